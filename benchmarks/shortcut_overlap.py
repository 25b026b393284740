"""How much of the exchange a shortcut-connected block hides, from one bench JSON that ran a strategy
with and without ``+shortcut`` (``hybridep bench --config configs/bench_shortcut.yaml``).

    python benchmarks/shortcut_overlap.py BENCH_JSON [--strategy ep] [--json PATH] [--plot PATH]

Exposed exchange: seconds per iteration a rank spends in the token exchange (``exposed_a2a_s_by_rank``:
issuing, transferring, waiting). The rank that waits least is the one the others wait for (its figure
is network time; theirs adds the wait for its compute), so the overlapped fraction is given for it
and for the rank mean: 1 - shortcut / standard.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def overlap(report: dict, strategy: str) -> dict:
    """Exposed exchange, overlapped fraction and iteration of ``strategy`` vs ``strategy+shortcut``."""
    runs = report["strategies"]
    std, short = runs[strategy], runs[f"{strategy}+shortcut"]
    a, b = std["exposed_a2a_s_by_rank"], short["exposed_a2a_s_by_rank"]
    compute = runs.get("compute-only", {}).get("median_iter_s")
    return {
        "strategy": strategy,
        "exposed_a2a_s_by_rank": {"standard": a, "shortcut": b},
        "overlapped_fraction_critical_rank": 1 - min(b) / min(a),
        "overlapped_fraction_rank_mean": 1 - sum(b) / sum(a),
        "iteration_s": {"standard": std["median_iter_s"], "shortcut": short["median_iter_s"]},
        "predicted_iteration_s": {"standard": std["predicted_iter_s"], "shortcut": short["predicted_iter_s"]},
        "model_error": {k: r["predicted_iter_s"] / r["median_iter_s"] - 1 for k, r in (("standard", std),
                                                                                         ("shortcut", short))},
        "exchange_share_of_standard_iteration": sum(a) / len(a) / std["median_iter_s"],
        "compute_only_iteration_s": compute,
    }


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exposed = summary["exposed_a2a_s_by_rank"]
    ranks = range(len(exposed["standard"]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax1.bar([r - 0.2 for r in ranks], exposed["standard"], 0.4, label="standard")
    ax1.bar([r + 0.2 for r in ranks], exposed["shortcut"], 0.4, label="shortcut")
    ax1.set_xticks(list(ranks))
    ax1.set_xlabel("rank")
    ax1.set_ylabel("exposed exchange (s / iteration)")
    ax1.legend()
    names = ["standard", "shortcut"]
    ax2.bar(names, [summary["iteration_s"][n] for n in names], 0.5, label="measured")
    ax2.scatter(names, [summary["predicted_iteration_s"][n] for n in names], color="k", zorder=3, label="model")
    ax2.set_ylabel("iteration (s)")
    ax2.legend()
    fig.suptitle(f"{summary['strategy']}: standard vs shortcut-connected MoE blocks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bench_json")
    ap.add_argument("--strategy", default="ep")
    ap.add_argument("--json")
    ap.add_argument("--plot", default="shortcut_overlap.png")
    args = ap.parse_args()
    summary = overlap(json.loads(Path(args.bench_json).read_text()), args.strategy)
    print(json.dumps({k: v for k, v in summary.items() if k != "exposed_a2a_s_by_rank"}, indent=1))
    plot(summary, args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
