"""Tensor x expert x data parallelism with duplicate-token dropping (DeepSpeed-TED).

Ranks form tensor-parallel (TP) groups of ``tp`` consecutive ranks (inside the innermost level).
The ``R = G / tp`` groups are data-parallel replicas: every rank of a TP group holds the same tokens.
Rank ``(g, j)`` (group g, TP index j) is member g of the *expert-parallel group* j (the ranks with
TP index j), owns the experts of EP position g (``n = E / R`` of them) and holds TP shard j of each:
the FFN dimension split in ``tp`` slices (``w1[:, :, slice]``, ``w2[:, slice, :]``), so an expert's
output is the sum of its shards' partial outputs.

TED composes with HybridEP: each EP group is a HybridEP world of R ranks on the *position topology*
(the innermost count divided by ``tp``; :func:`~hybridep.topology.position_topology`) with expert domains of
positions. The members of a domain with the same TP index all-gather their shards (each rank then
holds shard j of every expert of its domain; the gathered copies' gradients are reduce-scattered
back to the owners), and tokens travel only inside the *rail* -- the EP group's members at this
rank's offsets in the domains -- as in :mod:`hybridep.parallel.strategy`, which does that part on a
:class:`~hybridep.parallel.comm.RankView` of the EP group. With every domain size 1 the rail is the
whole EP group (plain EP among the positions).

One MoE layer, every TP rank routing the same (replicated) tokens:

* with duplicate-token dropping (``dtd``): TP rank j takes the j-th of ``tp`` row blocks of the
  layer's token copies (sorted by token slice, then destination) and sends only those over its
  rail -- each copy crosses the slow links once instead of ``tp`` times. The owner's TP group
  all-gathers what its members received, each member runs its expert shards on all of it, and a
  reduce-scatter sums the partial outputs back to the member that received the rows. The combine
  returns them; an all-gather inside the TP group gives every member every copy's output, and the
  weighted sum per token follows (replicated);
* without: every TP rank sends all copies, the owner's members receive the same rows, run their
  shards and all-reduce the partial outputs.

Every step is an autograd Function whose backward is its dual for the computation around it: the
split of the copies (backward: all-gather of the gradients, so every TP rank holds the whole input
gradient), the all-gather before the expert shards (backward: reduce-scatter of the partial input
gradients), the reduce-scatter after them (backward: all-gather), the all-gather of the outputs
before the replicated weighted sum (backward: each member's own block), and -- without DTD -- the
copy into the shards (backward: all-reduce) and the all-reduce after them (backward: identity).
Row counts go first at every collective (no padding). Expert gradients arrive summed over every
replica's tokens and are scaled by 1/R (the loss is the replicas' mean).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from hybridep.moe.experts import GroupedExperts
from hybridep.moe.layer import compute_in_place, permute, unpermute
from hybridep.moe.router import Routing
from hybridep.parallel.comm import Communicator, RankView
from hybridep.parallel.functional import AllToAll, ExchangeCache, exchange_counts, once, pipelined_round_trip
from hybridep.parallel.strategy import ExpertParallelStyle, _compute_received
from hybridep.topology import Domains, position_topology


def _gather_rows(comm: Communicator, x: torch.Tensor, counts: list[int], group: Sequence[int], op: str) -> torch.Tensor:
    """Every member's rows (``counts[i]`` from member i) in member order, on every member."""
    mine = counts[group.index(comm.rank)]
    out = x.new_empty((sum(counts), *x.shape[1:]))
    comm.all_to_all(out, x.repeat(len(group), *([1] * (x.dim() - 1))), counts, [mine] * len(group), group, op)
    return out


def _reduce_scatter_rows(comm: Communicator, x: torch.Tensor, counts: list[int], group: Sequence[int],
                         op: str) -> torch.Tensor:
    """Sum over the members of their ``x`` (all members' rows, member order); this member's block."""
    me = group.index(comm.rank)
    recv = x.new_empty((len(group) * counts[me], *x.shape[1:]))
    comm.all_to_all(recv, x.contiguous(), [counts[me]] * len(group), counts, group, op)
    return recv.view(len(group), counts[me], *x.shape[1:]).sum(0)


def _own_block(x: torch.Tensor, counts: list[int], index: int) -> torch.Tensor:
    start = sum(counts[:index])
    return x[start: start + counts[index]]


class GatherRows(torch.autograd.Function):
    """Forward: all-gather of uneven rows inside ``group``. Backward: ``sum`` -- reduce-scatter (what
    follows is a sharded computation whose input gradients are partial) -- or ``own`` -- this
    member's block (what follows is replicated, its gradients identical on every member)."""

    @staticmethod
    def forward(ctx, x, comm, group, counts, op, backward, cache=None):
        ctx.args = (comm, group, counts, op, backward)
        return once(cache, lambda: _gather_rows(comm, x, counts, group, op))

    @staticmethod
    def backward(ctx, grad):
        comm, group, counts, op, backward = ctx.args
        if backward == "sum":
            return _reduce_scatter_rows(comm, grad, counts, group, op + "_bwd"), None, None, None, None, None, None
        return _own_block(grad, counts, group.index(comm.rank)).clone(), None, None, None, None, None, None


class ReduceScatterRows(torch.autograd.Function):
    """Forward: the members' partial rows summed, this member's block kept. Backward: all-gather."""

    @staticmethod
    def forward(ctx, x, comm, group, counts, op, cache=None):
        ctx.args = (comm, group, counts, op)
        return once(cache, lambda: _reduce_scatter_rows(comm, x, counts, group, op))

    @staticmethod
    def backward(ctx, grad):
        comm, group, counts, op = ctx.args
        return _gather_rows(comm, grad.contiguous(), counts, group, op + "_bwd"), None, None, None, None, None


class SplitRows(torch.autograd.Function):
    """Forward: this member's block of replicated rows. Backward: all-gather of the blocks' gradients
    (every member then holds the whole, identical gradient)."""

    @staticmethod
    def forward(ctx, x, comm, group, counts, op):
        ctx.args = (comm, group, counts, op)
        return _own_block(x, counts, group.index(comm.rank)).clone()

    @staticmethod
    def backward(ctx, grad):
        comm, group, counts, op = ctx.args
        return _gather_rows(comm, grad.contiguous(), counts, group, op + "_bwd"), None, None, None, None


class SumPartials(torch.autograd.Function):
    """Forward: all-reduce (sum) of partial outputs inside ``group``; backward: identity (the
    gradient of the summed output is the same on every member)."""

    @staticmethod
    def forward(ctx, x, comm, group, op, cache=None):
        def reduce() -> torch.Tensor:
            out = x.clone()
            comm.all_reduce(out, group, op)
            return out
        return once(cache, reduce)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None


class CopyToShards(torch.autograd.Function):
    """Forward: identity (every member feeds the same rows to its shards); backward: all-reduce of the
    partial input gradients."""

    @staticmethod
    def forward(ctx, x, comm, group, op):
        ctx.args = (comm, group, op)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        comm, group, op = ctx.args
        out = grad.clone()
        comm.all_reduce(out, group, op)
        return out, None, None, None


class TedStyle:
    """The dispatcher of one MoE layer under TED (see the module docstring). ``domain_sizes``: the
    HybridEP expert domains of the EP positions (per level, counted in positions: the innermost
    level has ``count / tp`` of them; default all ones, plain EP among the positions)."""

    def __init__(self, comm: Communicator, tp: int, num_experts: int, dtd: bool = True, cac: bool = False,
                 domain_sizes: Sequence[int] | None = None, chunks: int = 1):
        g, inner = comm.world_size, comm.topology.counts[-1]
        if tp < 1 or inner % tp:
            raise ValueError(f"tp ({tp}) must divide the innermost level's count ({inner})")
        if not isinstance(chunks, int) or chunks < 1 or (cac and chunks > 1):
            raise ValueError(f"chunks must be a positive integer, 1 with cac; got {chunks!r}")
        replicas = g // tp
        if num_experts % replicas:
            raise ValueError(f"experts ({num_experts}) must be divisible by the expert-parallel world "
                             f"({replicas} = world {g} / tp {tp})")
        self.comm, self.tp, self.dtd = comm, tp, dtd
        self.cache = ExchangeCache() if cac else None
        """CAC: the layer's collectives' outputs, kept for activation checkpointing's recomputation."""
        self.replicas = replicas
        self.position, self.tp_index = divmod(comm.rank, tp)
        self.tp_group = [self.position * tp + j for j in range(tp)]
        comm.create_groups([[p * tp + j for j in range(tp)] for p in range(replicas)])
        view = RankView(comm, [[p * tp + j for p in range(replicas)] for j in range(tp)])
        positions = position_topology(comm.topology, tp)
        sizes = tuple(domain_sizes) if domain_sizes is not None else tuple(1 for _ in positions.counts)
        self.ep = ExpertParallelStyle(view, Domains(positions, sizes), num_experts)
        """The expert-parallel group of this TP index as a HybridEP world of ``replicas`` ranks: expert
        ownership, the domain's gathers (of this TP shard) and the rails."""
        self.ep.cache = self.cache
        self.n_local = self.ep.n_local
        self.rail = [view.members[r] for r in self.ep.rail]
        """The ranks this one exchanges tokens with (its TP index, its offsets in the domains)."""
        self.chunks = chunks if self.ep.domains.rail_factors[0] > 1 else 1
        """Chunks of the pipelined exchange (MoNTA, :meth:`_pipelined`; 1: one exchange) -- where
        the rail crosses the outermost level."""

    @property
    def next_prefetch(self) -> Callable[[], None] | None:
        return self.ep.next_prefetch

    @next_prefetch.setter
    def next_prefetch(self, issue: Callable[[], None] | None) -> None:
        self.ep.next_prefetch = issue

    def prefetch(self, experts: GroupedExperts) -> None:
        """Issue this layer's gather of the domain's shards now (nothing without domains)."""
        self.ep.prefetch(experts)

    def shard(self, experts: GroupedExperts) -> None:
        """Keep this rank's TP shard of its EP position's experts (gradients scaled by 1/R)."""
        if experts.ffn % self.tp:
            raise ValueError(f"ffn ({experts.ffn}) must be divisible by tp ({self.tp})")
        width = experts.ffn // self.tp
        cols = slice(self.tp_index * width, (self.tp_index + 1) * width)
        for name in experts.weight_names:
            full = getattr(experts, name).detach()
            setattr(experts, name, nn.Parameter((full[:, cols] if name == "w2" else full[:, :, cols]).clone()))
        self.ep.shard(experts)

    def __call__(self, x: torch.Tensor, routing: Routing, experts: GroupedExperts) -> torch.Tensor:
        comm, tp = self.comm, self.tp
        keys = self.ep.key_of_expert.to(x.device)
        if self.replicas == 1:  # one EP position: every expert here, only the TP collectives
            y = compute_in_place(CopyToShards.apply(x, comm, self.tp_group, "tp"), routing, experts,
                                 experts.weights(), keys)
            return SumPartials.apply(y, comm, self.tp_group, "tp", self.cache)
        if not self.dtd:
            p = permute(x, routing, keys)
            y = self._exchange(CopyToShards.apply(p.x, comm, self.tp_group, "tp"), p.keys, experts,
                               p.token_idx * self.chunks // max(1, x.shape[0]))
            return unpermute(y, p, x.shape[0])
        # copies sorted by (token slice, destination): TP member j sends the j-th block
        slice_of_token = torch.arange(x.shape[0], device=x.device) * tp // max(1, x.shape[0])
        p = permute(x, routing, keys)
        order = torch.argsort(slice_of_token[p.token_idx] * len(keys) + p.keys, stable=True)
        p.x, p.token_idx, p.weights, p.keys = p.x[order], p.token_idx[order], p.weights[order], p.keys[order]
        blocks = torch.bincount(slice_of_token[p.token_idx], minlength=tp).tolist()
        mine = SplitRows.apply(p.x, comm, self.tp_group, blocks, "tp")
        # a copy's chunk: its token's place within its slice (every member's rows span every chunk)
        chunk = (p.token_idx * tp - slice_of_token[p.token_idx] * x.shape[0]) * self.chunks // max(1, x.shape[0])
        y = self._exchange(mine, _own_block(p.keys, blocks, self.tp_index), experts,
                           _own_block(chunk, blocks, self.tp_index))
        return unpermute(GatherRows.apply(y, comm, self.tp_group, blocks, "tp", "own", self.cache), p, x.shape[0])

    def _exchange(self, rows: torch.Tensor, keys: torch.Tensor, experts: GroupedExperts,
                  chunk: torch.Tensor) -> torch.Tensor:
        """Dispatch ``rows`` (sorted by expert ``keys``) over the rail, run the domain's expert shards
        (on the TP group's rows with DTD), combine; the expert outputs in ``rows``' order. ``chunk``:
        each row's chunk of the pipelined exchange (its token's)."""
        if self.chunks > 1:
            return self._pipelined(rows, keys, experts, chunk)
        comm, rail, cache = self.comm, self.rail, self.cache
        per_dest = len(self.ep.domain) * self.n_local
        counts = torch.bincount(keys, minlength=len(rail) * per_dest).view(len(rail), per_dest)
        recv_counts = once(cache, lambda: exchange_counts(comm, counts, rail))
        send, recv = counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        received = AllToAll.apply(rows, comm, rail, send, recv, "a2a_dispatch", cache)
        weights = self.ep.expert_weights(experts)  # after the dispatch: the gather lands meanwhile
        y = self._shards(received, recv_counts, experts, weights)
        return AllToAll.apply(y, comm, rail, recv, send, "a2a_combine", cache)

    def _shards(self, received: torch.Tensor, recv_counts: torch.Tensor, experts: GroupedExperts,
                weights) -> torch.Tensor:
        """The expert shards on the rows this rank received (``recv_counts``: [rail members,
        experts]): with DTD on the TP group's rows (gathered; the partial outputs reduce-scattered
        back), else on its own (the partial outputs all-reduced); outputs in ``received``'s order."""
        comm, cache, tp = self.comm, self.cache, self.tp
        if not self.dtd:
            partial = _compute_received(experts, weights, received, recv_counts)
            return SumPartials.apply(partial, comm, self.tp_group, "tp", cache)
        all_counts = once(cache, lambda: exchange_counts(comm, recv_counts.repeat(tp, 1), self.tp_group))
        by_member = all_counts.view(tp, -1).sum(1).tolist()
        rows_in = GatherRows.apply(received, comm, self.tp_group, by_member, "tp", "sum", cache)
        partial = _compute_received(experts, weights, rows_in, all_counts)
        return ReduceScatterRows.apply(partial, comm, self.tp_group, by_member, "tp", cache)

    def _pipelined(self, rows: torch.Tensor, keys: torch.Tensor, experts: GroupedExperts,
                   chunk: torch.Tensor) -> torch.Tensor:
        """The exchange in ``chunks`` chunks of the tokens, pipelined (MoNTA): every chunk's dispatch
        is issued at once (one row-count exchange for all), and chunk by chunk, as its rows land,
        the TP group's collectives and the expert shards run -- while the later chunks still cross
        the slow links -- and its combine is issued at once. The backward mirrors it (the Issue /
        Wait Functions). The domain's experts are taken before the dispatch."""
        comm, rail, chunks = self.comm, self.rail, self.chunks
        per_dest = len(rail) * len(self.ep.domain) * self.n_local
        key = chunk * per_dest + keys
        order = torch.argsort(key, stable=True)
        counts = torch.bincount(key, minlength=chunks * per_dest).view(chunks, len(rail), -1)
        recv_counts = exchange_counts(comm, counts.transpose(0, 1).reshape(len(rail), -1), rail)
        recv_counts = recv_counts.view(len(rail), chunks, -1)
        weights = self.ep.expert_weights(experts)
        parts = torch.split(rows[order], counts.sum((1, 2)).tolist())
        splits = [(counts[c].sum(1).tolist(), recv_counts[:, c].sum(1).tolist()) for c in range(chunks)]
        back = pipelined_round_trip(comm, rail, parts, splits,
                                    lambda c, got, _: self._shards(got, recv_counts[:, c], experts, weights))
        return torch.cat(back)[torch.argsort(order)]


def _tp_plan(model: nn.Module) -> dict[str, object]:
    """Which dense submodules are tensor-parallel, as PyTorch ``ParallelStyle``s by module path (as
    Megatron splits a transformer): the language model's attention (``qkv`` column-wise: whole
    heads per rank; ``out`` row-wise, its output all-reduced) and dense FFNs (``w1``, ``w3``
    column-wise, ``w2`` row-wise); the verify stack's per-block Linear column-wise with its output
    gathered. Embeddings, norms and routers stay replicated."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from hybridep.lm.model import MoELM
    from hybridep.moe.stack import MoEStack

    if isinstance(model, MoEStack):
        return {f"blocks.{i}.dense": ColwiseParallel(output_layouts=Replicate()) for i in range(len(model.blocks))}
    if isinstance(model, MoELM):
        plan: dict[str, object] = {}
        for i, block in enumerate(model.blocks):
            plan[f"blocks.{i}.attn.qkv"] = ColwiseParallel()
            plan[f"blocks.{i}.attn.out"] = RowwiseParallel()
            if block.dense is not None:
                for name in ("w1", "w3"):
                    if hasattr(block.dense, name):
                        plan[f"blocks.{i}.dense.{name}"] = ColwiseParallel()
                plan[f"blocks.{i}.dense.w2"] = RowwiseParallel()
        return plan
    raise ValueError(f"tensor parallelism has no plan for a {type(model).__name__}")


def parallelize_ted(model: nn.Module, comm: Communicator, tp: int, dtd: bool = True, cac: bool = False,
                    checkpoint: bool | None = None, domain_sizes: Sequence[int] | None = None,
                    chunks: int = 1) -> list[TedStyle]:
    """Apply TED to ``model`` (in place): the dense part tensor-parallel over each TP group with
    PyTorch's ``parallelize_module`` (a 2-D device mesh: replicas x tp), every MoE layer's experts
    sharded (EP position, FFN slice) with :class:`TedStyle` as dispatcher. The DTensor parameters'
    gradients are averaged over the replicas by :func:`sync_replicas` hooks (DDP, which handles the
    rest, takes no DTensor). ``checkpoint`` (default: ``cac``): activation checkpointing of every
    block that holds an MoE layer (recomputed in backward); ``cac``: its recomputation takes the
    layer's collectives' outputs from the forward pass instead of communicating again;
    ``domain_sizes``: HybridEP expert domains of the EP positions (see :class:`TedStyle`), whose
    gathers the returned styles prefetch as a chain (:func:`~hybridep.parallel.strategy.prefetch_all`);
    ``chunks``: the exchange pipelined in that many chunks (MoNTA; 1 with ``cac``)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from hybridep.parallel.strategy import moe_layers

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device, (comm.world_size // tp, tp), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], _tp_plan(model))
    styles: list[TedStyle] = []
    for layer in moe_layers(model):
        style = TedStyle(comm, tp, layer.experts.num_experts, dtd, cac, domain_sizes, chunks)
        style.shard(layer.experts)
        layer.dispatcher = style
        if styles:  # the prefetch chain, as parallelize's
            styles[-1].next_prefetch = functools.partial(style.prefetch, layer.experts)
        styles.append(style)
    if cac if checkpoint is None else checkpoint:
        checkpoint_moe_blocks(model)
    sync_replicas(model, comm, tp)
    return styles


def checkpoint_moe_blocks(model: nn.Module) -> None:
    """Activation checkpointing (PyTorch's, non-reentrant) of every module that holds an MoE layer as
    a direct child: its forward keeps only its inputs, the backward recomputes it; an MoE layer whose
    dispatcher has an :class:`ExchangeCache` records its collectives' outputs in the forward pass and
    replays them in the recomputation."""
    from torch.utils.checkpoint import checkpoint

    from hybridep.moe.layer import MoE

    for module in list(model.modules()):
        layer = next((c for c in module.children() if isinstance(c, MoE)), None)
        if layer is None:
            continue
        cache = getattr(layer.dispatcher, "cache", None)
        contexts = (lambda c=cache: (c.recording(), c.replaying())) if cache is not None else None
        forward = module.forward

        def run(*args, forward=forward, contexts=contexts):
            kwargs = {"context_fn": contexts} if contexts is not None else {}
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        module.forward = run


def tp_param_names(model: nn.Module) -> list[str]:
    """Names of the tensor-parallel (DTensor) parameters."""
    from torch.distributed.tensor import DTensor

    return [name for name, p in model.named_parameters() if isinstance(p, DTensor)]


def replica_ranks(comm: Communicator, tp: int) -> list[int]:
    """The ranks holding the same TP index as this one: its data-parallel peers."""
    return list(range(comm.rank % tp, comm.world_size, tp))


def sync_replicas(model: nn.Module, comm: Communicator, tp: int) -> None:
    """Average every tensor-parallel parameter's local gradient shard over the replicas (an
    all-reduce over the ranks with the same TP index) as soon as it is accumulated."""
    ranks = replica_ranks(comm, tp)
    comm.create_groups([list(range(j, comm.world_size, tp)) for j in range(tp)])
    names = set(tp_param_names(model))
    for name, p in model.named_parameters():
        if name in names:
            def average(param: torch.Tensor) -> None:
                local = param.grad.to_local()
                comm.all_reduce(local, ranks, "dense_tp")
                local.div_(len(ranks))
            p.register_post_accumulate_grad_hook(average)
