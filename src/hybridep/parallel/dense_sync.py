"""Synchronisation of the dense (non-expert) gradients across the ranks: DDP communication hooks.

* ``ring`` -- DDP's own all-reduce of every bucket (PyTorch's default hook);
* ``hierarchical`` -- three stages over the topology's groups, through the communicator (bytes
  counted as ``dense`` per level, failures named): reduce-scatter of the bucket among the ranks of
  each top-level worker (a DC), all-reduce of each shard among the ranks that hold the same shard in
  the other DCs, all-gather inside the DC. Each DC's share crosses the DC boundary once, where the
  ring sends 2 (N-1)/N of the bucket across each boundary per direction. Same sums (in another order);
* ``powersgd(rank=r)`` -- PyTorch's PowerSGD hook: a rank-r approximation of every gradient matrix
  with error feedback, after ``start`` steps of plain all-reduce (lossy).

Names: ``ring``, ``hierarchical``, ``powersgd(rank=4)``, ``powersgd(rank=4,start=10)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the configuration reads this module: it imports torch only to register a hook
    from torch import nn

    from hybridep.parallel.comm import Communicator

_POWERSGD = re.compile(r"^powersgd\(rank=(\d+)(?:,start=(\d+))?\)$")
MODES = "ring, hierarchical, powersgd(rank=R) or powersgd(rank=R,start=S)"


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
        smallest = min((min(p.shape) for n, p in ddp.module.named_parameters()
                        if n not in ignored and p.requires_grad and p.dim() >= 2), default=None)
        if smallest is not None and sync.rank > smallest:
            raise ValueError(f"dense_sync: powersgd rank {sync.rank} is larger than the smallest gradient matrix "
                             f"({smallest}); allowed: 1..{smallest}")
        state = ps.PowerSGDState(process_group=None, matrix_approximation_rank=sync.rank,
                                 start_powerSGD_iter=sync.start)
        ddp.register_comm_hook(state, ps.powerSGD_hook)


__all__ = ["DenseSync", "parse_dense_sync", "register"]
