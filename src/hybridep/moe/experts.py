"""Experts stored as stacked tensors per layer, and the grouped expert computation.

``GELU`` experts: ``y = gelu(x @ w1[e]) @ w2[e]``; ``SwiGLU``: ``y = (silu(x @ w1[e]) * (x @ w3[e])) @ w2[e]``.
Shapes: ``w1``, ``w3``: [E, hidden, ffn]; ``w2``: [E, ffn, hidden]. No biases.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

WEIGHT_NAMES = {"gelu": ("w1", "w2"), "swiglu": ("w1", "w2", "w3")}


class ExpertSource(Protocol):
    """Expert weights produced on demand (e.g. decoded from a compressed copy), one expert at a time."""

    anchor: torch.Tensor
    """A scalar every output must depend on (carries the source's backward)."""

    def expert(self, i: int) -> dict[str, torch.Tensor]:
        """Weights {name: tensor without the expert axis} of expert ``i``."""
        ...


class Tie(torch.autograd.Function):
    """``Tie.apply(y, *others)`` is ``y`` in forward, and in backward gives every tensor of ``others``
    a zero gradient: ``y`` depends on them for autograd (their backward -- a reduce-scatter, a
    decode -- runs on every rank, tokens or not) without reading their values, so a NaN or inf in
    one of them reaches no output row (``y + 0 * x.sum()`` would spread it to all of them)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in others]
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (grad, *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.shapes))


def ffn(kind: str, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """One feed-forward network of ``kind`` (``gelu`` or ``swiglu``) with weights ``w`` ({w1: [hidden,
    ffn], w2: [ffn, hidden](, w3: [hidden, ffn])}) on rows ``x`` -- an expert, or a dense block's FFN."""
    h = x @ w["w1"]
    h = torch.nn.functional.silu(h) * (x @ w["w3"]) if kind == "swiglu" else torch.nn.functional.gelu(h)
    return h @ w["w2"]


class GroupedExperts(nn.Module):
    """``num_experts`` FFN experts of one layer as stacked parameters."""

    def __init__(self, num_experts: int, hidden: int, ffn: int, kind: str = "gelu"):
        super().__init__()
        if kind not in WEIGHT_NAMES:
            raise ValueError(f"expert kind must be one of {sorted(WEIGHT_NAMES)}, got {kind!r}")
        self.kind, self.hidden, self.ffn = kind, hidden, ffn
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, ffn))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn, hidden))
        if kind == "swiglu":
            self.w3 = nn.Parameter(torch.empty(num_experts, hidden, ffn))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name in self.weight_names:
            w = getattr(self, name)
            nn.init.normal_(w, std=1.0 / math.sqrt(w.shape[1]))

    @property
    def weight_names(self) -> tuple[str, ...]:
        return WEIGHT_NAMES[self.kind]

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.weight_names}

    def run_expert(self, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """One expert with weights ``w`` ({name: tensor without the expert axis}) on rows ``x``."""
        return ffn(self.kind, w, x)

    def compute(self, weights: dict[str, torch.Tensor] | ExpertSource, x: torch.Tensor,
                counts: list[int]) -> torch.Tensor:
        """Run expert i on the i-th block of ``counts[i]`` rows of ``x`` (rows sorted by expert).

        ``weights``: stacked tensors {name: [E, ...]}, or an :class:`ExpertSource`, whose experts
        are made one at a time inside activation checkpointing (made again in backward), so only
        one of them exists at any moment. The result always depends on ``x`` and on every weight
        (through a zero term), so that in backward every rank reaches the same collectives even
        when it computed no token.
        """
        source = None if isinstance(weights, dict) else weights
        # unbind once: its backward stacks the experts' gradients (one [E, ...] tensor), where
        # indexing w[i] per expert would build E zero-padded [E, ...] gradients and sum them
        rows = {} if source is not None else {name: w.unbind(0) for name, w in weights.items()}
        outs = []
        for i, chunk in enumerate(torch.split(x, counts)):
            if chunk.shape[0] == 0:
                continue
            if source is None:
                outs.append(self.run_expert({name: r[i] for name, r in rows.items()}, chunk))
            else:
                outs.append(checkpoint(lambda c, i=i: self.run_expert(source.expert(i), c), chunk, use_reentrant=False))
        y = torch.cat(outs) if outs else x.new_zeros(x.shape)
        tied = [source.anchor] if source is not None else list(weights.values())
        return Tie.apply(y, x, *tied)
