"""Loss curves of the quality benchmarks: training variants of the benchmark's language model on 4
local processes (2 x 2 topology, loopback: quality, not speed), final losses and one plot."""

from __future__ import annotations

from hybridep.launch import run_local


def _worker(rank: int, world: int, steps: int, variants: dict[str, dict], overrides: list[str]) -> dict:
    from hybridep.bench import lm_config
    from hybridep.config import load_config
    from hybridep.lm.train import RunSpec, run
    from hybridep.parallel.comm import Communicator
    from hybridep.topology import Topology

    cfg = load_config(None, overrides)
    lm, batch = lm_config(cfg)
    comm = Communicator(Topology(("dc", "gpu"), (2, 2)), 600)
    return {name: run(lm, RunSpec(**{"steps": steps, "warmup": 1, "batch_size": batch // 4, "seed": 0,
                                     "strategy": "ep", "domain_sizes": (1, 1), **fields}), comm).losses
            for name, fields in variants.items()}


def train_variants(steps: int, variants: dict[str, dict], overrides: list[str]) -> dict[str, list[float]]:
    """Per variant (name -> ``RunSpec`` fields over EP's), the training losses of ``steps`` steps of
    the configuration (embedded default with ``--set``-style ``overrides``), same data and seed."""
    return run_local(_worker, 4, (steps, variants, overrides), timeout_s=7200)[0]


def final_losses(losses: dict[str, list[float]], steps: int) -> dict[str, float]:
    """The mean of each curve's last 5 % of ``steps`` (at least one step)."""
    tail = max(1, steps // 20)
    return {name: sum(ls[-tail:]) / tail for name, ls in losses.items()}


def plot_losses(losses: dict[str, list[float]], title: str, path: str) -> None:
    """Training loss per step of every curve, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ls in losses.items():
        ax.plot(ls, label=name, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(losses: dict[str, list[float]], steps: int, baseline: str, vs_key: str, title: str, plot: str,
           json_path: str | None, meta: dict) -> dict:
    """Each curve's final loss and its change against ``baseline``'s (under ``vs_key``), printed, the
    plot, and (``json_path``) the JSON: summary, steps, ``meta``, losses. Returns the summary."""
    import json
    from pathlib import Path

    summary = {m: {"final_loss_mean_last_5pct": v} for m, v in final_losses(losses, steps).items()}
    base = summary[baseline]["final_loss_mean_last_5pct"]
    for name, v in summary.items():
        v[vs_key] = v["final_loss_mean_last_5pct"] / base - 1
        print(f"{name:>28}: final loss {v['final_loss_mean_last_5pct']:.4f} ({v[vs_key]:+.2%} vs {baseline})")
    plot_losses(losses, title, plot)
    if json_path:
        Path(json_path).write_text(json.dumps({"summary": summary, "steps": steps, **meta, "losses": losses},
                                              indent=1))
    return summary
