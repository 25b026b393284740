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

from dataclasses import dataclass

import numpy as np
import torch

from hybridep.migration.sr import SRSettings
from hybridep.moe.experts import GroupedExperts
from hybridep.moe.layer import Branch, Eager, compute_in_place
from hybridep.moe.router import Routing
from hybridep.parallel.comm import Communicator
from hybridep.parallel.functional import AllToAll
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
                 dedup: tuple[int, ...] = ()):
        super().__init__(comm, domains, num_experts, sr, a2a_chunks=1)
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
        packets, hops = torch.cat([x, weights], dim=1), []
        for lv in self.levels:
            packets, ids, hop = self._dispatch(packets, ids, lv)
            hops.append(hop)
        y = self._experts(packets, ids, experts, x.shape[1])
        for hop in reversed(hops):
            y = self._combine(y, hop)
        return y

    def _dispatch(self, packets: torch.Tensor, ids: torch.Tensor, lv: int) -> tuple[torch.Tensor, torch.Tensor, Hop]:
        """One stage: each packet's children (one per distinct destination member at ``lv`` when it
        deduplicates, else one per pair), sorted by member, exchanged in the stage group."""
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
        send = torch.bincount(member, minlength=len(group))
        recv = torch.empty_like(send)
        self.comm.all_to_all(recv, send, [1] * len(group), [1] * len(group), group, "meta")
        send_l, recv_l = send.tolist(), recv.tolist()
        out = AllToAll.apply(child, self.comm, group, send_l, recv_l, "a2a_dispatch")
        out_ids = child_ids.new_empty((sum(recv_l), k))
        self.comm.all_to_all(out_ids, child_ids.contiguous(), recv_l, send_l, group, "a2a_ids")
        return out, out_ids, Hop(group, send_l, recv_l, parent, packets.shape[0])

    def _experts(self, packets: torch.Tensor, ids: torch.Tensor, experts: GroupedExperts,
                 hidden: int) -> torch.Tensor:
        """Each arrived packet's experts, their outputs weighted and summed: one row per packet."""
        weights = self.expert_weights(experts)  # after the dispatch: the gather lands meanwhile
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
