"""The stream-based cost model: bytes per link and seconds per stream for one training iteration.

:func:`evaluate` prices a :class:`~hybridep.schedule.Schedule` -- what a strategy family says one
iteration runs -- and knows no family; the planner, the bench's predictions and ``simulate`` use it,
and the simulator executes the same Schedule. This module also derives the :class:`Workload` from
the configuration and the :class:`Network` from the topology.

Network model (``port`` model, per level): every worker of level l (a DC, a node, a GPU) has one
egress and one ingress port of rate ``B_l`` (bytes/s = bandwidth_bps / 8) through which all
traffic to its siblings at level l passes; the port is shared by all ranks inside that worker.
Traffic between two ranks is charged to the port of the coarsest level at which they differ
(the slowest hop). Ports of different levels work concurrently, so one collective phase takes
``max_l (alpha_l + max_port_bytes_l / B_l)``: all transfers of a phase are issued at once, so
the message latency ``alpha_l`` is paid once per phase and level. With ``dc_bandwidth`` given,
the top level uses one link per DC pair instead of one port per DC.

Streams (per MoE layer, per micro-batch; the paper's eq. for the forward pass):

* forward:  ``max(Lat_PE, Lat_AG) + 2 * Lat_A2A (+ Lat_E)`` -- the expert all-gather overlaps
  the pre-expert compute (parameters are known early); dispatch and combine cannot overlap. With
  ``overlap`` the gathers follow the runtime's prefetch chain: layer l+1's is issued when layer l
  takes its experts, so it also overlaps layer l's all-to-all and expert compute.
  The all-gather happens once per iteration (first micro-batch); A2A every micro-batch.
* backward (``full``): ``2 * Lat_A2A + 2 * Lat_E + 2 * Lat_PE``; the reduce-scatter of the
  gathered experts' gradients back to their owners overlaps the layer's pre-expert backward of
  the last micro-batch: ``max(2 * Lat_PE, Lat_RS)``.
* gradient sync of non-expert parameters (``full``): DDP's buckets, each through the stages of the
  schedule's :class:`~hybridep.schedule.GradSync` (the ``dense_sync`` mode's: a ring, or the
  hierarchical reduce-scatter / cross-DC all-reduce / all-gather, or PowerSGD's factors);
  the earlier buckets overlap the backward compute, the last one (the first layers' parameters,
  all of them in a small model) starts when the backward pass ends and is exposed.
* optimizer step (``full``, when ``optimizer_s_per_byte`` is known): after the backward pass, over the
  device's dense parameters and the experts it owns (:func:`optimizer_s`).
* port sharing (``full``): overlapped streams still share the ports, so the iteration is at least
  the busiest level's bytes per port over its rate, the dense gradients' sync included (the flow
  simulator shows the contention the two-stream recurrence alone misses).

``paper`` mode = the same code with backward, latency, expert compute and gradient sync off.
The exchange, gather and reduce-scatter are whatever the Schedule says: the HybridEP family's
(rail all-to-alls, hierarchical gathers inside expert domains) is built in
:mod:`hybridep.strategies.hybridep`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from hybridep.config import Config, CostTerms
from hybridep.lm.model import LMConfig, dense_shapes
from hybridep.schedule import CountExchange, Exchange, ExchangePorts, GradSync, Schedule, Stage
from hybridep.topology import Topology


@dataclass(frozen=True)
class Workload:
    """Per-device quantities of one MoE layer and one micro-batch, in bytes and seconds."""

    dispatch_bytes: float
    """D: token bytes one device dispatches (own share included)."""
    expert_bytes: float
    """P_E: bytes of one device's own experts."""
    pre_expert_s: float
    """Lat_PE: forward compute before the experts."""
    expert_s: float = 0.0
    """Forward expert compute under uniform routing (each device processes T*k token copies)."""
    layers: int = 1
    micro_batches: int = 1
    dense_grad_bytes: float = 0.0
    """Bytes of non-expert gradients one device all-reduces per iteration (DDP)."""
    dense_sync: str = "ring"
    """How DDP synchronises them (:mod:`hybridep.strategies.dense_sync`)."""
    dense_shapes: tuple[tuple[int, ...], ...] = ()
    """Shapes of the dense gradients (what PowerSGD compresses); () = unknown (a direct workload)."""
    top_k: int = 0
    """Experts per token (0 = unknown: a direct workload)."""
    token_bytes: float = 0.0
    """Bytes of one token's hidden vector (``dispatch_bytes`` = tokens x ``top_k`` x this)."""
    element_bytes: float = 4.0
    """Bytes of one activation element (a routing weight sent beside a token)."""
    flops: float = 0.0
    """FLOP/s the compute seconds were derived with (prices a compression's matrix products); 0 = unknown."""
    experts: int = 0
    """Total experts per layer (0 = unknown: routing taken as uniform)."""
    expert_load: tuple[float, ...] | None = None
    """Share of routed tokens per expert (sums to 1); None = uniform."""
    gather_bytes: float | None = None
    """Bytes of one device's experts as sent in the gather (compressed); None = ``expert_bytes``."""
    grad_bytes: float | None = None
    """Bytes of one device's expert gradients as sent in the reduce-scatter (compressed, top-k with
    error feedback); None = ``expert_bytes`` (gradients return dense)."""
    layer_loads: tuple[tuple[float, ...], ...] | None = None
    """Share of routed tokens per expert for each MoE layer (e.g. measured by a run); overrides
    ``expert_load`` layer by layer. None = ``expert_load`` for every layer."""
    codec_expert_s: float = 0.0
    """Seconds to encode or decode one expert (compressed gathers): per layer and iteration a device
    encodes its own experts and decodes the domain's, on its compute stream."""
    expert_weight_s_per_byte: float = 0.0
    """Seconds per byte of expert weights a device holds for a layer (its domain's experts), per
    forward + backward of that layer: the expert computation's cost beyond its FLOPs (more, smaller
    matmuls and weight gradients per expert held), see :func:`held_weights_s`."""
    expert_backward_factor: float = 2.0
    """The expert computation's backward in multiples of its forward (2 in FLOPs; memory-bound weight
    gradients make it more, measured by ``hybridep bench``)."""
    expert_weight_forward_share: float = 1.0 / 3.0
    """Share of ``expert_weight_s_per_byte`` in the forward (the rest in the backward); 1/3 = in
    proportion to the FLOPs."""
    expert_recompute: bool = False
    """The expert forward runs again in the backward pass, with its decode (compressed experts
    decoded one at a time under activation checkpointing, ``sr_decode="expert"``)."""
    optimizer_s_per_byte: float = 0.0
    """Seconds per byte of parameters for the optimizer step, after the backward pass (see
    :func:`optimizer_s`)."""
    a2a_chunks: int = 1
    """Chunks of a device's tokens whose dispatch, experts and combine pipeline (see
    :func:`_a2a_phase`); 1 = one dispatch and one combine."""
    dense_outputs_bytes: float = 0.0
    """Bytes of the outputs of the dense part's projections back to the hidden size (each attention's
    output projection, each dense FFN's second layer) per MoE layer and micro-batch: what a
    tensor-parallel dense part all-reduces; 0 = unknown (a direct workload)."""
    shortcut_s: tuple[float, float] = (0.0, 0.0)
    """Shortcut-connected blocks (ScMoE): the forward compute per layer and micro-batch, within
    ``pre_expert_s``, that the block runs while its dispatch / its combine is in flight (its attention
    / its dense FFN), seconds; (0, 0): standard blocks."""
    prefetch: bool = True
    """The expert gathers are prefetched (see :attr:`~hybridep.schedule.Schedule.prefetch`;
    ``bench.prefetch`` or the spec's ``+[no]prefetch``)."""
    processors: int | None = None
    """Processors (CPU cores) all ranks share, when fewer than the ranks (a CPU testbed); None = one
    per rank (GPUs). ``expert_s`` is then the time with every rank busy, see :func:`device_expert_s`."""

    @property
    def sent_expert_bytes(self) -> float:
        """Bytes of one device's experts as the gather sends them."""
        return self.expert_bytes if self.gather_bytes is None else self.gather_bytes

    def sent_grad_bytes(self, level: int) -> float:
        """Bytes of one device's expert gradients as the reduce-scatter's stage over ``level`` sends
        them: compressed (``grad_bytes``) only over the top level -- the slow WAN; inner stages stay
        dense (:class:`~hybridep.parallel.functional.ExpertGatherer`)."""
        return self.expert_bytes if self.grad_bytes is None or level != 0 else self.grad_bytes

    def load_of_layer(self, layer: int) -> tuple[float, ...] | None:
        """The expert-load shares that apply to MoE layer ``layer`` (None = uniform)."""
        return self.layer_loads[layer] if self.layer_loads is not None else self.expert_load

    @property
    def per_layer(self) -> bool:
        """Whether layers differ in routing (the per-layer quantities must be evaluated one by one)."""
        return self.layer_loads is not None


def zipf_load(n: int, s: float) -> tuple[float, ...]:
    """Shares (summing to 1) of n experts under Zipf skew s: share_e ~ (e+1)^-s."""
    x = np.arange(1, n + 1, dtype=float) ** -s
    return tuple((x / x.sum()).tolist())


def flops_per_layer(cfg: Config, shortcut: bool = False) -> dict[str, float]:
    """Forward FLOPs of one device for one MoE layer and micro-batch, by part: ``pre_expert`` (every
    dense block, the MoE block's attention and router, and -- ``shortcut`` -- its dense FFN),
    ``expert``, and the MoE block's ``attention`` and ``dense_ffn`` alone."""
    m = cfg.moe
    assert m is not None
    t, h, f = m.tokens_per_gpu, m.hidden, m.ffn
    mats = 3 if m.expert_kind == "swiglu" else 2
    attn = 8 * t * h * h + 4 * t * min(m.seq_len, max(t, 1)) * h
    ffn = 2 * mats * t * h * f
    router = 2 * t * h * m.experts
    return {
        "pre_expert": (m.blocks_before_moe + 1) * attn + (m.blocks_before_moe + shortcut) * ffn + router,
        "expert": 2 * mats * t * m.top_k * h * f,
        "attention": attn,
        "dense_ffn": ffn,
    }


def _priced_sync(cfg: Config) -> str:
    """The dense-sync mode the workload prices: the configured one (``ring`` for ``auto``, which the
    planner resolves)."""
    return "ring" if cfg.dense_sync == "auto" else cfg.dense_sync


def workload_from_config(cfg: Config, flops: float | None = None, sr_ratio: float | None = None,
                         sr_grads: str | None = None, shortcut: bool | None = None) -> Workload:
    """Derive the workload from model dimensions (or take the direct ``workload`` section).

    ``shortcut`` (default ``moe.shortcut``): price shortcut-connected MoE blocks (their dense FFN,
    and the compute their exchange overlaps).

    ``sr_ratio`` overrides ``moe.sr_ratio`` (the gather's compression; the reduce-scatter's too when
    ``sr_grads`` -- default ``moe.sr_grads`` -- is ``topk``). Model dimensions: the SR codec's exact
    encoded size (values + indices). Direct workload: ``expert_bytes / sr_ratio`` (the ratio counted
    on bytes, indices included)."""
    if cfg.workload is not None:
        w = cfg.workload
        g = cfg.topology.world_size
        return Workload(dispatch_bytes=w.dispatch_bytes, expert_bytes=w.expert_bytes,
                        pre_expert_s=w.pre_expert_s, expert_s=w.expert_s, layers=w.layers,
                        micro_batches=w.micro_batches, dense_grad_bytes=w.dense_grad_bytes,
                        dense_sync=_priced_sync(cfg),
                        experts=g if w.device_zipf is not None else 0,
                        expert_load=zipf_load(g, w.device_zipf) if w.device_zipf is not None else None,
                        gather_bytes=w.expert_bytes / sr_ratio if sr_ratio is not None else None)
    m = cfg.moe
    assert m is not None
    if flops is None:
        flops = cfg.compute.flops
    if flops is None:
        raise ValueError("compute.flops is not set: measure it with hybridep.compute_probe first")
    g = cfg.topology.world_size
    mats = 3 if m.expert_kind == "swiglu" else 2
    shortcut = m.shortcut if shortcut is None else shortcut
    fl = flops_per_layer(cfg, shortcut)
    shapes = tuple(dense_shapes(LMConfig(seq_len=m.seq_len, hidden=m.hidden, layers=m.layers, ffn=m.ffn,
                                         experts=m.experts, expert_kind=m.expert_kind,
                                         dense_blocks=m.blocks_before_moe, shortcut=shortcut)))
    gather = None
    ratio = m.sr_ratio if sr_ratio is None else sr_ratio
    if ratio is not None:
        from hybridep.migration.sr import encoded_bytes, value_bytes

        gather = encoded_bytes(ratio, mats * m.hidden * m.ffn, m.dtype_bytes, m.experts // g,
                               value_bytes(m.sr_values, m.dtype_bytes))
    load = None
    if m.expert_load is not None:
        total = sum(m.expert_load)
        load = tuple(x / total for x in m.expert_load)
    elif m.expert_zipf is not None:
        load = zipf_load(m.experts, m.expert_zipf)
    return Workload(
        dispatch_bytes=m.tokens_per_gpu * m.top_k * m.hidden * m.dtype_bytes,
        top_k=m.top_k,
        token_bytes=m.hidden * m.dtype_bytes,
        element_bytes=m.dtype_bytes,
        expert_bytes=(m.experts // g) * mats * m.hidden * m.ffn * m.dtype_bytes,
        pre_expert_s=fl["pre_expert"] / flops,
        expert_s=fl["expert"] / flops,
        layers=m.layers,
        micro_batches=m.micro_batches,
        dense_grad_bytes=sum(math.prod(x) for x in shapes) * m.dtype_bytes,
        dense_sync=_priced_sync(cfg),
        dense_shapes=shapes,
        flops=flops,
        experts=m.experts,
        expert_load=load,
        gather_bytes=gather,
        grad_bytes=gather if (sr_grads or m.sr_grads) == "topk" else None,
        codec_expert_s=cfg.compute.codec_expert_s or 0.0,
        optimizer_s_per_byte=cfg.compute.optimizer_s_per_byte or 0.0,
        expert_weight_s_per_byte=cfg.compute.expert_weight_s_per_byte or 0.0,
        expert_weight_forward_share=(1.0 / 3.0 if cfg.compute.expert_weight_forward_share is None
                                     else cfg.compute.expert_weight_forward_share),
        expert_backward_factor=(2.0 if cfg.compute.expert_backward_factor is None
                                else cfg.compute.expert_backward_factor),
        a2a_chunks=m.a2a_chunks,
        prefetch=cfg.bench.prefetch,
        processors=cfg.compute.processors if (cfg.compute.processors or g) < g else None,
        shortcut_s=(fl["attention"] / flops, fl["dense_ffn"] / flops) if shortcut else (0.0, 0.0),
        dense_outputs_bytes=m.tokens_per_gpu * m.hidden * m.dtype_bytes * (2 * m.blocks_before_moe + 1 + shortcut),
    )


@dataclass(frozen=True)
class Network:
    """Per-level port rates and latencies, derived from the configuration."""

    topology: Topology
    port_bytes_per_s: tuple[float, ...]
    latency_s: tuple[float, ...]
    dc_link_bytes_per_s: np.ndarray | None = None
    """Optional (SF_0 x SF_0) matrix of pairwise top-level link rates (bytes/s)."""
    gather_efficiency: tuple[float, ...] | None = None
    """Per level, the rate the expert gather (and its reduce-scatter) achieves relative to
    ``port_bytes_per_s`` (a calibration: the bench measures it); None = 1."""

    stage_delay_s: tuple[float, ...] | None = None
    """Per level, seconds each expert-gather (and reduce-scatter) stage over that level takes
    beyond its bytes at the gather rate, because it runs while the ranks compute: on shared cores a
    transfer waits for its sender's and receiver's threads (a calibration: the bench measures it);
    None = 0. Charged whatever ``CostTerms.latency`` says: it is a cost of this host, not of a link."""

    message_s: float = 0.0
    """Seconds a rank's communication engine is busy per message it sends or receives
    (``topology.message_overhead``; see :func:`engine_s`)."""

    rendezvous_s: float = 0.0
    """Seconds one blocking exchange costs beyond its bytes when the ranks compute between such
    calls (``topology.rendezvous``): the peers reach it at different times and, on shared cores,
    wait to be scheduled (see :func:`exchange_delay_s`)."""

    def gather_rate_factor(self, level: int) -> float:
        return 1.0 if self.gather_efficiency is None else self.gather_efficiency[level]

    def stage_delay(self, level: int) -> float:
        return 0.0 if self.stage_delay_s is None else self.stage_delay_s[level]

    def stage_rate_factor(self, st: Stage) -> float:
        """The share of its level's rate a chain's stage gets: a background chain's measured gather
        efficiency, a blocking stage's all-to-all rate (1)."""
        return 1.0 if st.blocking else self.gather_rate_factor(st.level)

    def stage_wait_s(self, st: Stage) -> float:
        """Seconds a chain's stage waits beyond its transfer: a background chain's measured delay per
        stage, a blocking stage's rendezvous (seconds)."""
        return self.rendezvous_s if st.blocking else self.stage_delay(st.level)

    @classmethod
    def from_config(cls, cfg: Config) -> Network:
        lv = cfg.topology.levels
        topo = cfg.topology.as_topology()
        matrix = None
        if cfg.topology.dc_bandwidth is not None:
            matrix = np.asarray(cfg.topology.dc_bandwidth, dtype=float) / 8.0
        return cls(topo, tuple(x.bandwidth_bps / 8.0 for x in lv), tuple(x.latency_s for x in lv), matrix,
                   message_s=cfg.topology.message_overhead_s, rendezvous_s=cfg.topology.rendezvous_s)


@dataclass
class Prediction:
    """Predicted iteration of one candidate. Times in seconds, bytes per iteration."""

    domain_sizes: tuple[int, ...]
    iteration_s: float
    compute_s: float
    a2a_s: float
    ag_s: float
    rs_s: float
    grad_sync_s: float
    exposed_ag_s: float
    exposed_rs_s: float
    exposed_grad_sync_s: float
    a2a_phase_s: float
    """One dispatch (or combine) all-to-all of one layer and micro-batch (mean over the layers)."""
    ag_phase_s: float
    """One layer's expert all-gather."""
    port_bound_s: float = 0.0
    """The average port of the busiest level busy with all its bytes, the dense sync's included (see
    ``port_sharing``)."""
    bytes_by_level: dict[str, dict[str, float]] = field(default_factory=dict)
    """Cluster-wide bytes crossing each level's ports per iteration: {level: {a2a, ag, rs, total}}."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["domain_sizes"] = list(self.domain_sizes)
        return d


def _phase_time(bytes_per_port: list[float], net: Network, latency: bool) -> float:
    """max over levels of (alpha_l + bytes_l / B_l) for the levels that carry traffic."""
    t = 0.0
    for lv, b in enumerate(bytes_per_port):
        if b > 0:
            t = max(t, (net.latency_s[lv] if latency else 0.0) + b / net.port_bytes_per_s[lv])
    return t


def engine_s(net: Network, levels: list[int], messages: float, latency: bool) -> float:
    """The least time of a phase whose ``messages`` (sent plus received by one rank) pass that rank's
    communication engine one at a time, ``net.message_s`` each: the largest latency of the levels it
    crosses plus messages x o. The engine works while earlier messages' bytes travel, so a phase
    takes the larger of this and its bytes' time (LogGP with o >= g); 0 when o is not charged."""
    if net.message_s <= 0 or messages <= 0 or not levels:
        return 0.0
    return (max(net.latency_s[lv] for lv in levels) if latency else 0.0) + messages * net.message_s


def count_exchange_s(counts: CountExchange | None, net: Network, terms: CostTerms) -> float:
    """Seconds of the row-count exchange before every forward dispatch (:class:`CountExchange`): one
    latency of the slowest level it crosses, or its messages through the engine."""
    if counts is None:
        return 0.0
    levels = list(counts.levels)
    lat = max(net.latency_s[lv] for lv in levels) if terms.latency else 0.0
    return max(lat, engine_s(net, levels, counts.messages, terms.latency))


def _top_link_time(net: Network, pair_bytes: np.ndarray, mask: np.ndarray) -> float:
    """With a DC-to-DC matrix: the slowest pairwise top-level transfer (seconds)."""
    assert net.dc_link_bytes_per_s is not None
    if not mask.any():
        return 0.0
    return float((pair_bytes[mask] / net.dc_link_bytes_per_s[mask]).max())


def exchange_delay_s(ex: Exchange, net: Network) -> float:
    """Seconds one phase of ``ex`` takes beyond its bytes because it runs among busy ranks: the
    largest measured per-stage delay (:attr:`Network.stage_delay_s`) of its ``delay_levels``. Such an
    exchange (a rail inside each DC while the communication threads run gather chains) is made of
    short transfers that each wait for their threads to be scheduled, as the measured gather stages
    do; one over the shaped top-level links pays none (measured on the testbed). Plus its blocking
    calls' rendezvous (:attr:`Exchange.calls` x :attr:`Network.rendezvous_s`)."""
    return max((net.stage_delay(lv) for lv in ex.delay_levels), default=0.0) + ex.calls * net.rendezvous_s


def interleaved(ex: Exchange, terms: CostTerms) -> bool:
    """Whether the top-level all-to-all is several interleaving groups per uplink (``ex`` says so and
    ``terms.rail_interleave`` charges it)."""
    return terms.rail_interleave and ex.interleaved_top


def _a2a_phase(ex: Exchange, net: Network, terms: CostTerms) -> tuple[float, list[float], list[float]]:
    """One dispatch (see :func:`_stage_phase`); a dispatch in stages (``ex.then``) takes its stages
    one after the other: seconds, bytes and busy seconds add up. Stages pipelined in C chunks
    (``ex.chunks``; MoNTA): every chunk's first stage is issued at once and streams over its links
    (b_0 seconds per chunk past one latency a_0); each chunk's later stages (w seconds per chunk,
    one after the other) run once it is in and the previous chunk's are done: a_0 + b_0 + w +
    (C - 1) max(b_0, w), each a chunk's share (1/C of the bytes and messages)."""
    stages = ex.stages()
    parts = [_stage_phase(stage, net, terms) for stage in stages]
    if len(parts) == 1:
        return parts[0]
    seconds = sum(t for t, _, _ in parts)
    if ex.chunks > 1:
        tau = _chunk_stages_s(stages, ex.chunks, net, terms)
        level0 = next((lv for lv, n in enumerate(stages[0].peers_by_level) if n > 0), 0)
        a0 = net.latency_s[level0] if terms.latency else 0.0
        b0, w = max(0.0, tau[0] - a0), sum(tau[1:])
        seconds = a0 + b0 + w + (ex.chunks - 1) * max(b0, w)
    return (seconds, [float(sum(x)) for x in zip(*(b for _, b, _ in parts), strict=True)],
            [float(sum(x)) for x in zip(*(b for _, _, b in parts), strict=True)])


def _chunk_stages_s(stages: list[Exchange], chunks: int, net: Network, terms: CostTerms) -> list[float]:
    """Seconds of one phase of each stage as one of ``chunks`` equal chunks carries it."""
    return [_stage_phase(_one_chunk(stage, chunks), net, terms)[0] for stage in stages]


def on_thread_s(ex: Exchange, net: Network, terms: CostTerms) -> float:
    """Seconds per phase the compute thread spends in a pipelined exchange in stages: every chunk's
    stages past the first run on it, between the experts of the chunks before and after (C times
    their one-chunk time); 0 for other exchanges (their transfers travel while the thread works)."""
    stages = ex.stages()
    if ex.chunks == 1 or len(stages) == 1:
        return 0.0
    return ex.chunks * sum(_chunk_stages_s(stages[1:], ex.chunks, net, terms))


def _one_chunk(ex: Exchange, chunks: int) -> Exchange:
    """One stage of ``ex`` as one of ``chunks`` equal chunks carries it (bytes and messages / C)."""
    ports = tuple(ExchangePorts(p.egress_bytes / chunks, p.ingress_bytes / chunks, p.total_bytes / chunks)
                  for p in ex.ports)
    return replace(ex, ports=ports, flow_bytes=ex.flow_bytes / chunks, messages=ex.messages / chunks, chunks=1,
                   top_pair_bytes=lambda: ex.top_pair_bytes() / chunks, then=None)


def _stage_phase(ex: Exchange, net: Network, terms: CostTerms) -> tuple[float, list[float], list[float]]:
    """One dispatch (combine is its mirror: same port loads, directions swapped): (seconds,
    cluster-wide bytes crossing each level's ports, seconds the busiest port of each level is busy
    with its bytes -- 0 at the top level with a DC link matrix).

    A port's egress carries e bytes and its ingress i in the dispatch, the reverse in the combine.
    One exchange each: every phase waits for the busier direction, max(e, i). With the tokens in C
    pipelined chunks the combine of early chunks overlaps the dispatch of later ones: dispatch plus
    combine take max(e + i, max(e, i) * (1 + 1/C)) -- both directions busy, but the first chunk's
    dispatch and the last one's combine alone -- charged here half per phase. Groups that interleave
    on a DC uplink act like C -> infinity there: (e + i) / 2 per phase."""
    port, total = [], []
    for lv, p in enumerate(ex.ports):
        eg, ing = p.egress_bytes, p.ingress_bytes
        if lv == 0 and interleaved(ex, terms):
            port.append(float(((eg + ing) / 2).max()))
        else:
            pair = np.maximum(eg + ing, np.maximum(eg, ing) * (1 + 1 / ex.chunks))
            port.append(float((pair / 2).max()))
        total.append(p.total_bytes)
    t = _phase_time(port, net, terms.latency)
    if net.dc_link_bytes_per_s is not None:
        pair_bytes = ex.top_pair_bytes()
        lat = net.latency_s[0] if terms.latency else 0.0
        t0 = _top_link_time(net, pair_bytes, pair_bytes > 0)
        inner = _phase_time([0.0, *port[1:]], net, terms.latency)
        t = max(inner, t0 + lat if t0 > 0 else 0.0)
    levels = [lv for lv, b in enumerate(port) if b > 0]
    t = max(t, engine_s(net, levels, ex.messages, terms.latency))
    t += exchange_delay_s(ex, net)
    busy = [b / net.port_bytes_per_s[lv] for lv, b in enumerate(port)]
    if net.dc_link_bytes_per_s is not None:
        busy[0] = 0.0
    return t, total, busy


def device_expert_s(w: Workload, factor, world: int):
    """Forward expert compute of a device whose work is ``factor`` times the uniform share (scalar or
    array). One processor per rank: ``expert_s * factor``. G ranks sharing C < G processors, with
    ``expert_s`` measured while all of them compute: the busy rank's phase takes
    max(its own work on one core, all ranks' work on C cores) = ``expert_s * max(factor * C / G, 1)``
    -- the idle ranks' cores serve the busy ones."""
    if w.processors is None or w.processors >= world:
        return w.expert_s * factor
    return w.expert_s * np.maximum(np.asarray(factor) * w.processors / world, 1.0)


DDP_FIRST_BUCKET_BYTES = 1 << 20
"""PyTorch DDP's first gradient bucket (the last layers' parameters, ready first)."""
DDP_BUCKET_BYTES = 25 << 20
"""PyTorch DDP's other buckets (``bucket_cap_mb`` = 25)."""


def ddp_last_bucket_bytes(dense_grad_bytes: float) -> float:
    """Bytes of the gradient bucket DDP fills last: it holds the first layers' parameters, so its
    all-reduce can only start when the backward pass ends (with small models: all of them)."""
    if dense_grad_bytes <= DDP_FIRST_BUCKET_BYTES:
        return dense_grad_bytes
    rest = (dense_grad_bytes - DDP_FIRST_BUCKET_BYTES) % DDP_BUCKET_BYTES
    return rest if rest > 0 else float(DDP_BUCKET_BYTES)


def grad_sync_s(sync: GradSync, nbytes: float, net: Network, latency: bool) -> float:
    """Seconds of synchronising ``nbytes`` of dense gradients (:class:`~hybridep.schedule.GradSync`):
    its stages one after the other, each its compute, then the bytes of its busiest port over that
    level's rate (the slowest level it crosses), plus its rounds of the slowest crossed level's
    latency when charged."""
    if nbytes <= 0:
        return 0.0
    t = 0.0
    for st in sync.stages:
        t += st.compute_s_per_byte * nbytes + max(st.port_fraction[lv] * nbytes / net.port_bytes_per_s[lv]
                                                 for lv in st.levels)
        t += st.rounds * max(net.latency_s[lv] for lv in st.levels) if latency else 0.0
    return t


def grad_sync_busy(sync: GradSync, nbytes: float, net: Network) -> list[float]:
    """Seconds synchronising ``nbytes`` of dense gradients keeps each level's busiest port busy."""
    return [sum(st.port_fraction[lv] for st in sync.stages) * nbytes / net.port_bytes_per_s[lv]
            for lv in range(net.topology.num_levels)]


def optimizer_s(w: Workload, expert_copies: int = 1) -> float:
    """Seconds of one device's optimizer step: its dense parameters and ``expert_copies`` times its
    own experts (1 under every strategy -- a device updates only the experts it owns; G for a
    device that holds and updates all experts, the compute-only reference)."""
    return w.optimizer_s_per_byte * (w.dense_grad_bytes + expert_copies * w.layers * w.expert_bytes)


def held_weights_s(w: Workload, experts_held: float) -> float:
    """Seconds per layer, forward + backward, of holding ``experts_held`` times a device's own
    experts (the domain size; G for the compute-only run)."""
    return w.expert_weight_s_per_byte * experts_held * w.expert_bytes


def held_weights_split(w: Workload, experts_held: float) -> tuple[float, float]:
    """:func:`held_weights_s` as a schedule charges it: (forward seconds, its share
    ``expert_weight_forward_share``, added to the expert compute; backward extra seconds, what the
    backward adds beyond ``expert_backward_factor`` times that forward part). (1/3, 0) of the total
    with the default share and factor 2."""
    total = held_weights_s(w, experts_held)
    forward = w.expert_weight_forward_share * total
    return forward, total - forward - w.expert_backward_factor * forward


def all_experts_fixed_s(w: Workload, world: int) -> float:
    """Seconds per iteration a device that holds and updates every expert (the compute-only
    reference) spends beyond its FLOPs: the optimizer step over all experts and the cost of holding
    them in the expert computation (forward + backward, every layer and micro-batch)."""
    held = held_weights_s(w, world) * w.layers * w.micro_batches
    return optimizer_s(w, world) + held


def _expert_s(s: Schedule, terms: CostTerms) -> list[float]:
    """Forward expert compute of each layer's busiest rank (0 without ``terms.expert_compute``)."""
    if not terms.expert_compute:
        return [0.0] * s.layers
    return [float(row.max()) for row in s.expert_s]


def _stage_port_bytes(s: Schedule, stages: tuple[Stage, ...], net: Network) -> list[float]:
    """Bytes each level's busiest port carries in a chain's stages over that level (all of them), at
    the gather's rate."""
    port = [0.0] * s.topology.num_levels
    for st in stages:
        port[st.level] += _one_stage_port_bytes(s, st, net)
    return port


def _one_stage_port_bytes(s: Schedule, st: Stage, net: Network) -> float:
    """Bytes the busiest port of ``st``'s level carries in that stage, at the gather's rate."""
    return s.topology.ranks_per_worker(st.level) * st.peers * st.flow_bytes / net.stage_rate_factor(st)


def _stages_time(s: Schedule, stages: tuple[Stage, ...], net: Network, terms: CostTerms) -> float:
    """A gather's (or reduce-scatter's) stages one after the other (seconds); with a DC link matrix
    the top stage runs on the pairwise links."""
    first = 1 if net.dc_link_bytes_per_s is not None else 0  # a DC link matrix: no shared top port
    t = 0.0
    for st in stages:
        lv = st.level
        if lv < first:
            rate_bytes = s.topology.ranks_per_worker(0) * st.flow_bytes / net.stage_rate_factor(st)
            t0 = _top_link_time(net, np.full(net.dc_link_bytes_per_s.shape, rate_bytes), st.top_pairs())
            t += t0 + (net.latency_s[0] if terms.latency else 0.0) + net.stage_wait_s(st) if t0 > 0 else 0.0
            continue
        port = _one_stage_port_bytes(s, st, net)
        t += (max(_phase_time([port if i == lv else 0.0 for i in range(s.topology.num_levels)], net, terms.latency),
                  engine_s(net, [lv], 2 * st.peers, terms.latency))
              + (net.stage_wait_s(st) if port > 0 else 0.0))
    return t


def _stages_busy(s: Schedule, stages: tuple[Stage, ...], net: Network) -> list[float]:
    """Seconds a gather's (or reduce-scatter's) bytes keep each level's busiest port busy."""
    first = 1 if net.dc_link_bytes_per_s is not None else 0
    return [0.0 if lv < first else b / net.port_bytes_per_s[lv]
            for lv, b in enumerate(_stage_port_bytes(s, stages, net))]


def _stages_total(s: Schedule, stages: tuple[Stage, ...]) -> list[float]:
    """Cluster-wide bytes a gather's (or reduce-scatter's) stages put on each level's ports."""
    total = [0.0] * s.topology.num_levels
    for st in stages:
        total[st.level] += s.world_size * st.peers * st.flow_bytes
    return total


@dataclass
class _Streams:
    """What :func:`evaluate` knows of one schedule on one network: the per-layer exchange phases,
    the gather and reduce-scatter chains, the compute; and the rules for overlapped transfers."""

    s: Schedule
    net: Network
    terms: CostTerms
    phases: list[tuple[float, list[float], list[float]]]
    """Per layer: one dispatch's (seconds, cluster-wide bytes per level, busiest port's seconds per level)."""
    e: list[float]
    """Per layer: the busiest rank's forward expert compute (seconds)."""
    thread: list[float]
    """Per layer: seconds per phase its exchange keeps the compute thread (:func:`on_thread_s`)."""
    tp_s: float = 0.0
    """Per layer and micro-batch: the tensor-parallel groups' blocking collectives, one way (seconds)."""

    @classmethod
    def of(cls, s: Schedule, net: Network, terms: CostTerms) -> _Streams:
        cache: dict[int, tuple[float, list[float], list[float]]] = {}  # layers often share one exchange
        thread: dict[int, float] = {}
        for ex in s.exchanges:
            if id(ex) not in cache:
                cache[id(ex)], thread[id(ex)] = _a2a_phase(ex, net, terms), on_thread_s(ex, net, terms)
        return cls(s, net, terms, [cache[id(ex)] for ex in s.exchanges], _expert_s(s, terms),
                   [thread[id(ex)] for ex in s.exchanges], _stages_time(s, s.tp_stages, net, terms))

    @property
    def a2a(self) -> list[float]:
        """One dispatch of each layer (seconds)."""
        return [t for t, _, _ in self.phases]

    @property
    def a2a_busy(self) -> list[list[float]]:
        """Per layer and level: seconds one dispatch keeps the busiest port busy."""
        return [busy for _, _, busy in self.phases]

    @property
    def chunks(self) -> int:
        return self.s.exchanges[0].chunks if self.s.exchanges else 1

    @property
    def pf(self) -> float:
        """Forward before the dispatch: the pre-expert compute (but what a shortcut block overlaps),
        then the row counts go out."""
        return self.s.pre_dispatch_s + self.tp_s + count_exchange_s(self.s.counts, self.net, self.terms)

    @property
    def hidden_forward(self) -> tuple[float, float]:
        """Compute beside the forward's dispatch and combine (a shortcut block's, seconds)."""
        return self.s.overlap_s

    @property
    def hidden_backward(self) -> tuple[float, float]:
        """Compute beside the backward's first and second exchange (the mirrors of the combine and
        the dispatch): twice the forward's overlapped parts, in the reverse order."""
        d, c = self.s.overlap_s
        return 2 * c, 2 * d

    def exchange(self, a: float, x: float, hidden: tuple[float, float] = (0.0, 0.0), w: float = 0.0) -> float:
        """Dispatch (``a``), experts (``x``) and combine (``a``), with ``hidden`` seconds of compute
        beside the dispatch and beside the combine: max(a, h0) + x + max(a, h1). Pipelined in C
        chunks (no compute beside them) the experts of one chunk overlap the others' transfers:
        max(2a + x/C, x + 2w + 2a/C) -- the transfers and one chunk's experts, or the compute thread's
        work: the experts and the later stages of both phases (``w`` seconds each, see
        :func:`on_thread_s`; ``a`` holds one chunk's of them already) between the first chunk's
        arrival and the last one's return."""
        c = self.chunks
        if c == 1:
            return max(a, hidden[0]) + x + max(a, hidden[1])
        return max(2 * a + x / c, x + 2 * w + 2 * a / c) + sum(hidden)

    def beside(self, left: list[float], phase: list[float]) -> tuple[float, list[float]]:
        """An all-to-all phase keeping each level's busiest port busy ``phase[lv]`` seconds alone,
        issued while a gather or reduce-scatter still has ``left[lv]`` seconds of bytes there: a
        shared port serves both alike (max-min fair), so both take m = min(phase, left) longer on
        the worst level (``terms.port_sharing``, unchunked exchanges). Returns (m, what is left)."""
        if not self.terms.port_sharing or self.chunks > 1:
            return 0.0, left
        m = max([min(ph, lf) for ph, lf in zip(phase, left, strict=True)] + [0.0])
        return m, [max(0.0, lf - ph) for ph, lf in zip(phase, left, strict=True)]


def _alone(left: list[float], seconds: float) -> list[float]:
    """What a gather or reduce-scatter has left after ``seconds`` with its ports to itself."""
    return [max(0.0, lf - seconds) for lf in left]


def _forward(st: _Streams, ag_t: float, ag_busy: list[float]) -> tuple[float, list[float]]:
    """(seconds of the forward pass, one layer's forward with nothing exposed, per layer). With
    ``overlap``: two streams, the runtime's prefetch chain -- layer 0's gather is issued at the start
    of the iteration, layer l+1's when layer l takes its experts (after its dispatch); layer l's
    experts wait for its gather. The all-to-alls issued while a gather is in flight -- layer l's
    combine and layer l+1's dispatch -- share the ports it uses (see :meth:`_Streams.beside`).
    Without: the paper's max(Lat_PE, Lat_AG) + 2 Lat_A2A per layer. Unprefetched
    (:attr:`~hybridep.schedule.Schedule.prefetch` False): each layer's gather when its experts are
    needed, alone: Lat_PE + Lat_AG + 2 Lat_A2A per layer."""
    s, pf, a2a, a2a_busy, codec, hid = st.s, st.pf, st.a2a, st.a2a_busy, st.s.codec_s, st.hidden_forward
    steps = [pf + st.exchange(a, x, hid, w) for a, x, w in zip(a2a, st.e, st.thread, strict=True)]
    rest = (s.micro_batches - 1) * sum(steps)  # the later micro-batches: their gathers are in
    if st.terms.overlap and not s.prefetch:
        return sum(step + ag_t + codec for step in steps) + rest, steps
    if not st.terms.overlap:
        return sum(max(pf, ag_t) + codec + st.exchange(a, x, hid, w)
                   for a, x, w in zip(a2a, st.e, st.thread, strict=True)) + rest, steps
    slow_d, left = st.beside(_alone(ag_busy, pf), a2a_busy[0])
    t_c, ag_start, yielded = 0.0, 0.0, slow_d
    for i, (a, x, w) in enumerate(zip(a2a, st.e, st.thread, strict=True)):
        # the chunked exchange takes the experts before its dispatch
        taken = max(a, hid[0]) if st.chunks == 1 else 0.0
        ag_start = max(t_c + pf + taken + slow_d, ag_start + ag_t + yielded)  # = next gather issued
        slow_c, left = st.beside(_alone(ag_busy, codec + x), a2a_busy[i])
        slow_d = 0.0
        if i + 1 < s.layers:
            slow_d, left = st.beside(_alone(left, a - max(a2a_busy[i]) + pf), a2a_busy[i + 1])
        yielded = slow_c + slow_d
        t_c = ag_start + codec + st.exchange(a, x, hid, w) - taken + slow_c
    return t_c + rest, steps


@dataclass
class _Backward:
    """The backward pass as :func:`_backward` prices it (seconds)."""

    seconds: float
    steps: list[float]
    """One layer's backward with nothing exposed, per layer."""
    compute: float
    last_start: float
    """When the last micro-batch's backward starts."""
    stream_end: float
    """When the compute stream's backward ends (reduce-scatters may go on)."""


def _backward(st: _Streams, rs_t: float, rs_busy: list[float]) -> _Backward:
    """The backward pass: every layer's exchange with ``backward_factor`` times the expert compute,
    then twice the pre-expert compute. With ``overlap`` the last micro-batch's reduce-scatters start
    as each layer's expert backward ends and run one after the other while the earlier layers'
    backward goes on; the next layer's two backward all-to-alls share the ports of the one in
    flight. Without: each layer's reduce-scatter overlaps only its own pre-expert backward."""
    # the pre-expert backward (its tensor-parallel collectives once more): 2 pe per layer below
    s, pe, a2a, a2a_busy, hid = st.s, st.s.pre_dispatch_s + st.tp_s / 2, st.a2a, st.a2a_busy, st.hidden_backward
    factor, extra = s.backward_factor, s.backward_extra_s
    steps = [st.exchange(a, factor * x + extra, hid, w) + 2 * pe for a, x, w in zip(a2a, st.e, st.thread, strict=True)]
    compute = s.micro_batches * sum(2 * s.pre_expert_s + factor * x + extra for x in st.e)
    last_start = (s.micro_batches - 1) * sum(steps)
    if not st.terms.overlap:
        seconds = sum(s.micro_batches * b - 2 * pe + max(2 * pe, rs_t) for b in steps)
        return _Backward(seconds, steps, compute, last_start, seconds)
    t, rs_free, issued = 0.0, 0.0, None
    for i in reversed(range(s.layers)):
        x = factor * st.e[i] + extra
        if issued is not None:  # the layer above's pre-expert backward, then this layer's two
            # exchanges beside the reduce-scatter issued after the layer above
            m1, left = st.beside(_alone(rs_busy, max(0.0, t + 2 * pe - issued)), a2a_busy[i])
            m2, _ = st.beside(_alone(left, a2a[i] - max(a2a_busy[i]) + x), a2a_busy[i])
            rs_free += m1 + m2
            t += 2 * pe + m1 + m2
        t += st.exchange(a2a[i], x, hid, st.thread[i])
        issued = max(t, rs_free)
        rs_free = issued + rs_t
    t += 2 * pe
    return _Backward(last_start + max(t, rs_free), steps, compute, last_start, last_start + t)


def _dense_sync(st: _Streams, bwd: _Backward, rs_busy: list[float]) -> tuple[float, float]:
    """(seconds of the dense gradients' synchronisation, seconds of it exposed after the backward).
    DDP: the earlier buckets go out as the last micro-batch's backward starts, the last one when the
    compute stream's backward ends (all of them then when the hook blocks the backward:
    ``overlaps_backward`` False) -- beside the reduce-scatters' tail and beside the backward's
    exchanges on the sync's busiest level: both take m longer. Without ``overlap`` the earlier
    buckets overlap the backward compute and the last one follows it."""
    s, net, terms = st.s, st.net, st.terms
    sync = s.grad_sync
    if not terms.grad_sync or sync.grad_bytes <= 0 or not sync.stages:
        return 0.0, 0.0
    dense = sync.grad_bytes
    last = ddp_last_bucket_bytes(dense) if sync.overlaps_backward else dense
    total = grad_sync_s(sync, dense, net, terms.latency)
    early = grad_sync_s(sync, dense - last, net, terms.latency)
    if not terms.overlap:
        return total, max(0.0, early - bwd.compute) + grad_sync_s(sync, last, net, terms.latency)
    busy = grad_sync_busy(sync, dense - last, net)  # its bytes on each level's busiest port
    lv = int(np.argmax(busy))
    bwd_busy = 2 * sum(ph[lv] for ph in st.a2a_busy) + s.layers * rs_busy[lv]  # last micro-batch
    m = min(busy[lv], bwd_busy) if terms.port_sharing else 0.0
    synced = max(bwd.stream_end + m, bwd.last_start + early + m) + grad_sync_s(sync, last, net, terms.latency)
    return total, max(0.0, synced - bwd.seconds)


def _bytes_by_level(st: _Streams, ag_total: list[float], rs_total: list[float]) -> dict[str, dict[str, float]]:
    """Cluster-wide bytes crossing each level's ports per iteration: {level: {a2a, ag, rs, tp, total,
    dense}} (``tp``: the tensor-parallel groups' collectives; ``total``: the expert exchanges' and
    those; ``dense``: the dense gradients' synchronisation, apart)."""
    s, backward = st.s, st.terms.backward
    sync = s.grad_sync
    directions = 4 if backward else 2  # dispatch + combine (+ their backward)
    tp_total = _stages_total(s, s.tp_stages)
    out = {}
    for lv, name in enumerate(s.topology.names):
        a2a_b = sum(tot[lv] for _, tot, _ in st.phases) * directions * s.micro_batches
        ag_b = ag_total[lv] * s.layers
        rs_b = rs_total[lv] * s.layers if backward else 0.0
        tp_b = tp_total[lv] * s.layers * s.micro_batches * (2 if backward else 1)
        dense = sum(x.total_fraction[lv] for x in sync.stages) * sync.grad_bytes if backward else 0.0
        out[name] = {"a2a": a2a_b, "ag": ag_b, "rs": rs_b, "tp": tp_b, "total": a2a_b + ag_b + rs_b + tp_b,
                     "dense": dense}
    return out


def evaluate(s: Schedule, net: Network, terms: CostTerms) -> Prediction:
    """The cost model of one iteration schedule (:class:`~hybridep.schedule.Schedule`): streams,
    alpha-beta per level, port sharing -- for any strategy family."""
    st = _Streams.of(s, net, terms)
    ag_t, rs_t = _stages_time(s, s.gather, net, terms), _stages_time(s, s.reduce_scatter, net, terms)
    ag_busy, rs_busy = _stages_busy(s, s.gather, net), _stages_busy(s, s.reduce_scatter, net)
    mb, layers, codec = s.micro_batches, s.layers, s.codec_s
    fwd, steps = _forward(st, ag_t, ag_busy)
    iteration = fwd
    compute = mb * sum(s.pre_expert_s + x for x in st.e) + layers * codec
    a2a_sum = mb * 2 * sum(st.a2a)
    exposed_ag = fwd - mb * sum(steps) - layers * codec
    exposed_rs = grad_sync = exposed_gs = 0.0
    if terms.backward:
        bwd = _backward(st, rs_t, rs_busy)
        exposed_rs = bwd.seconds - mb * sum(bwd.steps)
        grad_sync, exposed_gs = _dense_sync(st, bwd, rs_busy)
        iteration += bwd.seconds
        iteration += exposed_gs
        iteration += s.optimizer_s
        compute += bwd.compute
        compute += s.optimizer_s
        a2a_sum *= 2
    by_level = _bytes_by_level(st, _stages_total(s, s.gather), _stages_total(s, s.reduce_scatter))
    port_bound = _port_bound(s.topology, by_level, net, terms.grad_sync)
    if terms.port_sharing:
        iteration = max(iteration, port_bound)
    return Prediction(
        domain_sizes=(), iteration_s=iteration, compute_s=compute, a2a_s=a2a_sum,
        ag_s=layers * ag_t, rs_s=layers * rs_t if terms.backward else 0.0, grad_sync_s=grad_sync,
        exposed_ag_s=exposed_ag, exposed_rs_s=exposed_rs, exposed_grad_sync_s=exposed_gs,
        a2a_phase_s=sum(st.a2a) / layers, ag_phase_s=ag_t, port_bound_s=port_bound, bytes_by_level=by_level)


def lower_bound(s: Schedule, net: Network, terms: CostTerms, prediction: Prediction | None = None) -> float:
    """A bound no execution of schedule ``s`` can beat (seconds per iteration).

    The larger of (a) the critical path of compute and message latency -- every layer and
    micro-batch runs its pre-expert compute, then the busiest rank's expert compute between a
    dispatch and a combine that each take at least the smallest latency of a level carrying
    all-to-all traffic or the compute a shortcut block runs beside it (for the backward twice
    that, with the expert compute ``backward_factor`` times plus ``backward_extra_s``) -- and (b)
    the time the average port of each level needs for the bytes the port model charges to it
    (all-to-all, gather, reduce-scatter, tensor-parallel collectives and the dense gradients'
    sync). Both hold whatever the overlap, contention or fairness, so the simulator's iteration
    may never fall below it. ``prediction``: this
    schedule's :func:`evaluate` result, if already at hand.
    """
    e = sum(_expert_s(s, terms))  # all layers
    peers = s.exchanges[0].peers_by_level if s.exchanges else ()
    a2a_levels = [lv for lv, n in enumerate(peers) if n > 0]
    lat = min((net.latency_s[lv] for lv in a2a_levels), default=0.0) if terms.latency and a2a_levels else 0.0
    steps = s.layers * s.micro_batches
    d, c = s.overlap_s  # a shortcut block's compute beside its dispatch and combine
    path = steps * (s.pre_dispatch_s + max(lat, d) + max(lat, c)) + s.micro_batches * e
    if terms.backward:
        path += steps * (2 * s.pre_dispatch_s + max(lat, 2 * c) + max(lat, 2 * d) + s.backward_extra_s)
        path += s.micro_batches * s.backward_factor * e
    prediction = prediction or evaluate(s, net, terms)
    return max(path, prediction.port_bound_s)


def _port_bound(topo: Topology, by_level: dict[str, dict[str, float]], net: Network, dense: bool) -> float:
    """max over levels of (bytes charged to the level -- the expert exchanges', the collectives' and,
    with ``dense``, the dense gradients' sync -- / its number of ports) / port rate (seconds). Zero
    with a pairwise DC link matrix (no shared top-level port)."""
    if net.dc_link_bytes_per_s is not None:
        return 0.0
    out = 0.0
    for lv, name in enumerate(topo.names):
        workers = math.prod(topo.counts[: lv + 1])
        level = by_level[name]
        out = max(out, (level["total"] + (level["dense"] if dense else 0.0)) / workers / net.port_bytes_per_s[lv])
    return out


def paper_closed_form_p(dispatch_bytes: float, expert_bytes: float, pre_expert_s: float,
                        world: int, bytes_per_s: float) -> float:
    """The paper's closed-form optimum p* (volume convention, see Domains.p_volume), in [0, 1].

    If 2D < G*P_E: p* = 1 - B*Lat_PE / (P_E*(G-1)) clamped to [0, 1] (mixed AG + A2A);
    otherwise p* = 0 (pure AG).
    """
    if world <= 1:
        return 1.0
    if expert_bytes <= 0:
        return 0.0
    if 2 * dispatch_bytes < world * expert_bytes:
        p = 1.0 - bytes_per_s * pre_expert_s / (expert_bytes * (world - 1))
        return min(1.0, max(0.0, p))
    return 0.0
