"""``hybridep simulate``: strategies, sweeps, the Chrome trace, the plot and the calibration.

Every point of a sweep is one validated configuration; for each strategy the simulator runs one
iteration (:mod:`hybridep.sim.iteration`) and the cost model gives its closed-form prediction
and lower bound next to it. Times in seconds, bandwidths in bits/s, bytes per iteration.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hybridep import trace
from hybridep.calibration import COMPUTE_ONLY, PEERS, calibrated_model, measured_workload
from hybridep.config import Config, ConfigError, _parse_scalar, config_from_dict
from hybridep.costmodel import Network, Prediction, Workload, evaluate, lower_bound
from hybridep.planner import plan_workload
from hybridep.sim.iteration import TRACKS, SimResult, run_schedule
from hybridep.strategies import StrategyError, StrategySpec, parse, parse_request

FOLD_AUTO_MAX_RANKS = 32
LOG_Y_SPAN = 10.0
"""The plot's speedup axis turns logarithmic when its values span more than this factor."""


@dataclass
class Strategy:
    """A resolved ``simulate.strategies`` entry: the text as written and the spec it names."""

    text: str
    spec: StrategySpec

    @property
    def name(self) -> str:
        return str(self.spec)


def resolve(text: str, cfg: Config, net: Network, flops: float | None) -> Strategy:
    """Turn one ``simulate.strategies`` entry into a spec: what it leaves open (the planner's choice,
    levels left out, a target p) is filled with the partition the cost model predicts fastest."""
    topo = net.topology
    try:
        request = parse_request(text, topo)
    except StrategyError as err:
        raise ConfigError([("simulate.strategies", text, str(err))]) from None
    template = request.template
    if template.compressed and template.sr_grads == "dense" and cfg.moe is not None:  # as configured
        request = dataclasses.replace(request, template=dataclasses.replace(template, sr_grads=cfg.moe.sr_grads))
    w = request.template.workload(cfg, flops)
    if request.planner:
        best = plan_workload(net, w, cfg.terms, hier=False).choice.domains.sizes  # HybridEP's partition
    else:
        best = min(request.candidates(),
                   key=lambda s: (evaluate(request.with_sizes(s).schedule(w), net, cfg.terms).iteration_s,
                                  math.prod(s)))
    return Strategy(text, request.with_sizes(best))


def fold_for(cfg: Config, w: Workload) -> bool:
    """Fold senders unless asked not to (or ``auto`` with skew on a small world)."""
    mode = cfg.simulate.fold
    if mode != "auto":
        return mode == "on"
    loads = [w.load_of_layer(lv) for lv in range(w.layers)]
    skewed = any(x is not None and max(x) - min(x) > 1e-12 for x in loads)
    return not (skewed and cfg.topology.world_size <= FOLD_AUTO_MAX_RANKS)


def run_point(cfg: Config, flops: float | None, net: Network | None = None,
              strategies: list[str] | None = None) -> tuple[list[dict], dict[str, SimResult]]:
    """Simulate every configured strategy (``strategies``, default ``simulate.strategies``) on one
    configuration, plain EP always among them; one JSON point per strategy."""
    net = net or Network.from_config(cfg)
    topo = net.topology
    strategies = [resolve(s, cfg, net, flops) for s in (strategies or cfg.simulate.strategies)]
    if not any(s.name == "ep" for s in strategies):
        strategies.insert(0, resolve("ep", cfg, net, flops))
    points, sims = [], {}
    for s in strategies:
        w = s.spec.workload(cfg, flops)
        dom = s.spec.domains()
        schedule = s.spec.schedule(w)
        t0 = time.perf_counter()
        if s.name not in sims:  # two specs may resolve to the same partition: simulate it once
            sims[s.name] = run_schedule(schedule, net, cfg.terms, fold_for(cfg, w))
        res = sims[s.name]
        wall = time.perf_counter() - t0
        pred = evaluate(schedule, net, cfg.terms)
        points.append({
            "dcs": topo.counts[0], "bandwidth_bps": net.port_bytes_per_s[0] * 8, "strategy": s.name,
            "spec": s.text, "domain_sizes": dict(zip(topo.names, dom.sizes, strict=True)), "p": dom.p,
            "iteration_s": res.iteration_s,
            "model_iteration_s": pred.iteration_s,
            "lower_bound_s": lower_bound(schedule, net, cfg.terms, pred),
            "world_size": topo.world_size, "sim_wall_s": wall, "flow_classes": res.classes,
            "bytes_by_level": res.bytes_by_level,
        })
    ep = next(p["iteration_s"] for p in points if p["strategy"] == "ep")
    for p in points:
        p["speedup_vs_ep"] = ep / p["iteration_s"] if p["iteration_s"] > 0 else math.inf
        p["model_speedup_vs_ep"] = (next(q["model_iteration_s"] for q in points if q["strategy"] == "ep")
                                    / p["model_iteration_s"]) if p["model_iteration_s"] > 0 else math.inf
    return points, sims


# ---------------------------------------------------------------------- sweeps
SWEEP_ALIASES = {"dcs": "topology.levels.0.count", "bandwidth": "topology.levels.0.bandwidth",
                 "latency": "topology.levels.0.latency"}


def parse_sweeps(items: list[str]) -> list[tuple[str, list]]:
    """``name=v1,v2,...`` -> (name, values); names: dcs, bandwidth, latency or any config key."""
    out = []
    for item in items:
        key, sep, vals = item.partition("=")
        values = [v for v in vals.split(",") if v.strip()]
        if not sep or not key or not values:
            raise ConfigError([("--sweep", item, "NAME=V1,V2,... (dcs, bandwidth, latency or a config key)")])
        out.append((key.strip(), [_parse_scalar(v.strip()) for v in values]))
    return out


MAX_SWEEP_POINTS = 1000
"""Most points one ``hybridep simulate`` run may sweep (the product of the ``--sweep`` lists)."""


def sweep_configs(data: dict, sweeps: list[tuple[str, list]]) -> Iterator[tuple[dict, Config]]:
    """One validated configuration per combination of swept values (cartesian product), made one
    at a time as the caller asks; more than :data:`MAX_SWEEP_POINTS` combinations are refused before
    any is made.

    ``dcs`` scales ``moe.experts`` with the world so that each device keeps its experts."""
    points = math.prod(len(v) for _, v in sweeps)
    if points > MAX_SWEEP_POINTS:
        shown = " x ".join(f"{len(v)} {k}" for k, v in sweeps)
        raise ConfigError([("--sweep", shown, f"at most {MAX_SWEEP_POINTS} points in all ({points} asked)")])
    base = config_from_dict(copy.deepcopy(data))
    if not sweeps:
        yield {}, base
        return
    for combo in itertools.product(*(v for _, v in sweeps)):
        d = copy.deepcopy(data)
        for (key, _), val in zip(sweeps, combo, strict=True):
            _set(d, SWEEP_ALIASES.get(key, key), val, key)
            if key == "dcs" and base.moe is not None:
                per_device = base.moe.experts // base.topology.world_size
                if isinstance(val, int) and val > 0:
                    d["moe"]["experts"] = per_device * val * (base.topology.world_size // base.topology.levels[0].count)
        where = " ".join(f"{k}={v}" for (k, _), v in zip(sweeps, combo, strict=True))
        try:
            cfg = config_from_dict(d)
        except ConfigError as err:
            raise ConfigError([(f"{key} (at --sweep {where})", val, allowed)
                               for key, val, allowed in err.problems]) from None
        yield dict(zip((k for k, _ in sweeps), combo, strict=True)), cfg


def _set(data: dict, path: str, value, shown: str) -> None:
    node = data
    parts = path.split(".")
    for part in parts[:-1]:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise ConfigError([("--sweep", shown, f"{path} does not name a configuration key")])
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError([("--sweep", shown, f"{path} does not name a configuration key")])
        node[int(last)] = value
    else:
        node[last] = value


# ---------------------------------------------------------------------- outputs
def chrome_trace(sims: dict[str, SimResult], names: tuple[str, ...]) -> dict:
    """Chrome/Perfetto trace (JSON object format): one process per strategy, one thread per stream."""
    return trace.chrome_trace({k: r.spans for k, r in sims.items()}, TRACKS,
                              {k: r.iteration_s for k, r in sims.items()}, {"levels": list(names)})


def plot(points: list[dict], var: str | None, path: Path) -> None:
    """Speedup over EP against the swept variable ``var`` (one line per strategy and value of any
    other swept variable), or bars without a sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    strategies = list(dict.fromkeys(p["spec"] for p in points if p["strategy"] != "ep"))
    if var is None:
        sub = [p for p in points if p["strategy"] != "ep"]
        ax.bar(range(len(sub)), [p["speedup_vs_ep"] for p in sub], color="#4c72b0", label="simulated")
        ax.scatter(range(len(sub)), [p["model_speedup_vs_ep"] for p in sub], color="black", marker="_", s=600,
                   zorder=3, label="cost model")
        ax.set_xticks(range(len(sub)), [p["strategy"] for p in sub], rotation=20, ha="right")
    else:
        others = [k for k in points[0]["sweep"] if k != var]

        def rest(p: dict) -> tuple:
            return tuple(p["sweep"][k] for k in others)

        for spec in strategies:
            for key in dict.fromkeys(rest(p) for p in points if p["spec"] == spec):
                sub = [p for p in points if p["spec"] == spec and rest(p) == key]
                label = spec + "".join(f", {k}={v}" for k, v in zip(others, key, strict=True))
                xs = [p["sweep"][var] for p in sub]
                (line,) = ax.plot(xs, [p["speedup_vs_ep"] for p in sub], marker="o", label=f"{label} (simulated)")
                ax.plot(xs, [p["model_speedup_vs_ep"] for p in sub], linestyle="--", alpha=0.6,
                        color=line.get_color(), label=f"{label} (cost model)")
        if all(isinstance(p["sweep"][var], (int, float)) for p in points) and var in ("dcs", "bandwidth"):
            ax.set_xscale("log")
        ax.set_xlabel(var)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    shown = [p[k] for p in points for k in ("speedup_vs_ep", "model_speedup_vs_ep") if 0 < p[k] < math.inf]
    if shown and max(shown) / min(shown) > LOG_Y_SPAN:
        ax.set_yscale("log")  # a 15x planner beside a 1.05x fixed domain: both stay readable
    ax.set_ylabel("speedup over EP")
    ax.set_title("hybridep simulate")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- calibration
def _read_bench(bench_json: str | Path) -> dict:
    """A ``hybridep bench --json`` result, or a :class:`ConfigError` naming what is wrong with it."""
    try:
        report = json.loads(Path(bench_json).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError([("--calibrate", str(bench_json), f"a readable bench JSON: {err}")]) from None
    for key in ("config", "strategies", "probed_rates_bps"):
        if key not in report:
            raise ConfigError([("--calibrate", str(bench_json), f"bench JSON lacks {key!r}")])
    return report


def _error_summary(rows: list[dict]) -> dict:
    """Median and largest |sim_error| of ``rows`` (None without rows)."""
    errs = sorted(abs(r["sim_error"]) for r in rows)
    return {"median_abs_sim_error": errs[len(errs) // 2] if errs else None,
            "max_abs_sim_error": errs[-1] if errs else None}


def calibrate(bench_json: str | Path, report: dict | None = None) -> dict:
    """Simulate the strategies of a ``hybridep bench --json`` result (``report``, read from
    ``bench_json`` unless given) on its calibrated network (probed link rates x measured all-to-all
    efficiency, compute rate of the compute-only run) and compare with the measured medians."""
    report = report if report is not None else _read_bench(bench_json)
    cfg = config_from_dict(report["config"])
    rates = report["probed_rates_bps"] or [lv.bandwidth_bps for lv in cfg.topology.levels]
    measured = {k: v for k, v in report["strategies"].items()}
    model = calibrated_model(cfg, measured, rates, report.get("calibration"))
    if model is None:
        raise ConfigError([("--calibrate", str(bench_json), f"needs the {COMPUTE_ONLY!r} run")])
    net, flops = model
    rows = []
    for name, m in measured.items():
        if name == COMPUTE_ONLY or name in PEERS:
            continue
        spec = parse(name, net.topology)
        w = measured_workload(cfg, flops, spec, m, report.get("calibration"))
        schedule = spec.schedule(w)
        sim = run_schedule(schedule, net, cfg.terms, fold_for(cfg, w)).iteration_s
        pred = evaluate(schedule, net, cfg.terms)
        model_s = pred.iteration_s
        rows.append({"strategy": name, "measured_s": m["median_iter_s"], "simulated_s": sim, "model_s": model_s,
                     "sim_error": sim / m["median_iter_s"] - 1, "model_error": model_s / m["median_iter_s"] - 1,
                     "model_exposed_a2a_s": exposed_exchange_s(pred)})
    return {"bench_json": str(bench_json), "flops": flops, "link_bytes_per_s": list(net.port_bytes_per_s),
            "strategies": rows, **_error_summary(rows)}


def exposed_exchange_s(pred: Prediction) -> float:
    """The seconds per iteration a prediction leaves to the token exchanges on the critical path:
    the iteration less the compute and the exposed gathers, reduce-scatters and dense sync (what a
    bench run reports per rank as ``exposed_a2a_s_by_rank``)."""
    return max(0.0, pred.iteration_s - pred.compute_s - max(0.0, pred.exposed_ag_s) - pred.exposed_rs_s
               - pred.exposed_grad_sync_s)


def calibrate_runs(bench_jsons: list[str | Path]) -> dict:
    """:func:`calibrate` for each result; with several, also per strategy over the repeated runs
    of one configuration (the same ``config`` apart from its ``bench`` section): the median
    measured time against the median simulated one. On a shared-core testbed a single run's median
    moves by more than the model's error between runs; repeats separate the two."""
    reports = [_read_bench(p) for p in bench_jsons]
    runs = [calibrate(p, r) for p, r in zip(bench_jsons, reports, strict=True)]
    if len(runs) == 1:
        return runs[0]
    config_ids: dict[str, int] = {}  # numbered in order of appearance
    groups: dict[tuple[int, str], list[dict]] = {}
    for path, report, run in zip(bench_jsons, reports, runs, strict=True):
        key = json.dumps({k: v for k, v in report["config"].items() if k != "bench"}, sort_keys=True)
        config = config_ids.setdefault(key, len(config_ids))
        for row in run["strategies"]:
            groups.setdefault((config, row["strategy"]), []).append({**row, "bench_json": str(path)})
    repeated = []
    for (group, name), rows in groups.items():
        measured = float(statistics.median([r["measured_s"] for r in rows]))
        simulated = float(statistics.median([r["simulated_s"] for r in rows]))
        model = float(statistics.median([r["model_s"] for r in rows]))
        repeated.append({"config": group, "strategy": name, "runs": len(rows),
                         "bench_jsons": [r["bench_json"] for r in rows],
                         "measured_s": measured, "measured_min_s": min(r["measured_s"] for r in rows),
                         "measured_max_s": max(r["measured_s"] for r in rows), "simulated_s": simulated,
                         "model_s": model, "sim_error": simulated / measured - 1, "model_error": model / measured - 1})
    return {"runs": runs, "repeated": repeated, **_error_summary(repeated)}
