"""A small stack of blocks with an MoE FFN each: the model that ``verify`` and the tests train.

Block: ``h = h + tanh(dense(h)); h = h + moe(h)``. The dense layer gives every block non-expert
parameters besides the router (synchronised data-parallel, like a transformer's attention). With
``shortcut`` the MoE branch reads the block's input and its exchange runs while the dense layer
computes: ``y = h + tanh(dense(h)) + moe(h)``.
"""

from __future__ import annotations

import torch
from torch import nn

from hybridep.moe.layer import MoE, begin


class MoEBlock(nn.Module):
    def __init__(self, hidden: int, ffn: int, experts: int, top_k: int, kind: str = "gelu",
                 capacity_factor: float | None = None, shortcut: bool = False):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.moe = MoE(hidden, ffn, experts, top_k, kind, capacity_factor=capacity_factor)
        self.shortcut = shortcut

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.shortcut:
            branch = begin(self.moe, h)
            h = h + torch.tanh(self.dense(h))
            branch.experts()
            return h + branch.result()
        h = h + torch.tanh(self.dense(h))
        return h + self.moe(h)


class MoEStack(nn.Module):
    def __init__(self, layers: int, hidden: int, ffn: int, experts: int, top_k: int, kind: str = "gelu",
                 capacity_factor: float | None = None, shortcut: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(MoEBlock(hidden, ffn, experts, top_k, kind, capacity_factor, shortcut)
                                    for _ in range(layers))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            h = b(h)
        return h

    def aux_loss(self) -> torch.Tensor:
        return sum(b.moe.aux_loss for b in self.blocks)
