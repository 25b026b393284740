"""How many ranks compute at once, from the measured timelines of a bench run
(``hybridep bench --trace TRACE``): on a host whose ranks share fewer cores than there are ranks, a
rank computes at full speed only while few others compute, so this says how contended the compute
of each strategy really was.

    python benchmarks/compute_concurrency.py TRACE [--json PATH]

A rank computes during its forward, backward and optimizer spans less the spans it waits in a
collective on its compute thread (the ``comm`` track: issue, transfer, wait). The timeline from the
first to the last span is sampled every 0.1 ms; per strategy: the fraction of time with k = 0 .. G
ranks computing and the mean k.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

STEP_US = 100.0
"""Sampling step of the timeline (microseconds, the trace's unit)."""


def _busy(spans: list[dict], grid: np.ndarray) -> np.ndarray:
    """Whether ``grid``'s instants fall inside any of ``spans`` (one rank's track)."""
    inside = np.zeros(len(grid), bool)
    for e in spans:
        inside |= (grid >= e["ts"]) & (grid < e["ts"] + e["dur"])
    return inside


def concurrency(events: list[dict]) -> dict[str, dict]:
    """Per strategy (a process of the trace): {fraction_by_ranks_computing: [..], mean_ranks_computing,
    seconds} over its whole timeline."""
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    out = {}
    for pid, name in procs.items():
        spans = [e for e in events if e.get("ph") == "X" and e["pid"] == pid]
        ranks = sorted({int(t.split()[1]) for (p, _), t in threads.items() if p == pid and t.endswith("compute")})
        grid = np.arange(min(e["ts"] for e in spans), max(e["ts"] + e["dur"] for e in spans), STEP_US)
        computing = np.zeros(len(grid), int)
        for r in ranks:
            track = {kind: [e for e in spans if threads[(pid, e["tid"])] == f"rank {r} {kind}"]
                     for kind in ("compute", "comm")}
            computing += _busy(track["compute"], grid) & ~_busy(track["comm"], grid)
        fractions = np.bincount(computing, minlength=len(ranks) + 1) / len(grid)
        out[name] = {"fraction_by_ranks_computing": [round(float(f), 4) for f in fractions],
                     "mean_ranks_computing": float(computing.mean()), "seconds": len(grid) * STEP_US * 1e-6}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace")
    parser.add_argument("--json", help="write the figures as JSON here")
    args = parser.parse_args()
    with open(args.trace) as f:
        data = json.load(f)
    result = concurrency(data["traceEvents"] if isinstance(data, dict) else data)
    for name, r in result.items():
        shares = ", ".join(f"{k}: {f:.0%}" for k, f in enumerate(r["fraction_by_ranks_computing"]))
        print(f"{name}: ranks computing at once {shares}; mean {r['mean_ranks_computing']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"trace": args.trace, "strategies": result}, f, indent=1)


if __name__ == "__main__":
    main()
