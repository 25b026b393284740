"""Configuration: one YAML file plus ``--set key=value`` overrides -> validated pydantic models.

Units are parsed here only (see :mod:`hybridep.units`); every field that leaves this module
carries its unit in its name: ``bandwidth_bps`` (bits/s), ``latency_s`` (seconds),
``dispatch_bytes`` (bytes), ``flops`` (FLOP/s).

Any invalid input -- unknown keys, bad types, unparseable units, non-positive counts, experts
not divisible by the number of devices, ``top_k`` larger than ``experts`` ... -- raises one
:class:`ConfigError` whose message names the key, the value and what is allowed. Nothing else
escapes :func:`load_config` / :func:`config_from_dict`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from hybridep.topology import Topology
from hybridep.units import UnitError, parse_bandwidth, parse_bytes, parse_flops, parse_time

MAX_COUNT = 1_000_000
"""Largest allowed worker count of one topology level."""
MAX_LAYERS = 1024
"""Most MoE layers of a model (``moe.layers``, ``workload.layers``)."""
MAX_MICRO_BATCHES = 1024
"""Most micro-batches per iteration."""


class ConfigError(ValueError):
    """An invalid configuration. ``problems`` lists ``(key, value, what is allowed)``."""

    def __init__(self, problems: Sequence[tuple[str, Any, str]]):
        self.problems = list(problems)
        lines = [f"{key}: got {_short(value)} -- {allowed}" for key, value, allowed in self.problems]
        super().__init__("invalid configuration:\n  " + "\n  ".join(lines))


class _FieldError(ValueError):
    """Raised by cross-field validators: names the exact key, its value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}: {allowed}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _positive(parser):
    """Wrap a unit parser so that it also rejects values <= 0."""

    def parse(value: object) -> float:
        x = parser(value)
        if not x > 0:
            raise UnitError(f"must be > 0, got {value!r}")
        return x

    return parse


def _non_negative(parser):
    def parse(value: object) -> float:
        x = parser(value)
        if x < 0:
            raise UnitError(f"must be >= 0, got {value!r}")
        return x

    return parse


def _within(parser, lo: float, hi: float, shown: str):
    """Wrap a unit parser so that it also rejects values outside [lo, hi] (``shown`` says the range
    in the field's own units)."""

    def parse(value: object) -> float:
        x = parser(value)
        if not lo <= x <= hi:
            raise UnitError(f"must be within {shown}, got {value!r}")
        return x

    return parse


MAX_TIME_S = 3600.0
BandwidthBps = Annotated[float, BeforeValidator(_within(parse_bandwidth, 1.0, 1e14, "1 bit/s .. 100 Tbit/s"))]
TimeS = Annotated[float, BeforeValidator(_within(parse_time, 0.0, MAX_TIME_S, "0 .. 3600 s (1 h)"))]
LatencyS = Annotated[float, BeforeValidator(_within(parse_time, 0.0, 600.0, "0 .. 600 s (10 min)"))]
Bytes = Annotated[float, BeforeValidator(_within(parse_bytes, 0.0, 1e15, "0 .. 1 PB"))]
PositiveBytes = Annotated[float, BeforeValidator(_within(parse_bytes, 1.0, 1e15, "1 B .. 1 PB"))]
Flops = Annotated[float, BeforeValidator(_within(parse_flops, 1e3, 1e18, "1 kFLOP/s .. 1 EFLOP/s"))]
def _integral(value: object) -> object:
    """A float with an integral value (``1e3``, ``4096.0``) as that integer; anything else unchanged
    (so booleans, fractions and text still fail the integer check with their own message)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


Int = Annotated[StrictInt, BeforeValidator(_integral)]
"""An integer field: integers, and numbers in scientific notation with an integral value."""
Count = Annotated[Int, Field(ge=1, le=MAX_COUNT)]


def _bounded(lo: int, hi: int):
    return Annotated[Int, Field(ge=lo, le=hi)]


def _not_bool(value: object) -> object:
    """Booleans are not numbers here (pydantic would read ``true`` as 1.0)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


def _real(lo: float, hi: float, lo_open: bool = False):
    """A finite real number in [lo, hi] (or (lo, hi] with ``lo_open``), booleans refused."""
    bound = Field(gt=lo, le=hi, allow_inf_nan=False) if lo_open else Field(ge=lo, le=hi, allow_inf_nan=False)
    return Annotated[float, BeforeValidator(_not_bool), bound]


def _finite_non_negative(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number")
    try:
        x = float(value)
    except OverflowError:
        raise ValueError("must be a finite number") from None
    if not math.isfinite(x) or x < 0:
        raise ValueError("must be a finite number >= 0")
    return x


NonNegFloat = Annotated[float, BeforeValidator(_finite_non_negative), Field(le=1e12)]

DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class LevelConfig(_Strict):
    """One topology level: ``count`` workers under each worker of the level above."""

    name: Annotated[StrictStr, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
    count: Count
    bandwidth_bps: BandwidthBps = Field(alias="bandwidth")
    """Per-direction rate (bits/s) of the port through which a worker of this level reaches
    its siblings: shared by all ranks inside that worker."""
    latency_s: LatencyS = Field(default=0.0, alias="latency")
    """One-way message latency (seconds) between two workers that differ at this level."""


class TopologyConfig(_Strict):
    """Levels outermost first (e.g. dc, node, gpu). World size = product of the counts."""

    levels: Annotated[list[LevelConfig], Field(min_length=1, max_length=8)]
    dc_bandwidth: list[list[BandwidthBps]] | None = None
    """Optional full matrix (bits/s) of pairwise links between the top-level workers; replaces
    the top level's shared port by one link per pair (uneven WANs). Diagonal is ignored."""
    message_overhead_s: TimeS = Field(default=0.0, alias="message_overhead")
    """Seconds a rank's communication engine is busy per point-to-point message it sends or receives,
    beyond the message's bytes (LogGP's overhead o: posting, matching, completing one transfer);
    messages pass a rank's engine one at a time, so an exchange with n peers takes at least
    2 n o. 0 = not charged. ``hybridep bench`` measures it on its ranks."""
    rendezvous_s: TimeS = Field(default=0.0, alias="rendezvous")
    """Seconds one blocking exchange between ranks costs beyond its bytes when they compute between
    such calls (they reach it at different times; on shared cores they also wait to be scheduled):
    charged per blocking call of the staged (hierarchical) exchange, whose inner stages run chunk by
    chunk between expert computations. 0 = not charged (dedicated cores, one rank per GPU).
    ``hybridep bench`` measures it on its ranks."""

    @model_validator(mode="after")
    def _check(self) -> TopologyConfig:
        names = [lv.name for lv in self.levels]
        if len(set(names)) != len(names):
            raise _FieldError("topology.levels", names, "level names must be unique")
        world = math.prod(lv.count for lv in self.levels)
        if world > 10**7:
            raise _FieldError("topology.levels", world, "world size at most 10000000 ranks")
        if self.dc_bandwidth is not None:
            n = self.levels[0].count
            if len(self.dc_bandwidth) != n or any(len(row) != n for row in self.dc_bandwidth):
                raise _FieldError("topology.dc_bandwidth", self.dc_bandwidth,
                               f"a {n}x{n} matrix (top level count {n})")
        return self

    @property
    def world_size(self) -> int:
        return math.prod(lv.count for lv in self.levels)

    def as_topology(self) -> Topology:
        """The level names and counts as a :class:`~hybridep.topology.Topology`."""
        return Topology(tuple(lv.name for lv in self.levels), tuple(lv.count for lv in self.levels))


class MoEConfig(_Strict):
    """Model dimensions of the MoE part of the network, per MoE layer."""

    hidden: _bounded(1, 1_000_000) = 512
    ffn: _bounded(1, 10_000_000) = 1024
    """Hidden size of one expert's FFN (and of the dense FFN blocks)."""
    experts: _bounded(1, 1_000_000) = 8
    """Total experts per MoE layer; must be divisible by the world size."""
    top_k: _bounded(1, 1_000_000) = 2
    layers: _bounded(1, MAX_LAYERS) = 2
    """Number of MoE layers."""
    blocks_before_moe: _bounded(0, 64) = 1
    """The paper's m: dense transformer blocks before each MoE block."""
    tokens_per_gpu: _bounded(0, 100_000_000) = 4096
    """Tokens of one micro-batch on one device."""
    seq_len: _bounded(1, 100_000_000) = 256
    micro_batches: _bounded(1, MAX_MICRO_BATCHES) = 1
    dtype: Literal["float64", "float32", "bfloat16", "float16"] = "float32"
    expert_kind: Literal["gelu", "swiglu"] = "gelu"
    capacity_factor: _real(0, 1e3, lo_open=True) | None = None
    """None = dropless."""
    sr_ratio: _real(1, 1e6) | None = None
    """Shared + residual compression ratio of the expert gather (None = uncompressed)."""
    sr_values: Literal["param", "float16", "bfloat16"] = "float16"
    """Precision of the residual values sent under compression (``param``: the model's dtype); at a
    given ratio, 2-byte values keep more entries (see ``hybridep.migration.sr``)."""
    sr_grads: Literal["dense", "topk"] = "dense"
    """How the gathered copies' gradients return to their owners under compression: ``dense`` (exact,
    straight-through) or ``topk`` (the top-k of each expert's gradient at ``sr_ratio``, with error
    feedback: what one iteration leaves out is sent with the next)."""
    shortcut: bool = False
    """Shortcut-connected MoE blocks (ScMoE): each MoE block keeps a dense FFN on its main path and
    adds an MoE branch reading the previous block's output, so that the branch's exchange overlaps
    the block's attention and dense FFN (``hybridep.lm.model``). Needs ``blocks_before_moe`` >= 1."""
    a2a_chunks: Annotated[Int, Field(ge=1, le=64)] = 1
    """Each rank's tokens travel in this many chunks whose dispatch, expert computation and combine
    pipeline (one chunk's combine overlaps the next ones' dispatch, filling both directions of a
    link under skewed routing); 1 = one dispatch and one combine per layer."""
    expert_load: list[NonNegFloat] | None = None
    """Optional histogram (any scale) of how many tokens each expert receives; uniform if absent."""
    expert_zipf: _real(0, 10) | None = None
    """Zipf skew s of the expert load instead of a histogram: expert e gets a share ~ (e+1)^-s."""

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        if self.expert_load is not None and self.expert_zipf is not None:
            raise _FieldError("moe.expert_zipf", self.expert_zipf, "give moe.expert_load or moe.expert_zipf, not both")
        if self.top_k > self.experts:
            raise _FieldError("moe.top_k", self.top_k, f"at most moe.experts; allowed: 1..{self.experts}")
        if self.shortcut and self.blocks_before_moe < 1:
            raise _FieldError("moe.shortcut", self.shortcut,
                              "an MoE block's shortcut reads the block before it, and with "
                              "moe.blocks_before_moe = 0 the first MoE block has none; allowed: false, or "
                              "moe.blocks_before_moe >= 1")
        if self.expert_load is not None:
            if len(self.expert_load) != self.experts:
                raise _FieldError("moe.expert_load", self.expert_load,
                               f"one entry per expert ({self.experts} entries)")
            if not sum(self.expert_load) > 0:
                raise _FieldError("moe.expert_load", self.expert_load, "must have a positive sum")
        return self

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


class WorkloadConfig(_Strict):
    """Direct mode for published cases: the paper's D, P_E and Lat_PE per device and MoE layer."""

    dispatch_bytes: PositiveBytes
    """D: bytes of token data one device dispatches in one MoE layer (its own share included)."""
    expert_bytes: Bytes
    """P_E: bytes of one device's experts."""
    pre_expert_s: TimeS
    """Lat_PE: compute time before the experts (attention + dense blocks)."""
    expert_s: TimeS = 0.0
    """Expert compute time per layer on one device (uniform routing)."""
    layers: _bounded(1, MAX_LAYERS) = 1
    micro_batches: _bounded(1, MAX_MICRO_BATCHES) = 1
    dense_grad_bytes: Bytes = 0.0
    """Bytes of non-expert gradients one device all-reduces per iteration."""
    device_zipf: _real(0, 10) | None = None
    """Zipf skew s of the routed load over devices (device d's experts get a share ~ (d+1)^-s)."""


class ComputeConfig(_Strict):
    flops: Flops | None = None
    """Achieved FLOP/s of one device; None = measure with a short matmul probe (cached)."""
    codec_expert_s: TimeS | None = None
    """Seconds to SR-encode or -decode one expert on one device (compressed gathers); None = not
    charged (``hybridep bench`` measures it on its ranks and uses the measurement)."""
    optimizer_s_per_byte: _real(0, 1.0) | None = Field(
        default=None, validation_alias=AliasChoices("optimizer_s_per_byte", "optimizer_byte_s"))
    """Seconds per byte of parameters for one device's optimizer step (its dense parameters and its
    own experts); None = not charged (``hybridep bench`` measures Adam on its ranks). Read under its
    earlier name ``optimizer_byte_s`` too (stored results)."""
    expert_weight_s_per_byte: _real(0, 1.0) | None = Field(
        default=None, validation_alias=AliasChoices("expert_weight_s_per_byte", "expert_weight_byte_s"))
    """Seconds per byte of expert weights a device holds for a layer, per forward + backward of the
    layer (the expert computation's cost beyond FLOPs); None = not charged (``hybridep bench``
    measures it on its ranks)."""
    expert_backward_factor: _real(0, 100.0, lo_open=True) | None = None
    """The expert computation's backward in multiples of its forward; None = 2 (the FLOP ratio;
    ``hybridep bench`` measures it on its ranks: 2.6-3.7 on a CPU host, its weight gradients
    memory-bound)."""
    expert_weight_forward_share: _real(0, 1.0) | None = None
    """Share of ``expert_weight_s_per_byte`` spent in the forward (the rest in the backward's weight
    gradients); None = 1/3, in proportion to the FLOPs (``hybridep bench`` measures it: 0.02-0.22
    on a CPU host)."""
    processors: Annotated[Int, Field(ge=1, le=MAX_COUNT)] | None = None
    """Cores all ranks share when fewer than the ranks (a CPU testbed; ``compute.flops`` then the rate
    of a rank while every rank computes: a rank with more expert work than the others gets the idle
    ranks' cores); None = a device per rank (``hybridep bench`` records the cores its ranks shared
    and prices its runs on them)."""


class CostTerms(_Strict):
    """Terms the ``full`` cost model adds to the paper's forward model; all off = ``paper``."""

    backward: StrictBool = True
    latency: StrictBool = True
    expert_compute: StrictBool = True
    grad_sync: StrictBool = True
    port_sharing: StrictBool = True
    """All streams share a worker's port: the iteration is at least the busiest level's bytes per
    port divided by its rate (overlapped gathers still occupy the link the all-to-alls need), and a
    prefetched gather or reduce-scatter is through no earlier than its own bytes plus those of the
    all-to-alls issued while it is in flight on the levels both use (the dense gradients' ring
    likewise beside the backward's exchanges on its slowest port)."""
    overlap: StrictBool = True
    """Prefetched gathers of all layers and asynchronous reduce-scatters overlap compute across
    layers (two-stream schedule); off = the paper's per-layer max(Lat_PE, Lat_AG)."""
    rail_interleave: StrictBool = True
    """Several all-to-all rails share each top-level uplink (domains inside a DC, none spanning DCs): their
    exchanges drift apart, so one rail's dispatch (heavy towards the hot DC) meets another's combine (heavy
    the other way) and each direction of the uplink carries the mean of the two directions' loads,
    not the heavier one. One rail (plain EP) stays in lockstep. Only skewed routing is affected.
    The simulator pools the two directions of each DC uplink (one resource at twice the rate) for
    those rails' all-to-all flows."""


class BenchConfig(_Strict):
    """Settings of ``hybridep bench`` (the language model uses ``moe`` for its MoE dimensions)."""

    steps: Annotated[Int, Field(ge=2, le=100_000)] = 20
    warmup: Annotated[Int, Field(ge=0, le=100_000)] = 3
    lr: _real(0, 1e3, lo_open=True) = 1e-3
    heads: Annotated[Int, Field(ge=1, le=1024)] = 4
    seed: _bounded(0, 2**63 - 1) = 0
    peers: Annotated[list[Literal["deepspeed"]], Field(max_length=1)] = ["deepspeed"]
    sr_ratios: Annotated[list[_real(1, 1e6, lo_open=True)], Field(max_length=16)] = [50.0]
    """Also run HybridEP with SR compression at these ratios (at the planner's choice)."""
    sr_grads: Annotated[list[Literal["dense", "topk"]], Field(min_length=1, max_length=2)] = ["dense"]
    """Gradient return of those runs (``moe.sr_grads``), one run each: ``dense``, ``topk``
    (named ``hybridep+srRATIO+topkgrads(...)``)."""
    sr_basis: Literal["shared", "delta", "zero"] = "delta"
    """Residual basis of those runs: ``shared`` (mean expert, the paper's), ``delta`` (receivers'
    synchronised copies), ``zero`` (ablation)."""
    sr_decode: Literal["layer", "expert"] = "layer"
    """``expert``: keep gathered experts encoded and decode one at a time in the expert computation
    (recomputed in backward; ``shared``/``zero`` basis only)."""
    prefetch: StrictBool = True
    """Issue each layer's expert gather right after the optimizer step (False: in the forward pass)."""
    all_domain_sizes: StrictBool = True
    """Also run HybridEP at every feasible domain size besides the planner's choice."""
    hierarchical: StrictBool = True
    """Also run the hierarchical token exchange (``hierarchical``, ``<choice>+hier``) where it
    deduplicates (tokens cross a level above the innermost)."""
    strategies: Annotated[list[str], Field(min_length=1, max_length=64)] | None = None
    """Run EP and exactly these strategies (names as ``docs/cli.md`` lists them) instead of the
    planner's choice and the variants below; None: the planner's."""
    candidates: Annotated[Int, Field(ge=1, le=64)] | None = None
    """Run EP, the planner's choice and the planner's best N candidates of every family (by predicted
    iteration) instead of every domain size and the variants below; None: the variants."""
    ted: StrictBool = True
    """Also run TED with TP groups of 2, with and without duplicate-token dropping (``ted(tp=2,dtd)``,
    ``ted(tp=2)``), where the innermost level's count is even and the model divides by 2."""
    shortcut: StrictBool = True
    """Also run ``ep`` and the planner's choice on shortcut-connected MoE blocks (``+shortcut``, same
    data and seed) where the model allows it (``moe.blocks_before_moe`` >= 1) and is not shortcut-
    connected already (``moe.shortcut``: every strategy runs so)."""
    timeout_s: _real(0, 7 * 86400.0, lo_open=True) = 1800.0
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A non-finite loss or gradient: ``stop`` the run with an error naming the rank, the step and
    where (loss, expert or dense gradients), or ``skip`` that step on every rank and count it."""

    @model_validator(mode="after")
    def _check(self) -> BenchConfig:
        if self.warmup >= self.steps:
            raise _FieldError("bench.warmup", self.warmup, f"fewer than bench.steps ({self.steps})")
        for key, values in (("bench.sr_ratios", self.sr_ratios), ("bench.sr_grads", self.sr_grads),
                            ("bench.peers", self.peers)):
            if len(set(values)) != len(values):
                raise _FieldError(key, values, "each value once (every value is one run, named by it)")
        if self.sr_decode == "expert" and self.sr_basis == "delta":
            raise _FieldError("bench.sr_decode", self.sr_decode,
                              "'layer' with bench.sr_basis 'delta' (its receivers keep dense copies); "
                              "'expert' needs sr_basis 'shared' or 'zero'")
        return self


class TrainConfig(_Strict):
    """Settings of ``hybridep train`` (the model's dimensions come from ``moe``; the heads from
    ``bench.heads``)."""

    steps: _bounded(1, 10_000_000) = 200
    batch_size: _bounded(1, 1_000_000) | None = None
    """Sequences per step over all ranks (the global batch; each rank takes its share, so the run is
    the same on any world size that divides it). None = ``moe.tokens_per_gpu / moe.seq_len`` per rank."""
    lr: _real(0, 1e3, lo_open=True) = 1e-3
    min_lr_ratio: _real(0, 1) = 0.1
    """The cosine decays the learning rate to this share of ``lr`` at the last step."""
    warmup_steps: _bounded(0, 10_000_000) = 10
    weight_decay: _real(0, 10) = 0.0
    grad_clip: _real(0, 1e6) = 1.0
    """Clip the global gradient norm (experts of every rank included) to this; 0 = no clipping."""
    seed: _bounded(0, 2**63 - 1) = 0
    aux_loss_coef: _real(0, 1e3) = 0.01
    """Weight of the routers' load-balancing loss in the training loss."""
    eval_every: _bounded(0, 10_000_000) = 50
    """Held-out loss every N steps (and at the end); 0 = never."""
    eval_batches: _bounded(1, 1000) = 2
    checkpoint_every: _bounded(0, 10_000_000) = 100
    """Write a checkpoint every N steps (and at the end); 0 = only at the end."""
    keep: _bounded(1, 1000) = 3
    """Checkpoints kept (the newest)."""
    timeout_s: _real(0, 7 * 86400.0, lo_open=True) = 600.0
    """Seconds a collective may wait before the run stops with the name of the rank it waited for."""
    on_nonfinite: Literal["stop", "skip"] = "stop"


def _on_off(value: object) -> object:
    """YAML 1.1 reads ``on``/``off`` (and ``yes``/``no``) as booleans: take them back as the words."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


class SimulateConfig(_Strict):
    """Settings of ``hybridep simulate``."""

    strategies: Annotated[list[Annotated[StrictStr, Field(min_length=1, max_length=200)]],
                          Field(min_length=1, max_length=64)] = ["ep", "planner"]
    """``ep``; ``planner`` (HybridEP at the planner's choice); ``hybridep(dc=2,gpu=8)`` (given
    per-level domain sizes; levels left out take the planner's best); ``hybridep(p=0.5)`` (the
    domain size (1-p)*G, levels split by the planner); ``hybridep+sr50(...)`` with SR compression."""
    fold: Annotated[Literal["auto", "on", "off"], BeforeValidator(_on_off)] = "auto"
    """Fold symmetric senders into per-level means (``on``), simulate every rank pair (``off``), or
    fold unless routing is skewed and the world has at most 32 ranks (``auto``)."""


def _dense_sync(value: object, auto: bool = True) -> object:
    """``dense_sync``: ``auto`` or one of :data:`hybridep.strategies.dense_sync.MODES`, kept as its
    canonical name."""
    from hybridep.strategies.dense_sync import MODES, parse_dense_sync

    if not isinstance(value, str):
        raise ValueError(f"a name: {'auto, ' if auto else ''}{MODES}")
    if auto and value.strip() == "auto":
        return "auto"
    return str(parse_dense_sync(value))


SHORTCUT_CHOICE = "shortcut"
"""``planner.allow``'s name for shortcut-connected MoE blocks (a different model: its quality differs)."""
SR_CHOICE = "sr"
"""``planner.allow``'s name for SR-compressed gathers at ``planner.sr_ratios`` (lossy)."""


def _allowed(value: object) -> object:
    """A ``planner.allow`` entry: ``shortcut``, ``sr`` or a dense-sync mode (canonical name)."""
    if isinstance(value, str) and value.strip() in (SHORTCUT_CHOICE, SR_CHOICE):
        return value.strip()
    try:
        return _dense_sync(value, auto=False)
    except ValueError as err:
        raise ValueError(f"{SHORTCUT_CHOICE}, {SR_CHOICE}, or {err}") from None


class PlannerConfig(_Strict):
    """What the planner may choose beyond the exact strategies."""

    allow: Annotated[list[Annotated[str, BeforeValidator(_allowed)]], Field(max_length=16)] = []
    """Choices that change the result, which the planner makes only when listed here (never
    silently): lossy dense-sync modes such as ``powersgd(rank=4)``, ``shortcut`` (the model's MoE
    blocks shortcut-connected, every strategy weighed with and without) and ``sr`` (SR-compressed
    gathers at each of ``sr_ratios``). ``ring`` and ``hierarchical`` are exact and always candidates."""
    sr_ratios: Annotated[list[_real(1, 1e6)], Field(min_length=1, max_length=16)] = [10.0, 50.0]
    """The compression ratios weighed when ``allow`` lists ``sr``."""
    a2a_chunks: Annotated[list[Annotated[Int, Field(ge=1, le=64)]], Field(min_length=1, max_length=16)] | None = None
    """Chunk counts of the pipelined exchange to weigh (exact: no permission needed); None = the
    configured ``moe.a2a_chunks`` only."""


class Config(_Strict):
    cost_model: Literal["paper", "full"] = "full"
    dense_sync: Annotated[str, BeforeValidator(_dense_sync)] = "auto"
    """How the dense (non-expert) gradients are synchronised by ``bench`` and ``train``: ``ring``
    (DDP's all-reduce), ``hierarchical`` (reduce-scatter in each DC, all-reduce across DCs,
    all-gather in each DC), ``powersgd(rank=R[,start=S])`` (lossy), or ``auto``: the planner's
    choice among ``ring``, ``hierarchical`` and the modes ``planner.allow`` lists (recorded in the
    plan file)."""
    planner: PlannerConfig = PlannerConfig()
    topology: TopologyConfig
    moe: MoEConfig | None = None
    workload: WorkloadConfig | None = None
    compute: ComputeConfig = ComputeConfig()
    cost_terms: CostTerms = CostTerms()
    bench: BenchConfig = BenchConfig()
    simulate: SimulateConfig = SimulateConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _check(self) -> Config:
        if (self.moe is None) == (self.workload is None):
            raise _FieldError("moe/workload", None, "give exactly one of them (model dimensions, or "
                           "the direct paper workload)")
        if self.moe is not None and self.moe.a2a_chunks > 1 and self.bench.sr_decode == "expert":
            raise _FieldError("moe.a2a_chunks", self.moe.a2a_chunks,
                              "1 with bench.sr_decode 'expert' (experts decoded one at a time are recomputed in "
                              "backward, which the chunked exchange does not do), or bench.sr_decode 'layer'")
        if SHORTCUT_CHOICE in self.planner.allow and (self.moe is None or self.moe.blocks_before_moe < 1):
            i = self.planner.allow.index(SHORTCUT_CHOICE)
            raise _FieldError(f"planner.allow.{i}", SHORTCUT_CHOICE,
                              "shortcut-connected blocks need model dimensions with moe.blocks_before_moe >= 1 "
                              "(an MoE block's shortcut reads the block before it)")
        if self.moe is not None and self.moe.experts % self.topology.world_size:
            g = self.topology.world_size
            raise _FieldError("moe.experts", self.moe.experts,
                           f"must be divisible by the number of devices; allowed: a multiple of {g}")
        self._check_bench_strategies()
        return self

    def _check_bench_strategies(self) -> None:
        """Every ``bench.strategies`` name is a strategy of this topology (``docs/cli.md``)."""
        from hybridep.strategies import StrategyError, parse

        for i, name in enumerate(self.bench.strategies or []):
            try:
                parse(name, self.topology.as_topology())
            except StrategyError as err:
                raise _FieldError(f"bench.strategies.{i}", name, str(err)) from None

    @property
    def terms(self) -> CostTerms:
        """The cost terms in force: all off in ``paper`` mode."""
        if self.cost_model == "paper":
            return CostTerms(backward=False, latency=False, expert_compute=False, grad_sync=False, overlap=False,
                             port_sharing=False, rail_interleave=False)
        return self.cost_terms


def _problems(err: ValidationError) -> list[tuple[str, Any, str]]:
    out = []
    for e in err.errors(include_url=False):
        problem = e.get("ctx", {}).get("error")
        if isinstance(problem, _FieldError):
            out.append((problem.key, problem.value, problem.allowed))
            continue
        key = ".".join(str(p) for p in e["loc"]) or "(config)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        out.append((key, e.get("input"), msg))
    return out


def config_from_dict(data: object) -> Config:
    """Validate a plain mapping (as loaded from YAML) into a :class:`Config`."""
    if not isinstance(data, dict):
        raise ConfigError([("(config)", data, "the top level must be a mapping")])
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_problems(err)) from None
    except (ValueError, TypeError, OverflowError, RecursionError) as err:  # defensive: odd inputs
        raise ConfigError([("(config)", data, str(err))]) from None


class DuplicateKeyError(yaml.YAMLError):
    """A mapping gives the same key twice (PyYAML would keep the last one silently)."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except that numbers in scientific notation are numbers
    (``1e10``, ``300e12``, ``3.0e14``: YAML 1.2 floats), not strings, and that a key given twice in
    one mapping is an error."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: let PyYAML say so
                break
            if duplicate:
                raise DuplicateKeyError(f"key {key!r} given twice in one mapping (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text: str) -> Any:
    """Parse YAML text with :class:`_Loader` (scientific notation read as numbers)."""
    return yaml.load(text, Loader=_Loader)


def _parse_scalar(text: str) -> Any:
    try:
        return yaml_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Apply ``key.sub.0.name=value`` overrides (value parsed as YAML) to a nested mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError([("--set", item, "expected key=value, e.g. moe.top_k=2")])
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError([("--set", item, "empty key component")])
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError([(where, part, f"list index 0..{len(node) - 1}")])
                if last:
                    node[int(part)] = _parse_scalar(raw)
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = _parse_scalar(raw)
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise ConfigError([(where, node, "cannot set a key inside a scalar")])
    return data


def default_config_text() -> str:
    """The embedded default configuration (YAML)."""
    return resources.files("hybridep").joinpath("defaults/default.yaml").read_text()


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load a YAML file (or the embedded default when ``path`` is None) and apply overrides."""
    return config_from_dict(load_config_data(path, overrides))


MAX_CONFIG_BYTES = 1 << 20
"""A configuration file larger than this is refused (the shipped ones are under 2 kB)."""


def read_config_text(path: str | Path) -> str:
    """The text of a configuration file: at most :data:`MAX_CONFIG_BYTES`, UTF-8, or a ConfigError
    naming ``--config`` (a device like /dev/zero is read no further than the limit)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError([("--config", str(path), f"cannot read file: {err.strerror}")]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([("--config", str(path), f"a YAML file of at most {MAX_CONFIG_BYTES} bytes")])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError([("--config", str(path), f"UTF-8 text (byte {err.start} is not): a YAML file")]) from None


def load_config_data(path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict:
    """The raw mapping of :func:`load_config`, overrides applied, not yet validated."""
    if path is None:
        text, source = default_config_text(), "(embedded default)"
    else:
        text, source = read_config_text(path), str(path)
    return _data_from_text(text, overrides, source)


def config_from_text(text: str, overrides: Iterable[str] = (), source: str = "(text)") -> Config:
    """Parse YAML text, apply overrides and validate."""
    return config_from_dict(_data_from_text(text, overrides, source))


def _data_from_text(text: str, overrides: Iterable[str], source: str) -> dict:
    try:
        data = yaml_load(text)
    except yaml.YAMLError as err:
        raise ConfigError([(source, text[:60], f"not valid YAML: {err}")]) from None
    except (ValueError, RecursionError) as err:
        raise ConfigError([(source, text[:60], f"not valid YAML: {err}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([(source, data, "the top level must be a mapping")])
    return apply_overrides(data, overrides)


def config_to_dict(cfg: Config) -> dict:
    """A JSON-friendly dict of the validated configuration (SI units, field names)."""
    return cfg.model_dump(mode="json", by_alias=False)
