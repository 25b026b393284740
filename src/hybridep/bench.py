"""``hybridep bench``: every strategy and the DeepSpeed-MoE peer, side by side, in one run.

1. plan with the cost model (the planner's choice is marked);
2. bring the emulated multi-DC testbed up (root), or say why not and run unshaped on loopback;
3. launch one process per rank and train the same byte-level MoE language model from the same
   seed under: a compute-only reference (no communication), ``ep``, ``hybridep`` at the planner's
   choice and at every other feasible domain size, and ``deepspeed`` (``deepspeed.moe.layer.MoE``,
   dropless) when installed (``pip install hybridep[peers]``);
4. report per strategy: iteration time (median, p10, p90 after warm-up), breakdown, cross-DC bytes
   (counted by the testbed's htb classes: an independent measurement, also for the peer), link
   utilisation, the cost model's prediction (compute calibrated by the compute-only run, links by
   the testbed probe) and the final loss; a rich table, a PNG plot and JSON.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

from hybridep import trace
from hybridep.config import Config, config_to_dict
from hybridep.costmodel import Network, Workload, all_experts_fixed_s, predict, workload_from_config
from hybridep.lm.model import LMConfig
from hybridep.plan import parse_name, strategy_name
from hybridep.planner import PlanResult, plan_workload
from hybridep.topology import Domains
from hybridep.trace import Span

COMPUTE_ONLY = "compute-only"
COMPUTE_ONLY_TIMED_FACTOR = 3
"""The compute-only run times this many times the strategies' timed steps (its median sets the
compute rate of every prediction, so it gets more samples)."""


class BenchError(RuntimeError):
    """The benchmark cannot run as configured; the message says why."""


def lm_config(cfg: Config) -> tuple[LMConfig, int]:
    """Language-model dimensions and per-rank batch size from the ``moe`` section."""
    m = cfg.moe
    if m is None:
        raise BenchError("bench needs model dimensions: a `moe` section, not a direct `workload`")
    if m.tokens_per_gpu < m.seq_len:
        raise BenchError(f"moe.tokens_per_gpu ({m.tokens_per_gpu}) must be at least moe.seq_len ({m.seq_len})")
    if m.hidden % cfg.bench.heads:
        raise BenchError(f"moe.hidden ({m.hidden}) must be divisible by bench.heads ({cfg.bench.heads})")
    lm = LMConfig(seq_len=m.seq_len, hidden=m.hidden, heads=cfg.bench.heads, layers=m.layers, ffn=m.ffn,
                  experts=m.experts, top_k=m.top_k, expert_kind=m.expert_kind, dense_blocks=m.blocks_before_moe)
    return lm, m.tokens_per_gpu // m.seq_len


def runs(cfg: Config, planned: PlanResult, peers: list[str], steps: int) -> list[dict]:
    """The run list of the worker: compute-only first, then EP, the choice, the rest, the peers."""
    topo = planned.choice.domains.topology
    b = cfg.bench
    base = {"steps": steps, "warmup": min(b.warmup, steps - 1), "lr": b.lr, "seed": b.seed, "prefetch": b.prefetch,
            "a2a_chunks": cfg.moe.a2a_chunks}
    choice = planned.choice.domains.sizes
    sizes = [tuple(1 for _ in topo.counts)]
    if choice not in sizes:
        sizes.append(choice)
    if b.all_domain_sizes:
        sizes += [s for s in topo.feasible_domain_sizes() if s not in sizes]
    # the compute-only reference calibrates every prediction: three times the timed steps
    reference = {**base, "steps": base["warmup"] + COMPUTE_ONLY_TIMED_FACTOR * (steps - base["warmup"])}
    out = [{"name": COMPUTE_ONLY, "strategy": "local", **reference}]
    for s in sizes:
        out.append({"name": strategy_name(topo, s), "strategy": "ep" if all(x == 1 for x in s) else "hybridep",
                    "domain_sizes": list(s), **base})
    if any(x > 1 for x in choice):
        for ratio in b.sr_ratios:
            for grads in b.sr_grads:
                out.append({"name": strategy_name(topo, choice, ratio, grads), "strategy": "hybridep+sr",
                            "domain_sizes": list(choice), "sr_ratio": ratio, "sr_basis": b.sr_basis,
                            "sr_decode": b.sr_decode, "sr_values": cfg.moe.sr_values, "sr_grads": grads, **base})
    for peer in peers:
        out.append({"name": peer, "strategy": peer, **base})
    return out


def available_peers(cfg: Config) -> tuple[list[str], list[str]]:
    """Peers to run and notes on the ones that cannot run."""
    ok, notes = [], []
    for peer in cfg.bench.peers:
        if importlib.util.find_spec(peer) is None:
            notes.append(f"{peer} is not installed (pip install 'hybridep[peers]'); skipped")
        else:
            ok.append(peer)
    return ok, notes


def calibrated_model(cfg: Config, results: dict, rates_bps: list[float],
                     calibration: dict | None = None) -> tuple[Network, float] | None:
    """The cost model's network and compute rate calibrated by microbenchmarks only (the bench's
    ``calibration``) -- compute by the compute-only run less what holding every expert costs its
    ranks (their optimizer step over all experts and the per-expert cost of the expert computation,
    both measured), each level's links by its probed rate times the measured all-to-all efficiency
    (the expert gather's measured efficiency relative to it, and its measured delay per stage
    while every rank computes), the measured per-message overhead, latency zero (what the testbed
    has; the configured latencies apply to the real WAN)."""
    if COMPUTE_ONLY not in results:
        return None
    cal = calibration or {}
    efficiency = cal.get("efficiency_by_level") or [1.0] * len(rates_bps)
    gather_efficiency = cal.get("gather_efficiency_by_level")
    # the testbed cannot emulate latency (no netem): the model of *this* run uses none
    net0 = Network.from_config(cfg)
    topo = net0.topology
    relative = None
    if gather_efficiency is not None:
        relative = tuple(g / e for g, e in zip(gather_efficiency, efficiency, strict=True))
    delay = cal.get("gather_delay_s_by_level")  # the gathers run while the ranks compute
    net = Network(topo, tuple(r / 8 * e for r, e in zip(rates_bps, efficiency, strict=True)),
                  (0.0,) * topo.num_levels, net0.dc_link_bytes_per_s, relative,
                  tuple(delay) if delay else None, message_s=cal.get("message_s") or 0.0)
    ep = Domains(topo, tuple(1 for _ in topo.counts))
    # the FLOP-proportional compute only (the fixed-cost terms are charged separately below)
    w = dataclasses.replace(workload_from_config(cfg, flops=1.0), optimizer_byte_s=0.0, expert_weight_byte_s=0.0,
                            codec_expert_s=0.0)
    flops = predict(ep, w, net, cfg.terms).compute_s
    fixed = all_experts_fixed_s(dataclasses.replace(
        w, optimizer_byte_s=measured_rate(cfg, cal, "optimizer_byte_s"),
        expert_weight_byte_s=measured_rate(cfg, cal, "expert_weight_byte_s")), topo.world_size)
    compute = results[COMPUTE_ONLY]["median_iter_s"] - fixed
    if compute <= 0:
        raise BenchError(f"the compute-only run ({results[COMPUTE_ONLY]['median_iter_s']:.3f} s) is not longer "
                         f"than its measured optimizer step and held-expert cost ({fixed:.3f} s)")
    return net, flops / compute


def measured_rate(cfg: Config, calibration: dict | None, key: str) -> float:
    """``compute.KEY`` when configured, else the bench's measurement ``calibration[KEY]``, else 0
    (``optimizer_byte_s``, ``expert_weight_byte_s``, ``codec_expert_s``)."""
    configured = getattr(cfg.compute, key)
    if configured is not None:
        return configured
    return (calibration or {}).get(key) or 0.0


def measured_workload(cfg: Config, flops: float, sr_ratio: float | None, result: dict,
                      calibration: dict | None = None, sr_grads: str = "dense") -> Workload:
    """The workload of a measured run: dimensions from the configuration, routing as measured --
    each MoE layer's expert-load histogram (``expert_tokens``) when the run recorded one -- and from
    the bench's ``calibration``: the processors its ranks shared (the host's cores, when fewer than
    ranks) and the measured SR encode/decode seconds per expert. ``sr_grads``: how the run returned
    its gradients (``dense`` or ``topk``)."""
    w = workload_from_config(cfg, flops, sr_ratio, sr_grads)
    cal = calibration or {}
    processors = cal.get("processors")
    if processors is not None and processors < cfg.topology.world_size:
        w = dataclasses.replace(w, processors=processors)
    w = dataclasses.replace(w, codec_expert_s=measured_rate(cfg, cal, "codec_expert_s"),
                            optimizer_byte_s=measured_rate(cfg, cal, "optimizer_byte_s"),
                            expert_weight_byte_s=measured_rate(cfg, cal, "expert_weight_byte_s"),
                            expert_recompute=sr_ratio is not None and cfg.bench.sr_decode == "expert")
    tokens = result.get("expert_tokens")
    if not tokens or any(sum(row) <= 0 for row in tokens):
        return w
    loads = tuple(tuple(x / sum(row) for x in row) for row in tokens)
    return dataclasses.replace(w, layer_loads=loads, experts=len(loads[0]))


def predictions(cfg: Config, model: tuple[Network, float] | None, results: dict,
                calibration: dict | None = None) -> dict[str, float | None]:
    """The calibrated model's iteration time per strategy we run, with each run's measured routing
    (peers are not modelled: their capacity padding is data-dependent)."""
    if model is None:
        return {}
    net, flops = model
    out: dict[str, float | None] = {}
    for name in results:
        sizes, ratio, grads = parse_name(name)
        if sizes is None:
            out[name] = results[name]["median_iter_s"] if name == COMPUTE_ONLY else None
            continue
        sizes = sizes or tuple(1 for _ in net.topology.counts)
        w = measured_workload(cfg, flops, ratio, results[name], calibration, grads)
        out[name] = predict(Domains(net.topology, sizes), w, net, cfg.terms).iteration_s
    return out


def analyse(cfg: Config, results: dict, rates_bps: list[float] | None, config_choice: str,
            calibration: dict | None = None) -> dict:
    """Per-strategy figures for the report and JSON.

    ``planner_choice`` is the calibrated planner's choice when the run was shaped, else the choice
    from the configuration alone (``planner_choice_config``).
    """
    model = calibrated_model(cfg, results, rates_bps, calibration) if rates_bps is not None else None
    preds = predictions(cfg, model, results, calibration)
    planner_choice = config_choice
    if model is not None:
        cal = plan_workload(model[0], workload_from_config(cfg, flops=model[1]), cfg.terms)
        planner_choice = strategy_name(cal.choice.domains.topology, cal.choice.domains.sizes)
    compute = results.get(COMPUTE_ONLY, {}).get("median_iter_s")
    top = cfg.topology.levels[0]
    n_uplinks = top.count
    rate = (rates_bps or [top.bandwidth_bps])[0]
    out = {}
    for name, r in results.items():
        # time in cross-DC communication: while any rank is in an exchange that crosses DCs (the
        # ranks' own mean would overlap one rail's transfer with another's compute)
        comm = r.get("outer_busy_s") or (sum(r["comm_s"].values()) if r["comm_s"] else None)
        if comm is None and compute is not None and name != COMPUTE_ONLY:
            comm = max(r["median_iter_s"] - compute, 1e-9)
        cross = r["uplink_bytes"]
        if cross is None:
            cross = r["payload_bytes_by_level"].get(top.name)
        util = None
        sizes = parse_name(name)[0]
        overlapped = bool(sizes) and sizes[0] > 1  # cross-DC traffic = gathers hidden behind compute
        if cross is not None and comm and rates_bps is not None and name != COMPUTE_ONLY and not overlapped:
            util = cross / (n_uplinks * rate / 8 * comm)
        breakdown = None
        if compute is not None and name != COMPUTE_ONLY:
            parts = {"compute": compute, **(r["comm_s"] or {"comm": r["median_iter_s"] - compute})}
            parts["other"] = r["median_iter_s"] - sum(parts.values())
            breakdown = parts
        out[name] = {"median_iter_s": r["median_iter_s"], "p10_iter_s": r["p10_iter_s"], "p90_iter_s": r["p90_iter_s"],
                     "cross_dc_bytes": cross, "payload_bytes_by_level": r["payload_bytes_by_level"],
                     "cross_dc_comm_s": comm if name != COMPUTE_ONLY else None,
                     "link_utilisation": util, "predicted_iter_s": preds.get(name), "final_loss": r["final_loss"],
                     "losses": r["losses"], "breakdown_s": breakdown,
                     "expert_tokens": r.get("expert_tokens"), "a2a_pair_bytes": r.get("a2a_pair_bytes")}
    ep_t = out.get("ep", {}).get("median_iter_s")
    for v in out.values():
        v["speedup_vs_ep"] = ep_t / v["median_iter_s"] if ep_t else None
    fastest = min((n for n in out if parse_name(n)[0] is not None and parse_name(n)[1] is None),
                  key=lambda n: out[n]["median_iter_s"])
    ratio = [abs(v["predicted_iter_s"] / v["median_iter_s"] - 1) for n, v in out.items()
             if v["predicted_iter_s"] is not None and n != COMPUTE_ONLY]
    return {"strategies": out, "planner_choice": planner_choice, "planner_choice_config": config_choice,
            "fastest_measured": fastest,
            "choice_vs_fastest": out[planner_choice]["median_iter_s"] / out[fastest]["median_iter_s"],
            "median_model_error": sorted(ratio)[len(ratio) // 2] if ratio else None}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = list(report["strategies"].items())
    names = [n for n, _ in items]
    med = [v["median_iter_s"] for _, v in items]
    lo = [v["median_iter_s"] - v["p10_iter_s"] for _, v in items]
    hi = [v["p90_iter_s"] - v["median_iter_s"] for _, v in items]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 4.5))
    colors = ["#4c72b0" if n != report["planner_choice"] else "#dd8452" for n in names]
    ax.bar(range(len(names)), med, yerr=[lo, hi], color=colors, capsize=4, label="measured (median, p10-p90)")
    pred = [(i, v["predicted_iter_s"]) for i, (_, v) in enumerate(items) if v["predicted_iter_s"] is not None]
    if pred:
        ax.scatter([i for i, _ in pred], [p for _, p in pred], color="black", marker="_", s=600, zorder=3,
                   label="cost model")
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right")
    ax.set_ylabel("seconds per iteration")
    ax.set_title("hybridep bench (orange: planner's choice)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_spec(cfg: Config, planned: PlanResult, peers: list[str], steps: int, shaped: bool,
               rates_bps: list[float], trace: bool = False) -> dict:
    """The worker's input: model, runs, topology, rates; ``trace``: every run records its ranks'
    timelines (:func:`chrome_trace`)."""
    lm, batch_size = lm_config(cfg)
    run_list = runs(cfg, planned, peers, steps)
    for r in run_list:
        r["batch_size"] = batch_size
        r["trace"] = trace
    return {"names": [lv.name for lv in cfg.topology.levels], "counts": [lv.count for lv in cfg.topology.levels],
            "lm": asdict(lm), "runs": run_list, "shaped": shaped, "rates_bps": rates_bps,
            "collective_timeout_s": min(cfg.bench.timeout_s, 600.0)}


def chrome_trace(results: dict) -> dict:
    """The measured timelines of every run that recorded one, as Chrome/Perfetto trace-event JSON: one
    process per strategy, one thread per rank and track (``compute``, ``comm``, ``comm (background)``,
    ``grad sync``); times from the run's first recorded span."""
    processes = {}
    for name, r in results.items():
        ranks = r.get("trace")
        if not ranks:
            continue
        t0 = min((s[2] for spans in ranks for s in spans), default=0.0)
        processes[name] = [Span(f"rank {rank} {track}", op, start - t0, end - t0)
                           for rank, spans in enumerate(ranks) for track, op, start, end in spans]
        processes[name].sort(key=lambda s: (s.track, s.start_s))
    return trace.chrome_trace(processes, other={"source": "hybridep bench (measured)"})


def default_out_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="hybridep-bench-"))


def config_for_report(cfg: Config) -> dict:
    return json.loads(json.dumps(config_to_dict(cfg)))
