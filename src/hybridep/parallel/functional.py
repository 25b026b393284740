"""Autograd-aware collectives: the backward of each is its dual collective.

* :class:`AllToAll` -- forward: uneven all-to-all of rows; backward: the same with splits swapped.
* :class:`IssueAllToAll` + :class:`WaitAllToAll` -- the same split in two, so that compute runs
  between issuing the exchange and waiting for it (forward and backward; the shortcut block).
* :class:`PipelinedExpertExchange` -- dispatch, experts and combine in chunks whose transfers are all
  in flight at once (``a2a_chunks > 1``); backward mirrors it.
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

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hybridep.migration.sr import ErrorFeedback, SRCodec
from hybridep.parallel.comm import Communicator, Pending, Requests
from hybridep.topology import Domains


class ExchangeCache:
    """Communication-aware activation checkpointing (TED's CAC): the outputs of a layer's collectives
    recorded while its checkpointed forward runs (:meth:`recording`) and handed back, in the same
    order, when activation checkpointing recomputes it (:meth:`replaying`), so the recomputation
    sends nothing; the backward's collectives run as usual."""

    def __init__(self) -> None:
        self.mode: str | None = None
        self.saved: list[torch.Tensor] = []

    @contextlib.contextmanager
    def recording(self):
        self.mode, self.saved = "record", []
        try:
            yield
        finally:
            self.mode = None

    @contextlib.contextmanager
    def replaying(self):
        self.mode = "replay"
        try:
            yield
        finally:
            self.mode, self.saved = None, []

    def once(self, communicate: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``communicate()``'s result: run now (and kept while recording), or the recorded one."""
        if self.mode == "replay":
            return self.saved.pop(0).clone()
        out = communicate()
        if self.mode == "record":
            self.saved.append(out.detach())
        return out


def once(cache: ExchangeCache | None, communicate: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``communicate()`` through ``cache`` (:meth:`ExchangeCache.once`), or simply run without one."""
    return communicate() if cache is None else cache.once(communicate)


class AllToAll(torch.autograd.Function):
    """Uneven all-to-all of rows; backward: the same with the splits swapped. ``cache``: an
    :class:`ExchangeCache` that may hand the forward's output back instead (recomputation)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Communicator, ranks: Sequence[int], send: list[int],
                recv: list[int], op: str, cache: ExchangeCache | None = None) -> torch.Tensor:
        ctx.comm, ctx.ranks, ctx.send, ctx.recv, ctx.op = comm, ranks, send, recv, op

        def exchange() -> torch.Tensor:
            out = x.new_empty((sum(recv), *x.shape[1:]))
            comm.all_to_all(out, x.contiguous(), recv, send, ranks, op)
            return out
        return once(cache, exchange)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        ctx.comm.all_to_all(out, grad.contiguous(), ctx.send, ctx.recv, ctx.ranks, ctx.op + "_bwd")
        return out, None, None, None, None, None, None


class AsyncExchange:
    """One all-to-all in flight, shared by its :class:`IssueAllToAll` and :class:`WaitAllToAll`:
    ``send`` / ``recv`` rows per member of ``ranks``, under the operation name ``op``."""

    def __init__(self, comm: Communicator, ranks: Sequence[int], send: list[int], recv: list[int], op: str):
        self.comm, self.ranks, self.send, self.recv, self.op = comm, ranks, send, recv, op
        self.work = self.out = self.grad = None
        self.keep: torch.Tensor | None = None
        """The buffer being sent (kept alive until the exchange is waited for)."""
        self.shape: torch.Size | None = None

    def start(self, x: torch.Tensor, out_rows: list[int], in_rows: list[int], op: str) -> torch.Tensor:
        """Issue the exchange of ``x``'s rows; returns the buffer it fills."""
        self.keep = x.contiguous()
        out = x.new_empty((sum(out_rows), *x.shape[1:]))
        self.work = self.comm.all_to_all_start(out, self.keep, out_rows, in_rows, self.ranks, op)
        return out

    def finish(self, op: str) -> None:
        self.comm.wait(self.work, op, self.ranks)
        self.work = self.keep = None


class IssueAllToAll(torch.autograd.Function):
    """Forward: issue the exchange of ``x`` (:class:`AsyncExchange`) and return a token (a zero
    scalar) for :class:`WaitAllToAll`. Backward: wait for the mirror exchange that
    :class:`WaitAllToAll`'s backward issued, and return its rows as ``x``'s gradient -- so the
    backward computes whatever autograd runs between the two while the gradient travels."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, ex: AsyncExchange) -> torch.Tensor:
        ctx.ex = ex
        ex.shape = x.shape
        ex.out = ex.start(x, ex.recv, ex.send, ex.op)
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, token_grad: torch.Tensor):
        ex = ctx.ex
        ex.finish(ex.op + "_bwd")
        grad, ex.grad = ex.grad, None
        return grad, None


class WaitAllToAll(torch.autograd.Function):
    """Forward: wait for the exchange :class:`IssueAllToAll` issued; its received rows. Backward:
    issue the mirror exchange of the gradient (waited for by :class:`IssueAllToAll`'s backward)."""

    @staticmethod
    def forward(ctx, token: torch.Tensor, ex: AsyncExchange) -> torch.Tensor:
        ctx.ex = ex
        ex.finish(ex.op)
        out, ex.out = ex.out, None
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ex = ctx.ex
        ex.grad = ex.start(grad, ex.send, ex.recv, ex.op + "_bwd")
        return grad.new_zeros(()), None


def exchange_counts(comm: Communicator, rows: torch.Tensor, group: Sequence[int]) -> torch.Tensor:
    """``rows`` ([members x k, ...]: block i for member i) exchanged in ``group``: block i from member
    i -- the row counts every exchange sends first, so that no padding or agreement is needed."""
    out = torch.empty_like(rows)
    per = rows.shape[0] // len(group)
    comm.all_to_all(out, rows, [per] * len(group), [per] * len(group), group, "meta")
    return out


def pipelined_round_trip(comm: Communicator, group: Sequence[int], parts: Sequence[torch.Tensor],
                         splits: Sequence[tuple[list[int], list[int]]], work: Callable, side: Callable | None = None
                         ) -> list[torch.Tensor]:
    """Chunks of rows out to ``group`` and their results back, pipelined (MoNTA): every chunk
    ``parts[c]`` is issued at once (``splits[c]``: rows to and from each member) and ``side(c)``
    right after it (e.g. the chunk's expert ids); then chunk by chunk, as its rows land,
    ``work(c, rows, side(c)'s result)`` runs -- while the later chunks still travel -- and its result
    is issued back at once. Returns each chunk's results as they come back, in chunk order. The
    backward mirrors it through :class:`IssueAllToAll` / :class:`WaitAllToAll`: every result
    gradient is issued first, each chunk's row gradients waited for when autograd reaches them."""
    flights = []
    for c, (part, (send, recv)) in enumerate(zip(parts, splits, strict=True)):
        ex = AsyncExchange(comm, group, send, recv, "a2a_dispatch")
        token = IssueAllToAll.apply(part, ex)
        flights.append((ex, token, side(c) if side is not None else None))
    returns = []
    for c, (ex, token, extra) in enumerate(flights):
        y = work(c, WaitAllToAll.apply(token, ex), extra)
        back = AsyncExchange(comm, group, ex.recv, ex.send, "a2a_combine")
        returns.append((back, IssueAllToAll.apply(y, back)))
    return [WaitAllToAll.apply(token, back) for back, token in returns]


@dataclass
class ChunkPlan:
    """Row counts of a chunked exchange inside one rail (members indexed j = 0 .. r-1).

    ``send[c][j]`` / ``recv[c][j]``: rows this rank sends to / receives from member j in chunk c;
    ``recv_by_expert[c]``: [r, m] rows received in chunk c per source member and expert (each
    sender sorts its rows by expert)."""

    send: list[list[int]]
    recv: list[list[int]]
    recv_by_expert: list[torch.Tensor]


PIPELINE_TAG = 1 << 16
"""First point-to-point tag of chunked exchanges (chunk c: dispatch 2c, combine 2c + 1 above it),
apart from the untagged transfers of the other exchanges."""


def _by_chunk(t: torch.Tensor, counts: list[list[int]]) -> list[tuple[torch.Tensor, ...]]:
    """Rows of ``t`` (ordered by chunk, then member) as views [chunk][member]."""
    chunks = torch.split(t, [sum(row) for row in counts])
    return [torch.split(chunk, row) for chunk, row in zip(chunks, counts, strict=True)]


def _round_trip(comm: Communicator, rail: Sequence[int], plan: ChunkPlan, outgoing: torch.Tensor,
                work: Callable[[int, torch.Tensor], torch.Tensor], tags: tuple[int, int],
                ops: tuple[str, str]) -> torch.Tensor:
    """Send ``outgoing``'s rows (by chunk, then member: ``plan.send``) to the rail members, run
    ``work(c, rows)`` on each chunk's arrivals (``plan.recv[c]`` rows per member) as soon as they are
    in, send its result rows straight back, and return what comes back, in ``outgoing``'s order.
    Every receive is posted before any send; chunk c travels with tag ``PIPELINE_TAG + 2c + tags[0]``
    out and ``+ tags[1]`` back, under the operation names ``ops``."""
    me, chunks = rail.index(comm.rank), len(plan.send)
    peers = [j for j in range(len(rail)) if j != me]
    out_parts = _by_chunk(outgoing.contiguous(), plan.send)
    arrived = [outgoing.new_empty((sum(row), *outgoing.shape[1:])) for row in plan.recv]
    arrived_parts = [torch.split(b, row) for b, row in zip(arrived, plan.recv, strict=True)]
    back = torch.empty_like(outgoing)
    back_parts = _by_chunk(back, plan.send)
    start = time.perf_counter()

    def tag(c: int, way: int) -> int:
        return PIPELINE_TAG + 2 * c + tags[way]

    arrivals = [comm.post([(arrived_parts[c][j], rail[j], tag(c, 0)) for j in peers], [], rail, ops[0])
                for c in range(chunks)]
    returns = comm.post([(back_parts[c][j], rail[j], tag(c, 1)) for c in range(chunks) for j in peers], [],
                        rail, ops[1])
    sent = [comm.post([], [(out_parts[c][j], rail[j], tag(c, 0)) for c in range(chunks) for j in peers], rail, ops[0])]
    for c in range(chunks):
        arrived_parts[c][me].copy_(out_parts[c][me])
        comm.wait(arrivals[c], ops[0], rail)
        result = torch.split(work(c, arrived[c]), plan.recv[c])
        back_parts[c][me].copy_(result[me])
        sent.append(comm.post([], [(result[j], rail[j], tag(c, 1)) for j in peers], rail, ops[1]))
    comm.wait(Requests(returns.reqs + [q for o in sent for q in o.reqs]), ops[1], rail)
    comm.note_outer_interval(rail, start, time.perf_counter())
    return back


class PipelinedExpertExchange(torch.autograd.Function):
    """Dispatch -> experts -> combine in chunks, every chunk's transfers in flight at once.

    Forward: every receive (all chunks' tokens and results) is posted, then every chunk's tokens
    are sent; chunk c's experts run as soon as its tokens are in and its results go back at once, so
    one chunk's combine (under skewed routing heavy in one direction of a DC link) overlaps the next
    chunks' dispatch (heavy in the other). Backward mirrors it: every chunk's result gradients are
    sent, and each chunk's token gradients go back as soon as its expert backward is done. Each
    chunk's expert computation is recorded on its own graph in forward and differentiated in
    backward.

    ``x``: [N, ...] rows sorted by (chunk, destination member, expert); ``compute(weights, rows,
    rows_by_expert)`` runs the experts on received rows; ``grad_mode``: the caller's
    ``torch.is_grad_enabled()``; ``weights``: the expert weight tensors named ``names``. Returns the
    expert outputs in ``x``'s row order."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Communicator, rail: Sequence[int], plan: ChunkPlan,
                compute: Callable, names: tuple[str, ...], grad_mode: bool, *weights: torch.Tensor) -> torch.Tensor:
        # record the chunks' graphs only when a backward can follow (the caller's grad mode: not
        # under no_grad, e.g. in evaluation)
        record = grad_mode and (ctx.needs_input_grad[0] or any(ctx.needs_input_grad[7:]))
        leaves = [w.detach().requires_grad_(w.requires_grad and record) for w in weights]
        ctx.ys, ctx.inputs = [], []

        def experts(c: int, rows: torch.Tensor) -> torch.Tensor:
            with torch.set_grad_enabled(record):
                rows.requires_grad_(record)
                y = compute(dict(zip(names, leaves, strict=True)), rows, plan.recv_by_expert[c])
            if record:
                ctx.ys.append(y)
                ctx.inputs.append(rows)
            return y.detach()

        back = _round_trip(comm, rail, plan, x.detach(), experts, (0, 1), ("a2a_dispatch", "a2a_combine"))
        ctx.comm, ctx.rail, ctx.plan, ctx.leaves = comm, rail, plan, leaves
        return back

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        wanted = [w for w in ctx.leaves if w.requires_grad]
        weight_grads = [torch.zeros_like(w) for w in wanted]

        def experts_backward(c: int, grad_y: torch.Tensor) -> torch.Tensor:
            rows = ctx.inputs[c]
            got = torch.autograd.grad(ctx.ys[c], [rows, *wanted], grad_y, allow_unused=True)
            for acc, g in zip(weight_grads, got[1:], strict=True):
                if g is not None:
                    acc += g
            return got[0] if got[0] is not None else torch.zeros_like(rows)

        grad_x = _round_trip(ctx.comm, ctx.rail, ctx.plan, grad, experts_backward, (1, 0),
                             ("a2a_combine_bwd", "a2a_dispatch_bwd"))
        ctx.ys = ctx.inputs = None
        it = iter(weight_grads)
        return (grad_x, None, None, None, None, None, None,
                *[next(it) if w.requires_grad else None for w in ctx.leaves])


class PendingGather:
    """A gather running on the communicator's background thread (every stage, outermost first);
    :meth:`result` waits for it and decodes."""

    def __init__(self, gatherer: ExpertGatherer, local: torch.Tensor):
        self.gatherer, self.local = gatherer, local.detach()
        payload = gatherer.encode(self.local)
        self.pending = Pending(gatherer.comm, gatherer.comm.in_background(lambda: gatherer.gather_stages(payload)),
                               "ag", gatherer.groups[0])

    def encoded(self) -> torch.Tensor:
        """All members' payloads (encoded when compressing) in domain order, flat."""
        return self.pending.wait()

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
        self.grad_codec: SRCodec | None = None
        """Codec of the reduce-scatter's gradient shares over the top level (top-k with error
        feedback); None = dense. Stages inside a DC stay dense: their links are fast, and each
        compression point delays gradient mass by an iteration or more."""
        self.feedback: dict[int, ErrorFeedback] = {}
        """Error-feedback memory of each reduce-scatter stage (with ``grad_codec``)."""

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

    def gather_stages(self, payload: torch.Tensor) -> torch.Tensor:
        """Every stage of the gather of ``payload``, outermost first (blocking; run on the
        communicator's background thread); all members' payloads in domain order, flat."""
        data = payload
        for group in self.groups:
            out = data.new_empty(len(group) * data.numel())
            self.comm.all_gather(out, data, group, "ag")
            data = out
        k = len(self.stage_sizes)
        # layout now [S_{k-1}, ..., S_0, shard]; domain order is [S_0, ..., S_{k-1}, shard]
        view = data.view(*reversed(self.stage_sizes), -1)
        return view.permute(*reversed(range(k)), k).reshape(-1)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Gather now (a gather that was not prefetched)."""
        return self.start(local).result()

    def reduce_scatter_stages(self, data: torch.Tensor) -> torch.Tensor:
        """Every stage of the reduce-scatter of ``data`` (stage-major, see
        :meth:`reduce_scatter_start`), innermost first (blocking; run on the communicator's
        background thread); this rank's summed shard."""
        for stage in reversed(range(len(self.groups))):
            group = self.groups[stage]
            if self.grad_codec is None or self.levels[stage] != 0:  # compressed only over the WAN
                out = data.new_empty(data.numel() // len(group))
                self.comm.reduce_scatter(out, data, group, "rs")
            else:
                out = self._sparse_reduce_scatter(data, group, stage)
            data = out
        return data

    def _sparse_reduce_scatter(self, data: torch.Tensor, group: Sequence[int], stage: int) -> torch.Tensor:
        """One reduce-scatter stage with every member's share sent as top-k rows with error feedback
        (:class:`~hybridep.migration.sr.ErrorFeedback`, one per stage): the shares travel in one
        all-to-all of the encoded buffers, each receiver sums the decoded ones and its own dense share."""
        n, me = len(group), group.index(self.comm.rank)
        p = self.grad_codec.p
        rows = data.view(n, -1, p)
        feedback = self.feedback.get(stage)
        if feedback is None:
            feedback = self.feedback[stage] = ErrorFeedback(self.grad_codec)
        bufs = feedback.encode(rows, skip=me)
        size = max(b.numel() for b in bufs)
        sizes = [0 if i == me else size for i in range(n)]
        recv = torch.empty(size * (n - 1), dtype=torch.uint8)
        self.comm.all_to_all(recv, torch.cat(bufs), sizes, sizes, group, "rs")
        out = rows[me].clone()
        for buf in recv.view(n - 1, -1):
            out += feedback.decode(buf, rows.shape[1])
        return out.reshape(-1)

    def reduce_scatter_start(self, grad: torch.Tensor) -> Pending:
        """Sum ``grad`` (all shards, domain order) over the domain into this rank's shard, on the
        communicator's background thread. Returns a handle with ``wait() -> shard``."""
        k = len(self.stage_sizes)
        data = grad.view(*self.stage_sizes, -1).permute(*reversed(range(k)), k).reshape(-1)
        return Pending(self.comm, self.comm.in_background(lambda: self.reduce_scatter_stages(data)), "rs",
                       self.groups[0])


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
    receives this rank's summed shard when the backward pass ends. ``cache``: an
    :class:`ExchangeCache` that may hand the forward's gather back instead (recomputation)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, gatherer: ExpertGatherer, pending: PendingGather | None,
                accumulate: Callable[[torch.Tensor], None], cache: ExchangeCache | None = None) -> torch.Tensor:
        ctx.gatherer, ctx.accumulate = gatherer, accumulate
        return once(cache, lambda: pending.result() if pending is not None else gatherer.gather(local))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        _reduce_scatter_to_owners(ctx.gatherer, grad.contiguous(), ctx.accumulate)
        return None, None, None, None, None
