"""Command line: thin argument parsing that calls the modules and prints with rich."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hybridep.config import Config, ConfigError, load_config
from hybridep.units import fmt_bandwidth, fmt_bytes, fmt_time

console = Console() if sys.stdout.isatty() else Console(width=150)


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
    from hybridep.probe import probe_flops

    flops = probe_flops()
    console.print(f"compute.flops not set: measured {flops / 1e9:.1f} GFLOP/s with a matmul probe")
    return flops


def cmd_plan(args: argparse.Namespace) -> int:
    from hybridep.planner import plan

    cfg = load_config(args.config, args.overrides)
    result = plan(cfg, _flops(cfg))
    names = cfg.topology.levels
    console.print("topology: " + " x ".join(
        f"{lv.count} {lv.name} ({fmt_bandwidth(lv.bandwidth_bps)}, {fmt_time(lv.latency_s)})" for lv in names)
        + f" = {cfg.topology.world_size} devices; cost model: {cfg.cost_model}")
    table = Table(title="HybridEP partitions (fastest first)")
    for col in ("domain sizes", "p", "iteration", "compute", "A2A", "AG (exposed)", "RS (exposed)",
                "A2A/AG pairs", "bytes on " + names[0].name):
        table.add_column(col, justify="right")
    ranked = sorted(result.candidates, key=lambda c: c.prediction.iteration_s)
    shown = ranked[: args.top]
    if result.ep not in shown:
        shown.append(result.ep)
    for c in shown:
        pr = c.prediction
        mark = " *" if c is result.choice else (" (EP)" if c is result.ep else "")
        table.add_row(
            "x".join(str(s) for s in c.domains.sizes) + mark, f"{c.domains.p:.3f}", fmt_time(pr.iteration_s),
            fmt_time(pr.compute_s), fmt_time(pr.a2a_s), f"{fmt_time(pr.ag_s)} ({fmt_time(pr.exposed_ag_s)})",
            f"{fmt_time(pr.rs_s)} ({fmt_time(pr.exposed_rs_s)})",
            f"{c.domains.a2a_pairs()}/{c.domains.ag_pairs()}",
            fmt_bytes(pr.bytes_by_level[names[0].name]["total"]))
    console.print(table)
    if len(ranked) > len(shown):
        console.print(f"({len(ranked) - len(shown)} more candidates; --top N shows more)")
    ch = result.choice
    cf = result.closed_form
    console.print(f"choice: domain sizes {dict(zip(ch.domains.topology.names, ch.domains.sizes, strict=True))}"
                  f", p = {ch.domains.p:.3f}, predicted {fmt_time(ch.prediction.iteration_s)} per iteration, "
                  f"{result.speedup_over_ep:.2f}x over EP ({fmt_time(result.ep.prediction.iteration_s)})")
    snapped = f", snapped to domain size {cf['snapped_domain_size']}" if "snapped_domain_size" in cf else ""
    console.print(f"paper closed form ({'exact' if cf['exact'] else 'flattened to one level'}): "
                  f"p* = {cf['p']:.3f} (domain size {cf['domain_size']:.2f}){snapped}")
    _write_json(args.json, result.to_dict())
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    import os

    from hybridep.launch import RankFailedError, init_from_torchrun, run_local
    from hybridep.topology import Topology
    from hybridep.verify import default_topology, summarize, verify_worker

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = [s for s in strategies if s not in ("ep", "hybridep")]
    if bad or not strategies:
        raise ConfigError([("--strategies", args.strategies, "a comma-separated list of: ep, hybridep")])
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in ("float64", "float32") for d in dtypes):
        raise ConfigError([("--dtypes", args.dtypes, "a comma-separated list of: float64, float32")])
    in_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if in_torchrun else args.world_size
    if world is None or world < 1:
        raise ConfigError([("--world-size", world, "a positive number of processes (or run under torchrun)")])
    if args.config or args.overrides:
        cfg = load_config(args.config, args.overrides)
        lv = cfg.topology.levels
        topo = Topology(tuple(x.name for x in lv), tuple(x.count for x in lv))
        if topo.world_size != world:
            raise ConfigError([("topology.levels", [x.count for x in lv],
                                f"counts whose product equals the world size {world}")])
    else:
        topo = default_topology(world)
    worker_args = (topo.names, topo.counts, strategies, dtypes, args.seed, args.timeout)
    if in_torchrun:
        rank, _ = init_from_torchrun(args.backend, args.timeout)
        results = verify_worker(rank, world, *worker_args)
        if rank != 0:
            return 0 if all(r["passed"] for r in results) else 1
    else:
        console.print(f"verify: {world} local processes ({args.backend}), topology "
                      + " x ".join(f"{c} {n}" for n, c in zip(topo.names, topo.counts, strict=True)))
        try:
            results = run_local(verify_worker, world, worker_args, timeout_s=args.timeout,
                                backend=args.backend)[0]
        except RankFailedError as err:
            console.print(f"[red]verify failed:[/red] {err}", highlight=False)
            return 1
    summary = summarize(results)
    table = Table(title="hybridep verify: distributed vs single-process reference")
    for col in ("strategy", "domain sizes", "dtype", "prefetch", "top-k", "tokens per rank", "capacity",
                "max abs err", "max rel err", "result"):
        table.add_column(col)
    for r in results:
        sc = r["scenario"]
        table.add_row(r["strategy"], "x".join(str(v) for v in r["domain_sizes"].values()), r["dtype"],
                      "yes" if r["prefetch"] else "no", str(sc["top_k"]), str(sc["tokens"]),
                      str(sc["capacity_factor"] or "dropless") + (" skewed" if sc["skew"] else ""),
                      f"{r['max_abs_err']:.2e}", f"{r['max_rel_err']:.2e}",
                      "[green]pass[/green]" if r["passed"] else "[red]FAIL[/red]")
    console.print(table)
    n_pass = sum(r["passed"] for r in results)
    console.print(f"{n_pass}/{len(results)} cases passed")
    _write_json(args.json, summary)
    return 0 if summary["all_passed"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="choose per-level expert-domain sizes with the cost model")
    _add_config_args(p)
    p.add_argument("--top", type=int, default=12, help="candidates to show (default 12)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("verify", help="check every strategy against the single-process reference")
    _add_config_args(p)
    p.add_argument("--world-size", type=int, default=4, help="local processes to start (default 4)")
    p.add_argument("--strategies", default="ep,hybridep", help="comma-separated: ep, hybridep")
    p.add_argument("--dtypes", default="float64,float32", help="comma-separated: float64, float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a stalled run fails")
    p.set_defaults(func=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        console.print(f"[red]error:[/red] {err}", markup=True, highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
