"""Training quality under PowerSGD dense-gradient sync: the benchmark's language model trained for
N steps under ``ep`` with ``dense_sync`` ``ring`` (exact) and ``powersgd(rank=R)`` (lossy, error
feedback, plain all-reduce for the first ``start`` steps), same data and seed, on 4 local
processes (loopback: quality, not speed).

    python benchmarks/dense_sync_quality.py [--steps 300] [--rank 4] [--start 10] [--json PATH] [--plot PATH]

Final loss: the mean of the last 15 steps (5 % of 300).
"""

from __future__ import annotations

import argparse

from curves import report, train_variants


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
    report(losses, args.steps, "ring", "vs_ring", "MoE LM, 4 ranks, EP: dense gradients by ring vs PowerSGD",
           args.plot, args.json, {"blocks_before_moe": args.blocks_before_moe})

if __name__ == "__main__":
    main()
