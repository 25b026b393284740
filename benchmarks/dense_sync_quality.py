"""Training quality under PowerSGD dense-gradient sync: the benchmark's language model trained for
N steps under ``ep`` with ``dense_sync`` ``ring`` (exact) and ``powersgd(rank=R)`` (lossy, error
feedback, plain all-reduce for the first ``start`` steps), same data and seed, on 4 local
processes (loopback: quality, not speed).

    python benchmarks/dense_sync_quality.py [--steps 300] [--rank 4] [--start 10] [--json PATH] [--plot PATH]

Final loss: the mean of the last 15 steps (5 % of 300).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from curves import final_losses, plot_losses, train_variants


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--start", type=int, default=10)
    ap.add_argument("--blocks-before-moe", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--plot", default="dense_sync_quality.png")
    args = ap.parse_args()
    modes = ["ring", f"powersgd(rank={args.rank},start={args.start})"]
    losses = train_variants(args.steps, {m: {"dense_sync": m} for m in modes},
                            [f"moe.blocks_before_moe={args.blocks_before_moe}"])
    summary = {m: {"final_loss_mean_last_5pct": v} for m, v in final_losses(losses, args.steps).items()}
    ring = summary["ring"]["final_loss_mean_last_5pct"]
    for mode, v in summary.items():
        v["vs_ring"] = v["final_loss_mean_last_5pct"] / ring - 1
        print(f"{mode:>28}: final loss {v['final_loss_mean_last_5pct']:.4f} ({v['vs_ring']:+.2%} vs ring)")
    plot_losses(losses, "MoE LM, 4 ranks, EP: dense gradients by ring vs PowerSGD", args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "steps": args.steps,
                                               "blocks_before_moe": args.blocks_before_moe, "losses": losses},
                                              indent=1))


if __name__ == "__main__":
    main()
