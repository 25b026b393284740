"""One training iteration as a strategy family describes it, for the cost model and the simulator.

A family's ``schedule(workload)`` returns a :class:`Schedule`: what runs on each stream, with every
quantity the evaluators need -- seconds of compute, bytes per port and per flow on each topology
level, messages, groups -- and nothing about how the family arrived at them. The cost model
(:func:`hybridep.costmodel.evaluate`) prices a Schedule analytically; the simulator
(:func:`hybridep.sim.iteration.run_schedule`) executes it as flows with max-min sharing. Neither
knows a family: a new family is a new way of filling a Schedule.

The iteration the evaluators run (streams and dependencies):

* forward, per micro-batch and MoE layer: ``pre_expert_s`` of compute (the first micro-batch also
  ``codec_s``), the row-count exchange (:attr:`Schedule.counts`), the layer's :class:`Exchange`
  (dispatch -> each rank's expert compute -> combine, in ``chunks`` pipelined chunks), whose expert
  compute waits for the layer's :attr:`Schedule.gather` chain; a shortcut block
  (:attr:`Schedule.overlap_s`) computes part of ``pre_expert_s`` while its dispatch travels and
  part while its combine travels;
* background, the gather chains: one per layer, stages one after the other; with prefetch (the cost
  terms' ``overlap`` and :attr:`Schedule.prefetch`) layer 0's is issued at the start and layer
  l+1's when layer l takes its experts; unprefetched, each when its layer needs its experts;
  without ``overlap``, each at its layer's forward start;
* backward, per micro-batch and layer (last first): the exchange again with ``backward_factor``
  times the expert compute plus ``backward_extra_s``, then ``2 pre_expert_s`` (a shortcut block
  computes twice its overlapped parts beside the mirrors of combine and dispatch);
  after the last micro-batch's expert backward of each layer, its :attr:`Schedule.reduce_scatter`
  chain (stages in their order), one chain after the other;
* the dense gradients' synchronisation (:attr:`Schedule.grad_sync`: DDP's buckets, each through
  the stages of the configured ``dense_sync`` mode), then the optimizer step (``optimizer_s``).

Units: seconds (``_s``), bytes (``_bytes``); arrays are indexed by rank (``[layer, rank]``) or by
the workers of a level (``[worker]``, row-major over the levels above).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from hybridep.topology import Topology


@dataclass(frozen=True)
class ExchangePorts:
    """One dispatch of one layer on one level's ports (the combine is its mirror)."""

    egress_bytes: np.ndarray
    """Bytes each port of the level sends (one entry per port, or per class of ports alike)."""
    ingress_bytes: np.ndarray
    """Bytes the same ports receive (same indexing)."""
    total_bytes: float
    """Cluster-wide bytes crossing the level's ports in one dispatch."""


@dataclass(frozen=True)
class Exchange:
    """The token exchange of one MoE layer (one dispatch; the combine mirrors it)."""

    ports: tuple[ExchangePorts, ...]
    """Per level (outermost first): what the dispatch puts on that level's ports."""
    peers_by_level: tuple[int, ...]
    """Per level: how many peers each rank exchanges with whose coarsest differing level it is."""
    flow_bytes: np.ndarray
    """[rank]: bytes one peer sends to this rank in one dispatch (every peer alike)."""
    groups: Callable[[], list[list[int]]]
    """The exchange groups (every rank in exactly one; ranks of different groups never exchange)."""
    top_pair_bytes: Callable[[], np.ndarray]
    """(workers x workers) of the top level: bytes one worker sends another in one dispatch (0 where
    the pair does not exchange), for pairwise top-level links (made only when those are priced)."""
    messages: int
    """Messages one rank sends plus receives in one dispatch (all chunks)."""
    chunks: int
    """Pipelined chunks (1: one dispatch, the experts, one combine)."""
    interleaved_top: bool
    """Several exchange groups share each top-level port and drift apart (their dispatch meets
    another's combine): the port carries the mean of its two directions."""
    delay_levels: tuple[int, ...]
    """Levels whose measured per-stage delay the exchange pays (it runs among ranks whose
    communication threads are busy with gather chains), or () for none."""
    then: Exchange | None = None
    """The next stage of a dispatch in stages (each stage's all-to-all waits for the previous one;
    the combine retraces them, last first), or None: this is the last (or only) stage."""
    calls: float = 0.0
    """Blocking exchanges the compute thread makes with the stage's peers per chunk, per phase
    (dispatch, combine and their backwards, averaged): each a rendezvous that costs the network's
    ``rendezvous_s`` beyond its bytes (0: the phase's transfers are issued and waited for once,
    while its bytes travel)."""

    def stages(self) -> list[Exchange]:
        """This exchange and the stages that follow it, in dispatch order."""
        out, ex = [], self
        while ex is not None:
            out.append(ex)
            ex = ex.then
        return out


@dataclass(frozen=True)
class Stage:
    """One stage of a gather or reduce-scatter chain: every rank exchanges with the ``peers`` other
    members of its stage group across ``level``, ``flow_bytes`` to each."""

    level: int
    peers: int
    flow_bytes: float
    groups: Callable[[], list[list[int]]]
    """The stage groups (for simulating every pair)."""
    top_pairs: Callable[[], np.ndarray]
    """(workers x workers) of the top level: which pairs exchange in this stage (pairwise top-level
    links; asked only of a stage over the top level)."""
    blocking: bool = False
    """A blocking collective on the compute thread between two computations (a TP group's): it waits
    for its peers to be scheduled (the network's rendezvous) and runs at the all-to-all's rate, not
    the background chain's measured delay and efficiency."""


@dataclass(frozen=True)
class CountExchange:
    """The split-size exchange before every forward dispatch: a few bytes, one latency of the slowest
    level it crosses and ``messages`` messages per rank."""

    levels: tuple[int, ...]
    messages: int


@dataclass(frozen=True)
class SyncStage:
    """One stage of the dense gradients' synchronisation of a bucket: point-to-point flows issued at
    once (``src[i]`` sends ``fraction`` x the bucket's bytes to ``dst[i]``); the next stage starts
    when they have all arrived. ``compute_s_per_byte``: seconds every rank computes before the
    stage, per byte of the bucket (a compression's matrix products)."""

    label: str
    src: np.ndarray
    dst: np.ndarray
    fraction: float
    rounds: int
    """Message latencies the stage pays (of the slowest level it crosses)."""
    port_fraction: tuple[float, ...]
    """Per level: bytes the level's busiest port carries (egress or ingress), per bucket byte."""
    total_fraction: tuple[float, ...]
    """Per level: bytes crossing all the level's ports together, per bucket byte."""
    levels: tuple[int, ...]
    """The levels its flows cross (each flow charged to the coarsest level its ends differ at)."""
    flow_level: np.ndarray
    """Per flow: that coarsest level."""
    compute_s_per_byte: float = 0.0


def p2p_stage(topology: Topology, label: str, src: np.ndarray, dst: np.ndarray, fraction: float,
              rounds: int, compute_s_per_byte: float = 0.0) -> SyncStage:
    """A :class:`SyncStage` of flows ``src[i] -> dst[i]`` with its per-level port load worked out (a
    flow is charged to the sender's and the receiver's port of the coarsest level they differ at)."""
    src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    counts = np.asarray(topology.counts)
    cs = np.stack(np.unravel_index(src, topology.counts), axis=1)
    cd = np.stack(np.unravel_index(dst, topology.counts), axis=1)
    differ = cs != cd
    level = np.where(differ.any(axis=1), differ.argmax(axis=1), -1)
    port, total = [], []
    for lv in range(topology.num_levels):
        on = level == lv
        total.append(float(on.sum()) * fraction)
        if not on.any():
            port.append(0.0)
            continue
        width = int(np.prod(counts[: lv + 1]))
        flat = np.ravel_multi_index(tuple(cs[on, : lv + 1].T), tuple(counts[: lv + 1]))
        into = np.ravel_multi_index(tuple(cd[on, : lv + 1].T), tuple(counts[: lv + 1]))
        busiest = max(np.bincount(flat, minlength=width).max(), np.bincount(into, minlength=width).max())
        port.append(float(busiest) * fraction)
    crossed = tuple(lv for lv in range(topology.num_levels) if total[lv] > 0)
    return SyncStage(label, src, dst, fraction, rounds, tuple(port), tuple(total), crossed, level,
                     compute_s_per_byte)


@dataclass(frozen=True)
class GradSync:
    """The dense gradients' synchronisation of one iteration: DDP cuts ``grad_bytes`` into buckets
    (the last one -- the first layers' parameters -- ready only when the backward ends) and every
    bucket runs ``stages`` in order."""

    mode: str
    grad_bytes: float
    """Bytes of dense gradients one rank synchronises per iteration."""
    stages: tuple[SyncStage, ...]
    overlaps_backward: bool = True
    """The earlier buckets go out while the backward computes (an asynchronous hook); False: the
    backward waits for every bucket, so all of it counts as synchronised after the backward."""


@dataclass(frozen=True)
class Schedule:
    """One training iteration (see the module docstring)."""

    topology: Topology
    layers: int
    micro_batches: int
    pre_expert_s: float
    """Forward compute before the experts, per layer and micro-batch."""
    codec_s: float
    """Compute the first micro-batch adds per layer (encoding and decoding compressed experts)."""
    expert_s: np.ndarray
    """[layer, rank]: forward expert compute of each rank."""
    backward_factor: float
    """The backward's expert compute in multiples of the forward's (2, or 3 with recomputation)."""
    backward_extra_s: float
    """Compute the backward adds per layer and micro-batch to every rank's expert compute (decoding
    again under recomputation; the weight gradients' cost of the experts held beyond
    ``backward_factor`` times its forward share)."""
    exchanges: tuple[Exchange, ...]
    """Per layer."""
    counts: CountExchange | None
    gather: tuple[Stage, ...]
    """Each layer's gather chain, in order (empty: no gather)."""
    reduce_scatter: tuple[Stage, ...]
    """Each layer's reduce-scatter chain, in order."""
    grad_sync: GradSync
    optimizer_s: float
    tp_stages: tuple[Stage, ...] = ()
    """Blocking collectives of tensor-parallel groups per layer and micro-batch, on the compute stream
    before the dispatch (the backward runs them once more, after the pre-expert backward): each
    stage's flows once the previous stage's are delivered."""
    overlap_s: tuple[float, float] = (0.0, 0.0)
    """Forward compute per layer and micro-batch, within ``pre_expert_s``, that runs while the
    dispatch / the combine is in flight (a shortcut block's attention / dense FFN; the backward runs
    twice each while the combine's / the dispatch's mirror travels); (0, 0): none."""
    prefetch: bool = True
    """The gathers follow the prefetch chain (layer 0's at the start, layer l+1's when layer l takes
    its experts); False: each layer's is issued when the layer needs its experts (after a one-stage
    unchunked dispatch, before a chunked one) and the experts wait for it, nothing beside it."""

    @property
    def pre_dispatch_s(self) -> float:
        """Forward compute per layer and micro-batch before the dispatch is issued."""
        return self.pre_expert_s - sum(self.overlap_s)

    @property
    def world_size(self) -> int:
        return self.topology.world_size
