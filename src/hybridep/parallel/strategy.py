"""Expert-parallel strategies applied to parallelism-agnostic MoE modules from a plan.

One class serves EP and HybridEP, because EP *is* HybridEP with every domain size 1:

* each rank owns ``n = E / G`` experts (rank r owns experts ``r*n .. r*n+n-1``) and its optimizer
  updates only those;
* inside the rank's expert domain the members' experts are all-gathered before use, and the
  gradients of the gathered copies are reduce-scattered back to their owners in backward (autograd
  dual of the gather). The gathers can be prefetched layer by layer (:func:`prefetch_all`): layer
  0's is issued right after the optimizer step, and layer l+1's the moment layer l takes its
  experts, so it is in flight while layer l's experts and layer l+1's pre-expert part compute and
  the slow link carries one layer's gather at a time;
* tokens travel only inside the rank's rail: a token for an expert goes to the rail member that
  lies in the owner's domain (same offsets as the source at every level). Split sizes are
  exchanged first, so uneven and empty token counts need no padding and no agreement;
* with domain size 1 the gather disappears (plain EP); with the whole world as one domain the
  rail is the rank alone and no all-to-all is issued at all.

Gradient scale: the training loss is the mean of the ranks' losses (DDP semantics), so expert
gradients -- which arrive summed over all ranks' tokens -- are scaled by 1/G: by a hook in plain EP,
when the (asynchronous) reduce-scatter lands at the end of the backward pass in HybridEP.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from hybridep.migration.sr import VALUE_DTYPES, SRCodec, SRSettings
from hybridep.moe.experts import GroupedExperts
from hybridep.moe.layer import Branch, Eager, MoE, Permuted, compute_in_place, permute, unpermute
from hybridep.moe.router import Routing
from hybridep.parallel.comm import Communicator
from hybridep.parallel.functional import (
    AllToAll,
    AsyncExchange,
    ChunkPlan,
    EncodedExperts,
    ExchangeCache,
    ExpertGatherer,
    GatherEncoded,
    GatherExperts,
    IssueAllToAll,
    PendingGather,
    PipelinedExpertExchange,
    WaitAllToAll,
    exchange_counts,
)
from hybridep.strategies.dense_sync import DenseSync, register
from hybridep.topology import Domains


class ExpertParallelStyle:
    """The dispatcher of one MoE layer under a partition into expert domains."""

    def __init__(self, comm: Communicator, domains: Domains, num_experts: int, sr: SRSettings | None = None,
                 a2a_chunks: int = 1):
        g = comm.world_size
        if num_experts % g:
            raise ValueError(f"experts ({num_experts}) must be divisible by the world size ({g})")
        if not isinstance(a2a_chunks, int) or a2a_chunks < 1:
            raise ValueError(f"a2a_chunks must be a positive integer, got {a2a_chunks!r}")
        if a2a_chunks > 1 and sr is not None and sr.decode == "expert":
            raise ValueError("a2a_chunks > 1 needs sr decode 'layer': experts decoded one at a time are "
                             "recomputed in backward, which the chunked exchange does not do")
        self.a2a_chunks = domains.exchange_chunks(a2a_chunks)
        self.comm, self.domains = comm, domains
        self.n_local = num_experts // g
        rank = comm.rank
        self.rail = domains.rail_groups()[domains.offset_index(rank)]
        self.domain = domains.domain_groups()[domains.domain_index(rank)]
        comm.create_groups(domains.rail_groups())
        comm.create_groups([list(range(g))])
        self.sr = sr
        self.gatherer = ExpertGatherer(comm, domains, self.domain.index(rank))
        self._shared_work = None
        s, n = len(self.domain), self.n_local
        key = []
        for e in range(num_experts):
            owner = e // n
            owner_domain = domains.domain_of(owner)
            key.append(domains.domain_index(owner) * s * n + owner_domain.index(owner) * n + e % n)
        self.key_of_expert = torch.tensor(key)
        self._pending: PendingGather | None = None
        self.next_prefetch: Callable[[], None] | None = None
        """Issues the next layer's gather; called when this layer takes a prefetched gather."""
        self.cache: ExchangeCache | None = None
        """Communication-aware activation checkpointing: the gather's output kept for the
        recomputation (set by TED, :mod:`hybridep.parallel.ted`)."""

    # --- experts -------------------------------------------------------------------------
    def shard(self, experts: GroupedExperts) -> None:
        """Keep only this rank's experts as parameters (gradients scaled by 1/G, see module doc)."""
        lo = self.comm.rank * self.n_local
        scale = 1.0 / self.comm.world_size
        for name in experts.weight_names:
            full = getattr(experts, name)
            local = nn.Parameter(full.detach()[lo: lo + self.n_local].clone())
            if len(self.domain) == 1:  # with a domain, the reduce-scatter applies the scale
                local.register_hook(lambda g: g * scale)
            setattr(experts, name, local)
        if self.sr and len(self.domain) > 1:
            p = sum(getattr(experts, name)[0].numel() for name in experts.weight_names)
            codec = SRCodec(self.sr.ratio, p, experts.w1.dtype, VALUE_DTYPES[self.sr.values])
            self.gatherer.codec, self.gatherer.basis = codec, self.sr.basis
            if self.sr.grads == "topk":
                self.gatherer.grad_codec = codec
            if self.sr.basis == "shared":
                self._start_shared_update(experts)
            elif self.sr.basis == "zero":  # ablation: top-k of the raw expert
                self.gatherer.shared = torch.zeros(p, dtype=experts.w1.dtype)

    def _local_flat(self, experts: GroupedExperts) -> torch.Tensor:
        """This rank's experts as expert-major rows ([n, p]: w1[i], w2[i], (w3[i]) flattened), flat."""
        return torch.cat([w.reshape(self.n_local, -1) for w in experts.weights().values()], dim=1).reshape(-1)

    def _accumulate(self, experts: GroupedExperts):
        """Add a reduce-scattered gradient shard (expert-major) to the owner's parameters, scaled."""
        scale = 1.0 / self.comm.world_size

        def add(shard: torch.Tensor) -> None:
            rows, col = shard.view(self.n_local, -1), 0
            for w in experts.weights().values():
                width = w[0].numel()
                piece = rows[:, col: col + width].reshape(w.shape) * scale
                col += width
                w.grad = piece if w.grad is None else w.grad + piece
        return add

    # --- the SR basis: the mean of the layer's experts, all-reduced asynchronously ----------
    def _start_shared_update(self, experts: GroupedExperts) -> None:
        total = self._local_flat(experts).detach().view(self.n_local, -1).sum(0)
        world = list(range(self.comm.world_size))
        work = self.comm.all_reduce(total, world, "shared", async_op=True)
        self._shared_work = (work, total)

    def _finish_shared_update(self) -> None:
        if self._shared_work is not None:
            work, total = self._shared_work
            self.comm.wait(work, "shared", list(range(self.comm.world_size)))
            self.gatherer.shared = total / (self.n_local * self.comm.world_size)
            self._shared_work = None

    def prefetch(self, experts: GroupedExperts) -> None:
        """Issue this layer's expert all-gather now (its slow first stage asynchronously); the
        forward pass completes it when the layer needs the experts."""
        if len(self.domain) > 1:
            self._finish_shared_update()
            self._pending = self.gatherer.start(self._local_flat(experts).detach())

    def expert_weights(self, experts: GroupedExperts) -> dict[str, torch.Tensor] | EncodedExperts:
        """All experts of this rank's domain, in domain order: {name: [S*n, ...]}, or -- compressed
        with ``sr_decode="expert"`` -- an :class:`EncodedExperts` that decodes them one at a time."""
        own = experts.weights()
        s = len(self.domain)
        if s == 1:
            return own
        pending, self._pending = self._pending, None
        if pending is None:
            self._finish_shared_update()
        local = self._local_flat(experts)
        if self.gatherer.codec is not None and self.sr.decode == "expert":
            out = EncodedExperts(self.gatherer, local, functools.partial(_split_row, own))
            out.anchor = GatherEncoded.apply(local, self.gatherer, pending, self._accumulate(experts), out)
        else:
            flat = GatherExperts.apply(local, self.gatherer, pending, self._accumulate(experts), self.cache)
            out = _split_row(own, flat.view(s * self.n_local, -1))
        if pending is not None and self.next_prefetch is not None:
            self.next_prefetch()  # the chain: the next layer's gather goes out now
        if self.gatherer.codec is not None and self.sr.basis == "shared":  # refresh during the backward
            self._start_shared_update(experts)
        return out

    # --- tokens --------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, routing: Routing, experts: GroupedExperts) -> torch.Tensor:
        comm, rail = self.comm, self.rail
        r = len(rail)
        if r == 1:  # the domain holds every expert: no token leaves this rank
            return compute_in_place(x, routing, experts, self.expert_weights(experts), self.key_of_expert)
        p = permute(x, routing, self.key_of_expert.to(x.device))
        if self.a2a_chunks > 1:
            return self._pipelined(x, p, experts)
        send, recv, recv_counts = self._splits(p.keys)
        received = AllToAll.apply(p.x, comm, rail, send, recv, "a2a_dispatch")
        weights = self.expert_weights(experts)  # after the dispatch: the gather lands meanwhile
        y = _compute_received(experts, weights, received, recv_counts)
        back = AllToAll.apply(y, comm, rail, recv, send, "a2a_combine")
        return unpermute(back, p, x.shape[0])

    def begin(self, x: torch.Tensor, routing: Routing, experts: GroupedExperts) -> Branch:
        """The shortcut block's form of :meth:`__call__`: the dispatch is issued now and waited for
        at :meth:`InFlight.experts`, the combine issued there and waited for at
        :meth:`InFlight.result` (one exchange; a chunked exchange or a rank alone runs eagerly)."""
        if len(self.rail) == 1 or self.a2a_chunks > 1:
            return Eager(self, x, routing, experts)
        p = permute(x, routing, self.key_of_expert.to(x.device))
        send, recv, recv_counts = self._splits(p.keys)
        dispatch = AsyncExchange(self.comm, self.rail, send, recv, "a2a_dispatch")
        return InFlight(self, experts, p, x.shape[0], recv_counts, dispatch, IssueAllToAll.apply(p.x, dispatch))

    def _splits(self, keys: torch.Tensor) -> tuple[list[int], list[int], torch.Tensor]:
        """One unchunked exchange's rows to send to and receive from each rail member, and the
        [members, experts] rows that arrive (see :meth:`_exchange_counts`)."""
        counts, recv_counts = self._exchange_counts(keys, 1)
        counts, recv_counts = counts[0], recv_counts[:, 0]
        return counts.sum(1).tolist(), recv_counts.sum(1).tolist(), recv_counts

    def _exchange_counts(self, keys: torch.Tensor, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows per (chunk, rail member, expert) from sorted row ``keys`` (chunk-major), sent to every
        member first so that no padding or agreement is needed: (this rank's [C, r, m] counts,
        the [r, C, m] counts each member sends here)."""
        r, per_dest = len(self.rail), len(self.domain) * self.n_local
        counts = torch.bincount(keys, minlength=chunks * r * per_dest).view(chunks, r, per_dest)
        by_member = counts.transpose(0, 1).reshape(r, chunks * per_dest).contiguous()
        return counts, exchange_counts(self.comm, by_member, self.rail).view(r, chunks, per_dest)

    def _pipelined(self, x: torch.Tensor, p: Permuted, experts: GroupedExperts) -> torch.Tensor:
        """The exchange in ``a2a_chunks`` chunks of this rank's tokens, pipelined (see
        :class:`PipelinedExpertExchange`). The domain's experts are taken before the dispatch."""
        comm, rail, chunks = self.comm, self.rail, self.a2a_chunks
        r, per_dest = len(rail), len(self.domain) * self.n_local
        # rows by (chunk of the token, destination member, expert)
        chunk = p.token_idx * chunks // max(1, x.shape[0])
        keys = chunk * (r * per_dest) + p.keys
        order = torch.argsort(keys, stable=True)
        p = Permuted(p.x[order], p.token_idx[order], p.weights[order], keys[order])
        counts, recv_counts = self._exchange_counts(p.keys, chunks)
        plan = ChunkPlan(send=counts.sum(2).tolist(), recv=recv_counts.sum(2).T.tolist(),
                         recv_by_expert=[recv_counts[:, c] for c in range(chunks)])
        weights = self.expert_weights(experts)
        y = PipelinedExpertExchange.apply(p.x, comm, rail, plan, functools.partial(_compute_received, experts),
                                          tuple(weights), torch.is_grad_enabled(), *weights.values())
        return unpermute(y, p, x.shape[0])


class InFlight:
    """An MoE branch whose dispatch is in flight (:meth:`ExpertParallelStyle.begin`)."""

    def __init__(self, style: ExpertParallelStyle, experts: GroupedExperts, p: Permuted, tokens: int,
                 recv_counts: torch.Tensor, dispatch: AsyncExchange, token: torch.Tensor):
        self.style, self.experts_module, self.p, self.tokens = style, experts, p, tokens
        self.recv_counts, self.dispatch, self.token = recv_counts, dispatch, token
        self.combine: AsyncExchange | None = None

    def experts(self) -> None:
        """Wait for the tokens, run the experts, issue the combine."""
        received = WaitAllToAll.apply(self.token, self.dispatch)
        weights = self.style.expert_weights(self.experts_module)
        y = _compute_received(self.experts_module, weights, received, self.recv_counts)
        d = self.dispatch
        self.combine = AsyncExchange(d.comm, d.ranks, d.recv, d.send, "a2a_combine")
        self.token = IssueAllToAll.apply(y, self.combine)

    def result(self) -> torch.Tensor:
        """Wait for the combine; the weighted sum of the expert outputs per token."""
        if self.combine is None:
            raise RuntimeError("Branch.result() before Branch.experts()")
        return unpermute(WaitAllToAll.apply(self.token, self.combine), self.p, self.tokens)


def _compute_received(experts: GroupedExperts, weights, received: torch.Tensor,
                      recv_counts: torch.Tensor) -> torch.Tensor:
    """Run the experts on received rows, which arrive grouped by source member and, within each,
    by expert (``recv_counts``: [members, experts] rows); results in the received order."""
    r, m = recv_counts.shape
    label = torch.arange(m, device=received.device).repeat(r).repeat_interleave(recv_counts.reshape(-1))
    order = torch.argsort(label, stable=True)
    y = experts.compute(weights, received[order], recv_counts.sum(0).tolist())
    return y[torch.argsort(order)]


def _split_row(like: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Expert-major rows ([m, p] or one expert [p]) back into named weights shaped like ``like``'s
    (without the expert axis for a single row)."""
    out, col = {}, 0
    for name, w in like.items():
        width = w[0].numel()
        piece = rows[..., col: col + width]
        out[name] = piece.reshape(*rows.shape[:-1], *w.shape[1:])
        col += width
    return out


def moe_layers(model: nn.Module) -> Iterator[MoE]:
    return (m for m in model.modules() if isinstance(m, MoE))


def parallelize(model: nn.Module, comm: Communicator, domains: Domains, sr: SRSettings | None = None,
                a2a_chunks: int = 1, dedup: tuple[int, ...] | None = None) -> list[ExpertParallelStyle]:
    """Apply the partition to every MoE layer of ``model`` (in place): shard experts, swap dispatchers.
    ``sr`` enables shared + residual compression of the in-domain expert traffic (see
    :class:`~hybridep.migration.sr.SRSettings`); ``a2a_chunks``: split each rank's tokens into that
    many chunks whose dispatch, experts and combine pipeline (one chunk's combine overlaps the next
    ones' dispatch; 1 = one exchange); ``dedup``: the hierarchical token exchange instead, deduplicating
    at these level indices (:mod:`hybridep.parallel.hierarchical`; ``a2a_chunks`` then pipelines its
    stages)."""
    from hybridep.parallel.hierarchical import HierarchicalStyle

    styles: list[ExpertParallelStyle] = []
    for layer in moe_layers(model):
        if dedup is not None:
            style = HierarchicalStyle(comm, domains, layer.experts.num_experts, sr, dedup, a2a_chunks)
        else:
            style = ExpertParallelStyle(comm, domains, layer.experts.num_experts, sr, a2a_chunks)
        style.shard(layer.experts)
        layer.dispatcher = style
        if styles:  # the prefetch chain: the previous layer, taking its experts, issues this one's gather
            styles[-1].next_prefetch = functools.partial(style.prefetch, layer.experts)
        styles.append(style)
    return styles


def expert_param_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the expert parameters (owned per rank, not data-parallel)."""
    out = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, GroupedExperts):
            out += [f"{mod_name}.{w}" if mod_name else w for w in mod.weight_names]
    return out


def data_parallel(model: nn.Module, comm: Communicator | None = None, dense_sync: DenseSync | None = None,
                  bucket_cap_mb: float | None = None, replicas: list[int] | None = None) -> nn.Module:
    """Wrap in PyTorch DDP for the non-expert parameters; expert parameters are left to the strategy.
    ``dense_sync`` (default ``ring``) says how DDP's buckets are synchronised
    (:mod:`hybridep.strategies.dense_sync`). With ``comm`` and ``ring``, DDP's gradient all-reduces
    (PyTorch's default hook) are timed as cross-DC exchanges (:meth:`Communicator.note_outer_interval`):
    they cross the DC links too. ``replicas``: the ranks this one's data-parallel peers are (under
    tensor parallelism, :mod:`hybridep.parallel.ted`: those with its TP index, through ``comm``'s
    group; tensor-parallel parameters are left to :func:`~hybridep.parallel.ted.sync_replicas`)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    from hybridep.parallel.ted import tp_param_names

    ignore = expert_param_names(model) + tp_param_names(model)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    kwargs = {"bucket_cap_mb": bucket_cap_mb} if bucket_cap_mb else {}
    if replicas is not None:
        kwargs["process_group"] = comm.group(replicas)
    ddp = DistributedDataParallel(model, **kwargs)
    if dense_sync is not None and dense_sync.mode != "ring":
        register(ddp, dense_sync, comm)
    elif comm is not None:
        world = replicas if replicas is not None else list(range(comm.world_size))

        def timed_allreduce(state, bucket):
            start = time.perf_counter()
            fut = allreduce_hook(state, bucket)

            def done(f):
                end = time.perf_counter()
                comm.note_outer_interval(world, start, end)
                comm.note_span("allreduce (DDP bucket)", start, end, track="grad sync")
                comm.count_allreduce(bucket.buffer(), world, "dense_ring")  # bytes only: DDP timed it
                return f.value()
            return fut.then(done)

        ddp.register_comm_hook(None, timed_allreduce)
    return ddp


def prefetch_all(styles: list[ExpertParallelStyle], model: nn.Module) -> None:
    """Prefetch every layer's expert all-gather as a chain (call right after the optimizer step):
    layer 0's now, each next one when the previous layer takes its experts in the forward pass
    (the links are set by :func:`parallelize`)."""
    if styles:
        styles[0].prefetch(next(moe_layers(model)).experts)
