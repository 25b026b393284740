"""Hierarchical token exchange with per-level deduplication (NVIDIA Hybrid-EP's dispatch, across DCs).

The plain exchange copies a token once per routed expert and sends every copy to its destination in
one all-to-all over the rail. Here the token travels the rail level by level, outermost first: at
level l it moves to the rail member whose domain id at l is the destination's (the coordinates below
l unchanged), so a stage is an all-to-all among the R_l rail members that differ only at l
(:meth:`~hybridep.topology.Domains.rail_stage_groups`). At a *deduplicating* level a token crosses
once per distinct destination worker there, carrying the (expert, weight) pairs it has in that
worker's subtree; at the others once per pair. After the last stage the token sits on the rank that
holds (after the domain's gather) every expert it still carries; that rank sums their weighted
outputs into one vector, and the combine retraces the stages, each forwarder summing what comes back
from its children before it crosses the level again.

A packet is the token's row with its k routing weights as extra columns (masked to the pairs it
carries, so the weights' gradients flow back through the exchange) and, apart, its k expert ids
(int32, -1 where not carried; counted with the payload, op ``a2a_ids``). Every step is a
differentiable tensor operation or an :class:`~hybridep.parallel.functional.AllToAll`, so the
backward is autograd's: the duals of each stage in reverse. Split sizes go first at every stage (no
padding; empty counts are fine).

With every domain size 1 this is hierarchical EP; with HybridEP domains it runs inside the rails
(tokens for several experts of one destination domain travel once); with the whole world one domain
no token moves (the rail is the rank alone).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from hybridep.migration.sr import SRSettings
from hybridep.moe.experts import GroupedExperts
from hybridep.moe.layer import Branch, Eager, compute_in_place
from hybridep.moe.router import Routing
from hybridep.parallel.comm import Communicator
from hybridep.parallel.functional import AllToAll, exchange_counts, pipelined_round_trip
from hybridep.parallel.strategy import ExpertParallelStyle
from hybridep.topology import Domains

ID_BYTES = 4
"""Bytes of one expert id in a packet (int32)."""


@dataclass
class Hop:
    """One stage of the dispatch as the combine retraces it: the stage group, the rows sent to and
    received from each member, and each sent child's parent row (children sorted by member)."""

    group: list[int]
    send: list[int]
    recv: list[int]
    parent: torch.Tensor
    parents: int


class HierarchicalStyle(ExpertParallelStyle):
    """The dispatcher of one MoE layer: the domains' gathers as in HybridEP, tokens by stages
    (see the module docstring); ``dedup``: the level indices that deduplicate."""

    def __init__(self, comm: Communicator, domains: Domains, num_experts: int, sr: SRSettings | None = None,
                 dedup: tuple[int, ...] = (), chunks: int = 1):
        super().__init__(comm, domains, num_experts, sr, a2a_chunks=1)
        if not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"a2a_chunks must be a positive integer, got {chunks!r}")
        self.chunks = domains.exchange_chunks(chunks)
        """Chunks of the pipelined exchange (:meth:`_pipelined`; 1: the stages once, whole)."""
        self.dedup = set(dedup)
        self.levels = domains.rail_levels()
        self.groups = {}
        for lv in self.levels:
            groups = domains.rail_stage_groups(lv)
            comm.create_groups(groups)
            self.groups[lv] = next(g for g in groups if comm.rank in g)
        topo = domains.topology
        owners = np.arange(num_experts) // self.n_local
        coords = np.stack(np.unravel_index(owners, topo.counts), axis=1)
        self.dest_id = {lv: torch.as_tensor(coords[:, lv] // domains.sizes[lv]) for lv in self.levels}
        """Per stage level: each expert's destination member (its owner's domain id there)."""
        self.local_row = self.key_of_expert % (len(self.domain) * self.n_local)
        """Each expert's row in the domain's gathered experts (valid on ranks of the owner's domain)."""

    def begin(self, x: torch.Tensor, routing: Routing, experts: GroupedExperts) -> Branch:
        """The shortcut block's form: the staged exchange runs whole when the experts are needed
        (no overlap: each stage waits for the one before it)."""
        return Eager(self, x, routing, experts)

    def __call__(self, x: torch.Tensor, routing: Routing, experts: GroupedExperts) -> torch.Tensor:
        if len(self.rail) == 1:  # the domain holds every expert: no token leaves this rank
            return compute_in_place(x, routing, experts, self.expert_weights(experts), self.key_of_expert)
        ids = torch.where(routing.kept, routing.expert_idx, -1).to(torch.int32)
        weights = (routing.weights * routing.kept).to(x.dtype)
        packets = torch.cat([x, weights], dim=1)
        if self.chunks > 1:
            return self._pipelined(packets, ids, experts, x.shape[1])
        # the domain's experts taken after the dispatch: the gather lands meanwhile
        return self._through(self.levels, packets, ids, experts, x.shape[1], lambda: self.expert_weights(experts))

    def _pipelined(self, packets: torch.Tensor, ids: torch.Tensor, experts: GroupedExperts,
                   hidden: int) -> torch.Tensor:
        """The exchange in ``chunks`` chunks of this rank's tokens, pipelined over the stages (MoNTA):
        every chunk's first (outermost) stage is issued at once, after one exchange of all their
        row counts; chunk c's later stages, experts and inner combine stages run as soon as its
        first stage is in -- while the chunks after it still cross the slow links -- and its
        first-stage combine is issued at once; the results are summed into their tokens when every
        chunk is back. The backward mirrors it (the combines' gradients all issued first, each
        chunk's dispatch gradient waited for only when autograd reaches it). The domain's experts
        are taken before the dispatch."""
        comm, first, n = self.comm, self.levels[0], packets.shape[0]
        weights = self.expert_weights(experts)
        bounds = [n * c // self.chunks for c in range(self.chunks + 1)]
        routed = [self._children(packets[a:b], ids[a:b], first) for a, b in itertools.pairwise(bounds)]
        group = routed[0][2].group
        for (_, _, hop), recv in zip(routed, self._recv_counts([h.send for _, _, h in routed], group), strict=True):
            hop.recv = recv

        def ids_of(c: int):  # chunk c's expert ids, right behind its rows
            child_ids, hop = routed[c][1], routed[c][2]
            out = child_ids.new_empty((sum(hop.recv), ids.shape[1]))
            return out, comm.all_to_all_start(out, child_ids.contiguous(), hop.recv, hop.send, group, "a2a_ids")

        def stages(c: int, rows: torch.Tensor, chunk_ids) -> torch.Tensor:
            out_ids, ids_work = chunk_ids
            comm.wait(ids_work, "a2a_ids", group)
            return self._through(self.levels[1:], rows, out_ids, experts, hidden, lambda: weights)

        back = pipelined_round_trip(comm, group, [child for child, _, _ in routed],
                                    [(hop.send, hop.recv) for _, _, hop in routed], stages, ids_of)
        return torch.cat([y.new_zeros(hop.parents, y.shape[1]).index_add(0, hop.parent, y)
                          for y, (_, _, hop) in zip(back, routed, strict=True)])

    def _through(self, levels: list[int], packets: torch.Tensor, ids: torch.Tensor, experts: GroupedExperts,
                 hidden: int, weights: Callable[[], object]) -> torch.Tensor:
        """Dispatch through the stages of ``levels``, the experts (the domain's ``weights()``, taken
        after the dispatch) and the combine back: one output row per packet."""
        hops = []
        for lv in levels:
            packets, ids, hop = self._dispatch(packets, ids, lv)
            hops.append(hop)
        y = self._experts(packets, ids, experts, hidden, weights())
        for hop in reversed(hops):
            y = self._combine(y, hop)
        return y

    def _dispatch(self, packets: torch.Tensor, ids: torch.Tensor, lv: int) -> tuple[torch.Tensor, torch.Tensor, Hop]:
        """One stage: each packet's children (see :meth:`_children`), exchanged in the stage group."""
        child, child_ids, hop = self._children(packets, ids, lv)
        hop.recv = self._recv_counts([hop.send], hop.group)[0]
        out = AllToAll.apply(child, self.comm, hop.group, hop.send, hop.recv, "a2a_dispatch")
        out_ids = child_ids.new_empty((sum(hop.recv), ids.shape[1]))
        self.comm.all_to_all(out_ids, child_ids.contiguous(), hop.recv, hop.send, hop.group, "a2a_ids")
        return out, out_ids, hop

    def _children(self, packets: torch.Tensor, ids: torch.Tensor, lv: int) -> tuple[torch.Tensor, torch.Tensor, Hop]:
        """Each packet's children at stage level ``lv`` (one per distinct destination member there
        when it deduplicates, else one per pair), sorted by member: their rows, their expert ids and
        the stage's :class:`Hop` (its ``recv`` still to be exchanged)."""
        group, k = self.groups[lv], ids.shape[1]
        hidden = packets.shape[1] - k
        valid = ids >= 0
        dest = torch.where(valid, self.dest_id[lv].to(ids.device)[ids.clamp_min(0)], -1)
        if lv in self.dedup:
            hit = torch.zeros(ids.shape[0], len(group), dtype=torch.bool, device=ids.device)
            rows, slots = valid.nonzero(as_tuple=True)
            hit[rows, dest[rows, slots]] = True
            parent, member = hit.nonzero(as_tuple=True)
            mask = dest[parent] == member[:, None]
        else:
            parent, slot = valid.nonzero(as_tuple=True)
            member = dest[parent, slot]
            mask = torch.nn.functional.one_hot(slot, k).bool()
        order = torch.argsort(member, stable=True)
        parent, member, mask = parent[order], member[order], mask[order]
        rows = packets[parent]
        child = torch.cat([rows[:, :hidden], rows[:, hidden:] * mask.to(rows.dtype)], dim=1)
        child_ids = torch.where(mask, ids[parent], -1)
        send = torch.bincount(member, minlength=len(group)).tolist()
        return child, child_ids, Hop(group, send, [], parent, packets.shape[0])

    def _recv_counts(self, sends: list[list[int]], group: list[int]) -> list[list[int]]:
        """Rows each member sends here, for several exchanges in ``group`` at once (one message per
        member): ``sends[c][j]`` rows go to member j in exchange c."""
        send = torch.tensor(sends, dtype=torch.int64).T.contiguous()  # [member, exchange]
        return exchange_counts(self.comm, send, group).T.tolist()

    def _experts(self, packets: torch.Tensor, ids: torch.Tensor, experts: GroupedExperts, hidden: int,
                 weights) -> torch.Tensor:
        """Each arrived packet's experts (the domain's ``weights``), their outputs weighted and
        summed: one row per packet."""
        rows, slots = (ids >= 0).nonzero(as_tuple=True)
        local = self.local_row.to(ids.device)[ids[rows, slots]]
        order = torch.argsort(local, stable=True)
        rows, slots, local = rows[order], slots[order], local[order]
        counts = torch.bincount(local, minlength=len(self.domain) * self.n_local).tolist()
        out = experts.compute(weights, packets[rows, :hidden], counts)
        gate = packets[rows, hidden + slots].unsqueeze(-1)
        return packets.new_zeros(packets.shape[0], hidden).index_add(0, rows, out * gate)

    def _combine(self, y: torch.Tensor, hop: Hop) -> torch.Tensor:
        """Retrace one stage: the children's sums go back and each parent adds its children's."""
        back = AllToAll.apply(y, self.comm, hop.group, hop.recv, hop.send, "a2a_combine")
        return y.new_zeros(hop.parents, y.shape[1]).index_add(0, hop.parent, back)
