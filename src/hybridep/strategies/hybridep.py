"""The HybridEP family: expert domains per topology level (plain EP is the all-ones case).

Parameters (:class:`HybridEPSpec`): per-level expert-domain sizes; shared + residual compression of
the expert gather (``sr_ratio``) and how the gathered copies' gradients return (``sr_grads``);
the pipelined exchange's chunk count (``a2a_chunks``) and whether the gathers are prefetched.

Names (the one grammar, ``str(spec)`` / :func:`parse`)::

    ep                                    every domain size 1, uncompressed
    hybridep(dc=2,gpu=1)                  per-level domain sizes, every level named
    hybridep+sr50(dc=2,gpu=2)             SR compression at ratio 50 (dense gradients)
    hybridep+sr50+topkgrads(dc=2,gpu=2)   ... with top-k gradients (error feedback)
    ...+chunks3 / ...+[no]prefetch        after the other modifiers (ep+chunks3 too)
    ep+shortcut, hybridep(...)+shortcut   shortcut-connected MoE blocks (any family's name + shortcut,
                                          :mod:`hybridep.strategies.base`)

``a2a_chunks`` and ``prefetch`` left out of a name mean "as configured" (``moe.a2a_chunks``,
``bench.prefetch``): a spec whose fields are None takes them from the configuration it runs with.

Requests (``simulate.strategies``, :func:`parse_request`) may also say ``planner`` (the planner's
choice), leave levels out (the planner's best for them) or give ``p=P`` (domain size (1-p)·G).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
from torch import nn

from hybridep import costmodel
from hybridep.config import Config, CostTerms
from hybridep.costmodel import (
    Network,
    Prediction,
    Workload,
    device_expert_s,
    evaluate,
    held_weights_split,
    optimizer_s,
    workload_from_config,
)
from hybridep.migration.sr import SRSettings
from hybridep.parallel.comm import Communicator
from hybridep.schedule import CountExchange, Exchange, ExchangePorts, Schedule, Stage
from hybridep.sim.iteration import SimResult, run_schedule
from hybridep.strategies import dense_sync
from hybridep.strategies.base import SHORTCUT, StrategyError
from hybridep.topology import Domains, Topology, divisors

_NAME = re.compile(r"^(?P<base>ep|planner|hybridep)(?P<mods>(?:\+[a-z]+[0-9.]*(?:e[-+]?[0-9]+)?)*)"
                   r"(?:\((?P<args>[^()]*)\))?$")
_MOD = re.compile(r"\+(sr(?P<sr>[0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)|topkgrads|chunks(?P<chunks>[0-9]+)"
                  r"|noprefetch|prefetch)")
MAX_CHUNKS = 64
FORMS = ("ep, hybridep(LEVEL=SIZE,...) with every level, optionally +srRATIO[+topkgrads], +chunksC, +[no]prefetch "
         "after the family name")
REQUEST_FORMS = ("ep, planner, hybridep(LEVEL=SIZE,...) (levels left out: the planner's best), hybridep(p=P), "
                 "optionally +srRATIO[+topkgrads], +chunksC, +[no]prefetch after the name")


@dataclass(frozen=True)
class HybridEPSpec:
    """One HybridEP strategy on one topology."""

    topology: Topology
    domain_sizes: tuple[int, ...]
    sr_ratio: float | None = None
    """SR compression ratio of the expert gather (None: uncompressed)."""
    sr_grads: str = "dense"
    """``dense`` or ``topk`` (compressed gradient return; only with ``sr_ratio``)."""
    a2a_chunks: int | None = None
    """Chunks of the pipelined exchange; None = the configuration's ``moe.a2a_chunks``."""
    prefetch: bool | None = None
    """Prefetch the expert gathers; None = the configuration's ``bench.prefetch``."""
    shortcut: bool = False
    """The model's MoE blocks are shortcut-connected (ScMoE): the exchange overlaps the block's
    attention and dense FFN (one-stage, unchunked exchanges; see :func:`build_schedule`)."""
    family: ClassVar[str] = "hybridep"

    def __post_init__(self) -> None:
        topo, sizes = self.topology, self.domain_sizes
        if len(sizes) != topo.num_levels:
            raise StrategyError(f"strategy {self.name_or_sizes()}: one domain size per level "
                                f"({', '.join(topo.names)}), got {len(sizes)}")
        for name, count, s in zip(topo.names, topo.counts, sizes, strict=True):
            if not isinstance(s, int) or s not in divisors(count):
                raise StrategyError(f"strategy {self.name_or_sizes()}: {name} domain size {s!r} must divide "
                                    f"{count}; allowed: {divisors(count)}")
        if self.sr_ratio is not None and not (math.isfinite(self.sr_ratio) and 1 <= self.sr_ratio <= 1e6):
            raise StrategyError(f"strategy {self.name_or_sizes()}: SR ratio {self.sr_ratio!r}; allowed: 1..1e6")
        if self.sr_grads not in ("dense", "topk"):
            raise StrategyError(f"strategy {self.name_or_sizes()}: sr_grads {self.sr_grads!r}; allowed: dense, topk")
        if self.sr_grads == "topk" and self.sr_ratio is None:
            raise StrategyError(f"strategy {self.name_or_sizes()}: +topkgrads needs +srRATIO before it")
        chunks = self.a2a_chunks
        if chunks is not None and not (isinstance(chunks, int) and 1 <= chunks <= MAX_CHUNKS):
            raise StrategyError(f"strategy {self.name_or_sizes()}: chunks {chunks!r}; allowed: 1..{MAX_CHUNKS}")

    def name_or_sizes(self) -> str:
        """What the error messages call this spec (its name may not be formable yet)."""
        pairs = zip(self.topology.names, self.domain_sizes, strict=False)
        return "'hybridep(" + ",".join(f"{n}={s}" for n, s in pairs) + ")'"

    # --- the name --------------------------------------------------------------------------
    def __str__(self) -> str:
        tail = f"+chunks{self.a2a_chunks}" if self.a2a_chunks is not None else ""
        tail += {None: "", True: "+prefetch", False: "+noprefetch"}[self.prefetch]
        short = SHORTCUT if self.shortcut else ""
        if self.is_ep:
            return "ep" + tail + short
        head = "hybridep"
        if self.sr_ratio is not None:
            head += f"+sr{_shortest(self.sr_ratio)}" + ("+topkgrads" if self.sr_grads == "topk" else "")
        sizes = ",".join(f"{n}={s}" for n, s in zip(self.topology.names, self.domain_sizes, strict=True))
        return f"{head}{tail}({sizes}){short}"

    # --- what the other modules ask of a spec ----------------------------------------------------
    @property
    def is_ep(self) -> bool:
        """Plain expert parallelism: every domain size 1, uncompressed."""
        return all(s == 1 for s in self.domain_sizes) and self.sr_ratio is None

    @property
    def compressed(self) -> bool:
        return self.sr_ratio is not None

    @property
    def gathers_across_top_level(self) -> bool:
        """Whether expert domains span top-level workers (their cross-DC traffic is gathers)."""
        return self.domain_sizes[0] > 1

    def domains(self) -> Domains:
        return Domains(self.topology, self.domain_sizes)

    def runtime_kind(self) -> str:
        """The dispatcher this spec runs with: ``ep``, ``hybridep`` or ``hybridep+sr``."""
        if self.sr_ratio is not None:
            return "hybridep+sr"
        return "ep" if self.is_ep else "hybridep"

    def uncompressed(self) -> HybridEPSpec:
        """The same partition without compression (the exact variant of this spec)."""
        return replace(self, sr_ratio=None, sr_grads="dense")

    def resolved(self, a2a_chunks: int, prefetch: bool) -> HybridEPSpec:
        """The spec with its "as configured" fields filled in."""
        return replace(self, a2a_chunks=self.a2a_chunks if self.a2a_chunks is not None else a2a_chunks,
                       prefetch=self.prefetch if self.prefetch is not None else prefetch)

    def workload(self, cfg: Config, flops: float | None = None) -> Workload:
        """The cost model's workload of ``cfg`` run under this spec (its compression, chunks,
        prefetch and block form)."""
        if self.shortcut and (cfg.moe is None or cfg.moe.blocks_before_moe < 1):
            raise StrategyError(f"strategy {self}: +shortcut needs model dimensions (a moe section) with "
                                "moe.blocks_before_moe >= 1 (an MoE block's shortcut reads the block before it)")
        w = workload_from_config(cfg, flops, self.sr_ratio, self.sr_grads if self.compressed else None,
                                 self.shortcut if cfg.moe is not None else None)
        if self.prefetch is not None:
            w = dataclasses.replace(w, prefetch=self.prefetch)
        return w if self.a2a_chunks is None else dataclasses.replace(w, a2a_chunks=self.a2a_chunks)

    def schedule(self, w: Workload) -> Schedule:
        """One iteration of this strategy under workload ``w`` (made by :meth:`workload`)."""
        return build_schedule(self.domains(), w)

    def apply(self, model: nn.Module, comm: Communicator, sr: SRSettings | None, a2a_chunks: int) -> list:
        """The runtime face: put this strategy's dispatcher on every MoE layer of ``model`` (experts
        sharded by owner, the domain gathers and rail exchanges of :mod:`hybridep.parallel.strategy`);
        ``sr``: the compression settings when :attr:`compressed`; ``a2a_chunks`` when not in the spec."""
        from hybridep.parallel.strategy import parallelize

        chunks = self.a2a_chunks if self.a2a_chunks is not None else a2a_chunks
        return parallelize(model, comm, self.domains(), sr if self.compressed else None, chunks)

    def to_dict(self) -> dict:
        return {"family": self.family, "name": str(self),
                "domain_sizes": dict(zip(self.topology.names, self.domain_sizes, strict=True)),
                "sr_ratio": self.sr_ratio, "sr_grads": self.sr_grads, "a2a_chunks": self.a2a_chunks,
                "prefetch": self.prefetch, "shortcut": self.shortcut}

    @classmethod
    def ep(cls, topology: Topology, **params) -> HybridEPSpec:
        """Plain EP on ``topology`` (keyword parameters as for the class)."""
        return cls(topology, tuple(1 for _ in topology.counts), **params)


def _shortest(x: float) -> str:
    """The shortest text that reads back as exactly ``x`` (``50``, ``12.5``, ``10000.75``, ``1e+16``)."""
    text = repr(float(x))
    return text.removesuffix(".0")


@dataclass(frozen=True)
class HybridEPRequest:
    """A ``simulate.strategies`` entry of this family: the parameters given, the rest for a planner."""

    text: str
    fixed: dict[int, int]
    """Domain sizes given, by level index."""
    p: float | None
    """Target p (domain size (1-p)·G), or None."""
    planner: bool
    """The planner's choice (``planner``, or ``hybridep`` with no arguments)."""
    template: HybridEPSpec
    """Every parameter but the domain sizes (which are all ones here)."""

    def with_sizes(self, sizes: tuple[int, ...]) -> HybridEPSpec:
        return replace(self.template, domain_sizes=tuple(sizes))

    def candidates(self) -> list[tuple[int, ...]]:
        """Every feasible partition that fits what was given."""
        topo = self.template.topology
        g = topo.world_size
        return [s for s in topo.feasible_domain_sizes()
                if all(s[lv] == v for lv, v in self.fixed.items())
                and (self.p is None or abs(math.prod(s) - (1 - self.p) * g) < 1e-9)]


def accepts(name: str) -> bool:
    return _NAME.match(name) is not None


def _modifiers(name: str, mods: str) -> dict:
    """The ``+...`` modifiers of a name as spec fields, in the one order the grammar allows."""
    out: dict = {}
    pos, order = 0, []
    for m in _MOD.finditer(mods):
        if m.start() != pos:
            break
        pos = m.end()
        word = m.group(1)
        key = "sr" if m.group("sr") else "chunks" if m.group("chunks") else word.removeprefix("no")
        if key in order:
            raise StrategyError(f"strategy {name!r}: +{key} given twice")
        order.append(key)
        if m.group("sr"):
            out["sr_ratio"] = float(m.group("sr"))
        elif word == "topkgrads":
            out["sr_grads"] = "topk"
        elif m.group("chunks"):
            out["a2a_chunks"] = int(m.group("chunks"))
        else:
            out["prefetch"] = word == "prefetch"
    if pos != len(mods):
        raise StrategyError(f"strategy {name!r}: cannot read {mods[pos:]!r}; allowed: {FORMS}")
    canonical = [k for k in ("sr", "topkgrads", "chunks", "prefetch") if k in order]
    if order != canonical:
        raise StrategyError(f"strategy {name!r}: modifiers in the order +srRATIO, +topkgrads, +chunksC, "
                            "+prefetch or +noprefetch")
    return out


def _args(name: str, args: str | None, topology: Topology, allow_p: bool) -> tuple[dict[int, int], float | None]:
    fixed: dict[int, int] = {}
    p = None
    for item in filter(None, (args or "").split(",")):
        key, sep, val = item.partition("=")
        allowed_keys = ", ".join((["p"] if allow_p else []) + list(topology.names))
        if not sep or (key not in topology.names and not (allow_p and key == "p")):
            raise StrategyError(f"strategy {name!r}: unknown key {key!r}; allowed: {allowed_keys}")
        if key == "p":
            try:
                p = float(val)
            except ValueError:
                p = math.nan
            if not 0 <= p < 1:
                raise StrategyError(f"strategy {name!r}: p must satisfy 0 <= p < 1, got {val!r}")
            continue
        lv = topology.names.index(key)
        if lv in fixed:
            raise StrategyError(f"strategy {name!r}: level {key!r} given twice")
        if not val.isdigit() or int(val) not in divisors(topology.counts[lv]):
            raise StrategyError(f"strategy {name!r}: {key} domain size must divide {topology.counts[lv]}; "
                                f"allowed: {divisors(topology.counts[lv])}, got {val!r}")
        fixed[lv] = int(val)
    return fixed, p


def parse(name: str, topology: Topology) -> HybridEPSpec:
    """The spec named ``name`` (every level's domain size given, or ``ep``)."""
    m = _NAME.match(name)
    if m is None or m.group("base") == "planner":
        raise StrategyError(f"strategy {name!r}: not a strategy name; allowed: {FORMS}")
    params = _modifiers(name, m.group("mods"))
    if m.group("base") == "ep":
        if m.group("args") is not None or "sr_ratio" in params:
            raise StrategyError(f"strategy {name!r}: ep takes no domain sizes and no compression; allowed: {FORMS}")
        return HybridEPSpec.ep(topology, **params)
    fixed, _ = _args(name, m.group("args"), topology, allow_p=False)
    if len(fixed) != topology.num_levels:
        raise StrategyError(f"strategy {name!r}: a name gives every level's domain size "
                            f"({', '.join(topology.names)}); allowed: {FORMS}")
    return HybridEPSpec(topology, tuple(fixed[lv] for lv in range(topology.num_levels)), **params)


def parse_request(text: str, topology: Topology) -> HybridEPRequest:
    """A ``simulate.strategies`` entry (see the module docstring)."""
    m = _NAME.match(text)
    if m is None:
        raise StrategyError(f"strategy {text!r}: allowed: {REQUEST_FORMS}")
    params = _modifiers(text, m.group("mods"))
    base, args = m.group("base"), m.group("args")
    if base in ("ep", "planner") and args is not None:
        raise StrategyError(f"strategy {text!r}: {base} takes no arguments")
    if base == "ep" and "sr_ratio" in params:
        raise StrategyError(f"strategy {text!r}: ep takes no compression; allowed: {REQUEST_FORMS}")
    fixed, p = _args(text, args, topology, allow_p=True)
    template = HybridEPSpec.ep(topology, **params)
    if base == "ep":
        fixed = dict(enumerate(template.domain_sizes))
    request = HybridEPRequest(text, fixed, p, planner=base == "planner" or (base == "hybridep" and not args),
                              template=template)
    if base != "ep" and not request.candidates():
        g = topology.world_size
        ok = sorted({round(1 - math.prod(s) / g, 6) for s in topology.feasible_domain_sizes()})
        raise StrategyError(f"strategy {text!r}: no partition matches; feasible p on this topology: {ok}")
    return request


# ---------------------------------------------------------------------- the iteration's schedule
def domain_load_grid(dom: Domains, w: Workload, layer: int = 0) -> np.ndarray:
    """Share of routed tokens per expert domain in MoE layer ``layer``, as an array of shape
    (R_0, ..., R_{L-1})."""
    g = dom.topology.world_size
    load = w.load_of_layer(layer)
    if load is None or w.experts == 0:
        per_rank = np.full(g, 1.0 / g)
    else:
        per_rank = np.asarray(load, dtype=float).reshape(g, -1).sum(axis=1)
    shape = []
    for r, s in zip(dom.rail_factors, dom.sizes, strict=True):
        shape += [r, s]
    grid = per_rank.reshape(shape)
    return grid.sum(axis=tuple(range(1, 2 * dom.topology.num_levels, 2)))


def _a2a_level_bytes(dom: Domains, w: Workload, load: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray]:
    """Egress and ingress bytes of every level-``level`` worker's port for one dispatch, indexed by
    the worker's domain ids (d_0..d_level): workers alike but for their offsets carry the same."""
    n_l = dom.topology.ranks_per_worker(level)
    r_l = dom.rail_factors[level]
    a_next = load.sum(axis=tuple(range(level + 1, load.ndim)))  # shape (R_0..R_level)
    a_this = a_next.sum(axis=level, keepdims=True)
    egress = n_l * w.dispatch_bytes * (a_this - a_next)
    ingress = (r_l - 1) * n_l * w.dispatch_bytes * a_next
    return egress, ingress


def _top_pair_bytes(dom: Domains, w: Workload, load: np.ndarray) -> np.ndarray:
    """Bytes one top-level worker sends another in one dispatch (0 where they do not exchange)."""
    c0 = dom.topology.counts[0]
    d0, o0 = np.arange(c0) // dom.sizes[0], np.arange(c0) % dom.sizes[0]
    a_next0 = load.sum(axis=tuple(range(1, load.ndim)))  # load per level-0 domain id
    same_off = (o0[:, None] == o0[None, :]) & (d0[:, None] != d0[None, :])
    pair = dom.topology.ranks_per_worker(0) * w.dispatch_bytes * np.broadcast_to(a_next0[d0][None, :], (c0, c0))
    return np.where(same_off, np.maximum(pair, pair.T), 0.0)


def _top_stage_pairs(dom: Domains) -> np.ndarray:
    """Top-level worker pairs of one domain at different offsets: they exchange in the gather's top stage."""
    c0 = dom.topology.counts[0]
    d0, o0 = np.arange(c0) // dom.sizes[0], np.arange(c0) % dom.sizes[0]
    return (d0[:, None] == d0[None, :]) & (o0[:, None] != o0[None, :])


def exchange_chunks(dom: Domains, w: Workload) -> int:
    """Chunks of the pipelined exchange in force for this partition (see
    :meth:`~hybridep.topology.Domains.exchange_chunks`)."""
    return dom.exchange_chunks(max(1, w.a2a_chunks))


def _codec_ops_s(dom: Domains, w: Workload, ops_per_expert: float) -> float:
    """Seconds of ``ops_per_expert`` SR encodes or decodes per expert a device owns (compressed
    gathers only; 0 when the expert count or the codec time is unknown)."""
    g = dom.topology.world_size
    if w.gather_bytes is None or w.codec_expert_s <= 0 or dom.domain_size == 1 or w.experts < g:
        return 0.0
    return w.codec_expert_s * ops_per_expert * (w.experts // g)


def codec_s(dom: Domains, w: Workload) -> float:
    """Seconds per layer a device spends encoding its own experts and decoding the other domain
    members' (n + (S - 1) n), and with compressed gradients also encoding the gradient shares it sends
    over the top level and decoding the ones it receives there (2 (S_0 - 1) n); charged to the
    compute stream (shared cores here, a side stream on a GPU)."""
    grads = 2 * (dom.sizes[0] - 1) if w.grad_bytes is not None else 0
    return _codec_ops_s(dom, w, dom.domain_size + grads)


def recompute_s(dom: Domains, w: Workload) -> tuple[float, float]:
    """(factor, seconds) the backward adds per layer and micro-batch when the experts are recomputed
    (``expert_recompute``): the expert forward again (factor 1 of the forward expert time) and the
    decode of the other members' experts; (0, 0) otherwise."""
    if not w.expert_recompute:
        return 0.0, 0.0
    return 1.0, _codec_ops_s(dom, w, dom.domain_size - 1)


def _exchange(dom: Domains, w: Workload, load: np.ndarray, share: np.ndarray, chunks: int) -> Exchange:
    """The token exchange of one layer whose domains serve the shares ``load`` (the grid) --
    ``share``: per rank, its domain's share."""
    topo = dom.topology
    ports = []
    for lv in range(topo.num_levels):
        eg, ing = _a2a_level_bytes(dom, w, load, lv)
        ports.append(ExchangePorts(eg, ing, float(eg.sum()) * math.prod(dom.sizes[: lv + 1])))
    levels = dom.rail_levels()
    delayed = tuple(levels) if dom.domain_size > 1 and levels and levels[0] != 0 else ()
    return Exchange(ports=tuple(ports), peers_by_level=tuple(dom.peers_by_level("a2a")),
                    flow_bytes=w.dispatch_bytes * share, groups=dom.rail_groups,
                    top_pair_bytes=lambda: _top_pair_bytes(dom, w, load),
                    messages=2 * (dom.rail_size - 1) * chunks, chunks=chunks,
                    interleaved_top=dom.sizes[0] == 1 and math.prod(dom.sizes[1:]) > 1, delay_levels=delayed)


def _stages(dom: Domains, shard_bytes, reverse: bool = False) -> tuple[Stage, ...]:
    """The hierarchical gather (or, ``reverse``, its reduce-scatter): one stage per level whose domain
    size exceeds 1, outermost first; ``shard_bytes(l)``: one device's experts as sent over level l."""
    levels = dom.gather_levels()[::-1] if reverse else dom.gather_levels()
    return tuple(Stage(lv, dom.sizes[lv] - 1, shard_bytes(lv) * math.prod(dom.sizes[:lv]),
                       groups=functools.partial(dom.stage_groups, lv),
                       top_pairs=functools.partial(_top_stage_pairs, dom)) for lv in levels)


def build_schedule(dom: Domains, w: Workload) -> Schedule:
    """One iteration of HybridEP with domains ``dom`` under workload ``w`` (see :mod:`hybridep.schedule`):
    rail all-to-alls of the tokens, the hierarchical gather of the domain's experts and its
    reduce-scatter, the domain's load on each rank's expert compute. Shortcut blocks overlap an
    unchunked exchange with their attention and dense FFN (a chunked one runs when the experts are
    needed, as the runtime does)."""
    topo = dom.topology
    g = topo.world_size
    chunks = exchange_chunks(dom, w)
    coords = topo.all_coords
    dom_ids = tuple((coords // np.asarray(dom.sizes)).T)
    distinct = range(w.layers) if w.per_layer else range(1)
    grids = [domain_load_grid(dom, w, lv) for lv in distinct]
    shares = [grid[dom_ids] for grid in grids]
    exchanges = [_exchange(dom, w, grid, share, chunks) for grid, share in zip(grids, shares, strict=True)]
    held, held_bwd = (chunks * s for s in held_weights_split(w, dom.domain_size))  # once per chunk
    expert_s = np.stack([device_expert_s(w, share * dom.rail_size, g) + held for share in shares])
    if not w.per_layer:
        exchanges, expert_s = exchanges * w.layers, np.repeat(expert_s, w.layers, axis=0)
    rc, redo = recompute_s(dom, w)
    levels = dom.rail_levels()
    return Schedule(
        topology=topo, layers=w.layers, micro_batches=w.micro_batches, pre_expert_s=w.pre_expert_s,
        codec_s=codec_s(dom, w), expert_s=expert_s, backward_factor=w.expert_backward_factor + rc,
        backward_extra_s=redo + held_bwd,
        exchanges=tuple(exchanges),
        counts=CountExchange(tuple(levels), 2 * (dom.rail_size - 1)) if levels else None,
        gather=_stages(dom, lambda lv: w.sent_expert_bytes),
        reduce_scatter=_stages(dom, w.sent_grad_bytes, reverse=True),
        grad_sync=dense_sync.schedule(topo, w), optimizer_s=optimizer_s(w),
        overlap_s=w.shortcut_s if chunks == 1 else (0.0, 0.0), prefetch=w.prefetch)


def predict(dom: Domains, w: Workload, net: Network, terms: CostTerms) -> Prediction:
    """The cost model's prediction for HybridEP with domains ``dom`` (:func:`~hybridep.costmodel.evaluate`
    of :func:`build_schedule`)."""
    return dataclasses.replace(evaluate(build_schedule(dom, w), net, terms), domain_sizes=dom.sizes)


def lower_bound(dom: Domains, w: Workload, net: Network, terms: CostTerms,
                prediction: Prediction | None = None) -> float:
    """:func:`~hybridep.costmodel.lower_bound` of HybridEP with domains ``dom``."""
    return costmodel.lower_bound(build_schedule(dom, w), net, terms, prediction)


def simulate(dom: Domains, w: Workload, net: Network, terms: CostTerms, fold: bool = True) -> SimResult:
    """One simulated iteration of HybridEP with domains ``dom`` (:func:`~hybridep.sim.iteration.run_schedule`)."""
    return dataclasses.replace(run_schedule(build_schedule(dom, w), net, terms, fold), domain_sizes=dom.sizes)
