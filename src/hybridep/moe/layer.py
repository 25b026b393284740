"""The MoE layer: routing + experts + a token dispatcher. Knows nothing about ranks.

A *dispatcher* moves routed tokens to the experts and back. The default, :class:`LocalDispatcher`,
runs everything in this process; a parallel strategy (``hybridep.parallel``) replaces it, the way
torchtitan applies ``ExpertParallel`` to an MoE module as a ``ParallelStyle``.

A shortcut-connected block (ScMoE) runs its MoE branch in three steps so that the exchange overlaps
the block's own compute: :meth:`MoE.begin` routes and issues the dispatch, :meth:`Branch.experts`
waits for the tokens, runs the experts and issues the combine, :meth:`Branch.result` waits for the
combine. A dispatcher that can issue its exchange without waiting has a ``begin`` method returning
such a branch; any other runs whole at :meth:`Branch.experts` (:class:`Eager`: same result, no overlap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from hybridep.moe.experts import ExpertSource, GroupedExperts
from hybridep.moe.router import Routing, TopKRouter


@dataclass
class Permuted:
    """Token copies sorted by a per-expert key: rows of ``x``, their token ids, weights, keys."""

    x: torch.Tensor
    token_idx: torch.Tensor
    weights: torch.Tensor
    keys: torch.Tensor


def permute(x: torch.Tensor, routing: Routing, key_of_expert: torch.Tensor) -> Permuted:
    """Copy each token once per kept assignment and sort the copies by ``key_of_expert[e]`` (stable)."""
    t, k = routing.expert_idx.shape
    token_idx = torch.arange(t, device=x.device).repeat_interleave(k)
    experts = routing.expert_idx.reshape(-1)
    kept = routing.kept.reshape(-1)
    token_idx, experts = token_idx[kept], experts[kept]
    weights = routing.weights.reshape(-1)[kept]
    keys = key_of_expert[experts]
    order = torch.argsort(keys, stable=True)
    return Permuted(x[token_idx[order]], token_idx[order], weights[order], keys[order])


def unpermute(y: torch.Tensor, p: Permuted, num_tokens: int) -> torch.Tensor:
    """Weighted sum of the expert outputs back onto their tokens: [num_tokens, hidden]."""
    out = y.new_zeros(num_tokens, y.shape[-1])
    return out.index_add(0, p.token_idx, y * p.weights.unsqueeze(-1).to(y.dtype))


class Dispatcher(Protocol):
    def __call__(self, x: torch.Tensor, routing: Routing, experts: GroupedExperts) -> torch.Tensor: ...


def compute_in_place(x: torch.Tensor, routing: Routing, experts: GroupedExperts,
                     weights: dict[str, torch.Tensor] | ExpertSource, key_of_expert: torch.Tensor) -> torch.Tensor:
    """Every routed token through its expert in this process: ``weights`` holds all experts, expert
    ``e`` at row ``key_of_expert[e]``."""
    p = permute(x, routing, key_of_expert.to(x.device))
    counts = torch.bincount(p.keys, minlength=len(key_of_expert)).tolist()
    return unpermute(experts.compute(weights, p.x, counts), p, x.shape[0])


class Branch(Protocol):
    """An MoE branch in flight (see the module docstring)."""

    def experts(self) -> None: ...

    def result(self) -> torch.Tensor: ...


class Eager:
    """The branch of a dispatcher that cannot overlap: the whole dispatcher at :meth:`experts`."""

    def __init__(self, dispatcher, *args: object):
        self.run = lambda: dispatcher(*args)
        self.y: torch.Tensor | None = None

    def experts(self) -> None:
        self.y = self.run()

    def result(self) -> torch.Tensor:
        if self.y is None:
            raise RuntimeError("Branch.result() before Branch.experts()")
        return self.y


def begin(layer: nn.Module, x: torch.Tensor) -> Branch:
    """Start ``layer``'s branch on ``x``: :meth:`MoE.begin`, or -- a layer without it (a peer's MoE
    layer) -- the whole layer at :meth:`Branch.experts`."""
    start = getattr(layer, "begin", None)
    return start(x) if start is not None else Eager(layer, x)


class LocalDispatcher:
    """Single-process dispatch: permute by expert, run every expert, unpermute."""

    def __call__(self, x: torch.Tensor, routing: Routing, experts: GroupedExperts) -> torch.Tensor:
        return compute_in_place(x, routing, experts, experts.weights(), torch.arange(experts.num_experts))


class MoE(nn.Module):
    """Mixture-of-Experts FFN: ``y = sum_k w_k * expert_{e_k}(x)`` for each token of ``x`` [..., hidden].

    After a forward pass ``self.aux_loss`` holds the router's load-balancing loss, and
    ``self.routed_tokens`` [experts] counts the token copies routed to each expert (kept ones) since
    the last :meth:`reset_routing_stats` -- the measured routing histogram (not a buffer: DDP would
    overwrite it with rank 0's).
    """

    def __init__(self, hidden: int, ffn: int, experts: int, top_k: int, kind: str = "gelu",
                 normalize_top_k: bool | None = None, capacity_factor: float | None = None):
        super().__init__()
        self.router = TopKRouter(hidden, experts, top_k, normalize_top_k, capacity_factor)
        self.experts = GroupedExperts(experts, hidden, ffn, kind)
        self.dispatcher: Dispatcher = LocalDispatcher()
        self.aux_loss: torch.Tensor | None = None
        self.routed_tokens = torch.zeros(experts, dtype=torch.int64)

    def reset_routing_stats(self) -> None:
        self.routed_tokens = torch.zeros_like(self.routed_tokens)

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """Tokens as rows [tokens, hidden] and their routing (the balance loss and histogram kept)."""
        flat = x.reshape(-1, x.shape[-1])
        routing = self.router(flat)
        self.aux_loss = routing.aux_loss
        counts = torch.bincount(routing.expert_idx[routing.kept].detach(), minlength=self.routed_tokens.numel())
        self.routed_tokens = self.routed_tokens.to(counts.device) + counts  # stays on the device: no sync
        return flat, routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat, routing = self._route(x)
        return self.dispatcher(flat, routing, self.experts).reshape(x.shape)

    def begin(self, x: torch.Tensor) -> Branch:
        """Route ``x`` and issue the dispatch (when the dispatcher can: ``begin``); the returned
        branch's ``result()`` is ``forward(x)``."""
        flat, routing = self._route(x)
        start = getattr(self.dispatcher, "begin", None)
        branch = start(flat, routing, self.experts) if start is not None else Eager(
            self.dispatcher, flat, routing, self.experts)
        return _Shaped(branch, x.shape)


class _Shaped:
    """A branch whose result comes back in the input's shape."""

    def __init__(self, branch: Branch, shape: torch.Size):
        self.branch, self.shape = branch, shape

    def experts(self) -> None:
        self.branch.experts()

    def result(self) -> torch.Tensor:
        return self.branch.result().reshape(self.shape)
