"""Autograd-aware collectives: the backward of each is its dual collective.

* :class:`AllToAll` -- forward: uneven all-to-all of rows; backward: the same with splits swapped.
* :class:`GatherExperts` -- forward: all-gather of every member's expert shard inside an expert
  domain (optionally already in flight: prefetched); backward: sum reduce-scatter of the gradients
  back to the owners (the dual of the gather).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hybridep.parallel.comm import Communicator


class AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Communicator, ranks: Sequence[int], send: list[int],
                recv: list[int], op: str) -> torch.Tensor:
        ctx.comm, ctx.ranks, ctx.send, ctx.recv, ctx.op = comm, ranks, send, recv, op
        out = x.new_empty((sum(recv), *x.shape[1:]))
        comm.all_to_all(out, x.contiguous(), recv, send, ranks, op)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        ctx.comm.all_to_all(out, grad.contiguous(), ctx.send, ctx.recv, ctx.ranks, ctx.op + "_bwd")
        return out, None, None, None, None, None


class PendingGather:
    """An all-gather already issued (prefetch): its output buffer and work handle."""

    def __init__(self, comm: Communicator, local: torch.Tensor, ranks: Sequence[int], op: str = "ag"):
        self.buffer = local.new_empty(len(ranks) * local.numel())
        self.work = comm.all_gather(self.buffer, local.detach().contiguous(), ranks, op, async_op=True)
        self.comm, self.ranks, self.op = comm, ranks, op

    def result(self) -> torch.Tensor:
        self.comm.wait(self.work, self.op, self.ranks)
        return self.buffer


class GatherExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor, comm: Communicator, ranks: Sequence[int],
                pending: PendingGather | None) -> torch.Tensor:
        ctx.comm, ctx.ranks = comm, ranks
        if pending is not None:
            return pending.result()
        out = local.new_empty(len(ranks) * local.numel())
        comm.all_gather(out, local.contiguous(), ranks, "ag")
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shard = grad.new_empty(grad.numel() // len(ctx.ranks))
        ctx.comm.reduce_scatter(shard, grad.contiguous(), ctx.ranks, "rs")
        return shard, None, None, None
