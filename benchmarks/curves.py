"""Loss curves of the quality benchmarks: final losses and one plot."""

from __future__ import annotations


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
