"""Activation memory and all-to-all calls of TED with communication-aware activation checkpointing.

The benchmark's language model (the embedded default with one dense block before each MoE block) on
4 local processes (2 x 2, loopback), ``ted(tp=2,dtd)`` three ways: no checkpointing, its MoE blocks
checkpointed (recomputed in backward, every collective again), and CAC (recomputed, the collectives'
outputs replayed). Per way and rank: the growth of the process's resident memory over the forward
pass (the activations autograd keeps, plus what CAC keeps; allocations of 64 KiB and more are mapped
one by one, so resident memory follows the live tensors), the all-to-all calls per iteration and
the iteration time; also ``ep`` for its parameter + optimizer bytes per rank.

    python benchmarks/ted_memory.py [--steps 4] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from hybridep.launch import run_local

WAYS = {"no checkpointing": (False, False), "checkpointing": (False, True), "CAC": (True, True)}


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(rank: int, world: int, steps: int) -> dict:
    import torch

    from hybridep.bench import lm_config
    from hybridep.config import load_config
    from hybridep.lm.data import batch, load_corpus
    from hybridep.lm.model import MoELM
    from hybridep.parallel.comm import Communicator
    from hybridep.parallel.strategy import data_parallel, parallelize
    from hybridep.parallel.ted import parallelize_ted, replica_ranks
    from hybridep.topology import Domains, Topology

    lm, size = lm_config(load_config(None, ["moe.blocks_before_moe=1"]))
    comm = Communicator(Topology(("dc", "gpu"), (2, 2)), 600)
    corpus = load_corpus()
    out = {}
    for way, (cac, checkpoint) in [*WAYS.items(), ("ep", (None, None))]:
        torch.manual_seed(0)
        model = MoELM(lm)
        if way == "ep":
            parallelize(model, comm, Domains(comm.topology, (1, 1)))
            module = data_parallel(model, comm)
        else:
            parallelize_ted(model, comm, 2, True, cac=cac, checkpoint=checkpoint)
            module = data_parallel(model, comm, replicas=replica_ranks(comm, 2))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        grown, calls, times = [], [], []
        for step in range(steps):
            x, y = batch(corpus, size, lm.seq_len, 0, step, rank if way == "ep" else rank // 2)
            comm.traffic.reset()
            start, before = time.perf_counter(), _resident_bytes()
            loss = module(x, y)
            grown.append(_resident_bytes() - before)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
            calls.append(comm.traffic.calls_by_op.get("a2a", 0))
        local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
        params = sum(p.numel() * p.element_size() for p in local)
        out[way] = {"forward_resident_growth_bytes": statistics.median(grown[1:]), "a2a_calls": calls[-1],
                    "iteration_s": statistics.median(times[1:]), "param_bytes": params,
                    "param_and_adam_bytes": 3 * params}
    return out


def main() -> None:
    # every allocation of 64 KiB or more gets its own mapping, returned when freed, so that resident
    # memory follows the live tensors (glibc's default raises the threshold as the process runs)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json")
    args = ap.parse_args()
    per_rank = run_local(worker, 4, (args.steps,), timeout_s=1800)
    for way in [*WAYS, "ep"]:
        rows = [r[way] for r in per_rank]
        print(f"{way:>17}: forward grows resident memory by "
              + ", ".join(f"{r['forward_resident_growth_bytes'] / 2**20:.1f}" for r in rows)
              + f" MiB (ranks 0-3); all-to-all calls {rows[0]['a2a_calls']}; iteration "
              f"{statistics.median(r['iteration_s'] for r in rows):.3f} s; parameters + Adam state "
              f"{rows[0]['param_and_adam_bytes'] / 2**20:.2f} MiB on rank 0")
    if args.json:
        Path(args.json).write_text(json.dumps({"per_rank": per_rank, "steps": args.steps}, indent=1))


if __name__ == "__main__":
    main()
