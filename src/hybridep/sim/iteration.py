"""One simulated training iteration of the MoE layers: streams, flows and their dependencies.

The network is the cost model's port model walked hop by hop: every worker of level ``l`` (a DC,
a node, a GPU) has an egress and an ingress link of ``B_l`` bytes/s; a flow between two ranks
that differ first at level ``l`` crosses the sender's egress links of levels ``L-1 .. l`` and the
receiver's ingress links of levels ``l .. L-1`` (so a DC uplink is shared by all its ranks'
cross-DC flows, and a GPU port by its intra- and cross-DC flows). Each flow is delivered its
level's latency after its last byte.

What runs comes from a :class:`~hybridep.schedule.Schedule` (any strategy family's: bytes per flow,
peers per level, groups, compute seconds per rank); rates and latencies from the cost model's
:class:`~hybridep.costmodel.Network`. This module adds contention, skew and overlap by dependency
and knows no family.
With a per-message overhead (``topology.message_overhead``), every rank also has a communication
engine that its flows share (one message per ``o`` seconds, see :class:`_Fabric`).

* forward, per layer and micro-batch: pre-expert compute -> the row-count exchange (its latency and
  messages, :func:`~hybridep.costmodel.count_exchange_s`) -> dispatch all-to-all (tokens of the
  same exchange group) -> each rank's expert compute once its tokens *and* its layer's gathered experts are
  in and its own dispatch sends are delivered (a blocking all-to-all returns only then; folded
  runs do not track senders) -> combine all-to-all from that rank -> next layer once every rank
  has its results back;
* a shortcut block (:attr:`~hybridep.schedule.Schedule.overlap_s`) computes part of its pre-expert
  compute beside the dispatch (its experts start no earlier than that) and part beside the combine
  (the next layer starts no earlier than that after its expert compute);
* backward mirrors it (expert and pre-expert compute twice as long);
* gather chains (:attr:`~hybridep.schedule.Schedule.gather`): with ``overlap``, the runtime's
  prefetch chain -- layer 0's at the start of the iteration, layer l+1's when layer l takes its
  experts (the first rank with its dispatched tokens and its gather in); else each layer's at its
  forward start; stages in their order;
* reduce-scatter chains of the gathered experts' gradients: after the last micro-batch's expert
  backward of each layer, one after the other, stages in their order;
* the dense gradients' synchronisation (DDP's buckets, each through the stages of
  :attr:`~hybridep.schedule.Schedule.grad_sync`, one after the other): the earlier buckets released
  at the start of the last backward, the last one when the backward ends and the earlier ones are
  through.

Folding (``fold=True``): senders of the dispatch (and receivers of the combine) are symmetric --
every rank routes with the same expert-load histogram -- so a flow class is "all flows into rank b
over level l" with the senders' egress links folded into a per-level mean (a broadcast entry);
the receivers' links stay exact. Gathers, reduce-scatters are folded on both sides. This keeps
1000 DCs x 8 GPUs at tens of thousands of classes instead of 64 million flows. ``fold=False``
simulates every rank pair as its own flow on exact links (small worlds; used to test the fold).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from hybridep.config import CostTerms
from hybridep.costmodel import Network, count_exchange_s, ddp_last_bucket_bytes, exchange_delay_s, interleaved
from hybridep.schedule import Exchange, Schedule, Stage
from hybridep.sim.fluid import Batch, Engine
from hybridep.topology import Topology
from hybridep.trace import Span

TRACKS = ("compute", "a2a", "ag", "rs", "tp", "grad_sync")
COALESCE = 1e-3
"""In folded runs, completions of large batches (>= 256 flow classes) within 0.1 % of the batch's elapsed time
are merged into one event: bytes are conserved, times err by at most that much."""


@dataclass
class SimResult:
    """One simulated iteration. Times in seconds, bytes per iteration (cluster-wide)."""

    domain_sizes: tuple[int, ...]
    """The partition it ran (set by the family's wrapper; () from :func:`run_schedule`)."""
    iteration_s: float
    spans: list[Span]
    bytes_by_level: dict[str, dict[str, float]]
    """{level: {op: bytes}} of flows whose coarsest differing level is ``level``."""
    link_bytes: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    events: int = 0
    classes: int = 0


class _Fabric:
    """Link numbering: egress then ingress links of every level's workers, one group per both;
    with ``pooled``, then the pooled top-level uplinks (group 2L); with a per-message overhead, then
    one communication engine per rank (the last group): a resource of capacity 1 (its busy share)
    that each flow occupies ``o / size`` per byte sent and per byte received, so a rank handles at
    most one message per ``o`` seconds (LogGP's overhead, in fluid form)."""

    def __init__(self, topo: Topology, net: Network, pooled: bool):
        self.L = topo.num_levels
        self.G = topo.world_size
        self.workers = [math.prod(topo.counts[: j + 1]) for j in range(self.L)]
        self.per_worker = [topo.ranks_per_worker(j) for j in range(self.L)]
        offs, cap, grp = [], [], []
        start = 0
        for j in range(self.L):
            for direction in (0, 1):
                offs.append(start)
                cap.append(np.full(self.workers[j], net.port_bytes_per_s[j]))
                grp.append(np.full(self.workers[j], 2 * j + direction))
                start += self.workers[j]
        self.pooled_links = pooled
        if pooled:  # top-level uplinks with both directions as one resource at twice the rate (group
            # 2L): the all-to-alls of rails that interleave (CostTerms.rail_interleave)
            offs.append(start)
            cap.append(np.full(self.workers[0], 2 * net.port_bytes_per_s[0]))
            grp.append(np.full(self.workers[0], 2 * self.L))
        self.message_s = net.message_s
        self.engine_group = 2 * self.L + int(pooled)
        if self.message_s > 0:
            self.engine_offset = start + (self.workers[0] if pooled else 0)
            cap.append(np.ones(self.G))
            grp.append(np.full(self.G, self.engine_group))
        self.offset = offs  # index 2j: egress of level j, 2j+1: ingress, 2L: pooled top level
        self.capacity = np.concatenate(cap)
        self.group = np.concatenate(grp)
        self.groups = self.engine_group + int(self.message_s > 0)

    def link(self, level: int, ingress: bool, ranks: np.ndarray) -> np.ndarray:
        """Link ids of the given ranks' level-``level`` workers."""
        return self.offset[2 * level + int(ingress)] + ranks // self.per_worker[level]

    def engine(self, ranks: np.ndarray) -> np.ndarray:
        """Link ids of the given ranks' communication engines."""
        return self.engine_offset + ranks

    def a2a_link(self, level: int, ingress: bool, ranks: np.ndarray) -> np.ndarray:
        """Link ids an all-to-all flow uses at ``level``: the pooled uplinks at the top level when
        there are some, else :meth:`link`."""
        if level == 0 and self.pooled_links:
            return self.offset[2 * self.L] + ranks // self.per_worker[0]
        return self.link(level, ingress, ranks)

    def a2a_group(self, level: int, ingress: bool) -> int:
        """The link group of :meth:`a2a_link`."""
        return 2 * self.L if level == 0 and self.pooled_links else 2 * level + int(ingress)


class IterationSim:
    """Builds and runs one iteration on a fluid :class:`~hybridep.sim.fluid.Engine`."""

    def __init__(self, schedule: Schedule, net: Network, terms: CostTerms, fold: bool = True):
        if net.dc_link_bytes_per_s is not None:
            raise ValueError("topology.dc_bandwidth: the simulator models one shared port per DC; "
                             "a pairwise DC link matrix is not supported yet (remove it to simulate)")
        self.s, self.net, self.terms, self.fold = schedule, net, terms, fold
        topo = self.topology = schedule.topology
        ex = schedule.exchanges[0]
        # groups sharing a DC uplink interleave: their top-level all-to-all flows use pooled uplinks
        self.fab = _Fabric(topo, net, interleaved(ex, terms))
        self.G, self.L = topo.world_size, topo.num_levels
        ranks = np.arange(self.G)
        self.coords = np.stack(np.unravel_index(ranks, topo.counts), axis=1) if self.L > 1 else ranks[:, None]
        self.flow_bytes = np.stack([x.flow_bytes for x in schedule.exchanges])  # [layer, b]: one sender -> b
        self.expert_s = schedule.expert_s if terms.expert_compute else np.zeros_like(schedule.expert_s)
        self.lat = [x if terms.latency else 0.0 for x in net.latency_s]
        self.a2a_lat = [x + exchange_delay_s(ex, net) for x in self.lat]  # an exchange among busy ranks
        self.eng = Engine(self.fab.capacity, self.fab.group, self.fab.groups, coalesce=COALESCE if fold else 0.0)
        self.spans: list[Span] = []
        self.classes = 0
        self._a2a_peers = list(ex.peers_by_level)
        self._chunks = ex.chunks

    # ------------------------------------------------------------------ flow classes
    def _a2a_batch(self, op: str, layer: int, toward_b: bool, ranks: np.ndarray, release: np.ndarray,
                   label: str, scale: float = 1.0, stage: Exchange | None = None) -> Batch:
        """One all-to-all of MoE layer ``layer``: its flows into (``toward_b``) or out of the given
        ranks, per level (``scale`` times the bytes: one chunk of a pipelined exchange); ``stage``:
        one stage of a dispatch in stages instead of the layer's exchange."""
        sizes, counts, lats, rel, owner, other = [], [], [], [], [], []
        ent: list[list[np.ndarray]] = [[], [], []]
        gent: list[list[np.ndarray]] = [[], [], []]
        n_cls = 0
        peers_by_level = self._a2a_peers if stage is None else stage.peers_by_level
        flow_bytes = self.flow_bytes[layer] if stage is None else stage.flow_bytes
        a2a_lat = self.a2a_lat if stage is None else [x + exchange_delay_s(stage, self.net) for x in self.lat]
        for lv in range(self.L):
            n = peers_by_level[lv]
            if n == 0:
                continue
            if self.fold:
                cls = n_cls + np.arange(len(ranks))
                sizes.append(flow_bytes[ranks] * scale)
                counts.append(np.full(len(ranks), float(n)))
                lats.append(np.full(len(ranks), a2a_lat[lv]))
                rel.append(release)
                owner.append(ranks)
                other.append(np.full(len(ranks), -1))  # folded: the senders are not tracked
                for j in range(lv, self.L):
                    ent[0].append(cls)
                    ent[1].append(self.fab.a2a_link(j, toward_b, ranks))
                    ent[2].append(np.full(len(ranks), float(n)))
                    gent[0].append(cls)
                    gent[1].append(np.full(len(ranks), self.fab.a2a_group(j, not toward_b)))
                    gent[2].append(np.full(len(ranks), n / self.fab.workers[j]))
                n_cls += len(ranks)
            else:
                peers = self._rail_peers(ranks, lv, stage)  # (len(ranks), n)
                b = np.repeat(ranks, n)
                a = peers.reshape(-1)
                cls = n_cls + np.arange(len(b))
                sizes.append(flow_bytes[b] * scale)
                counts.append(np.ones(len(b)))
                lats.append(np.full(len(b), a2a_lat[lv]))
                rel.append(np.repeat(release, n))
                owner.append(b)
                other.append(a)
                src, dst = (a, b) if toward_b else (b, a)
                for j in range(lv, self.L):
                    for side, r in ((False, src), (True, dst)):
                        ent[0].append(cls)
                        ent[1].append(self.fab.a2a_link(j, side, r))
                        ent[2].append(np.ones(len(b)))
                n_cls += len(b)
        batch = self._batch(op, sizes, counts, lats, rel, ent, gent, label, owner)
        batch.other = np.concatenate(other).astype(int) if other else np.zeros(0, int)
        if self.fold:  # the real end handles the class's n flows; the folded senders n / G each on average
            cls = np.arange(batch.classes)
            return self._engines(batch, real=(cls, batch.owner, batch.count), mean=(cls, batch.count / self.G))
        batch.src, batch.dst = (batch.other, batch.owner) if toward_b else (batch.owner, batch.other)
        return self._p2p_engines(batch)

    def _rail_peers(self, ranks: np.ndarray, lv: int, stage: Exchange | None = None) -> np.ndarray:
        """For each rank, the members of its exchange group (of ``stage``, if given) whose coarsest
        differing level is ``lv``."""
        group_of = {r: g for g in (stage or self.s.exchanges[0]).groups() for r in g}
        return np.asarray([[q for q in group_of[r] if self.topology.level_of_pair(r, q) == lv]
                           for r in ranks.tolist()], dtype=int)

    def _stage_batch(self, op: str, stage: Stage, label: str) -> Batch:
        """One stage of a gather (or reduce-scatter) chain over its level, at the network's gather
        efficiency of that level, each flow ending its stage delay after its last byte (on top of
        the level's latency; a blocking stage: the all-to-all's rate and the rendezvous, see
        :meth:`~hybridep.costmodel.Network.stage_wait_s`); every rank sends to and receives from
        each of its stage peers."""
        lv = stage.level
        s = stage.peers + 1
        per_flow = stage.flow_bytes
        n_flows = self.G * (s - 1)
        if self.fold:
            cls = np.zeros(self.L - lv, dtype=int)
            gent = [[cls, cls], [np.arange(lv, self.L) * 2, np.arange(lv, self.L) * 2 + 1],
                    [np.array([n_flows / self.fab.workers[j] for j in range(lv, self.L)])] * 2]
            batch = self._batch(op, [np.array([per_flow])], [np.array([float(n_flows)])],
                                [np.array([self.lat[lv]])], [np.array([self.eng.now])],
                                [[], [], []], [[np.concatenate(x)] for x in gent], label, [np.zeros(1, int)])
        else:
            src, dst = [], []
            for group in stage.groups():
                for a in group:
                    for b in group:
                        if a != b:
                            src.append(a)
                            dst.append(b)
            batch = self._p2p_batch(op, np.asarray(src), np.asarray(dst), per_flow, lv, label)
        factor = self.net.stage_rate_factor(stage)
        if factor != 1.0:
            batch.cost = np.full(batch.classes, 1.0 / factor)
        if self.net.stage_wait_s(stage):
            batch.latency = batch.latency + self.net.stage_wait_s(stage)
        if self.fold:  # every rank sends to and receives from its S_l - 1 stage peers
            return self._engines(batch, mean=(np.zeros(1, int), np.array([2.0 * (s - 1)])))
        return self._p2p_engines(batch)

    def _engines(self, batch: Batch, real: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                 mean: tuple[np.ndarray, np.ndarray] | None = None) -> Batch:
        """Add the communication engines' use to ``batch`` when a per-message overhead is charged:
        ``real`` = (classes, ranks, that class's messages the rank sends or receives), ``mean`` =
        (classes, that class's messages every rank handles on average -- the folded ends). A flow
        of ``size`` bytes occupies its engines ``o / size`` per byte/s (its link cost undone)."""
        o = self.fab.message_s
        if o <= 0:
            return batch
        cost = batch.cost if batch.cost is not None else np.ones(batch.classes)
        per = np.divide(o, batch.size * cost, out=np.zeros(batch.classes), where=batch.size > 0)
        c, link, k = batch.entries
        if real is not None:
            rc, rr, rk = real
            batch.entries = (np.concatenate([c, rc]), np.concatenate([link, self.fab.engine(rr)]),
                             np.concatenate([k, rk * per[rc]]))
        if mean is not None:
            mc, mk = mean
            gc, grp, gk = batch.group_entries
            batch.group_entries = (np.concatenate([gc, mc]),
                                   np.concatenate([grp, np.full(len(mc), self.fab.engine_group)]),
                                   np.concatenate([gk, mk * per[mc]]))
        return batch

    def _p2p_engines(self, batch: Batch) -> Batch:
        """:meth:`_engines` for single flows: one message at each end (``batch.src``, ``batch.dst``)."""
        n = batch.classes
        cls = np.arange(n)
        return self._engines(batch, real=(np.concatenate([cls, cls]), np.concatenate([batch.src, batch.dst]),
                                          np.ones(2 * n)))

    def _p2p_batch(self, op: str, src: np.ndarray, dst: np.ndarray, per_flow: float, lv: int | np.ndarray,
                   label: str, latency: float | None = None) -> Batch:
        """Single flows on exact links (``lv``: coarsest differing level per flow)."""
        n = len(src)
        lvs = np.broadcast_to(np.asarray(lv), (n,))
        cls = np.arange(n)
        ent: list[list[np.ndarray]] = [[], [], []]
        for j in range(self.L):
            on = lvs <= j
            for side, r in ((False, src), (True, dst)):
                ent[0].append(cls[on])
                ent[1].append(self.fab.link(j, side, r[on]))
                ent[2].append(np.ones(int(on.sum())))
        lat = np.asarray([self.lat[x] for x in lvs]) if latency is None else np.full(n, latency)
        batch = self._batch(op, [np.full(n, per_flow)], [np.ones(n)], [lat], [np.full(n, self.eng.now)],
                            ent, [[], [], []], label, [np.zeros(n, int)])
        batch.src, batch.dst = src, dst
        return batch

    def _batch(self, op, sizes, counts, lats, rel, ent, gent, label, owner) -> Batch:
        def cat(parts, dtype=float):
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

        b = Batch(op=op, size=cat(sizes), count=cat(counts), latency=cat(lats), release=cat(rel),
                  entries=(cat(ent[0], int), cat(ent[1], int), cat(ent[2])),
                  group_entries=(cat(gent[0], int), cat(gent[1], int), cat(gent[2])), label=label)
        b.owner = cat(owner, int)  # the real-side rank of every class
        self.classes += b.classes
        return b

    # ------------------------------------------------------------------ schedule
    def _span(self, track: str, name: str, start: float, end: float) -> None:
        if end > start:
            self.spans.append(Span(track, name, start, end))

    def _collective(self, batch: Batch, track: str, then) -> None:
        """Submit a batch; record its span and call ``then(t)`` when all of it is delivered."""
        start = self.eng.now

        def done(t: float) -> None:
            self._span(track, batch.label, start, t)
            then(t)

        batch.on_all_delivered = done
        self.eng.submit(batch)

    def _staged(self, op: str, stages: tuple[Stage, ...], label: str, then) -> None:
        """Stages one after the other (each delivered before the next starts)."""
        if not stages or stages[0].flow_bytes <= 0:
            then(self.eng.now)
            return
        stage, rest = stages[0], stages[1:]
        batch = self._stage_batch(op, stage, f"{label} {self.topology.names[stage.level]}")
        self._collective(batch, op, lambda t: self._staged(op, rest, label, then))

    def _staged_step(self, layer: int, name: str, work: np.ndarray, need_experts: int | None, then,
                     on_experts=None, on_launch=None, hidden: tuple[float, float] = (0.0, 0.0)) -> None:
        """A dispatch in stages (:attr:`~hybridep.schedule.Exchange.then`): each stage's all-to-all
        once the previous one is delivered everywhere, every rank's experts once the last stage is in
        (and its layer's experts gathered), the combine's stages in reverse once every rank's experts
        are done (a forwarder sums what its children send back before it sends on); in chunks:
        :meth:`_pipelined_stages`."""
        stages = self.s.exchanges[layer].stages()
        if stages[0].chunks > 1:
            return self._pipelined_stages(layer, name, work, need_experts, then, on_experts, on_launch,
                                          hidden)
        start, ranks = self.eng.now, np.arange(self.G)
        done = {"experts": start}

        def dispatch(i: int, t: float) -> None:
            if i == len(stages):
                return experts(t)
            batch = self._a2a_batch("a2a", layer, True, ranks, np.full(self.G, t),
                                    f"dispatch {name} stage {i}", stage=stages[i])
            self._collective(batch, "a2a", lambda tt: dispatch(i + 1, tt))

        def experts(t: float) -> None:
            self._with_experts(need_experts, ranks, max(t, start + hidden[0]), lambda _bs, tt: launch(tt))

        def launch(t: float) -> None:
            if on_launch is not None:
                on_launch(t)
            end = t + float(work.max())
            self._span("compute", f"experts {name}", t, end)
            if on_experts is not None:
                on_experts(end)
            done["experts"] = end
            self.eng.at(end, lambda: combine(len(stages) - 1, end))

        def combine(i: int, t: float) -> None:
            if i < 0:
                self._span("a2a", f"dispatch..combine {name}", start, t)
                return self._after(max(t, done["experts"] + hidden[1]), then)
            batch = self._a2a_batch("a2a", layer, False, ranks, np.full(self.G, t),
                                    f"combine {name} stage {i}", stage=stages[i])
            self._collective(batch, "a2a", lambda tt: combine(i - 1, tt))

        dispatch(0, start)

    def _pipelined_stages(self, layer: int, name: str, work: np.ndarray, need_experts: int | None, then,
                          on_experts=None, on_launch=None, hidden: tuple[float, float] = (0.0, 0.0)) -> None:
        """A dispatch in stages pipelined in C chunks (MoNTA), as the runtime runs it: the chunks'
        first (outermost) stage one after the other on its connections (1/C of the bytes each); one
        chunk at a time, in order, once its first stage is in and the previous chunk's work is done,
        the later stages, the experts (1/C of the expert time, its layer's experts gathered) and the
        inner combine stages, then its first-stage combine is issued; ``then(t)`` when every chunk's
        combine is back (and ``hidden[1]`` after the last experts)."""
        stages = self.s.exchanges[layer].stages()
        chunks, start, ranks = stages[0].chunks, self.eng.now, np.arange(self.G)
        st = {"arrived": {}, "next": 0, "busy": False, "free": start, "back": 0, "expert_start": math.inf,
              "expert_end": start}

        def batch(c: int, i: int, toward: bool, t: float):
            kind = "dispatch" if toward else "combine"
            return self._a2a_batch("a2a", layer, toward, ranks, np.full(self.G, t),
                                   f"{kind} {name} chunk {c} stage {i}", 1.0 / chunks, stage=stages[i])

        def arrived(c: int, t: float) -> None:
            st["arrived"][c] = t
            pump()

        def follow(nxt, idx: np.ndarray, t: float) -> None:  # the next chunk's flows, once these have left
            self.eng.release_at(nxt, idx, np.full(len(idx), t))

        firsts = [batch(c, 0, True, start if c == 0 else np.inf) for c in range(chunks)]
        for c, b in enumerate(firsts):  # each chunk's flows follow the previous chunk's on their connections
            if c + 1 < chunks:
                b.on_sent = functools.partial(follow, firsts[c + 1])
            self._collective(b, "a2a", functools.partial(arrived, c))

        def pump() -> None:
            c = st["next"]
            if st["busy"] or c >= chunks or c not in st["arrived"]:
                return
            st["busy"], st["next"] = True, c + 1
            self._after(max(st["arrived"][c], st["free"]), lambda t: dispatch(c, 1, t))

        def dispatch(c: int, i: int, t: float) -> None:
            if i == len(stages):
                return experts(c, max(t, start + hidden[0]))
            self._collective(batch(c, i, True, t), "a2a", lambda tt: dispatch(c, i + 1, tt))

        def experts(c: int, t: float) -> None:
            self._with_experts(need_experts, ranks, t, lambda _bs, tt: compute(c, tt))

        def compute(c: int, t: float) -> None:
            if c == 0 and on_launch is not None:
                on_launch(t)
            end = t + float(work.max()) / chunks
            st["expert_start"], st["expert_end"] = min(st["expert_start"], t), end
            if c == chunks - 1:
                self._span("compute", f"experts {name}", st["expert_start"], end)
                if on_experts is not None:
                    on_experts(end)
            self.eng.at(end, lambda: combine(c, len(stages) - 1, end))

        def combine(c: int, i: int, t: float) -> None:
            if i > 0:
                return self._collective(batch(c, i, False, t), "a2a", lambda tt: combine(c, i - 1, tt))
            self._collective(batch(c, 0, False, t), "a2a", back)
            st["busy"], st["free"] = False, t
            pump()

        def back(t: float) -> None:
            st["back"] += 1
            if st["back"] == chunks:
                self._span("a2a", f"dispatch..combine {name}", start, t)
                self._after(max(t, st["expert_end"] + hidden[1]), then)

    def _after(self, t: float, then) -> None:
        """``then(t)`` at time ``t`` (now or later: the callee reads the clock)."""
        if t > self.eng.now:
            self.eng.at(t, lambda: then(t))
        else:
            then(t)

    def _moe_step(self, layer: int, name: str, work: np.ndarray, need_experts: int | None, then,
                  on_experts=None, on_launch=None, hidden: tuple[float, float] = (0.0, 0.0)) -> None:
        """Dispatch -> each rank's expert compute (``work``: seconds per rank) -> combine from that
        rank, in ``a2a_chunks`` chunks; ``hidden``: seconds every rank computes beside the dispatch
        (its experts start no earlier than that after the step's start) and beside the combine (the
        step ends no earlier than that after the last expert compute) -- a shortcut block's.

        Chunk c's flows (1/C of the bytes) follow chunk c-1's on the same connection (a flow class
        is released when its predecessor is delivered); a rank computes chunk c (1/C of its expert
        time, after its chunk c-1) once that chunk's flows into it -- and, unfolded, out of it -- are
        delivered, and sends its results at once. ``then(t)`` runs when every rank has all its
        results back; ``on_experts(t)`` when the last expert compute ends (known once every rank
        has started its last chunk); ``on_launch(t)`` when the first rank starts its experts (its
        tokens in, its layer's experts gathered)."""
        if self._gathered_first(layer, need_experts, lambda: self._moe_step(
                layer, name, work, need_experts, then, on_experts, on_launch, hidden)):
            return
        if self.s.exchanges[layer].then is not None:
            return self._staged_step(layer, name, work, need_experts, then, on_experts, on_launch, hidden)
        start = self.eng.now
        ranks = np.arange(self.G)
        chunks = self._chunks if any(self._a2a_peers) else 1
        st = {"launched": 0, "combined": 0, "expert_start": math.inf, "expert_end": start}
        busy = np.full(self.G, -math.inf)  # per rank: when its previous chunk's experts end
        dispatch, combine, left = [], [], []
        for c in range(chunks):
            label = f" chunk {c}" if chunks > 1 else ""
            d = self._a2a_batch("a2a", layer, True, ranks, np.full(self.G, start if c == 0 else np.inf),
                                f"dispatch {name}{label}", 1.0 / chunks)
            # the runtime's all-to-all returns when the rank's receives *and* sends are done: a rank
            # waits for the flows into it and (unfolded: senders known) the flows out of it
            sender = d.other
            left.append(np.bincount(d.owner, minlength=self.G) + np.bincount(sender[sender >= 0], minlength=self.G))
            dispatch.append(d)
            # the combine's classes exist from the start; each rank's are released when its experts end
            combine.append(self._a2a_batch("a2a", layer, False, ranks, np.full(self.G, np.inf),
                                           f"combine {name}{label}", 1.0 / chunks))
        expected = sum(b.classes for b in combine)
        order = np.argsort(combine[0].owner, kind="stable")
        first = np.searchsorted(combine[0].owner[order], ranks)
        per_rank = np.bincount(combine[0].owner, minlength=self.G)

        def experts_ready(c: int, bs: np.ndarray, t: float) -> None:
            self._with_experts(need_experts, bs, max(t, start + hidden[0]), functools.partial(launch, c))

        def launch(c: int, bs: np.ndarray, t: float) -> None:
            if st["launched"] == 0 and on_launch is not None:
                on_launch(t)
            begin = np.maximum(t, busy[bs])
            end = begin + work[bs] / chunks
            busy[bs] = end
            st["launched"] += len(bs)
            st["expert_start"] = min(st["expert_start"], t)
            st["expert_end"] = max(st["expert_end"], float(end.max()))
            if st["launched"] == self.G * chunks:
                self._span("compute", f"experts {name}", st["expert_start"], st["expert_end"])
                if on_experts is not None:
                    on_experts(st["expert_end"])
            if expected == 0:
                if st["launched"] == self.G * chunks:
                    self.eng.at(st["expert_end"], lambda: finish(self.eng.now))
                return
            idx = np.concatenate([order[first[b]: first[b] + per_rank[b]] for b in bs.tolist()])
            self.eng.release_at(combine[c], idx, np.repeat(end, per_rank[bs]))

        def combined(n: int, t: float) -> None:
            st["combined"] += n
            if st["combined"] == expected:
                finish(t)

        def finish(t: float) -> None:
            self._span("a2a", f"dispatch..combine {name}", start, t)
            self._after(max(t, st["expert_end"] + hidden[1]), then)

        def dispatched(c: int, idx: np.ndarray, t: float) -> None:
            if c + 1 < chunks:  # the next chunk's flows follow on the same connections
                self.eng.release_at(dispatch[c + 1], idx, np.full(len(idx), t))
            owners, senders = dispatch[c].owner[idx], dispatch[c].other[idx]
            senders = senders[senders >= 0]
            np.subtract.at(left[c], owners, 1)
            np.subtract.at(left[c], senders, 1)
            ready = np.unique(np.concatenate([owners, senders]))
            ready = ready[left[c][ready] == 0]
            if len(ready):
                experts_ready(c, ready, t)

        if expected == 0:
            experts_ready(0, ranks, start)
            return
        for c in range(chunks):
            combine[c].on_delivered = lambda idx, tt: combined(len(idx), tt)
            dispatch[c].on_delivered = functools.partial(dispatched, c)
            self.eng.submit(dispatch[c])
            self.eng.submit(combine[c])

    def _with_experts(self, need: int | None, ranks: np.ndarray, t: float, go) -> None:
        """``go(ranks, t')`` once layer ``need``'s gathered experts are in: t' the later of ``t`` and
        their arrival (at once without gathers); unprefetched, needing them issues their gather."""
        self._need(need, t)
        if need is not None and need not in self.ag_done:
            self.waiting.setdefault(need, []).append((ranks, t, go))
            return
        go(ranks, max(t, self.ag_done.get(need, 0.0) if need is not None else 0.0))

    def _gather_done(self, layer: int, t: float) -> None:
        self.ag_done[layer] = t
        for bs, t0, launch in self.waiting.pop(layer, []):
            launch(bs, max(t0, t))

    def run(self) -> SimResult:
        """Simulate one iteration and return its timeline."""
        s = self.s
        self.ag_done: dict[int, float] = {}
        self.waiting: dict[int, list] = {}
        self._gathers = bool(s.gather)
        self._counts_s = count_exchange_s(s.counts, self.net, self.terms)  # before every forward dispatch
        sync = s.grad_sync
        self._last_bucket = ddp_last_bucket_bytes(sync.grad_bytes) if sync.overlaps_backward else sync.grad_bytes
        self._end = {"bwd": 0.0, "rs": 0.0, "gs": 0.0, "gs0": 0.0}
        self._rs_queue: list[int] = []
        self._rs_on = False
        self._taken: set[int] = set()
        self._chained: set[int] = set()
        # the buckets' all-reduces run one after the other on their process group: the last one once
        # the backward has ended and the earlier ones are through
        self._last_waits = {"ready"} | ({"early"} if s.grad_sync.grad_bytes - self._last_bucket > 0 else set())
        self._issued: set[int] = set()
        if self.terms.overlap and self._gathers and s.prefetch:
            self._issue(0)
        self._forward(0, 0)
        self.eng.run()
        iteration = max(self._end.values())
        if self.terms.backward and s.optimizer_s > 0:
            self._span("compute", "optimizer step", iteration, iteration + s.optimizer_s)
            iteration += s.optimizer_s
        return SimResult((), iteration, self.spans, self._bytes_by_level(), dict(self.eng.link_bytes),
                         self.eng.events, self.classes)

    # ------------------------------------------------------------------ the forward and backward passes
    def _forward(self, m: int, layer: int) -> None:
        """Micro-batch ``m`` reaches MoE layer ``layer``: its pre-expert compute (the first micro-batch
        also en/decodes), the row counts, then the layer's exchange; past the last layer, the backward."""
        s, t0 = self.s, self.eng.now
        if layer == s.layers and self.terms.backward:
            return self._backward(m, s.layers - 1)
        if layer == s.layers:
            self._end["bwd"] = t0
            return self._next_micro_batch(m)
        if m == 0 and not self.terms.overlap and self._gathers:
            self._issue(layer)
        pre = s.pre_dispatch_s + (s.codec_s if m == 0 else 0.0)
        self._span("compute", f"pre-expert L{layer} mb{m}", t0, t0 + pre)
        need = layer if self._gathers else None
        first = m == 0 and self.terms.overlap and self._gathers
        on_launch = (lambda t: self._take(layer)) if first else None
        def exchange() -> None:
            t = self.eng.now
            self._span("a2a", f"row counts L{layer} mb{m}", t, t + self._counts_s)
            self.eng.at(t + self._counts_s, lambda: self._moe_step(
                layer, f"L{layer} mb{m}", self.expert_s[layer], need, lambda t: self._forward(m, layer + 1),
                on_launch=on_launch,
                hidden=s.overlap_s))

        self.eng.at(t0 + pre, lambda: self._staged("tp", s.tp_stages, f"tp L{layer} mb{m}", lambda t: exchange()))

    def _backward(self, m: int, layer: int) -> None:
        """Micro-batch ``m``'s backward reaches layer ``layer`` (last first): its exchange with the
        backward's expert compute, then twice the pre-expert compute; the last micro-batch queues the
        layer's reduce-scatter when its experts' backward ends and releases DDP's buckets."""
        s, t0, last_mb = self.s, self.eng.now, m == self.s.micro_batches - 1
        if layer < 0:
            self._end["bwd"] = t0
            if last_mb and self.terms.grad_sync:  # DDP's last bucket: ready when the backward ends
                self._sync_last("ready")
            return self._next_micro_batch(m)
        if last_mb and layer == s.layers - 1 and self.terms.grad_sync:  # DDP's earlier buckets
            self._grad_sync(s.grad_sync.grad_bytes - self._last_bucket, self._early_synced)

        def experts_done(t: float) -> None:
            if last_mb and self._gathers:
                self.eng.at(t, lambda: (self._rs_queue.append(layer), self._next_rs()))

        def after(t: float) -> None:
            span = 2 * s.pre_dispatch_s
            self._span("compute", f"pre-expert bwd L{layer} mb{m}", t, t + span)
            self.eng.at(t + span, lambda: self._staged("tp", s.tp_stages, f"tp bwd L{layer} mb{m}",
                                                      lambda tt: self._backward(m, layer - 1)))

        d, c = s.overlap_s  # the mirrors of the combine, then of the dispatch
        work = s.backward_factor * self.expert_s[layer] + s.backward_extra_s
        self._moe_step(layer, f"bwd L{layer} mb{m}", work, None, after, experts_done,
                       hidden=(2 * c, 2 * d))

    def _next_micro_batch(self, m: int) -> None:
        if m + 1 < self.s.micro_batches:
            self._forward(m + 1, 0)

    # ------------------------------------------------------------------ gathers and reduce-scatters
    def _gather(self, layer: int) -> None:
        """Issue layer ``layer``'s gather chain."""
        def done(t: float) -> None:
            self._gather_done(layer, t)
            if layer in self._taken:
                self._chain(layer)
        self._staged("ag", self.s.gather, f"gather L{layer}", done)

    def _chain(self, layer: int) -> None:
        """Layer ``layer`` took its experts: the prefetch chain issues the next layer's gather (once:
        every rank that launches the layer's experts reports it)."""
        if self.terms.overlap and self.s.prefetch and layer + 1 < self.s.layers and layer not in self._chained:
            self._chained.add(layer)
            self._issue(layer + 1)

    def _issue(self, layer: int) -> None:
        """Issue layer ``layer``'s gather chain unless it is out already."""
        if layer not in self._issued:
            self._issued.add(layer)
            self._gather(layer)

    def _need(self, layer: int | None, t: float | None = None) -> None:
        """Layer ``layer`` needs its experts at ``t`` (default now): unprefetched, its gather goes out
        then (once)."""
        if layer is None or not self.terms.overlap or self.s.prefetch or layer in self._issued:
            return
        self._after(self.eng.now if t is None else t, lambda _t: self._issue(layer))

    def _gathered_first(self, layer: int, need: int | None, retry) -> bool:
        """Unprefetched, a chunked exchange takes its layer's experts before its dispatch: if they
        are not in, issue their gather and ``retry()`` the step when it lands (returns True)."""
        if need is None or self.s.prefetch or not self.terms.overlap or need in self.ag_done:
            return False
        if self.s.exchanges[layer].chunks == 1:
            return False
        self._need(need)
        self.waiting.setdefault(need, []).append((np.arange(self.G), self.eng.now, lambda _bs, t: self._after(
            t, lambda _t: retry())))
        return True

    def _take(self, layer: int) -> None:
        self._taken.add(layer)
        if layer in self.ag_done:
            self._chain(layer)

    def _next_rs(self) -> None:
        """Start the next queued reduce-scatter chain unless one is in flight."""
        if self._rs_on or not self._rs_queue:
            return
        layer = self._rs_queue.pop(0)
        self._rs_on = True

        def done(t: float) -> None:
            self._rs_on = False
            self._end["rs"] = t
            self._next_rs()

        self._staged("rs", self.s.reduce_scatter, f"reduce-scatter L{layer}", done)

    # ------------------------------------------------------------------ DDP's buckets
    def _sync_last(self, event: str) -> None:
        self._last_waits.discard(event)
        if not self._last_waits:
            self._grad_sync(self._last_bucket, lambda t: self._end.__setitem__("gs", t))

    def _early_synced(self, t: float) -> None:
        self._end["gs0"] = t
        self._sync_last("early")

    def _grad_sync(self, nbytes: float, then, stage: int = 0) -> None:
        """Synchronise ``nbytes`` of dense gradients: the schedule's stages one after the other, each
        its compute, then its flows (a stage's latency: its rounds of the slowest level it crosses)."""
        stages = self.s.grad_sync.stages
        if nbytes <= 0 or stage >= len(stages):
            if nbytes > 0:
                then(self.eng.now)
            return
        st = stages[stage]
        lat = st.rounds * max(self.lat[x] for x in st.levels)

        def issue() -> None:
            batch = self._p2p_batch("allreduce", st.src, st.dst, st.fraction * nbytes,
                                    st.flow_level, f"dense grad {st.label}", latency=lat)
            self._collective(batch, "grad_sync", lambda t: self._grad_sync(nbytes, then, stage + 1))

        self.eng.at(self.eng.now + st.compute_s_per_byte * nbytes, issue)

    def _bytes_by_level(self) -> dict[str, dict[str, float]]:
        """Bytes of flows by coarsest level: level-l egress bytes minus level-(l-1) egress bytes."""
        out: dict[str, dict[str, float]] = {n: {} for n in self.topology.names}
        for op, per_link in self.eng.link_bytes.items():
            prev, pooled = 0.0, 0.0
            if self.fab.pooled_links:
                pool = self.fab.offset[2 * self.L]
                pooled = float(per_link[pool: pool + self.fab.workers[0]].sum()) / 2  # each flow crosses 2 pools
            for j, name in enumerate(self.topology.names):
                e = float(per_link[self.fab.offset[2 * j]: self.fab.offset[2 * j] + self.fab.workers[j]].sum())
                e += pooled if j == 0 else 0.0
                out[name][op] = e - prev
                prev = e
        return out


def run_schedule(schedule: Schedule, net: Network, terms: CostTerms, fold: bool = True) -> SimResult:
    """Simulate one training iteration as ``schedule`` describes it (any strategy family)."""
    return IterationSim(schedule, net, terms, fold).run()
