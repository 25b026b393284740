"""Top-k softmax router with load-balancing loss and an optional capacity factor.

Drop policy (capacity factor set): capacity per expert = ceil(capacity_factor * T * k / E), where
T is the number of tokens the router sees. Assignments are ranked first by choice slot (every
token's first choice before any second choice), then by token position; each expert keeps its
first ``capacity`` assignments. A dropped assignment gets weight 0 and is not dispatched (its
token keeps only the residual path). Capacity is decided where the tokens are, before any
communication, so ranks never need to agree on buffer sizes (split sizes are exchanged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Routing:
    """Routing of T tokens: expert ids and weights [T, k], kept mask [T, k], auxiliary loss."""

    expert_idx: torch.Tensor
    weights: torch.Tensor
    kept: torch.Tensor
    aux_loss: torch.Tensor


class TopKRouter(nn.Module):
    """Linear gate -> softmax -> top-k.

    ``normalize`` rescales the k weights to sum to 1; default: only for k > 1 (with k = 1 it would
    make every weight exactly 1 and leave the gate without gradient, so top-1 uses the raw
    probability, as Switch Transformer does).
    """

    def __init__(self, hidden: int, experts: int, top_k: int, normalize: bool | None = None,
                 capacity_factor: float | None = None):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"top_k must be in 1..{experts}, got {top_k}")
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts, self.top_k = experts, top_k
        self.normalize = top_k > 1 if normalize is None else normalize
        self.capacity_factor = capacity_factor

    def forward(self, x: torch.Tensor) -> Routing:
        t = x.shape[0]
        probs = torch.softmax(self.gate(x), dim=-1)
        weights, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        kept = torch.ones_like(idx, dtype=torch.bool)
        if self.capacity_factor is not None and t > 0:
            cap = math.ceil(self.capacity_factor * t * self.top_k / self.experts)
            # slot-major order: all first choices, then all second choices, ...
            flat = idx.t().reshape(-1)
            onehot = torch.nn.functional.one_hot(flat, self.experts)
            position = (onehot.cumsum(0) * onehot).sum(-1) - 1
            kept = (position < cap).reshape(self.top_k, t).t()
            weights = weights * kept
        # Switch-style balance loss E * sum_e f_e * P_e; exactly 0 (not NaN) with no tokens.
        if t > 0:
            f = torch.zeros(self.experts, dtype=probs.dtype, device=x.device)
            f.index_add_(0, idx.reshape(-1), torch.ones(idx.numel(), dtype=probs.dtype, device=x.device))
            aux = self.experts * (f / idx.numel() * probs.mean(0)).sum()
        else:
            aux = probs.sum() * 0.0
        return Routing(idx, weights, kept, aux)
