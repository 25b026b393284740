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

import contextlib
import dataclasses
import importlib.util
import json
import math
import sys
import tempfile
from collections.abc import Collection, Iterator
from dataclasses import asdict
from pathlib import Path

from hybridep import trace
from hybridep.calibration import COMPUTE_ONLY, PEERS, calibrated_config, calibrated_model, measured_workload
from hybridep.config import Config, config_to_dict
from hybridep.costmodel import Network, evaluate
from hybridep.lm.model import LMConfig
from hybridep.planner import PlanResult, plan
from hybridep.strategies import HierarchicalSpec, HybridEPSpec, StrategyError, TedSpec, parse
from hybridep.strategies.ted import check_config
from hybridep.topology import Topology
from hybridep.trace import Span

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
                  experts=m.experts, top_k=m.top_k, expert_kind=m.expert_kind, dense_blocks=m.blocks_before_moe,
                  shortcut=m.shortcut)
    return lm, m.tokens_per_gpu // m.seq_len


def run_entry(spec: HybridEPSpec, cfg: Config, base: dict) -> dict:
    """The worker's description of one run of our strategy ``spec`` (named ``str(spec)``)."""
    entry = {"name": str(spec), "strategy": spec.runtime_kind(), "domain_sizes": list(spec.domain_sizes), **base}
    if spec.a2a_chunks is not None:
        entry["a2a_chunks"] = spec.a2a_chunks
    if spec.prefetch is not None:
        entry["prefetch"] = spec.prefetch
    if isinstance(spec, HierarchicalSpec):
        entry["dedup"] = list(spec.dedup_levels)
    if spec.shortcut:
        entry["shortcut"] = True
    if isinstance(spec, TedSpec):
        entry.update({"tp": spec.tp, "dtd": spec.dtd, "cac": spec.cac,
                      "a2a_chunks": spec.chunks(base.get("a2a_chunks", 1))})
    if spec.compressed:
        b = cfg.bench
        entry.update({"sr_ratio": spec.sr_ratio, "sr_basis": b.sr_basis, "sr_decode": b.sr_decode,
                      "sr_values": cfg.moe.sr_values, "sr_grads": spec.sr_grads})
    return entry


def bench_strategies(cfg: Config, planned: PlanResult, planned_spec: HybridEPSpec | None = None) -> list[HybridEPSpec]:
    """Our strategies a bench runs: EP, the planner's choice, every other domain size
    (``bench.all_domain_sizes``), the choice with SR at every ``bench.sr_ratios`` x ``bench.sr_grads``,
    (``bench.hierarchical``) the hierarchical exchange on EP's and the choice's partitions and
    (``bench.shortcut``) EP and the choice on shortcut-connected blocks -- or, with
    ``bench.candidates`` N, EP, the choice and the planner's best N of every family; with
    ``bench.strategies``: EP and exactly those; with a plan file (``planned_spec``): EP and exactly the
    planned strategy. Under ``moe.shortcut`` every one of
    them runs shortcut-connected."""
    topo = planned.choice.domains.topology
    m, b = cfg.moe, cfg.bench
    ep = HybridEPSpec.ep(topo, shortcut=m.shortcut)
    if planned_spec is not None:
        return [ep] if planned_spec == ep else [ep, planned_spec]
    if b.strategies is not None:  # exactly these (checked against the topology when loaded)
        named = [parse(name, topo) for name in b.strategies]
        return [ep] + [s for s in dict.fromkeys(named) if s != ep]
    choice = planned.choice.spec
    specs = [ep] + ([choice] if choice != ep else [])
    if b.candidates is not None:
        return specs + [s for s in best_of_families(planned, b.candidates) if s not in specs]
    if b.all_domain_sizes:
        others = [HybridEPSpec(topo, s, shortcut=m.shortcut) for s in topo.feasible_domain_sizes()]
        specs += [s for s in others if s not in specs]
    if not choice.is_ep:
        specs += [dataclasses.replace(choice, sr_ratio=ratio, sr_grads=grads)
                  for ratio in b.sr_ratios for grads in b.sr_grads]
    if b.hierarchical:  # the hierarchical exchange on EP's partition and the choice's, where it deduplicates
        for sizes in dict.fromkeys([ep.domain_sizes, choice.domain_sizes]):
            hier = HierarchicalSpec(topo, sizes, shortcut=m.shortcut)
            if set(hier.dedup_levels) & set(hier.domains().rail_levels()) and hier not in specs:
                specs.append(hier)
    if b.shortcut and not m.shortcut and m.blocks_before_moe >= 1:
        specs += [s for s in dict.fromkeys(dataclasses.replace(x, shortcut=True) for x in (ep, choice))]
    if b.ted:  # TP groups of 2 with and without duplicate-token dropping (and in the choice's domains)
        specs += [s for s in ted_specs(cfg, topo, choice) if s not in specs]
    return specs


def best_of_families(planned: PlanResult, n: int) -> list[HybridEPSpec]:
    """The planner's ``n`` fastest distinct strategies of every family, fastest first."""
    return [c.spec for top in planned.top_by_family(n).values() for c in top]


def ted_specs(cfg: Config, topo: Topology, choice: HybridEPSpec | None = None) -> list[TedSpec]:
    """``ted(tp=2,dtd)`` and ``ted(tp=2)`` when the innermost level has an even count and the model's
    dimensions divide by 2 (:func:`hybridep.strategies.ted.check_config`), else none; and, when the
    planner's ``choice`` has expert domains, ``ted(tp=2,dtd)`` inside the closest domains of EP
    positions (its sizes, the innermost one cut to what the positions there divide)."""
    if topo.counts[-1] % 2:
        return []
    try:
        check_config(cfg, 2)
    except StrategyError:
        return []
    ones = tuple(1 for _ in topo.counts)
    out = [TedSpec(topo, ones, tp=2, dtd=dtd, shortcut=cfg.moe.shortcut) for dtd in (True, False)]
    if choice is not None:
        sizes = (*choice.domain_sizes[:-1], math.gcd(choice.domain_sizes[-1], topo.counts[-1] // 2))
        if sizes != ones:
            out.append(TedSpec(topo, sizes, tp=2, dtd=True, shortcut=cfg.moe.shortcut))
    return out


def runs(cfg: Config, planned: PlanResult, peers: list[str], steps: int,
         planned_spec: HybridEPSpec | None = None) -> list[dict]:
    """The run list of the worker: compute-only first, then our strategies
    (:func:`bench_strategies`), then the peers (none with a plan file)."""
    b = cfg.bench
    base = {"steps": steps, "warmup": min(b.warmup, steps - 1), "lr": b.lr, "seed": b.seed, "prefetch": b.prefetch,
            "a2a_chunks": cfg.moe.a2a_chunks, "on_nonfinite": b.on_nonfinite, "dense_sync": cfg.dense_sync}
    # the compute-only reference calibrates every prediction: three times the timed steps
    reference = {**base, "steps": base["warmup"] + COMPUTE_ONLY_TIMED_FACTOR * (steps - base["warmup"])}
    out = [{"name": COMPUTE_ONLY, "strategy": "local", **reference}]
    out += [run_entry(spec, cfg, base) for spec in bench_strategies(cfg, planned, planned_spec)]
    for peer in peers if planned_spec is None else []:
        out.append({"name": peer, "strategy": peer, **base})
    return out


def our_spec(name: str, topology: Topology) -> HybridEPSpec | None:
    """The strategy of a bench result named ``name``; None for the compute-only reference and the peers."""
    if name == COMPUTE_ONLY or name in PEERS:
        return None
    spec = parse(name, topology)
    assert isinstance(spec, HybridEPSpec)
    return spec


def available_peers(cfg: Config) -> tuple[list[str], list[str]]:
    """Peers to run and notes on the ones that cannot run."""
    ok, notes = [], []
    for peer in cfg.bench.peers:
        if importlib.util.find_spec(peer) is None:
            notes.append(f"{peer} is not installed (pip install 'hybridep[peers]'); skipped")
        else:
            ok.append(peer)
    return ok, notes


def predictions(cfg: Config, model: tuple[Network, float] | None, results: dict,
                calibration: dict | None = None) -> dict[str, float | None]:
    """The calibrated model's iteration time per strategy we run, with each run's measured routing
    (peers are not modelled: their capacity padding is data-dependent)."""
    if model is None:
        return {}
    net, flops = model
    out: dict[str, float | None] = {}
    for name in results:
        spec = our_spec(name, net.topology)
        if spec is None:
            out[name] = results[name]["median_iter_s"] if name == COMPUTE_ONLY else None
            continue
        w = measured_workload(cfg, flops, spec, results[name], calibration)
        out[name] = evaluate(spec.schedule(w), net, cfg.terms).iteration_s
    return out


def calibrated_choice(cfg: Config, model: tuple[Network, float], ran: Collection[str],
                      calibration: dict | None = None) -> str | None:
    """The planner's choice on the calibrated ``model`` (network, FLOP/s) and the bench's measured
    compute costs (:func:`~hybridep.calibration.calibrated_config`) among the strategies that ran
    (its whole search space, the configured workload), or None when none of them is a candidate."""
    cands = [c for c in plan(calibrated_config(cfg, calibration), model[1], model[0]).candidates
             if str(c.spec) in ran]
    return str(min(cands, key=lambda c: c.prediction.iteration_s).spec) if cands else None


def analyse(cfg: Config, results: dict, rates_bps: list[float] | None, config_choice: str,
            calibration: dict | None = None, from_plan: bool = False) -> dict:
    """Per-strategy figures for the report and JSON.

    ``planner_choice`` is the calibrated planner's choice among the strategies that ran when the run
    was shaped, else the choice from the configuration alone (``planner_choice_config``); with
    ``from_plan`` it is the plan file's strategy (``config_choice``), the one that ran.
    """
    model = calibrated_model(cfg, results, rates_bps, calibration) if rates_bps is not None else None
    preds = predictions(cfg, model, results, calibration)
    planner_choice = config_choice
    if model is not None and not from_plan:
        planner_choice = calibrated_choice(cfg, model, results, calibration) or config_choice
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
        spec = our_spec(name, cfg.topology.as_topology())
        overlapped = spec is not None and spec.gathers_across_top_level  # cross-DC traffic = gathers, hidden
        if cross is not None and comm and rates_bps is not None and name != COMPUTE_ONLY and not overlapped:
            util = cross / (n_uplinks * rate / 8 * comm)
        breakdown = None
        if compute is not None and name != COMPUTE_ONLY:
            parts = {"compute": compute, **(r["comm_s"] or {"comm": r["median_iter_s"] - compute})}
            parts["other"] = r["median_iter_s"] - sum(parts.values())
            breakdown = parts
        out[name] = {"median_iter_s": r["median_iter_s"], "p10_iter_s": r["p10_iter_s"], "p90_iter_s": r["p90_iter_s"],
                     "cross_dc_bytes": cross, "payload_bytes_by_level": r["payload_bytes_by_level"],
                     "dense_bytes_by_level": r.get("dense_bytes_by_level"),
                     "cross_dc_comm_s": comm if name != COMPUTE_ONLY else None,
                     "link_utilisation": util, "predicted_iter_s": preds.get(name), "final_loss": r["final_loss"],
                     "exposed_a2a_s_by_rank": r.get("a2a_s_by_rank"),
                     "param_bytes_rank0": r.get("optimizer_param_bytes"),
                     "losses": r["losses"], "breakdown_s": breakdown,
                     "expert_tokens": r.get("expert_tokens"), "a2a_pair_bytes": r.get("a2a_pair_bytes")}
    ep_t = out.get("ep", {}).get("median_iter_s")
    for v in out.values():
        v["speedup_vs_ep"] = ep_t / v["median_iter_s"] if ep_t else None
    topo = cfg.topology.as_topology()
    uncompressed = [n for n in out if (spec := our_spec(n, topo)) is not None and not spec.compressed]
    fastest = min(uncompressed, key=lambda n: out[n]["median_iter_s"])
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
               rates_bps: list[float], trace: bool = False, planned_spec: HybridEPSpec | None = None) -> dict:
    """The worker's input: model, runs, topology, rates; ``trace``: every run records its ranks'
    timelines (:func:`chrome_trace`); ``planned_spec``: the strategy of a plan file (see :func:`runs`)."""
    lm, batch_size = lm_config(cfg)
    run_list = runs(cfg, planned, peers, steps, planned_spec)
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


@contextlib.contextmanager
def testbed(cfg: Config, mode: str, reuse: bool = False, keep: bool = False) -> Iterator[str | None]:
    """Hold the emulated testbed for a bench's ranks while the block runs: ``mode`` ``auto`` (shape
    when possible), ``on`` (required) or ``off``; ``reuse``: keep a testbed already up for this
    topology; ``keep``: leave it up afterwards. Yields None when shaped, else why not (``off``, or
    the prerequisite that is missing under ``auto``). Raises TestbedError when ``on`` cannot be had."""
    from hybridep.testbed import netns

    if mode == "off":
        yield "--testbed off"
        return
    with contextlib.ExitStack() as held:
        try:
            netns.check_prerequisites()
            held.enter_context(netns.hold())
        except netns.TestbedError as err:
            if mode == "on":
                raise
            why: str | None = str(err)
        else:
            why = None
            st = netns.state()
            want = ([lv.name for lv in cfg.topology.levels], [lv.count for lv in cfg.topology.levels])
            if not (reuse and st and (st["names"], st["counts"]) == want):
                if not keep:  # registered first: a signal during up still takes down what it made
                    held.callback(netns.down)
                netns.up(cfg.topology.as_topology(), tuple(lv.bandwidth_bps for lv in cfg.topology.levels))
        yield why


def launch_ranks(cfg: Config, spec: dict, out: Path, shaped: bool, on_line) -> dict:
    """Write the worker's ``spec`` to OUT/spec.json, run one bench worker per rank (in the testbed's
    namespaces when ``shaped``), call ``on_line`` with each line rank 0 prints and return the
    worker's results.json ({"results", "calibration"}). Raises RankFailedError."""
    from hybridep.testbed.launcher import launch

    (out / "spec.json").write_text(json.dumps(spec, indent=1))
    argv = [sys.executable, "-m", "hybridep.bench_worker", str(out / "spec.json"), str(out)]
    launch(argv, cfg.topology.as_topology().world_size, out / "logs", shaped, cfg.bench.timeout_s, on_line)
    return json.loads((out / "results.json").read_text())


def default_out_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="hybridep-bench-"))


def config_for_report(cfg: Config) -> dict:
    return json.loads(json.dumps(config_to_dict(cfg)))
