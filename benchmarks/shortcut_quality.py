"""Training quality of shortcut-connected MoE blocks (ScMoE): the benchmark's language model trained
for N steps under ``ep`` with standard top-2 blocks and with shortcut-connected top-2 blocks, same
data and seed, on 4 local processes (loopback: quality, not speed).

    python benchmarks/shortcut_quality.py [--steps 300] [--json PATH] [--plot PATH]

Final loss: the mean of the last 15 steps (5 % of 300). A shortcut block needs a block before it:
the model has ``--blocks-before-moe`` (default 1) dense blocks before each MoE block, in both variants.
"""

from __future__ import annotations

import argparse

from curves import report, train_variants


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--blocks-before-moe", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--plot", default="shortcut_quality.png")
    args = ap.parse_args()
    variants = {"ep (standard, top-2)": {"shortcut": False}, "ep+shortcut (top-2)": {"shortcut": True}}
    losses = train_variants(args.steps, variants, [f"moe.blocks_before_moe={args.blocks_before_moe}",
                                                   "moe.top_k=2"])
    report(losses, args.steps, "ep (standard, top-2)", "vs_standard",
           "MoE LM, 4 ranks, EP, top-2: standard vs shortcut-connected blocks", args.plot, args.json,
           {"blocks_before_moe": args.blocks_before_moe})

if __name__ == "__main__":
    main()
