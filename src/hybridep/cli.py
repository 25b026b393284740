"""Command line: thin argument parsing that calls the modules and prints with rich."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hybridep.config import Config, ConfigError, load_config
from hybridep.units import fmt_bandwidth, fmt_bytes, fmt_time

console = Console() if sys.stdout.isatty() else Console(width=150)


def _fail(err: Exception, code: int, what: str = "error") -> int:
    """Print ``what: err`` (its text as text, not markup) and return the exit status ``code``."""
    console.print(f"[red]{what}:[/red] {escape(str(err))}", highlight=False)
    return code


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML configuration (default: the embedded default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a configuration key, e.g. --set moe.top_k=1 (repeatable)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH")


def _write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2))
        console.print(f"wrote {path}")


def _flops(cfg: Config) -> float | None:
    if cfg.workload is not None or cfg.compute.flops is not None:
        return cfg.compute.flops
    from hybridep.compute_probe import probe_flops

    flops = probe_flops()
    console.print(f"compute.flops not set: measured {flops / 1e9:.1f} GFLOP/s with a matmul probe")
    return flops


def cmd_plan(args: argparse.Namespace) -> int:
    from hybridep.planfile import plan_document, write_plan
    from hybridep.planner import plan

    cfg = load_config(args.config, args.overrides)
    flops = _flops(cfg)
    start = time.perf_counter()
    result = plan(cfg, flops)
    seconds = time.perf_counter() - start
    names = cfg.topology.levels
    console.print("topology: " + " x ".join(
        f"{lv.count} {lv.name} ({fmt_bandwidth(lv.bandwidth_bps)}, {fmt_time(lv.latency_s)})" for lv in names)
        + f" = {cfg.topology.world_size} devices; cost model: {cfg.cost_model}")
    table = Table(title="candidates (fastest first)")
    for col in ("strategy", "dense sync", "p", "iteration", "compute", "A2A", "AG (exposed)", "RS (exposed)",
                "grad sync (exposed)", "A2A/AG pairs", "bytes on " + names[0].name):
        table.add_column(col, justify="right")
    ranked = sorted(result.candidates, key=lambda c: c.prediction.iteration_s)
    shown = ranked[: args.top]
    if result.ep not in shown:
        shown.append(result.ep)
    for c in shown:
        pr = c.prediction
        mark = " *" if c is result.choice else (" (EP)" if c is result.ep else "")
        table.add_row(
            str(c.spec) + mark, c.dense_sync, f"{c.domains.p:.3f}",
            fmt_time(pr.iteration_s), fmt_time(pr.compute_s), fmt_time(pr.a2a_s),
            f"{fmt_time(pr.ag_s)} ({fmt_time(pr.exposed_ag_s)})", f"{fmt_time(pr.rs_s)} ({fmt_time(pr.exposed_rs_s)})",
            f"{fmt_time(pr.grad_sync_s)} ({fmt_time(pr.exposed_grad_sync_s)})",
            f"{c.domains.a2a_pairs()}/{c.domains.ag_pairs()}",
            fmt_bytes(pr.bytes_by_level[names[0].name]["total"]))
    console.print(table)
    if len(ranked) > len(shown):
        console.print(f"({len(ranked) - len(shown)} more candidates; --top N shows more)")
    _print_families(result, names[0].name)
    ch = result.choice
    cf = result.closed_form
    console.print(f"choice: {ch.spec}, dense sync {ch.dense_sync}, p = {ch.domains.p:.3f}, "
                  f"predicted {fmt_time(ch.prediction.iteration_s)} "
                  f"per iteration, {result.speedup_over_ep:.2f}x over EP "
                  f"({fmt_time(result.ep.prediction.iteration_s)})")
    snapped = f", snapped to domain size {cf['snapped_domain_size']}" if "snapped_domain_size" in cf else ""
    console.print(f"paper closed form ({'exact' if cf['exact'] else 'flattened to one level'}): "
                  f"p* = {cf['p']:.3f} (domain size {cf['domain_size']:.2f}){snapped}")
    console.print(f"scored {len(result.candidates)} candidates in {seconds:.2f} s")
    _write_json(args.json, {**result.to_dict(), "scored": len(result.candidates), "planning_s": seconds})
    if args.out:
        write_plan(args.out, plan_document(cfg, result))
        console.print(f"wrote plan {args.out}: {result.choice.spec} (run it with --plan {args.out})")
    return 0


def _print_families(result, top: str, per_family: int = 3) -> None:
    """The ``per_family`` fastest strategies of each family with the terms that decide between them:
    exchange seconds, exposed gather seconds, and the bytes crossing each level's ports."""
    levels = list(result.choice.prediction.bytes_by_level)
    table = Table(title=f"best {per_family} of each family")
    for col in ("family", "strategy", "dense sync", "iteration", "exchange", "exposed gather",
                *[f"bytes on {lv}" for lv in levels], f"dense-sync bytes on {top}"):
        table.add_column(col, justify="right")
    for family, cands in result.top_by_family(per_family).items():
        for c in cands:
            pr = c.prediction
            table.add_row(family, str(c.spec), c.dense_sync, fmt_time(pr.iteration_s), fmt_time(pr.a2a_s),
                          fmt_time(max(0.0, pr.exposed_ag_s)),
                          *[fmt_bytes(pr.bytes_by_level[lv]["total"]) for lv in levels],
                          fmt_bytes(pr.bytes_by_level[top].get("dense", 0.0)))
    console.print(table)


def _check_cores(world: int, args: argparse.Namespace, key: str) -> None:
    """Refuse to start ``world`` local ranks when they exceed this machine's cores by more than
    ``--max-ranks-per-core`` (every rank would crawl and collectives time out instead)."""
    import os

    cores = len(os.sched_getaffinity(0))
    if world > args.max_ranks_per_core * cores:
        raise ConfigError([(key, world, f"at most {args.max_ranks_per_core:g} ranks per core on this machine's "
                            f"{cores} cores ({int(args.max_ranks_per_core * cores)} ranks); raise "
                            "--max-ranks-per-core to start them anyway")])


def _plan_spec(args: argparse.Namespace, cfg: Config):
    """The strategy of ``--plan FILE`` checked against ``cfg``'s topology, or None without one."""
    if not getattr(args, "plan", None):
        return None
    from hybridep.planfile import planned_spec

    spec = planned_spec(args.plan, cfg.topology.as_topology())
    console.print(f"plan {args.plan}: {spec}")
    return spec


def _verify_family(spec) -> str:
    """The ``verify --strategies`` entry that runs a planned spec's exchange on its partition."""
    from hybridep.strategies import HierarchicalSpec, TedSpec

    ones = all(s == 1 for s in spec.domain_sizes)
    if isinstance(spec, TedSpec):
        return "ted"
    if isinstance(spec, HierarchicalSpec):
        return "hierarchical" if ones else "hybridep+hier"
    return "ep" if ones else "hybridep"


def cmd_verify(args: argparse.Namespace) -> int:
    import os

    from hybridep.launch import RankFailedError, init_from_torchrun, leave, run_local
    from hybridep.verify import STRATEGIES, default_topology, summarize, verify_worker

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad or not strategies:
        raise ConfigError([("--strategies", args.strategies, f"a comma-separated list of: {', '.join(STRATEGIES)}")])
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in ("float64", "float32") for d in dtypes):
        raise ConfigError([("--dtypes", args.dtypes, "a comma-separated list of: float64, float32")])
    in_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if in_torchrun else args.world_size
    if world is None or world < 1:
        raise ConfigError([("--world-size", world, "a positive number of processes (or run under torchrun)")])
    partitions, shortcut, tp = None, False, 2
    if args.config or args.overrides or args.plan:
        cfg = load_config(args.config, args.overrides)
        topo = cfg.topology.as_topology()
        if topo.world_size != world:
            raise ConfigError([("topology.levels", list(topo.counts),
                                f"counts whose product equals the world size {world}")])
        shortcut = cfg.moe is not None and cfg.moe.shortcut
        spec = _plan_spec(args, cfg)
        if spec is not None:  # exactly the planned partition (its exchange; compression is lossy)
            if spec.compressed:
                console.print(f"{spec} compresses its gathers (lossy): verifying its exact variant "
                              f"{spec.uncompressed()}")
            strategies, partitions = [_verify_family(spec)], [spec.domain_sizes]
            tp = getattr(spec, "tp", 2)  # TED's TP group size
    else:
        topo = default_topology(world)
    worker_args = (topo.names, topo.counts, strategies, dtypes, args.seed, args.timeout, partitions, shortcut, tp)
    if in_torchrun:
        import torch.distributed as dist

        rank, _ = init_from_torchrun(args.backend, args.timeout)
        results = verify_worker(rank, world, *worker_args)
        # leave together and tear the groups down before exiting (no gloo threads left at exit)
        dist.barrier()
        dist.destroy_process_group()
        if rank != 0:
            leave(0 if all(r["passed"] for r in results) else 1)
    else:
        _check_cores(world, args, "--world-size")
        console.print(f"verify: {world} local processes ({args.backend}), topology "
                      + " x ".join(f"{c} {n}" for n, c in zip(topo.names, topo.counts, strict=True)))
        try:
            results = run_local(verify_worker, world, worker_args, timeout_s=args.timeout,
                                backend=args.backend)[0]
        except RankFailedError as err:
            return _fail(err, 1, "verify failed")
    summary = summarize(results)
    table = Table(title="hybridep verify: distributed vs single-process reference")
    for col in ("strategy", "domain sizes", "dtype", "block", "prefetch", "top-k", "tokens per rank", "capacity",
                "max abs err", "max rel err", "result"):
        table.add_column(col)
    for r in results:
        sc = r["scenario"]
        strategy = r["strategy"] if r.get("tp", 1) == 1 else f"ted(tp={r['tp']}{',dtd' if r['dtd'] else ''})"
        table.add_row(strategy, "x".join(str(v) for v in r["domain_sizes"].values()), r["dtype"],
                      "shortcut" if r["shortcut"] else "standard",
                      "yes" if r["prefetch"] else "no", str(sc["top_k"]), str(sc["tokens"]),
                      str(sc["capacity_factor"] or "dropless") + (" skewed" if sc["skew"] else ""),
                      f"{r['max_abs_err']:.2e}", f"{r['max_rel_err']:.2e}",
                      "[green]pass[/green]" if r["passed"] else "[red]FAIL[/red]")
    console.print(table)
    n_pass = sum(r["passed"] for r in results)
    console.print(f"{n_pass}/{len(results)} cases passed")
    _write_json(args.json, summary)
    code = 0 if summary["all_passed"] else 1
    if in_torchrun:
        leave(code)
    return code


def _probe_levels(cfg: Config) -> list[float]:
    """Measured rank-0 point-to-point rate (bits/s) across each level of the testbed."""
    from hybridep.testbed.rate_probe import measure

    topo = cfg.topology.as_topology()
    rates = []
    for level, lv in enumerate(cfg.topology.levels):
        if lv.count == 1:
            rates.append(lv.bandwidth_bps)
            continue
        rates.append(measure(0, topo.ranks_per_worker(level), seconds=1.0))
    table = Table(title="testbed: measured point-to-point rate per level")
    for col in ("level", "configured", "measured", "ratio"):
        table.add_column(col, justify="right")
    for lv, r in zip(cfg.topology.levels, rates, strict=True):
        table.add_row(lv.name, fmt_bandwidth(lv.bandwidth_bps), fmt_bandwidth(r), f"{r / lv.bandwidth_bps:.2f}")
    console.print(table)
    return rates


LATENCY_NOTE = ("latency is not emulated (this kernel has no netem); the cost model accounts for the "
                "configured latencies instead")


def cmd_testbed(args: argparse.Namespace) -> int:
    from hybridep.testbed import netns

    if args.action == "down":
        try:
            removed = netns.down()
        except netns.TestbedError as err:
            return _fail(err, 2, "testbed down refused")
        console.print(f"removed {len(removed)} namespaces" + (f": {', '.join(removed)}" if removed else ""))
        return 0
    if args.action == "status":
        st = netns.state()
        names = netns.existing_namespaces()
        if st is None:
            console.print("testbed: down" + (f" (stray namespaces: {', '.join(names)})" if names else ""))
        else:
            console.print(f"testbed: up, levels {st['names']} x {st['counts']}, rates "
                          + ", ".join(fmt_bandwidth(r) for r in st["rates_bps"]) + f"; {len(names)} namespaces")
        console.print(LATENCY_NOTE)
        return 0
    cfg = load_config(args.config, args.overrides)
    try:
        netns.up(cfg.topology.as_topology(), tuple(lv.bandwidth_bps for lv in cfg.topology.levels))
    except netns.TestbedError as err:
        return _fail(err, 2, "testbed up refused")
    console.print(f"testbed up: {len(netns.existing_namespaces())} namespaces; {LATENCY_NOTE}")
    rates = _probe_levels(cfg)
    _write_json(args.json, {"levels": [lv.name for lv in cfg.topology.levels],
                            "configured_bps": [lv.bandwidth_bps for lv in cfg.topology.levels],
                            "measured_bps": rates})
    return 0


def _check_dense_sync(cfg: Config) -> None:
    """A PowerSGD rank (``dense_sync`` or ``planner.allow``) larger than the model's smallest dense
    gradient matrix: a configuration error naming the key, before any rank starts."""
    from hybridep.costmodel import workload_from_config
    from hybridep.strategies.dense_sync import check_rank

    shapes = workload_from_config(cfg, flops=1.0).dense_shapes
    keyed = [("dense_sync", cfg.dense_sync)] + [(f"planner.allow.{i}", a) for i, a in enumerate(cfg.planner.allow)]
    for key, value in keyed:
        try:
            check_rank(value, shapes)
        except ValueError as err:
            raise ConfigError([(key, value, str(err))]) from None


def _with_dense_sync(cfg: Config, document: dict | None, planned) -> Config:
    """``cfg`` with ``dense_sync: auto`` resolved: the plan file's mode, else the planner's choice."""
    if cfg.dense_sync != "auto":
        return cfg
    from hybridep.planfile import resolved_dense_sync

    mode = resolved_dense_sync(cfg, document) if document is not None else planned.choice.dense_sync
    console.print(f"dense sync: {mode} (auto)")
    return cfg.model_copy(update={"dense_sync": mode})


def cmd_bench(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from hybridep import bench
    from hybridep.calibration import CalibrationError
    from hybridep.launch import RankFailedError
    from hybridep.planner import plan
    from hybridep.testbed.netns import TestbedError

    overrides = [*args.overrides, *([f"bench.candidates={args.candidates}"] if args.candidates is not None else [])]
    cfg = load_config(args.config, overrides)
    steps = args.steps or cfg.bench.steps
    if steps < 2:
        raise ConfigError([("--steps", steps, "at least 2")])
    try:
        bench.lm_config(cfg)
    except bench.BenchError as err:
        return _fail(err, 2, "error")
    _check_cores(cfg.topology.world_size, args, "topology.levels")
    _check_dense_sync(cfg)
    planned_spec = _plan_spec(args, cfg)
    planned = plan(cfg, _flops(cfg))
    choice = str(planned_spec if planned_spec is not None else planned.choice.spec)
    predicted = fmt_time(planned.choice.prediction.iteration_s)
    console.print(f"planner's choice: {planned.choice.spec}, dense sync {planned.choice.dense_sync} (predicted "
                  f"{predicted}, {planned.speedup_over_ep:.2f}x over EP)"
                  + (f"; running the plan's {choice}" if planned_spec else ""))
    from hybridep.planfile import read_plan

    cfg = _with_dense_sync(cfg, read_plan(args.plan) if planned_spec is not None else None, planned)
    peers, notes = bench.available_peers(cfg)
    for n in notes:
        console.print(f"[yellow]note:[/yellow] {n}")
    out = Path(args.out) if args.out else bench.default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with bench.testbed(cfg, args.testbed, args.testbed_is_up, args.keep_testbed) as why_unshaped:
            shaped = why_unshaped is None
            if shaped:
                console.print(f"testbed up; {LATENCY_NOTE}")
            elif args.testbed != "off":
                console.print(f"[yellow]testbed unavailable:[/yellow] {why_unshaped}. Running the unshaped "
                              "comparison on loopback instead (no WAN emulation; predictions omitted).",
                              highlight=False)
            rates = _probe_levels(cfg) if shaped else None
            spec = bench.bench_spec(cfg, planned, peers, steps, shaped,
                                    rates or [lv.bandwidth_bps for lv in cfg.topology.levels],
                                    trace=bool(args.trace), planned_spec=planned_spec)
            with Progress(TextColumn("{task.description}"), BarColumn(),
                          TextColumn("{task.completed}/{task.total} runs"), TimeElapsedColumn(),
                          console=console) as progress:
                task = progress.add_task("bench", total=len(spec["runs"]))

                def on_line(line: str) -> None:
                    if line.startswith("[calibrate]"):
                        progress.console.print(line, highlight=False, markup=False)
                    if line.startswith("[bench]"):
                        progress.advance(task)
                        progress.console.print(line, highlight=False, markup=False)

                raw = bench.launch_ranks(cfg, spec, out, shaped, on_line)
    except TestbedError as err:
        return _fail(err, 2, "error")
    except RankFailedError as err:
        return _fail(err, 1, "bench failed")
    results, calibration = raw["results"], raw["calibration"]
    try:
        report = bench.analyse(cfg, results, rates, choice, calibration, from_plan=planned_spec is not None)
    except CalibrationError as err:
        return _fail(err, 1, "error")
    report["calibration"] = calibration
    report.update({"config": bench.config_for_report(cfg), "shaped": shaped, "probed_rates_bps": rates,
                   "notes": notes, "steps": steps, "plan": args.plan})
    _print_bench(report)
    plot_path = Path(args.plot) if args.plot else out / "bench.png"
    bench.plot(report, plot_path)
    console.print(f"plot: {plot_path}; logs: {out / 'logs'}")
    if args.trace:
        Path(args.trace).parent.mkdir(parents=True, exist_ok=True)
        Path(args.trace).write_text(json.dumps(bench.chrome_trace(results)))
        console.print(f"wrote {args.trace} (open in chrome://tracing or ui.perfetto.dev)")
    _write_json(args.json, report)
    return 0


def _print_bench(report: dict) -> None:
    table = Table(title="hybridep bench" + ("" if report["shaped"] else " (unshaped: loopback)"))
    for col in ("strategy", "median", "p10-p90", "compute / a2a / ag / rs / other", "cross-DC bytes/iter",
                "link util.", "predicted", "final loss", "vs EP"):
        table.add_column(col, justify="right")
    for name, v in report["strategies"].items():
        bd = v["breakdown_s"]
        parts = " / ".join(f"{bd.get(k, 0.0):.3f}" for k in ("compute", "a2a", "ag", "rs", "other")) if bd else "-"
        if bd and "comm" in bd:
            parts = f"{bd['compute']:.3f} / comm {bd['comm']:.3f} / {bd['other']:.3f}"
        mark = " *" if name == report["planner_choice"] else ""
        table.add_row(name + mark, fmt_time(v["median_iter_s"]),
                      f"{fmt_time(v['p10_iter_s'])}-{fmt_time(v['p90_iter_s'])}", parts,
                      fmt_bytes(v["cross_dc_bytes"]) if v["cross_dc_bytes"] is not None else "-",
                      f"{v['link_utilisation']:.0%}" if v["link_utilisation"] is not None else "-",
                      fmt_time(v["predicted_iter_s"]) if v["predicted_iter_s"] is not None else "-",
                      f"{v['final_loss']:.3f}", f"{v['speedup_vs_ep']:.2f}x" if v["speedup_vs_ep"] else "-")
    console.print(table)
    how = "calibrated" if report["shaped"] else "from the configuration; unshaped run"
    console.print(f"planner's choice ({how}): {report['planner_choice']} (from the configuration alone: "
                  f"{report['planner_choice_config']}); fastest measured: {report['fastest_measured']} "
                  f"(choice / fastest = {report['choice_vs_fastest']:.3f})")
    if report["median_model_error"] is not None:
        console.print(f"cost model vs measurement: median |error| {report['median_model_error']:.1%}")


def _calibration_table(title: str, rows: list[dict], repeated: bool = False) -> None:
    """Simulated (and cost-model) vs measured iteration time per strategy."""
    table = Table(title=title)
    cols = ["strategy", "measured", "simulated", "error", "cost model", "error"]
    if repeated:
        cols[1:1] = ["config", "runs", "measured min-max"]
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        cells = [r["strategy"], fmt_time(r["measured_s"]), fmt_time(r["simulated_s"]), f"{r['sim_error']:+.1%}",
                 fmt_time(r["model_s"]), f"{r['model_error']:+.1%}"]
        if repeated:
            cells[1:1] = [str(r["config"]), str(r["runs"]),
                          f"{fmt_time(r['measured_min_s'])}-{fmt_time(r['measured_max_s'])}"]
        table.add_row(*cells)
    console.print(table)


def cmd_simulate(args: argparse.Namespace) -> int:
    from hybridep.config import config_to_dict, load_config_data
    from hybridep.sim import study

    if args.calibrate:
        rep = study.calibrate_runs(args.calibrate)
        for run in rep.get("runs", [rep]):
            _calibration_table(f"simulated vs measured ({run['bench_json']})", run["strategies"])
        if "repeated" in rep:
            _calibration_table(f"repeated runs ({len(rep['runs'])} results): median simulated vs median measured",
                               rep["repeated"], repeated=True)
        if rep["median_abs_sim_error"] is not None:
            console.print(f"simulator: median |error| {rep['median_abs_sim_error']:.1%}, "
                          f"max {rep['max_abs_sim_error']:.1%}" + (" (over the repeated runs' medians)"
                                                                    if "repeated" in rep else ""))
        _write_json(args.json, rep)
        return 0
    sweeps = study.parse_sweeps(args.sweep)
    configs = study.sweep_configs(load_config_data(args.config, args.overrides), sweeps)
    points: list[dict] = []
    first = None
    flops_cache: dict = {}
    for values, cfg in configs:
        if "f" not in flops_cache:
            flops_cache["f"] = _flops(cfg)
        planned = _plan_spec(args, cfg) if args.plan else None  # checked against every point's topology
        pts, sims = study.run_point(cfg, flops_cache["f"], strategies=[str(planned)] if planned else None)
        for p in pts:
            p["sweep"] = values
        points += pts
        first = first or (cfg, sims)
    names = [k for k, _ in sweeps]
    table = Table(title="hybridep simulate (one iteration)")
    for col in [*names, "strategy", "p", "simulated", "cost model", "lower bound", "vs EP (sim)",
                "vs EP (model)", "sim wall"]:
        table.add_column(col, justify="right")
    for p in points:
        shown = p["strategy"] if p["spec"] == p["strategy"] else f"{p['spec']}: {p['strategy']}"
        table.add_row(*(str(p["sweep"][k]) for k in names), shown, f"{p['p']:.3f}",
                      fmt_time(p["iteration_s"]), fmt_time(p["model_iteration_s"]), fmt_time(p["lower_bound_s"]),
                      f"{p['speedup_vs_ep']:.2f}x", f"{p['model_speedup_vs_ep']:.2f}x", f"{p['sim_wall_s']:.2f} s")
    console.print(table)
    cfg0, sims0 = first
    if args.trace:
        Path(args.trace).parent.mkdir(parents=True, exist_ok=True)
        Path(args.trace).write_text(json.dumps(study.chrome_trace(sims0, cfg0.topology.as_topology().names)))
        console.print(f"wrote {args.trace} (open in chrome://tracing or ui.perfetto.dev)")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        study.plot(points, names[0] if names else None, Path(args.plot))
        console.print(f"wrote {args.plot}")
    _write_json(args.json, {"points": points, "sweeps": {k: v for k, v in sweeps},
                            "config": config_to_dict(cfg0)})
    return 0


def _check_trainable(spec, cfg: Config, plan_path: str | None) -> None:
    """``train`` runs a plan's strategy on the configured model: TED is not trainable here yet (its
    TP groups share a batch and its DTensor shards have no checkpoint path); a plan for
    shortcut-connected blocks builds them (it needs a block before each MoE block), and a model
    configured shortcut-connected needs a plan made for it."""
    from hybridep.strategies import TedSpec

    if spec is None:
        return
    if isinstance(spec, TedSpec):
        raise ConfigError([("--plan", plan_path, f"{spec}: train under ted is not built (it runs in bench, verify "
                                                 "and simulate); allowed: a plan of ep, hybridep or hierarchical")])
    if cfg.moe.shortcut and not spec.shortcut:
        raise ConfigError([("moe.shortcut", True, f"the plan's {spec} is for standard MoE blocks; allowed: "
                            "false, or a plan made for this model")])
    if spec.shortcut and cfg.moe.blocks_before_moe < 1:
        raise ConfigError([("moe.blocks_before_moe", 0, f"the plan's {spec} is for shortcut-connected MoE "
                            "blocks, which need a block before each MoE block; allowed: >= 1")])


def cmd_train(args: argparse.Namespace) -> int:
    """Train the byte-level MoE language model under a plan (the planner's choice unless --plan)."""
    import os

    from hybridep.config import config_to_dict
    from hybridep.launch import RankFailedError, init_from_torchrun, leave, run_local
    from hybridep.planfile import make_plan
    from hybridep.trainer import global_batch_size, train

    cfg = load_config(args.config, args.overrides)
    if cfg.moe is None:
        raise ConfigError([("moe", None, "model dimensions (train runs the language model of moe)")])
    world = cfg.topology.world_size
    if global_batch_size(cfg) % world:
        raise ConfigError([("train.batch_size", global_batch_size(cfg), f"a multiple of the world size {world}")])
    if args.data and not Path(args.data).exists():
        raise ConfigError([("--data", args.data, "an existing text file or folder of text files")])
    if args.resume:
        from hybridep.checkpoint import CheckpointError, latest

        try:
            latest(args.resume)
        except CheckpointError as err:
            raise ConfigError([("--resume", args.resume, str(err))]) from None
    _check_dense_sync(cfg)
    spec = _plan_spec(args, cfg)
    _check_trainable(spec, cfg, args.plan)
    plan = make_plan(cfg, _flops(cfg))
    document = plan.document if spec is None else _with_strategy(plan.document, spec, args.plan)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(document, indent=2))
    worker_args = (config_to_dict(cfg), document, str(out), args.resume, args.data)
    in_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if in_torchrun:
        import torch.distributed as dist

        rank, _ = init_from_torchrun("nccl" if args.backend == "nccl" else "gloo", cfg.train.timeout_s)
        summary = train(rank, world, *worker_args)
        dist.barrier()  # leave together, the groups torn down (no gloo thread left at exit)
        dist.destroy_process_group()
        if rank != 0:
            leave(0)
    elif args.testbed == "on":
        _check_cores(world, args, "topology.levels")
        return _train_on_testbed(args, cfg, out)
    else:
        _check_cores(world, args, "topology.levels")
        console.print(f"train: {document['strategy']} on {world} local processes, {cfg.train.steps} steps; "
                      f"out {out}")
        try:
            summary = run_local(train, world, worker_args, timeout_s=30 * 86400.0,
                                collective_timeout_s=cfg.train.timeout_s)[0]
        except RankFailedError as err:
            return _fail(err, 1, "train failed")
    losses = summary["losses"]
    console.print(f"trained steps {summary['start_step']}..{summary['step']}: loss "
                  f"{losses[0] if losses else float('nan'):.4f} -> {losses[-1] if losses else float('nan'):.4f}; "
                  f"metrics {out / 'metrics.jsonl'}, checkpoints {out / 'checkpoints'}")
    _write_json(args.json, {"strategy": document["strategy"], "out": str(out), **summary})
    if in_torchrun:
        leave(0)
    return 0


def _train_on_testbed(args: argparse.Namespace, cfg: Config, out: Path) -> int:
    """``train --testbed on``: the same command once per rank inside the emulated WAN's namespaces
    (each rank sees RANK, WORLD_SIZE, MASTER_ADDR as under torchrun), on the plan written to OUT."""
    from hybridep import bench
    from hybridep.launch import RankFailedError
    from hybridep.testbed.launcher import launch
    from hybridep.testbed.netns import TestbedError

    argv = [sys.executable, "-m", "hybridep.cli", "train", "--out", str(out), "--plan", str(out / "plan.json")]
    argv += ["--config", args.config] if args.config else []
    argv += [x for o in args.overrides for x in ("--set", o)]
    argv += (["--data", args.data] if args.data else []) + (["--resume", args.resume] if args.resume else [])
    try:
        with bench.testbed(cfg, "on"):
            console.print(f"train on the testbed: {cfg.topology.world_size} ranks in their namespaces; {LATENCY_NOTE}")
            launch(argv, cfg.topology.world_size, out / "logs", True, 30 * 86400.0, _echo_progress)
    except TestbedError as err:
        return _fail(err, 2, "error")
    except RankFailedError as err:
        return _fail(err, 1, "train failed")
    _write_json(args.json, {"strategy": json.loads((out / "plan.json").read_text())["strategy"], "out": str(out)})
    return 0


def _echo_progress(line: str) -> None:
    """Rank 0's progress lines, as the ranks print them."""
    if line.startswith(("[train]", "trained")):
        console.print(line, highlight=False, markup=False)


def _with_strategy(document: dict, spec, plan_path: str) -> dict:
    """The plan document with ``spec`` as its strategy and the plan file's dense-sync mode (a --plan
    file's choices over the planner's)."""
    from hybridep.planfile import read_plan

    mode = read_plan(plan_path).get("dense_sync", "ring")
    return {**document, "strategy": str(spec), "spec": spec.to_dict(), "dense_sync": mode}


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from hybridep.checkpoint import CheckpointError, inspect

    try:
        info = inspect(args.path)
    except CheckpointError as err:
        raise ConfigError([("DIR", args.path, str(err))]) from None
    table = Table(title=f"checkpoint {info['checkpoint']}")
    for col in ("tensor", "global shape"):
        table.add_column(col)
    for name, shape in info["tensors"].items():
        table.add_row(name, "x".join(str(x) for x in shape) or "scalar")
    console.print(table)
    console.print(f"step {info.get('step')}, strategy {info.get('strategy')}, saved by {info.get('world_size')} "
                  f"ranks, {fmt_bytes(info['bytes'])}")
    _write_json(args.json, info)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="choose per-level expert-domain sizes with the cost model")
    _add_config_args(p)
    p.add_argument("--top", type=int, default=12, help="candidates to show (default 12)")
    p.add_argument("--out", metavar="PLAN", help="write the plan file (the chosen strategy) to PLAN")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("verify", help="check every strategy against the single-process reference")
    _add_config_args(p)
    p.add_argument("--plan", metavar="PLAN", help="run exactly the strategy of a plan file (hybridep plan --out)")
    p.add_argument("--world-size", type=int, default=4, help="local processes to start (default 4)")
    p.add_argument("--max-ranks-per-core", type=float, default=4.0, metavar="F",
                   help="refuse to start more than F local ranks per core (default 4)")
    p.add_argument("--strategies", default="ep,hybridep",
                   help="comma-separated: ep, hybridep, hierarchical, hybridep+hier, ted")
    p.add_argument("--dtypes", default="float64,float32", help="comma-separated: float64, float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a stalled run fails")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("testbed", help="emulated multi-DC network: up | down | status")
    p.add_argument("action", choices=["up", "down", "status"])
    _add_config_args(p)
    p.set_defaults(func=cmd_testbed)

    p = sub.add_parser("bench", help="train every strategy and the peer side by side on the testbed")
    _add_config_args(p)
    p.add_argument("--plan", metavar="PLAN", help="run exactly the strategy of a plan file (hybridep plan --out)")
    p.add_argument("--steps", type=int, help="training steps per strategy (default: bench.steps)")
    p.add_argument("--candidates", type=int, metavar="N",
                   help="run the planner's choice and its best N candidates of every family, instead of every "
                        "domain size and variant (bench.candidates)")
    p.add_argument("--max-ranks-per-core", type=float, default=4.0, metavar="F",
                   help="refuse to start more than F local ranks per core (default 4)")
    p.add_argument("--testbed", choices=["auto", "on", "off"], default="auto",
                   help="auto: shape when root, else run unshaped; on: require it; off: loopback")
    p.add_argument("--testbed-is-up", action="store_true", help="reuse a testbed already up for this topology")
    p.add_argument("--keep-testbed", action="store_true", help="leave the testbed up afterwards")
    p.add_argument("--out", metavar="DIR", help="folder for spec, logs, results, plot (default: a new temp folder)")
    p.add_argument("--plot", metavar="PATH", help="PNG plot path (default: OUT/bench.png)")
    p.add_argument("--trace", metavar="PATH",
                   help="Chrome/Perfetto trace of every rank's timed steps per strategy (measured)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("simulate", help="flow-level simulation of one iteration per strategy, with sweeps")
    _add_config_args(p)
    p.add_argument("--plan", metavar="PLAN", help="run exactly the strategy of a plan file (hybridep plan --out)")
    p.add_argument("--sweep", action="append", default=[], metavar="NAME=V1,V2",
                   help="sweep dcs, bandwidth, latency or any config key (repeatable: cartesian product)")
    p.add_argument("--trace", metavar="PATH", help="Chrome/Perfetto trace of the first point's iteration")
    p.add_argument("--plot", metavar="PATH", help="PNG: speedup over EP against the first swept variable")
    p.add_argument("--calibrate", metavar="BENCH_JSON", nargs="+",
                   help="compare with hybridep bench --json results (several: also over the repeated runs)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("train", help="train the byte-level MoE language model under a plan, with checkpoints")
    _add_config_args(p)
    p.add_argument("--plan", metavar="PLAN", help="run exactly the strategy of a plan file (default: plan now)")
    p.add_argument("--data", metavar="PATH", help="a text file or a folder of them (default: the shipped corpus)")
    p.add_argument("--out", metavar="DIR", default="train-out", help="metrics, plan, checkpoints (default train-out)")
    p.add_argument("--resume", metavar="DIR", help="continue from the newest complete checkpoint in DIR")
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"], help="under torchrun")
    p.add_argument("--testbed", choices=["off", "on"], default="off",
                   help="on: run the ranks in the emulated WAN's namespaces (root)")
    p.add_argument("--max-ranks-per-core", type=float, default=4.0, metavar="F",
                   help="refuse to start more than F local ranks per core (default 4)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("checkpoint", help="inspect a checkpoint: hybridep checkpoint inspect DIR")
    p.add_argument("action", choices=["inspect"])
    p.add_argument("path", metavar="DIR")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH")
    p.set_defaults(func=cmd_checkpoint)
    return parser


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived: unwinds the command so that its ``finally`` blocks stop the ranks
    and tear down what it brought up (a BaseException, so no ``except Exception`` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop_on_signal(signum: int, frame) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal must not cut the teardown short
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signum)


def main(argv: list[str] | None = None) -> int:
    """Run one command; exit status 0, 1 (the run failed), 2 (bad input), 128 + signal when stopped
    by SIGTERM (143) or SIGINT (130) -- after stopping every rank and tearing down its testbed."""
    args = build_parser().parse_args(argv)
    handlers = {sig: signal.signal(sig, _stop_on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return args.func(args)
    except ConfigError as err:
        return _fail(err, 2)
    except Stopped as stop:
        name = signal.Signals(stop.signum).name
        console.print(f"hybridep {args.command}: stopped by {name}; its ranks are stopped and what it brought up "
                      "is taken down", highlight=False)
        return 128 + stop.signum
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
