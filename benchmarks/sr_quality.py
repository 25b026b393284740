"""Training quality under residual compression: the benchmark's language model trained for N steps
under ``ep`` and ``hybridep+sr`` (CR 50, full domain) with the shared basis (the paper's), the
delta basis (receivers' synchronised copies) -- with dense and with top-k (error feedback) gradient
return -- and no basis (ablation: top-k of the raw expert), on 4 local processes (loopback:
quality, not speed).

    python benchmarks/sr_quality.py [--steps 300] [--ratio 50] [--json PATH] [--plot PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from curves import final_losses, plot_losses

from hybridep.launch import run_local


def worker(rank, world, steps, ratio):
    from hybridep.bench import lm_config
    from hybridep.config import load_config
    from hybridep.lm.train import RunSpec, run
    from hybridep.parallel.comm import Communicator
    from hybridep.topology import Topology

    cfg = load_config()
    lm, batch = lm_config(cfg)
    comm = Communicator(Topology(("dc", "gpu"), (2, 2)), 600)
    out = {}
    sr = {"strategy": "hybridep+sr", "domain_sizes": (2, 2), "sr_ratio": ratio}
    variants = (("ep", {"strategy": "ep", "domain_sizes": (1, 1)}),
                (f"hybridep+sr{ratio:g} shared basis", {**sr, "sr_basis": "shared"}),
                (f"hybridep+sr{ratio:g} delta basis", {**sr, "sr_basis": "delta"}),
                (f"hybridep+sr{ratio:g} delta basis, top-k gradients", {**sr, "sr_basis": "delta", "sr_grads": "topk"}),
                (f"hybridep+sr{ratio:g} without shared", {**sr, "sr_basis": "zero"}))
    for name, extra in variants:
        res = run(lm, RunSpec(steps=steps, warmup=1, batch_size=batch // 4, seed=0, **extra), comm)
        out[name] = res.losses
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ratio", type=float, default=50.0)
    ap.add_argument("--json")
    ap.add_argument("--plot", default="sr_quality.png")
    args = ap.parse_args()
    losses = run_local(worker, 4, (args.steps, args.ratio), timeout_s=7200)[0]
    summary = {name: {"final_loss_mean_last_5pct": v} for name, v in final_losses(losses, args.steps).items()}
    ep = summary["ep"]["final_loss_mean_last_5pct"]
    for name, v in summary.items():
        v["vs_ep"] = v["final_loss_mean_last_5pct"] / ep - 1
        print(f"{name:>50}: final loss {v['final_loss_mean_last_5pct']:.4f} ({v['vs_ep']:+.2%} vs ep)")
    plot_losses(losses, f"MoE LM, 4 ranks: EP vs HybridEP with SR compression (CR {args.ratio:g})", args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "losses": losses}, indent=1))


if __name__ == "__main__":
    main()
