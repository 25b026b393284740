"""Synchronisation of the dense (non-expert) gradients across the ranks: DDP communication hooks.

* ``ring`` -- DDP's own all-reduce of every bucket (PyTorch's default hook), asynchronous: the
  earlier buckets overlap the rest of the backward;
* ``hierarchical`` -- three stages over the topology's groups, through the communicator (bytes
  counted as ``dense`` per level, failures named): reduce-scatter of the bucket among the ranks of
  each top-level worker (a DC), all-reduce of each shard among the ranks that hold the same shard in
  the other DCs, all-gather inside the DC. Each DC's share crosses the DC boundary once, where the
  ring sends 2 (N-1)/N of the bucket across each boundary per direction. Same sums (in another order).
  The hook runs its stages before it returns, so the backward waits for each bucket;
* ``powersgd(rank=r)`` -- PyTorch's PowerSGD hook: a rank-r approximation of every gradient matrix
  with error feedback, after ``start`` steps of plain all-reduce (lossy); each bucket finished before
  the backward goes on (:func:`counted_powersgd`).

Names: ``ring``, ``hierarchical``, ``powersgd(rank=4)``, ``powersgd(rank=4,start=10)``; ``auto`` in
the configuration: the planner chooses among ``ring``, ``hierarchical`` and the lossy modes that
``planner.allow`` lists (:func:`candidates`).

A mode is one module's worth, like a strategy family: its name (:class:`DenseSync`), its schedule
(:func:`schedule`: the stages every DDP bucket runs, as point-to-point flows the cost model and the
simulator price) and its runtime (:func:`register`: the DDP communication hook, its bytes counted
by the communicator as ``dense*`` per level).

``hierarchical+powersgd`` (compress only the cross-DC stage) is not offered: PyTorch's PowerSGD hook
all-reduces over one process group of its own, so the cross-DC stage would have to re-implement its
compression and error feedback.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hybridep.schedule import GradSync, SyncStage, p2p_stage

if TYPE_CHECKING:  # the configuration reads this module: it imports torch only to register a hook
    from torch import nn

    from hybridep.costmodel import Workload
    from hybridep.parallel.comm import Communicator
    from hybridep.topology import Topology

_POWERSGD = re.compile(r"^powersgd\(rank=(\d+)(?:,start=(\d+))?\)$")
MODES = "ring, hierarchical, powersgd(rank=R) or powersgd(rank=R,start=S)"
EXACT = ("ring", "hierarchical")
"""The modes that give DDP's sums (the planner may always choose them)."""
MIN_COMPRESSION_RATE = 2
"""PyTorch's PowerSGD compresses a matrix only when that divides its elements by more than this."""


@dataclass(frozen=True)
class DenseSync:
    """One way of synchronising the dense gradients (see the module docstring)."""

    mode: str
    rank: int = 0
    """PowerSGD's approximation rank."""
    start: int = 10
    """PowerSGD: steps of plain all-reduce before compressing."""

    def __str__(self) -> str:
        if self.mode != "powersgd":
            return self.mode
        return f"powersgd(rank={self.rank},start={self.start})"


def parse_dense_sync(text: str) -> DenseSync:
    """A ``dense_sync`` value; ValueError saying what is allowed."""
    name = text.replace(" ", "")
    if name in ("ring", "hierarchical"):
        return DenseSync(name)
    m = _POWERSGD.match(name)
    if m is None:
        raise ValueError(f"allowed: {MODES}")
    rank, start = int(m.group(1)), int(m.group(2) or 10)
    if rank < 1 or start < 2:
        raise ValueError(f"rank >= 1 and start >= 2 (PowerSGD's error feedback needs one plain step); allowed: {MODES}")
    return DenseSync("powersgd", rank, start)


def check_rank(text: str, shapes) -> None:
    """ValueError when ``text`` is a PowerSGD mode whose rank exceeds the smallest dense gradient
    matrix of ``shapes`` (PyTorch would compress nothing at that rank)."""
    if not text.startswith("powersgd"):
        return
    sync = parse_dense_sync(text)
    smallest = min((min(s) for s in shapes if len(s) >= 2), default=None)
    if smallest is not None and sync.rank > smallest:
        raise ValueError(f"powersgd rank {sync.rank} is larger than the smallest dense gradient matrix "
                         f"({smallest}); allowed: 1..{smallest}")


def candidates(allow: list[str]) -> list[DenseSync]:
    """The modes the planner chooses among: the exact ones and the lossy ones ``allow`` names (dense-sync
    modes only)."""
    allowed = [parse_dense_sync(a) for a in allow]
    return [DenseSync(m) for m in EXACT] + [s for s in allowed if s.mode not in EXACT]


# ---------------------------------------------------------------------------------------- schedule
def powersgd_elements(shapes, rank: int) -> tuple[int, int, int]:
    """(elements all-reduced uncompressed, elements of the P factors, of the Q factors) for gradients
    of ``shapes`` under PowerSGD of ``rank`` -- PyTorch's rule: each gradient viewed as (rows, rest),
    compressed at rank min(rows, rest, rank) only if that divides its size by more than 2."""
    plain = p = q = 0
    for shape in shapes:
        n = int(shape[0]) if shape else 1
        m = math.prod(int(x) for x in shape[1:])
        r = min(n, m, rank)
        if (n + m) * r * MIN_COMPRESSION_RATE < n * m:
            p, q = p + n * r, q + m * r
        else:
            plain += n * m
    return plain, p, q


def _ring(topology: Topology, groups: np.ndarray, label: str, fraction: float,
          compute_s_per_byte: float = 0.0) -> SyncStage | None:
    """An all-reduce in each group (rows of ``groups``) counted as a ring's: 2 (n-1)/n x ``fraction``
    of the bucket from each member to the next."""
    n = groups.shape[1]
    if n == 1:
        return None
    return p2p_stage(topology, label, groups.ravel(), np.roll(groups, -1, axis=1).ravel(),
                     2.0 * (n - 1) / n * fraction, 2 * math.ceil(math.log2(n)), compute_s_per_byte)


def _pairwise(topology: Topology, groups: np.ndarray, label: str) -> SyncStage | None:
    """A reduce-scatter (or all-gather) in each group: every member sends 1/n of the bucket to each
    other member (the communicator's, one all-to-all of the shards)."""
    n = groups.shape[1]
    if n == 1:
        return None
    src = np.repeat(groups, n, axis=1).ravel()
    dst = np.tile(groups, (1, n)).ravel()
    keep = src != dst
    return p2p_stage(topology, label, src[keep], dst[keep], 1.0 / n, 1)


@dataclass(frozen=True)
class _Dense:
    dense_grad_bytes: float
    dense_shapes: tuple
    flops: float


def _powersgd_fractions(w: _Dense, rank: int) -> tuple[float, float, float, float]:
    """(uncompressed, P, Q fractions of the gradient bytes, seconds of compression per gradient byte)."""
    plain, p, q = powersgd_elements(w.dense_shapes, rank)
    elements = sum(math.prod(int(x) for x in s) for s in w.dense_shapes)
    # matrix products per compressed matrix: M Q, M^T P and P Q^T (2 n m r FLOPs each)
    seconds = 6.0 * rank * (elements - plain) / w.flops / w.dense_grad_bytes if w.flops > 0 else 0.0
    return plain / elements, p / elements, q / elements, seconds


def schedule(topology: Topology, w: Workload) -> GradSync:
    """The stages every DDP bucket runs under ``w.dense_sync`` (see the module docstring)."""
    return _schedule(topology, w.dense_sync, w.dense_grad_bytes, w.dense_shapes, w.flops)


@functools.lru_cache(maxsize=64)
def _schedule(topology: Topology, mode: str, grad_bytes: float, shapes: tuple, flops: float) -> GradSync:
    """:func:`schedule`, once per topology and mode (every candidate of a planner shares it)."""
    w = _Dense(grad_bytes, shapes, flops)
    sync = parse_dense_sync(mode)
    world = np.arange(topology.world_size)
    if topology.world_size == 1 or w.dense_grad_bytes <= 0:
        return GradSync(str(sync), w.dense_grad_bytes, (), overlaps_backward=sync.mode == "ring")
    if sync.mode == "ring":
        stages = [_ring(topology, world[None, :], "all-reduce", 1.0)]
    elif sync.mode == "hierarchical":
        inner = world.reshape(topology.counts[0], -1)
        n = inner.shape[1]
        stages = [_pairwise(topology, inner, "reduce-scatter in DC"),
                  _ring(topology, inner.T, "all-reduce across DCs", 1.0 / n),
                  _pairwise(topology, inner, "all-gather in DC")]
    else:
        if not w.dense_shapes:
            raise ValueError("dense_sync powersgd is priced from the dense gradients' shapes: give model "
                             "dimensions (a moe section), not a direct workload")
        plain, p, q, seconds = _powersgd_fractions(w, sync.rank)
        stages = [_ring(topology, world[None, :], "all-reduce uncompressed", plain),
                  _ring(topology, world[None, :], "all-reduce P", p, seconds / 2),
                  _ring(topology, world[None, :], "all-reduce Q", q, seconds / 2)]
    return GradSync(str(sync), w.dense_grad_bytes, tuple(s for s in stages if s is not None and s.fraction > 0),
                    overlaps_backward=sync.mode == "ring")


def dc_groups(comm: Communicator) -> tuple[list[list[int]], list[list[int]]]:
    """(the ranks of each top-level worker, the ranks at the same position in every top-level worker)."""
    topo = comm.topology
    per = topo.world_size // topo.counts[0]
    inner = [list(range(d * per, (d + 1) * per)) for d in range(topo.counts[0])]
    outer = [list(range(i, topo.world_size, per)) for i in range(per)]
    return inner, outer


def hierarchical_hook(comm: Communicator):
    """A DDP communication hook: the bucket's mean over all ranks in three stages (see module doc)."""
    comm = comm.sibling()  # groups of its own: the gather chains use the same rank sets meanwhile
    inner_groups, outer_groups = dc_groups(comm)
    comm.create_groups(inner_groups)
    comm.create_groups(outer_groups)
    inner = next(g for g in inner_groups if comm.rank in g)
    outer = next(g for g in outer_groups if comm.rank in g)

    import torch

    def hook(state, bucket):  # (no return annotation: DDP checks it against its own, unresolved here)
        grad = bucket.buffer()
        n = len(inner)
        padded = grad.new_zeros((grad.numel() + n - 1) // n * n)
        padded[: grad.numel()] = grad
        shard = padded.new_empty(padded.numel() // n)
        comm.reduce_scatter(shard, padded, inner, "dense_rs")
        comm.all_reduce(shard, outer, "dense_allreduce")
        comm.all_gather(padded, shard, inner, "dense_ag")
        grad.copy_(padded[: grad.numel()]).div_(comm.world_size)
        fut = torch.futures.Future()
        fut.set_result(grad)
        return fut

    return hook


def register(ddp: nn.Module, sync: DenseSync, comm: Communicator | None) -> None:
    """Put ``sync``'s hook on a DDP module (``ring`` keeps DDP's own)."""
    if sync.mode == "hierarchical":
        if comm is None:
            raise ValueError("dense_sync hierarchical needs the communicator (its groups and counters)")
        ddp.register_comm_hook(None, hierarchical_hook(comm))
    elif sync.mode == "powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps

        ignored = getattr(ddp, "parameters_to_ignore", set())
        try:
            check_rank(str(sync), [tuple(p.shape) for n, p in ddp.module.named_parameters()
                                   if n not in ignored and p.requires_grad])
        except ValueError as err:
            raise ValueError(f"dense_sync: {err}") from None
        state = ps.PowerSGDState(process_group=None, matrix_approximation_rank=sync.rank,
                                 start_powerSGD_iter=sync.start, min_compression_rate=MIN_COMPRESSION_RATE)
        ddp.register_comm_hook(state, counted_powersgd(comm))


def counted_powersgd(comm: Communicator | None):
    """PyTorch's PowerSGD hook with its all-reduces counted by ``comm`` (when given) as rings over the world (op
    ``dense_powersgd``): the whole bucket before ``start``, then the elements PyTorch reports it sent
    (uncompressed tensors, P and Q factors: its own compression statistics).

    Each bucket's three all-reduces finish before the hook returns: PyTorch chains them in callbacks,
    so with several buckets one rank could issue bucket 2's first all-reduce before bucket 1's second
    and another rank the other way round -- a deadlock on gloo, which matches collectives by issue
    order. Buckets are handed to the hook in the same order on every rank, so waiting keeps them in
    step (at the price of the overlap with the rest of the backward)."""
    import torch
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps

    def hook(state, bucket):
        grad = bucket.buffer()
        before = state.total_numel_after_compression
        plain = state.iter < state.start_powerSGD_iter
        result = ps.powerSGD_hook(state, bucket).wait()  # in step: see the docstring
        sent = grad.numel() if plain else state.total_numel_after_compression - before
        if comm is not None:
            comm.count_allreduce(grad.new_empty(int(sent)), list(range(comm.world_size)), "dense_powersgd")
        fut = torch.futures.Future()
        fut.set_result(result)
        return fut

    return hook


__all__ = ["DenseSync", "candidates", "parse_dense_sync", "powersgd_elements", "register", "schedule"]
