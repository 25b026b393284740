"""``hybridep train``: the byte-level MoE language model trained under a plan, with checkpoints.

One rank's loop (:func:`train`), nanoGPT-style: warm-up + cosine learning rate, gradient
accumulation over ``moe.micro_batches``, the global gradient norm clipped (the experts of every rank
counted once), a non-finite check, AdamW, the next step's expert gathers prefetched, a held-out loss
every ``train.eval_every`` steps, a placement-agnostic checkpoint every ``train.checkpoint_every``.
Rank 0 appends one JSON object per step to ``OUT/metrics.jsonl`` and draws ``OUT/metrics.png``.

The data is the same on any world size: step s's global batch of ``train.batch_size`` sequences is
drawn from (seed, s) alone and rank r of W takes sequences r*B/W .. (r+1)*B/W - 1, so a run resumed
on another number of ranks sees the same sequences.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from hybridep import checkpoint
from hybridep.api import Parallelized, parallelize
from hybridep.config import Config, config_from_dict
from hybridep.lm.data import batch, load_corpus
from hybridep.lm.model import LMConfig, MoELM
from hybridep.lm.train import check_finite
from hybridep.planfile import Plan
from hybridep.strategies import parse

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.float32, "float16": torch.float32}
"""Parameter dtype per ``moe.dtype``; bfloat16 and float16 train in float32 under autocast."""


def model_config(cfg: Config, shortcut: bool = False) -> LMConfig:
    """The language model's dimensions from ``moe`` (and ``bench.heads``); shortcut-connected blocks
    under ``moe.shortcut`` or ``shortcut`` (a plan's choice, ``planner.allow: [shortcut]``)."""
    m = cfg.moe
    return LMConfig(seq_len=m.seq_len, hidden=m.hidden, heads=cfg.bench.heads, layers=m.layers, ffn=m.ffn,
                    experts=m.experts, top_k=m.top_k, expert_kind=m.expert_kind, dense_blocks=m.blocks_before_moe,
                    shortcut=m.shortcut or shortcut, aux_loss_coef=cfg.train.aux_loss_coef)


def global_batch_size(cfg: Config) -> int:
    """Sequences per step over all ranks."""
    return cfg.train.batch_size or cfg.topology.world_size * max(1, cfg.moe.tokens_per_gpu // cfg.moe.seq_len)


def local_batch(corpus: torch.Tensor, cfg: Config, step: int, rank: int, world: int, split: str = "train"):
    """Rank ``rank``'s share of step ``step``'s global batch (inputs, targets)."""
    size = global_batch_size(cfg)
    x, y = batch(corpus, size, cfg.moe.seq_len, cfg.train.seed, step, 0, split)
    share = size // world
    return x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]


def learning_rate(cfg: Config, step: int) -> float:
    """Linear warm-up to ``train.lr``, then a cosine down to ``min_lr_ratio`` of it at the last step."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def clip_global_norm(par: Parallelized, max_norm: float) -> float:
    """Scale every gradient so that the global norm is at most ``max_norm`` (0: leave them); return
    the norm. Dense gradients are the same on every rank after DDP; each expert lives on one rank."""
    experts = torch.tensor([_squares(par.expert_parameters())], dtype=torch.float64)
    dist.all_reduce(experts)
    norm = math.sqrt(_squares(par.dense_parameters()) + float(experts))
    if max_norm > 0 and norm > max_norm:
        for p in par.model.parameters():
            if p.grad is not None:
                p.grad.mul_(max_norm / (norm + 1e-12))
    return norm


def _squares(params) -> float:
    """Sum of the squared gradient entries of ``params`` (float64)."""
    return sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None)


def mean_over_ranks(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def train(rank: int, world: int, config: dict, plan_document: dict, out_dir: str, resume: str | None = None,
          data: str | None = None) -> dict:
    """Train one rank (under the local launcher, torchrun or the testbed); returns the run's summary."""
    cfg = config_from_dict(config)
    t = cfg.train
    plan = Plan(parse(plan_document["strategy"], cfg.topology.as_topology()), plan_document)
    out = Path(out_dir)
    corpus = load_corpus() if data is None else _corpus(data)
    torch.manual_seed(t.seed)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    model = MoELM(model_config(cfg, plan.spec.shortcut)).to(DTYPES[cfg.moe.dtype]).to(device)
    par = parallelize(model, plan, timeout_s=t.timeout_s, config=cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    step = checkpoint.load(resume, par, opt) if resume else 0
    metrics = (out / "metrics.jsonl").open("a") if rank == 0 else None
    report = Progress(step, t.steps) if rank == 0 else None
    autocast = _autocast(cfg)
    tokens = global_batch_size(cfg) * cfg.moe.seq_len
    summary: dict = {"start_step": step, "losses": []}
    counted: dict[str, dict] = {}
    while step < t.steps:
        start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step)
        x, y = (v.to(device) for v in local_batch(corpus, cfg, step, rank, world))
        loss = accumulate(par, x, y, cfg.moe.micro_batches, autocast)
        norm = clip_global_norm(par, t.grad_clip)
        skipped = check_finite(loss, model, t.on_nonfinite, rank, step, True)
        if not skipped:
            opt.step()
        opt.zero_grad(set_to_none=True)
        par.prefetch()
        step += 1
        row = {"step": step, "loss": mean_over_ranks(float(loss)), "lr": learning_rate(cfg, step - 1),
               "grad_norm": norm, "seconds": time.perf_counter() - start, "skipped": skipped}
        row["tokens_per_s"] = tokens / row["seconds"]
        if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
            row["eval_loss"] = evaluate(par, corpus, cfg, rank, world)
        if step == t.steps or (t.checkpoint_every and step % t.checkpoint_every == 0):
            checkpoint.save(out / "checkpoints", step, par, opt, t.keep, {"config": config})
        summary["losses"].append(row["loss"])
        if metrics is not None:
            now = _counters(par)  # this rank's, since the run started
            row.update({k: {n: v - counted.get(k, {}).get(n, 0) for n, v in d.items()} for k, d in now.items()})
            counted = now
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            report(step, t.steps, row)
    if metrics is not None:
        metrics.close()
        report.close()
        plot_metrics(out / "metrics.jsonl", out / "metrics.png")
    summary["step"] = step
    return summary


class Progress:
    """Rank 0's progress: a rich bar (loss, tokens/s, ETA) on a terminal, else one line per step
    (``[train] step S/N loss L T tokens/s``, which the testbed launcher shows)."""

    def __init__(self, start: int, steps: int):
        self.bar = None
        if sys.stdout.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=steps, completed=start, info="")
            self.bar.start()

    def __call__(self, step: int, steps: int, row: dict) -> None:
        info = f"loss {row['loss']:.4f} {row['tokens_per_s']:.0f} tokens/s"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        else:
            print(f"[train] step {step}/{steps} {info}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _counters(par: Parallelized) -> dict[str, dict]:
    """This rank's communicator counters: bytes per level and per ``op/level``, seconds per op."""
    tr = par.comm.traffic
    return {"bytes_by_level": dict(tr.bytes_by_level()),
            "bytes_by_op_level": {f"{op}/{lv}": b for (op, lv), b in tr.bytes_by_op_level.items()},
            "seconds_by_op": dict(tr.seconds_by_op)}


def _autocast(cfg: Config):
    """bf16 autocast on the training device when ``moe.dtype`` is bfloat16 (reusable), else nothing."""
    if cfg.moe.dtype != "bfloat16":
        return contextlib.nullcontext()
    return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)


def accumulate(par: Parallelized, x: torch.Tensor, y: torch.Tensor, micro_batches: int, autocast) -> torch.Tensor:
    """Forward and backward of the local batch in ``micro_batches`` pieces, gradients summed (DDP
    all-reduces once, after the last); returns the batch's mean loss."""
    pieces = list(zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True))
    total = 0.0
    for i, (xs, ys) in enumerate(pieces):
        sync = contextlib.nullcontext() if i == len(pieces) - 1 else par.module.no_sync()
        with sync:
            with autocast:
                loss = par.module(xs, ys) * (len(xs) / len(x))
            loss.backward()
        total = total + loss.detach()
    return total


@torch.no_grad()
def evaluate(par: Parallelized, corpus: torch.Tensor, cfg: Config, rank: int, world: int) -> float:
    """Mean held-out loss over ``train.eval_batches`` global batches of the validation split."""
    losses = []
    for i in range(cfg.train.eval_batches):
        x, y = local_batch(corpus, cfg, i, rank, world, split="val")
        device = next(par.model.parameters()).device
        x, y = x.to(device), y.to(device)
        losses.append(float(par.module(x, y)))
    return mean_over_ranks(sum(losses) / len(losses))


def plot_metrics(jsonl: Path, png: Path) -> None:
    """Training and held-out loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="training loss")
    ev = [r for r in rows if "eval_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], marker="o", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _corpus(path: str) -> torch.Tensor:
    """The bytes of a text file, or of every file under a folder (sorted), as uint8."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    blob = b"".join(f.read_bytes() for f in files)
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)

