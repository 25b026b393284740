"""One rank of ``hybridep bench``: ``python -m hybridep.bench_worker SPEC.json OUT_DIR``.

Started by the launcher with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (and, on the testbed,
GLOO_SOCKET_IFNAME) in its environment, like torchrun does. Runs the compute-only reference and
then every strategy of the spec in turn; rank 0 writes OUT_DIR/results.json.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from hybridep.lm.model import LMConfig
from hybridep.lm.train import RunSpec, run
from hybridep.parallel.comm import Communicator
from hybridep.topology import Topology


def main(spec_path: str, out_dir: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    timeout = timedelta(seconds=spec["collective_timeout_s"])
    dist.init_process_group("gloo", timeout=timeout)
    rank = dist.get_rank()
    topo = Topology(tuple(spec["names"]), tuple(spec["counts"]))
    comm = Communicator(topo, spec["collective_timeout_s"])
    cfg = LMConfig(**spec["lm"])
    counter = None
    if spec.get("shaped") and rank == 0:
        from hybridep.testbed import netns

        def counter() -> int:
            return netns.uplink_bytes(topo, tuple(spec["rates_bps"]), 0)
    elif spec.get("shaped"):
        def counter() -> int:
            return 0
    results = {}
    for run_spec in spec["runs"]:
        run_spec = dict(run_spec)
        name = run_spec.pop("name")
        rs = RunSpec(**{**run_spec, "domain_sizes": tuple(run_spec.get("domain_sizes", ()))})
        local = rs.strategy == "local"
        res = run(cfg, rs, None if local else comm, None if local else counter)
        results[name] = res.summary()
        dist.barrier()
        if rank == 0:
            print(f"[bench] {name}: median {results[name]['median_iter_s']:.3f} s/iter, "
                  f"final loss {results[name]['final_loss']:.3f}", flush=True)
    if rank == 0:
        Path(out_dir, "results.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
