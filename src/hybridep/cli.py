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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="choose per-level expert-domain sizes with the cost model")
    _add_config_args(p)
    p.add_argument("--top", type=int, default=12, help="candidates to show (default 12)")
    p.set_defaults(func=cmd_plan)
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
