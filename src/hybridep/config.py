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


BandwidthBps = Annotated[float, BeforeValidator(_positive(parse_bandwidth))]
TimeS = Annotated[float, BeforeValidator(_non_negative(parse_time))]
PositiveTimeS = Annotated[float, BeforeValidator(_positive(parse_time))]
Bytes = Annotated[float, BeforeValidator(_non_negative(parse_bytes))]
PositiveBytes = Annotated[float, BeforeValidator(_positive(parse_bytes))]
Flops = Annotated[float, BeforeValidator(_positive(parse_flops))]
def _integral(value: object) -> object:
    """A float with an integral value (``1e3``, ``4096.0``) as that integer; anything else unchanged
    (so booleans, fractions and text still fail the integer check with their own message)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


Int = Annotated[StrictInt, BeforeValidator(_integral)]
"""An integer field: integers, and numbers in scientific notation with an integral value."""
Count = Annotated[Int, Field(ge=1, le=MAX_COUNT)]
NonNegInt = Annotated[Int, Field(ge=0, le=10**9)]
PositiveInt = Annotated[Int, Field(ge=1, le=10**9)]


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


NonNegFloat = Annotated[float, BeforeValidator(_finite_non_negative)]

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
    latency_s: TimeS = Field(default=0.0, alias="latency")
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

    hidden: PositiveInt = 512
    ffn: PositiveInt = 1024
    """Hidden size of one expert's FFN (and of the dense FFN blocks)."""
    experts: PositiveInt = 8
    """Total experts per MoE layer; must be divisible by the world size."""
    top_k: PositiveInt = 2
    layers: PositiveInt = 2
    """Number of MoE layers."""
    blocks_before_moe: NonNegInt = 1
    """The paper's m: dense transformer blocks before each MoE block."""
    tokens_per_gpu: NonNegInt = 4096
    """Tokens of one micro-batch on one device."""
    seq_len: PositiveInt = 256
    micro_batches: PositiveInt = 1
    dtype: Literal["float64", "float32", "bfloat16", "float16"] = "float32"
    expert_kind: Literal["gelu", "swiglu"] = "gelu"
    capacity_factor: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    """None = dropless."""
    sr_ratio: Annotated[float, Field(ge=1, le=1e6, allow_inf_nan=False)] | None = None
    """Shared + residual compression ratio of the expert gather (None = uncompressed)."""
    sr_values: Literal["param", "float16", "bfloat16"] = "float16"
    """Precision of the residual values sent under compression (``param``: the model's dtype); at a
    given ratio, 2-byte values keep more entries (see ``hybridep.migration.sr``)."""
    sr_grads: Literal["dense", "topk"] = "dense"
    """How the gathered copies' gradients return to their owners under compression: ``dense`` (exact,
    straight-through) or ``topk`` (the top-k of each expert's gradient at ``sr_ratio``, with error
    feedback: what one iteration leaves out is sent with the next)."""
    a2a_chunks: Annotated[Int, Field(ge=1, le=64)] = 1
    """Each rank's tokens travel in this many chunks whose dispatch, expert computation and combine
    pipeline (one chunk's combine overlaps the next ones' dispatch, filling both directions of a
    link under skewed routing); 1 = one dispatch and one combine per layer."""
    expert_load: list[NonNegFloat] | None = None
    """Optional histogram (any scale) of how many tokens each expert receives; uniform if absent."""
    expert_zipf: Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)] | None = None
    """Zipf skew s of the expert load instead of a histogram: expert e gets a share ~ (e+1)^-s."""

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        if self.expert_load is not None and self.expert_zipf is not None:
            raise _FieldError("moe.expert_zipf", self.expert_zipf, "give moe.expert_load or moe.expert_zipf, not both")
        if self.top_k > self.experts:
            raise _FieldError("moe.top_k", self.top_k, f"at most moe.experts; allowed: 1..{self.experts}")
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
    layers: PositiveInt = 1
    micro_batches: PositiveInt = 1
    dense_grad_bytes: Bytes = 0.0
    """Bytes of non-expert gradients one device all-reduces per iteration."""
    device_zipf: Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)] | None = None
    """Zipf skew s of the routed load over devices (device d's experts get a share ~ (d+1)^-s)."""


class ComputeConfig(_Strict):
    flops: Flops | None = None
    """Achieved FLOP/s of one device; None = measure with a short matmul probe (cached)."""
    codec_expert_s: TimeS | None = None
    """Seconds to SR-encode or -decode one expert on one device (compressed gathers); None = not
    charged (``hybridep bench`` measures it on its ranks and uses the measurement)."""
    optimizer_s_per_byte: Annotated[float, Field(ge=0, le=1.0, allow_inf_nan=False)] | None = Field(
        default=None, validation_alias=AliasChoices("optimizer_s_per_byte", "optimizer_byte_s"))
    """Seconds per byte of parameters for one device's optimizer step (its dense parameters and its
    own experts); None = not charged (``hybridep bench`` measures Adam on its ranks). Read under its
    earlier name ``optimizer_byte_s`` too (stored results)."""
    expert_weight_s_per_byte: Annotated[float, Field(ge=0, le=1.0, allow_inf_nan=False)] | None = Field(
        default=None, validation_alias=AliasChoices("expert_weight_s_per_byte", "expert_weight_byte_s"))
    """Seconds per byte of expert weights a device holds for a layer, per forward + backward of the
    layer (the expert computation's cost beyond FLOPs); None = not charged (``hybridep bench``
    measures it on its ranks)."""


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
    lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e-3
    heads: Annotated[Int, Field(ge=1, le=1024)] = 4
    seed: Int = 0
    peers: list[Literal["deepspeed"]] = ["deepspeed"]
    sr_ratios: list[Annotated[float, Field(gt=1, le=1e6, allow_inf_nan=False)]] = [50.0]
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
    timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1800.0
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A non-finite loss or gradient: ``stop`` the run with an error naming the rank, the step and
    where (loss, expert or dense gradients), or ``skip`` that step on every rank and count it."""

    @model_validator(mode="after")
    def _check(self) -> BenchConfig:
        if self.warmup >= self.steps:
            raise _FieldError("bench.warmup", self.warmup, f"fewer than bench.steps ({self.steps})")
        for key, values in (("bench.sr_ratios", self.sr_ratios), ("bench.sr_grads", self.sr_grads)):
            if len(set(values)) != len(values):
                raise _FieldError(key, values, "each value once (every value is one run, named by it)")
        if self.sr_decode == "expert" and self.sr_basis == "delta":
            raise _FieldError("bench.sr_decode", self.sr_decode,
                              "'layer' with bench.sr_basis 'delta' (its receivers keep dense copies); "
                              "'expert' needs sr_basis 'shared' or 'zero'")
        return self


class SimulateConfig(_Strict):
    """Settings of ``hybridep simulate``."""

    strategies: Annotated[list[Annotated[StrictStr, Field(min_length=1, max_length=200)]],
                          Field(min_length=1, max_length=64)] = ["ep", "planner"]
    """``ep``; ``planner`` (HybridEP at the planner's choice); ``hybridep(dc=2,gpu=8)`` (given
    per-level domain sizes; levels left out take the planner's best); ``hybridep(p=0.5)`` (the
    domain size (1-p)*G, levels split by the planner); ``hybridep+sr50(...)`` with SR compression."""
    fold: Literal["auto", "on", "off"] = "auto"
    """Fold symmetric senders into per-level means (``on``), simulate every rank pair (``off``), or
    fold unless routing is skewed and the world has at most 32 ranks (``auto``)."""


class Config(_Strict):
    cost_model: Literal["paper", "full"] = "full"
    topology: TopologyConfig
    moe: MoEConfig | None = None
    workload: WorkloadConfig | None = None
    compute: ComputeConfig = ComputeConfig()
    cost_terms: CostTerms = CostTerms()
    bench: BenchConfig = BenchConfig()
    simulate: SimulateConfig = SimulateConfig()

    @model_validator(mode="after")
    def _check(self) -> Config:
        if (self.moe is None) == (self.workload is None):
            raise _FieldError("moe/workload", None, "give exactly one of them (model dimensions, or "
                           "the direct paper workload)")
        if self.moe is not None and self.moe.a2a_chunks > 1 and self.bench.sr_decode == "expert":
            raise _FieldError("moe.a2a_chunks", self.moe.a2a_chunks,
                              "1 with bench.sr_decode 'expert' (experts decoded one at a time are recomputed in "
                              "backward, which the chunked exchange does not do), or bench.sr_decode 'layer'")
        if self.moe is not None and self.moe.experts % self.topology.world_size:
            g = self.topology.world_size
            raise _FieldError("moe.experts", self.moe.experts,
                           f"must be divisible by the number of devices; allowed: a multiple of {g}")
        return self

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


class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except that numbers in scientific notation are numbers
    (``1e10``, ``300e12``, ``3.0e14``: YAML 1.2 floats), not strings."""


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


def load_config_data(path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict:
    """The raw mapping of :func:`load_config`, overrides applied, not yet validated."""
    if path is None:
        text, source = default_config_text(), "(embedded default)"
    else:
        try:
            text, source = Path(path).read_text(), str(path)
        except OSError as err:
            raise ConfigError([("--config", str(path), f"cannot read file: {err.strerror}")]) from None
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
