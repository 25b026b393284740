"""The planner's choice against the fastest strategy measured, on stored bench results of
``hybridep bench --candidates N --json`` (one per configuration): per result, the planner's choice
from the configuration alone (planned again with this code, as the bench plans before it runs),
the planner's choice on the bench's calibrated model among the strategies that ran (as the bench
reports it, :func:`hybridep.bench.calibrated_choice`), the fastest one measured, the ratio
of each choice's measured iteration to the fastest's, and the cost model's errors against the
measurements (this code, :func:`hybridep.sim.study.calibrate`). Prints a table, writes JSON.

    python benchmarks/selection_report.py benchmarks/results/selection/bench_*.json \\
        --json benchmarks/results/selection/summary.json
"""

from __future__ import annotations

import argparse
import json
import statistics

from hybridep.bench import calibrated_choice
from hybridep.calibration import COMPUTE_ONLY, PEERS, calibrated_model
from hybridep.config import config_from_dict
from hybridep.planner import plan
from hybridep.sim.study import calibrate


def selection(path: str) -> dict:
    """One stored bench result's choices, fastest and model errors (seconds, ratios)."""
    with open(path) as f:
        report = json.load(f)
    cfg = config_from_dict(report["config"])
    measured = {name: v["median_iter_s"] for name, v in report["strategies"].items()
                if name != COMPUTE_ONLY and name not in PEERS}
    fastest = min(measured, key=measured.__getitem__)
    choice = str(plan(cfg, cfg.compute.flops).choice.spec)
    model = calibrate(path, report)
    rates = report["probed_rates_bps"] or [lv.bandwidth_bps for lv in cfg.topology.levels]
    net_flops = calibrated_model(cfg, report["strategies"], rates, report.get("calibration"))
    calibrated = calibrated_choice(cfg, net_flops, measured, report.get("calibration"))
    errors = [abs(r["model_error"]) for r in model["strategies"]]
    for row in model["strategies"]:  # the exposed exchange measured beside the model's
        row["exposed_a2a_s_by_rank"] = report["strategies"][row["strategy"]].get("exposed_a2a_s_by_rank")
    return {
        "bench_json": path, "strategies_measured": len(measured), "fastest": fastest,
        "fastest_s": measured[fastest], "choice": choice, "choice_measured_s": measured.get(choice),
        "choice_over_fastest": measured[choice] / measured[fastest] if choice in measured else None,
        "calibrated_choice": calibrated,
        "calibrated_over_fastest": measured[calibrated] / measured[fastest] if calibrated else None,
        "model_median_abs_error": statistics.median(errors), "model_max_abs_error": max(errors),
        "model": model["strategies"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench_json", nargs="+")
    parser.add_argument("--json", help="write the rows and their summary as JSON here")
    args = parser.parse_args()
    rows = [selection(p) for p in args.bench_json]
    for r in rows:
        ratio = "not run" if r["choice_over_fastest"] is None else f"{r['choice_over_fastest']:.3f}"
        print(f"{r['bench_json']}: choice {r['choice']} / fastest {r['fastest']} = {ratio}; calibrated choice "
              f"{r['calibrated_choice']} ({r['calibrated_over_fastest'] or float('nan'):.3f}); model |error| median "
              f"{r['model_median_abs_error']:.1%}, max {r['model_max_abs_error']:.1%} "
              f"({r['strategies_measured']} strategies)")
    every = [abs(m["model_error"]) for r in rows for m in r["model"]]
    summary = {"results": len(rows), "worst_choice_over_fastest": max(
        (r["choice_over_fastest"] for r in rows if r["choice_over_fastest"] is not None), default=None),
        "model_median_abs_error": statistics.median(every) if every else None}
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
