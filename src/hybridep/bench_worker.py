"""One rank of ``hybridep bench``: ``python -m hybridep.bench_worker SPEC.json OUT_DIR``.

Started by the launcher with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (and, on the testbed,
GLOO_SOCKET_IFNAME) in its environment, like torchrun does. Runs the compute-only reference and
then every strategy of the spec in turn; rank 0 writes OUT_DIR/results.json.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from hybridep.compute_probe import measure_expert_weight_cost
from hybridep.lm.model import LMConfig
from hybridep.lm.train import RunSpec, run
from hybridep.parallel.comm import Communicator
from hybridep.topology import Domains, Topology


def calibrate_links(comm: Communicator, rates_bps: list[float], mib: float = 4.0, reps: int = 7,
                    shard_bytes: int | None = None) -> dict:
    """Measured efficiency of our all-to-all on each level's links: for level l, every group of
    siblings at level l runs one uniform all-to-all at once (one warm-up, then ``reps`` timed);
    efficiency = the cost model's time for it at the probed rates / the fastest measured time,
    capped at 1. The fastest, not the median: these times used to be bimodal -- at the probed
    rate, or ~170 ms later (3 of 7 reps in one run), which ended when our exchanges started posting
    their receives before their sends; now they agree within 5 % at the DC level. All times are
    reported (``seconds_by_level``).

    The same for the expert all-gather (``gather_efficiency_by_level``): for level l, every group
    of siblings at level l gathers a shard of ``mib / count`` MiB per rank at once, as the first
    stage of a domain spanning that level does.

    And the same gather *while every rank computes* (``busy_gather_seconds_by_level``), as the
    runtime's gathers and reduce-scatters run in training: each rank runs the gather as a background
    chain (shards of ``shard_bytes``, the bench model's experts of one rank and layer) and keeps
    multiplying matrices until it lands. ``gather_delay_s_by_level``: the median of those times less
    the idle gather's time for the same bytes -- on shared cores a transfer waits for its sender's
    and receiver's threads to be scheduled, a delay per transfer rather than a rate, which
    an idle probe does not see."""

    from hybridep.config import CostTerms
    from hybridep.costmodel import Network, Workload
    from hybridep.strategies.hybridep import predict

    topo = comm.topology
    off = CostTerms(backward=False, latency=False, expert_compute=False, grad_sync=False, overlap=False)
    net = Network(topo, tuple(r / 8 for r in rates_bps), (0.0,) * topo.num_levels)

    def timed(op) -> list[float]:
        """Seconds of ``reps`` calls of ``op`` on all ranks at once, each until every rank is done."""
        return timed_together(lambda: (op(), dist.barrier()), reps)

    efficiency, seconds, gather_eff, busy_delay, busy_seconds = [], [], [], [], []
    for level, count in enumerate(topo.counts):
        if count == 1:
            efficiency.append(1.0)
            gather_eff.append(1.0)
            if shard_bytes:
                busy_delay.append(0.0)
                busy_seconds.append([])
            seconds.append([])
            continue
        gdom = Domains(topo, tuple(count if i == level else 1 for i in range(topo.num_levels)))
        groups = gdom.stage_groups(level)
        comm.create_groups(groups)
        group = next(g for g in groups if comm.rank in g)
        shard = torch.zeros(int(mib * 2**20 / 4) // count)
        gathered = torch.empty(count * shard.numel())
        gtimes = timed(functools.partial(comm.all_gather, gathered, shard, group, "calibrate"))
        gw = Workload(dispatch_bytes=0.0, expert_bytes=float(shard.numel() * 4), pre_expert_s=0.0)
        gather_eff.append(min(1.0, predict(gdom, gw, net, off).ag_phase_s / min(gtimes)))
        if shard_bytes:
            small = torch.zeros(max(1, shard_bytes // 4))
            small_out = torch.empty(count * small.numel())
            btimes = timed(functools.partial(_while_computing, comm, group, functools.partial(
                comm.all_gather, small_out, small, group, "calibrate")))
            bw = Workload(dispatch_bytes=0.0, expert_bytes=float(small.numel() * 4), pre_expert_s=0.0)
            idle = predict(gdom, bw, net, off).ag_phase_s / gather_eff[-1]
            busy_delay.append(max(0.0, statistics.median(btimes) - idle))
            busy_seconds.append(btimes)
        sizes = tuple(1 if i == level else c for i, c in enumerate(topo.counts))
        dom = Domains(topo, sizes)
        rail = dom.rail_groups()[dom.offset_index(comm.rank)]
        comm.create_groups(dom.rail_groups())
        rows = max(count, int(mib * 2**20 / 4 / 256) // count * count)
        inp = torch.zeros(rows, 256)
        out = torch.empty_like(inp)
        split = [rows // count] * count
        times = timed(functools.partial(comm.all_to_all, out, inp, split, split, rail, "calibrate"))
        w = Workload(dispatch_bytes=float(inp.numel() * 4), expert_bytes=0.0, pre_expert_s=0.0)
        ideal = predict(dom, w, net, off).a2a_phase_s
        efficiency.append(min(1.0, ideal / min(times)))
        seconds.append(times)
    comm.traffic.reset()
    out = {"efficiency_by_level": efficiency, "seconds_by_level": seconds, "gather_efficiency_by_level": gather_eff}
    if shard_bytes:
        out.update(gather_delay_s_by_level=busy_delay, busy_gather_seconds_by_level=busy_seconds)
    return out


def measure_message_s(comm: Communicator, messages: int = 64, reps: int = 7) -> float:
    """Seconds a rank's communication engine spends per message it sends or receives (LogGP's o,
    ``topology.message_overhead``): all ranks exchange tiny (4-byte) messages with every other rank
    at once, 1 and ``messages`` per peer (tagged, all posted before any is waited for), ``reps``
    times each, alternating; o = the extra time of the fastest repetition over the extra messages
    each rank sends and receives (scheduling noise on shared cores only adds time), median over
    ranks."""
    import time

    world = list(range(comm.world_size))
    peers = [r for r in world if r != comm.rank]
    if not peers:
        return 0.0
    comm.create_groups([world])

    def exchange(k: int) -> float:
        recv = [(torch.empty(1), p, t) for p in peers for t in range(k)]
        send = [(torch.zeros(1), p, t) for p in peers for t in range(k)]
        dist.barrier()
        start = time.perf_counter()
        comm.post(recv, send, world, "calibrate").wait()
        return time.perf_counter() - start

    exchange(messages)  # warm-up
    times = [(exchange(1), exchange(messages)) for _ in range(reps)]
    one, many = min(t[0] for t in times), min(t[1] for t in times)
    comm.traffic.reset()
    return ranks_median(max(0.0, many - one) / (2 * len(peers) * (messages - 1)))


def measure_rendezvous_s(comm: Communicator, calls: int = 8, reps: int = 7) -> float:
    """Seconds one blocking exchange costs beyond its bytes when the ranks compute between such
    calls (``topology.rendezvous``), as the inner stages of a pipelined staged exchange do: every
    rank runs ``calls`` pieces of compute (~ms each) with a tiny all-to-all among its innermost
    siblings (the ranks differing only at the innermost level with more than one) after each, and
    the same pieces without; the extra time of the median repetition over ``calls`` (pieces with
    and without alternate, ``reps`` each after one warm-up), median over ranks. 0 with one rank."""
    import time

    topo = comm.topology
    level = max((lv for lv, n in enumerate(topo.counts) if n > 1), default=None)
    if level is None:
        return 0.0
    sizes = tuple(n if lv == level else 1 for lv, n in enumerate(topo.counts))
    groups = Domains(topo, sizes).stage_groups(level)
    comm.create_groups(groups)
    group = next(g for g in groups if comm.rank in g)
    a, b = torch.randn(256, 1024), torch.randn(1024, 256)
    inp, out = torch.zeros(len(group)), torch.empty(len(group))
    split = [1] * len(group)

    def pieces(rendezvous: bool) -> float:
        dist.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            (a @ b).sum().item()
            if rendezvous:
                comm.all_to_all(out, inp, split, split, group, "calibrate")
        return time.perf_counter() - start

    pieces(True), pieces(False)
    pairs = [(pieces(True), pieces(False)) for _ in range(reps)]
    comm.traffic.reset()
    extra = statistics.median(w - wo for w, wo in pairs) / calls
    return ranks_median(max(0.0, extra))


def measure_overlap_efficiency(comm: Communicator, cfg: LMConfig, copies: int, reps: int = 7) -> dict:
    """How much of a token exchange this host's ranks hide behind their expert compute (recorded in
    the calibration, not used by the cost model, which credits overlaps whole): every rank times,
    all at once, an all-to-all of rows among all ranks alone (T), the expert computation of one
    MoE layer of the bench model -- ``copies`` token copies over its experts, forward + backward --
    alone (X), and both at once: the all-to-all issued, the experts computed, the all-to-all waited
    for (B). The all-to-all's rows are scaled so that T is about X. Efficiency = (T + X - B) /
    min(T, X), clipped to [0, 1]: 1 when B = max(T, X), 0 when B = T + X; per rank from the
    medians of ``reps`` timed repetitions, then the median over ranks. Returns the efficiency and
    rank 0's medians (seconds)."""

    from hybridep.moe.experts import GroupedExperts

    world = list(range(comm.world_size))
    comm.create_groups([world])
    n = len(world)
    experts = GroupedExperts(experts_per_rank(cfg, n), cfg.hidden, cfg.ffn, cfg.expert_kind)
    x = torch.randn(copies, cfg.hidden, requires_grad=True)
    m = experts.num_experts
    counts = [copies // m + (1 if i < copies % m else 0) for i in range(m)]

    def compute() -> None:
        experts.compute(experts.weights(), x, counts).square().sum().backward()

    def exchange(rows: int):
        inp, out = torch.zeros(rows * n, cfg.hidden), torch.empty(rows * n, cfg.hidden)
        return lambda: comm.all_to_all_start(out, inp, [rows] * n, [rows] * n, world, "calibrate")

    def median_s(op) -> float:
        return statistics.median(timed_together(op, reps))

    def both(start) -> None:
        work = start()
        compute()
        comm.wait(work, "calibrate", world)

    rows = max(1, copies // n)
    probe = exchange(rows)
    t1 = ranks_median(median_s(lambda: comm.wait(probe(), "calibrate", world)))
    x1 = ranks_median(median_s(compute))
    rows = max(1, round(rows * x1 / max(t1, 1e-6)))  # the same on every rank: medians over ranks
    x_s = median_s(compute)
    start = exchange(rows)
    t_s = median_s(lambda: comm.wait(start(), "calibrate", world))
    b_s = median_s(lambda: both(start))
    comm.traffic.reset()
    hidden = (t_s + x_s - b_s) / max(min(t_s, x_s), 1e-9)
    return {"overlap_efficiency": ranks_median(min(1.0, max(0.0, hidden))),
            "overlap_seconds": {"transfer": t_s, "compute": x_s, "both": b_s, "rows_per_peer": rows}}


def timed_together(op, reps: int) -> list[float]:
    """This rank's seconds of ``reps`` calls of ``op``, each started on all ranks at once (a barrier
    before it), after one untimed warm-up call."""
    import time

    times = []
    for _ in range(reps + 1):
        dist.barrier()
        start = time.perf_counter()
        op()
        times.append(time.perf_counter() - start)
    return times[1:]


def _while_computing(comm: Communicator, group: list[int], op) -> None:
    """Run ``op`` (a blocking collective in ``group``) as a background chain and multiply
    matrices on this thread until it has landed."""
    future = comm.in_background(op)
    a = torch.randn(128, 128)
    while not future.done():
        a = torch.tanh(a @ a)
    comm.result(future, "calibrate", group)


def ranks_median(value: float) -> float:
    """The median of ``value`` over all ranks (every rank gets it): a microbenchmark that all ranks
    run at once on shared cores is noisy on any one rank."""
    values = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(values, torch.tensor([value], dtype=torch.float64))
    return float(torch.cat(values).median())


def expert_params(cfg: LMConfig) -> int:
    """Parameters of one expert of the bench model."""
    from hybridep.moe.experts import WEIGHT_NAMES

    return len(WEIGHT_NAMES[cfg.expert_kind]) * cfg.hidden * cfg.ffn


def experts_per_rank(cfg: LMConfig, world: int) -> int:
    """Experts each rank of the bench model owns (at least one)."""
    return max(1, cfg.experts // world)


def codec_time(cfg: LMConfig, run: dict, world: int) -> float:
    """Measured seconds to SR-encode or -decode one expert of the bench model (all ranks at once)."""
    from hybridep.migration.sr import VALUE_DTYPES, SRCodec, measure_codec_expert_s

    codec = SRCodec(run["sr_ratio"], expert_params(cfg), torch.float32, VALUE_DTYPES[run.get("sr_values", "float16")])
    dist.barrier()
    return measure_codec_expert_s(codec, experts_per_rank(cfg, world))


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
    calibration = {}
    if spec.get("shaped"):
        calibration = calibrate_links(comm, spec["rates_bps"],
                                      shard_bytes=expert_params(cfg) * 4 * experts_per_rank(cfg, topo.world_size))
        if rank == 0:
            eff = ", ".join(f"{n} {e:.2f}" for n, e in zip(topo.names, calibration["efficiency_by_level"], strict=True))
            print(f"[calibrate] all-to-all link efficiency per level: {eff}", flush=True)
            busy = ", ".join(f"{n} {e * 1e3:.1f} ms" for n, e in
                             zip(topo.names, calibration["gather_delay_s_by_level"], strict=True))
            print(f"[calibrate] expert-gather delay per stage while computing, per level: {busy}", flush=True)
    calibration["message_s"] = measure_message_s(comm)
    if rank == 0:
        print(f"[calibrate] per-message overhead: {calibration['message_s'] * 1e6:.1f} us", flush=True)
    calibration["rendezvous_s"] = measure_rendezvous_s(comm)
    if rank == 0:
        print(f"[calibrate] blocking exchange between computations: {calibration['rendezvous_s'] * 1e3:.2f} ms",
              flush=True)
    copies = spec["runs"][0]["batch_size"] * cfg.seq_len * cfg.top_k  # one MoE layer's token copies per rank
    calibration.update(measure_overlap_efficiency(comm, cfg, copies))
    if rank == 0:
        print(f"[calibrate] exchange hidden behind compute: {calibration['overlap_efficiency']:.2f}", flush=True)
    calibration["processors"] = len(os.sched_getaffinity(0))  # the cores this host's ranks share
    dist.barrier()  # the expert computation's cost per expert held (same tokens over 2 vs 8 experts)
    rate, forward_share, backward_factor = measure_expert_weight_cost(cfg.hidden, cfg.ffn, cfg.expert_kind, copies,
                                                                      repeats=9, sync=dist.barrier)
    calibration["expert_weight_s_per_byte"] = ranks_median(rate)
    calibration["expert_weight_forward_share"] = ranks_median(forward_share)
    calibration["expert_backward_factor"] = ranks_median(backward_factor)
    sr_runs = [r for r in spec["runs"] if r.get("sr_ratio")]
    if sr_runs:  # every rank at once, as in training: the contended encode/decode time
        calibration["codec_expert_s"] = ranks_median(codec_time(cfg, sr_runs[0], topo.world_size))
    for run_spec in spec["runs"]:
        run_spec = dict(run_spec)
        name = run_spec.pop("name")
        dedup = run_spec.get("dedup")
        rs = RunSpec(**{**run_spec, "domain_sizes": tuple(run_spec.get("domain_sizes", ())),
                        "dedup": tuple(dedup) if dedup is not None else None})
        local = rs.strategy == "local"
        res = run(cfg, rs, None if local else comm, None if local else counter)
        results[name] = res.summary()
        if local:  # the compute-only run's own (contended) optimizer step, all parameters on every rank
            calibration["optimizer_s_per_byte"] = ranks_median(res.optimizer_s) / res.optimizer_param_bytes
        dist.barrier()
        if rank == 0:
            print(f"[bench] {name}: median {results[name]['median_iter_s']:.3f} s/iter, "
                  f"final loss {results[name]['final_loss']:.3f}", flush=True)
    if rank == 0:
        Path(out_dir, "results.json").write_text(json.dumps({"results": results, "calibration": calibration},
                                                            indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from hybridep.launch import leave

    leave(main(sys.argv[1], sys.argv[2]))
