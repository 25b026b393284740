"""Autograd-aware collectives: the backward of each is its dual collective.

* :class:`AllToAll` -- forward: uneven all-to-all of rows; backward: the same with splits swapped.
* :class:`ExpertGatherer` -- the hierarchical all-gather of expert shards inside an expert domain:
  one stage per level with domain size > 1, outermost (slowest) first, so a slow link carries each
  shard once and the fast inner links fan it out. Its dual, the reduce-scatter of the gradients,
  runs the stages innermost first, so the slow link carries only already-summed shards.
* :class:`GatherExperts` -- the autograd function: forward gathers (or takes a prefetched gather);
  backward starts the reduce-scatter, runs its slow outer stage asynchronously while the backward
  pass goes on, and adds the owner's gradient (scaled) when the backward pass ends.
* :class:`GatherEncoded` + :class:`EncodedExperts` -- the same with compressed experts left encoded
  and decoded one at a time inside the expert computation (``sr_decode="expert"``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from hybridep.migration.sr import SRCodec
from hybridep.parallel.comm import Communicator
from hybridep.topology import Domains


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
    """A gather whose first (slowest) stage is in flight; :meth:`result` completes it."""

    def __init__(self, gatherer: ExpertGatherer, local: torch.Tensor):
        self.gatherer, self.local = gatherer, local.detach()
        payload = gatherer.encode(self.local)
        first = gatherer.groups[0]
        self.buffer = payload.new_empty(len(first) * payload.numel())
        self.work = gatherer.comm.all_gather(self.buffer, payload, first, "ag", async_op=True)

    def encoded(self) -> torch.Tensor:
        """All members' payloads (encoded when compressing) in domain order, flat."""
        g = self.gatherer
        g.comm.wait(self.work, "ag", g.groups[0])
        return g.finish_gather(self.buffer)

    def result(self) -> torch.Tensor:
        return self.gatherer.decode(self.encoded(), self.local)


class ExpertGatherer:
    """Hierarchical gather / reduce-scatter of one rank's expert shard inside its domain."""

    def __init__(self, comm: Communicator, domains: Domains, member: int, codec: SRCodec | None = None,
                 basis: str = "shared"):
        if basis not in ("shared", "delta", "zero"):
            raise ValueError(f"sr basis must be 'shared', 'delta' or 'zero', got {basis!r}")
        self.comm, self.member, self.codec, self.basis = comm, member, codec, basis
        self.shared: torch.Tensor | None = None
        """Basis [p] of the ``shared``/``zero`` modes (identical on all ranks)."""
        self.replica: torch.Tensor | None = None
        """``delta`` mode: every member's copy of the domain's experts [S*n, p], identical on all
        members; the first gather is dense, later ones send top-k of (expert - replica)."""
        self.levels = domains.gather_levels()
        self.groups = []
        for lv in self.levels:
            groups = domains.stage_groups(lv)
            comm.create_groups(groups)
            self.groups.append(next(g for g in groups if comm.rank in g))
        self.stage_sizes = [len(g) for g in self.groups]

    @property
    def domain_size(self) -> int:
        out = 1
        for s in self.stage_sizes:
            out *= s
        return out

    def start(self, local: torch.Tensor) -> PendingGather:
        """Begin gathering ``local`` ([n, p] expert-major rows of this rank's experts, flattened)."""
        return PendingGather(self, local)

    def encode(self, local: torch.Tensor) -> torch.Tensor:
        if self.codec is None:
            return local.contiguous()
        rows = local.view(-1, self.codec.p)
        if self.basis == "delta":
            if self.replica is None:
                return rows.contiguous().view(torch.uint8).reshape(-1)
            n = rows.shape[0]
            return self.codec.encode(rows, self.replica[self.member * n:(self.member + 1) * n])
        return self.codec.encode(rows, self.shared)

    def decode(self, gathered: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """Dense experts of all members in domain order; this rank's own slot is its exact expert."""
        if self.codec is None:
            return gathered
        rows = local.view(-1, self.codec.p)
        n = rows.shape[0]
        chunks = gathered.view(self.domain_size, -1)
        if self.basis == "delta":
            if self.replica is None:
                self.replica = torch.cat([c.view(rows.dtype).view(n, -1) for c in chunks])
            else:
                self.replica = torch.cat([self.codec.decode(c, n, self.replica[i * n:(i + 1) * n])
                                          for i, c in enumerate(chunks)])
            dense = self.replica.clone()
        else:
            dense = torch.cat([self.codec.decode(c, n, self.shared) for c in chunks])
        dense[self.member * n:(self.member + 1) * n] = rows
        return dense.reshape(-1)

    def decode_row(self, gathered: torch.Tensor, local: torch.Tensor, j: int) -> torch.Tensor:
        """Dense expert ``j`` [p] (domain order) of a gathered payload -- the own slot exact, others
        decoded alone (``shared``/``zero`` basis; the ``delta`` basis keeps dense copies anyway)."""
        rows = local.view(-1, self.codec.p)
        member, i = divmod(j, rows.shape[0])
        if member == self.member:
            return rows[i]
        return self.codec.decode_one(gathered.view(self.domain_size, -1)[member], rows.shape[0], i, self.shared)

    def finish_gather(self, first: torch.Tensor) -> torch.Tensor:
        """Run the inner stages on the first stage's result; return all shards in domain order."""
        data = first
        for group in self.groups[1:]:
            out = data.new_empty(len(group) * data.numel())
            self.comm.all_gather(out, data, group, "ag")
            data = out
        k = len(self.stage_sizes)
        # layout now [S_{k-1}, ..., S_0, shard]; domain order is [S_0, ..., S_{k-1}, shard]
        view = data.view(*reversed(self.stage_sizes), -1)
        return view.permute(*reversed(range(k)), k).reshape(-1)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        return self.start(local).result()

    def reduce_scatter_start(self, grad: torch.Tensor):
        """Sum ``grad`` (all shards, domain order) over the domain into this rank's shard: inner
        stages now, the outermost one asynchronously. Returns a handle with ``wait() -> shard``."""
        k = len(self.stage_sizes)
        data = grad.view(*self.stage_sizes, -1).permute(*reversed(range(k)), k).reshape(-1)
        for group in reversed(self.groups[1:]):
            out = data.new_empty(data.numel() // len(group))
            self.comm.reduce_scatter(out, data, group, "rs")
            data = out
        shard = data.new_empty(data.numel() // self.stage_sizes[0])
        return self.comm.reduce_scatter_async(shard, data.contiguous(), self.groups[0], "rs")


def _reduce_scatter_to_owners(gatherer: ExpertGatherer, grad: torch.Tensor,
                              accumulate: Callable[[torch.Tensor], None]) -> None:
    """Start the reduce-scatter of ``grad`` (all domain experts); ``accumulate`` gets this rank's
    summed shard when the backward pass ends (the slow stage runs meanwhile)."""
    handle = gatherer.reduce_scatter_start(grad)
    torch.autograd.Variable._execution_engine.queue_callback(lambda: accumulate(handle.wait()))


class EncodedExperts:
    """A domain's gathered experts kept encoded, decoded one at a time (:meth:`expert`), with the
    dense gradient of all of them collected for the reduce-scatter. The expert computation runs
    each expert under activation checkpointing, so a decoded expert lives only while that expert
    computes (forward, and again in its backward): the layer never holds more than one dense copy
    besides the rank's own experts. ``anchor`` (a zero scalar) ties every output to the gather."""

    def __init__(self, gatherer: ExpertGatherer, local: torch.Tensor, split: Callable[[torch.Tensor], dict]):
        self.gatherer, self.local, self.split = gatherer, local.detach(), split
        self.payload: torch.Tensor | None = None
        self.grad: torch.Tensor | None = None
        self.anchor: torch.Tensor | None = None

    def row(self, j: int) -> torch.Tensor:
        """Expert ``j`` [p], decoded now (the own slot: the exact expert)."""
        return self.gatherer.decode_row(self.payload, self.local, j)

    def dense_grad(self) -> torch.Tensor:
        """The gradient of all the domain's experts, flat in domain order (zeros until added to)."""
        if self.grad is None:
            self.grad = self.local.new_zeros(self.gatherer.domain_size * self.local.numel())
        return self.grad

    def add_grad(self, j: int, grad: torch.Tensor) -> None:
        self.dense_grad().view(-1, grad.numel())[j] += grad

    def expert(self, j: int) -> dict[str, torch.Tensor]:
        """Expert ``j``'s weights {name: tensor}, decoded now (call inside a checkpointed region)."""
        return self.split(DecodeExpert.apply(self.anchor, self, j))


class DecodeExpert(torch.autograd.Function):
    """Forward: expert ``j`` decoded. Backward: its gradient goes into the domain's dense gradient."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, experts: EncodedExperts, j: int) -> torch.Tensor:
        ctx.experts, ctx.j = experts, j
        return experts.row(j)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.experts.add_grad(ctx.j, grad)
        return grad.new_zeros(()), None, None


class GatherEncoded(torch.autograd.Function):
    """Forward: completes the gather into ``experts`` (encoded) and returns its anchor (a zero
    scalar). Backward -- after every expert's gradient is in -- reduce-scatters the dense gradient
    to the owners, as :class:`GatherExperts` does."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, gatherer: ExpertGatherer, pending: PendingGather | None,
                accumulate: Callable[[torch.Tensor], None], experts: EncodedExperts) -> torch.Tensor:
        ctx.experts, ctx.accumulate = experts, accumulate
        experts.payload = (pending if pending is not None else gatherer.start(local)).encoded()
        return local.new_zeros(())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        _reduce_scatter_to_owners(ctx.experts.gatherer, ctx.experts.dense_grad(), ctx.accumulate)
        return None, None, None, None, None


class GatherExperts(torch.autograd.Function):
    """Forward: the domain's experts (decoded copies, own slot exact). Backward: dense gradients of
    all copies reduce-scattered to the owners (straight-through for decoded copies); ``accumulate``
    receives this rank's summed shard when the backward pass ends."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, gatherer: ExpertGatherer, pending: PendingGather | None,
                accumulate: Callable[[torch.Tensor], None]) -> torch.Tensor:
        ctx.gatherer, ctx.accumulate = gatherer, accumulate
        return pending.result() if pending is not None else gatherer.gather(local)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        _reduce_scatter_to_owners(ctx.gatherer, grad.contiguous(), ctx.accumulate)
        return None, None, None, None
