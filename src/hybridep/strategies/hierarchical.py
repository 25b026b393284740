"""The hierarchical family: the token exchange in stages per level with per-level deduplication (NVIDIA
Hybrid-EP's dispatch, across DCs), alone or inside HybridEP's rails.

Parameters (:class:`HierarchicalSpec`): HybridEP's (domain sizes, compression, prefetch) and the
levels that deduplicate (default: every level above the innermost), and ``a2a_chunks``: the stages
pipelined in that many chunks of the tokens (MoNTA: chunk c's inner stages run while chunk c+1
crosses the outer level). The runtime is :mod:`hybridep.parallel.hierarchical`.

Names (``str(spec)`` / :func:`parse`)::

    hierarchical                        every domain size 1, dedup at every level but the innermost
    hierarchical(dedup=dc+node)         dedup at these levels (``dedup=none``: at none)
    hybridep(dc=1,gpu=2)+hier           inside HybridEP's rails (any HybridEP name before ``+hier``)
    hybridep(dc=1,gpu=2)+hier(dedup=dc)
    ep+chunks4+hier                     the stages pipelined in 4 chunks (any +chunksC before +hier)

Bytes (the schedule): at stage level l a token crosses once per distinct destination worker there
(prefix of domain ids d_0..d_l) other than its own, when l and every stage level before it
deduplicate; else once per (token, expert) pair crossing l. A dispatch crossing carries the token's
hidden vector, its k routing weights and k int32 expert ids; a combine crossing the hidden vector
(:func:`packet_bytes` charges each direction their mean, so the iteration's total is exact). With E
experts, k per token (without replacement), R_l rail members at level l and W_l = R_0 ... R_l
destination workers down to l, uniform routing gives the closed form

    E[crossings at l per token] = W_{l-1} (R_l - 1) (1 - C(E - E/W_l, k) / C(E, k))   (dedup)
                                = k (R_l - 1) / R_l                                  (per pair)

(for skewed loads the hit probability of a worker with load share q uses q E experts in its place).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
from torch import nn

from hybridep.costmodel import Workload
from hybridep.migration.sr import SRSettings
from hybridep.parallel.comm import Communicator
from hybridep.schedule import CountExchange, Exchange, ExchangePorts, Schedule
from hybridep.strategies import hybridep
from hybridep.strategies.base import SHORTCUT, StrategyError
from hybridep.strategies.hybridep import HybridEPSpec, build_schedule
from hybridep.topology import Domains, Topology

FORMS = ("hierarchical, hierarchical(dedup=LEVEL+LEVEL...|none), or a HybridEP name followed by +hier "
         "or +hier(dedup=...)")


@dataclass(frozen=True)
class HierarchicalSpec(HybridEPSpec):
    """HybridEP's parameters with the hierarchical token exchange."""

    dedup: tuple[int, ...] | None = None
    """Level indices that deduplicate; None = every level above the innermost."""
    family: ClassVar[str] = "hierarchical"

    def __post_init__(self) -> None:
        super().__post_init__()
        levels = self.topology.num_levels
        if self.dedup is not None and tuple(sorted(set(self.dedup))) == tuple(range(levels - 1)):
            object.__setattr__(self, "dedup", None)  # the default, one way
        if self.dedup is not None and any(not 0 <= lv < levels for lv in self.dedup):
            raise StrategyError(f"strategy hierarchical: dedup levels {self.dedup}; allowed: indices of "
                                f"{', '.join(self.topology.names)}")

    @property
    def dedup_levels(self) -> tuple[int, ...]:
        return tuple(range(self.topology.num_levels - 1)) if self.dedup is None else tuple(sorted(self.dedup))

    def __str__(self) -> str:
        dedup = ""
        if self.dedup is not None:
            names = "+".join(self.topology.names[lv] for lv in self.dedup_levels) or "none"
            dedup = f"(dedup={names})"
        base = HybridEPSpec.__str__(replace(self.as_hybridep(), shortcut=False))
        name = f"hierarchical{dedup}" if base == "ep" else f"{base}+hier{dedup}"
        return name + (SHORTCUT if self.shortcut else "")

    @property
    def is_ep(self) -> bool:
        return False

    def as_hybridep(self) -> HybridEPSpec:
        """The same partition and settings with the one-stage exchange."""
        return HybridEPSpec(self.topology, self.domain_sizes, self.sr_ratio, self.sr_grads, self.a2a_chunks,
                            self.prefetch, self.shortcut)

    def runtime_kind(self) -> str:
        return "hierarchical" + ("+sr" if self.compressed else "")

    def uncompressed(self) -> HierarchicalSpec:
        return replace(self, sr_ratio=None, sr_grads="dense")

    def schedule(self, w: Workload) -> Schedule:
        return build_schedule_hier(self.domains(), w, self.dedup_levels)

    def apply(self, model: nn.Module, comm: Communicator, sr: SRSettings | None, a2a_chunks: int) -> list:
        """The runtime face: HybridEP's gathers, the hierarchical token exchange."""
        from hybridep.parallel.strategy import parallelize

        chunks = self.a2a_chunks if self.a2a_chunks is not None else a2a_chunks
        sr = sr if self.compressed else None
        return parallelize(model, comm, self.domains(), sr, chunks, dedup=self.dedup_levels)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "family": self.family, "name": str(self),
                "dedup": [self.topology.names[lv] for lv in self.dedup_levels]}


# --------------------------------------------------------------------------------- the grammar
def accepts(name: str) -> bool:
    return name.startswith("hierarchical") or "+hier" in name


def _dedup(name: str, args: str, topology: Topology) -> tuple[int, ...]:
    key, sep, val = args.partition("=")
    if key != "dedup" or not sep:
        raise StrategyError(f"strategy {name!r}: unknown argument {args!r}; allowed: dedup=LEVEL+LEVEL... or "
                            f"dedup=none with levels {', '.join(topology.names)}")
    if val == "none":
        return ()
    out = []
    for level in val.split("+"):
        if level not in topology.names:
            raise StrategyError(f"strategy {name!r}: dedup level {level!r} does not exist; allowed: "
                                f"{', '.join(topology.names)} (joined by +), or none")
        out.append(topology.names.index(level))
    return tuple(sorted(set(out)))


def _split(name: str) -> tuple[str, str | None]:
    """(the HybridEP part, the dedup argument or None)."""
    if name.startswith("hierarchical"):
        base, rest = "ep", name.removeprefix("hierarchical")
    else:
        base, _, rest = name.rpartition("+hier")
        if not base:
            raise StrategyError(f"strategy {name!r}: allowed: {FORMS}")
    if rest and not (rest.startswith("(") and rest.endswith(")")):
        raise StrategyError(f"strategy {name!r}: cannot read {rest!r}; allowed: {FORMS}")
    return base, rest[1:-1] if rest else None


def parse(name: str, topology: Topology) -> HierarchicalSpec:
    """The spec named ``name`` (see the module docstring)."""
    base, args = _split(name)
    inner = hybridep.parse(base, topology)
    dedup = _dedup(name, args, topology) if args is not None else None
    return HierarchicalSpec(topology, inner.domain_sizes, inner.sr_ratio, inner.sr_grads, inner.a2a_chunks,
                            inner.prefetch, dedup=dedup)


@dataclass(frozen=True)
class HierarchicalRequest:
    """A ``simulate.strategies`` entry: a HybridEP request with the hierarchical exchange."""

    text: str
    inner: hybridep.HybridEPRequest
    dedup: tuple[int, ...] | None

    @property
    def planner(self) -> bool:
        return self.inner.planner

    @property
    def template(self) -> HierarchicalSpec:
        return self.with_sizes(self.inner.template.domain_sizes)

    def candidates(self) -> list[tuple[int, ...]]:
        return self.inner.candidates()

    def with_sizes(self, sizes: tuple[int, ...]) -> HierarchicalSpec:
        t = self.inner.with_sizes(sizes)
        return HierarchicalSpec(t.topology, t.domain_sizes, t.sr_ratio, t.sr_grads, t.a2a_chunks, t.prefetch,
                                dedup=self.dedup)


def parse_request(text: str, topology: Topology) -> HierarchicalRequest:
    base, args = _split(text)
    dedup = _dedup(text, args, topology) if args is not None else None
    return HierarchicalRequest(text, hybridep.parse_request(base, topology), dedup)


# --------------------------------------------------------------------------------- the schedule
def destination_hits(dom: Domains, w: Workload, dedup: tuple[int, ...], layer: int = 0) -> dict[int, np.ndarray]:
    """Per stage level l: for every destination worker X there (a prefix of rail domain ids, array of
    shape (R_0, ..., R_l)), how often one token from an origin elsewhere at l crosses into X -- the
    probability that one of its k experts lies in X (deduplicating), or k times X's load share (per
    pair). See the module docstring for the closed form."""
    topo, k = dom.topology, w.top_k
    g = topo.world_size
    experts = w.experts or g
    if k < 1:
        raise StrategyError("strategy hierarchical: needs the experts per token (model dimensions, a moe "
                            "section), not a direct workload")
    load = w.load_of_layer(layer)
    load = np.full(experts, 1.0 / experts) if load is None else np.asarray(load, dtype=float)
    owners = np.arange(experts) // max(1, experts // g)
    coords = np.stack(np.unravel_index(owners, topo.counts), axis=1)
    domain_ids = coords // np.asarray(dom.sizes)
    out, deduplicating = {}, True
    for lv in dom.rail_levels():
        deduplicating &= lv in dedup
        shape = tuple(dom.rail_factors[: lv + 1])
        prefix = np.ravel_multi_index(tuple(domain_ids[:, : lv + 1].T), shape)
        share = np.bincount(prefix, weights=load, minlength=math.prod(shape))
        if not deduplicating:
            out[lv] = (k * share).reshape(shape)
            continue
        missed = np.ones_like(share)
        for i in range(k):  # k experts without replacement, none of them in the worker
            missed *= np.clip((experts - share * experts - i) / (experts - i), 0.0, 1.0)
        out[lv] = (1 - missed).reshape(shape)
    return out


def crossings_per_token(dom: Domains, w: Workload, dedup: tuple[int, ...], layer: int = 0) -> dict[int, float]:
    """Expected times one token crosses each stage level (origins uniform: a share (R_l - 1)/R_l of them
    lies elsewhere at l than a given destination worker)."""
    return {lv: float((1 - 1 / dom.rail_factors[lv]) * hits.sum())
            for lv, hits in destination_hits(dom, w, dedup, layer).items()}


STAGE_CALLS = 1.5
"""Blocking exchanges per stage, chunk and phase of the runtime's staged exchange
(:class:`~hybridep.parallel.hierarchical.HierarchicalStyle`): the dispatch's row counts, rows and
expert ids, the combine's rows, one each in the backward -- 6 over the 4 phases."""


def _stage(dom: Domains, lv: int, hits: np.ndarray, token_bytes: float, then: Exchange | None,
           chunks: int = 1) -> Exchange:
    """The all-to-all of one stage over ``lv`` (``hits``: :func:`destination_hits` there;
    ``token_bytes``: the bytes of all of a rank's tokens as packets). A level-l port of the workers
    with domain ids X receives the crossings into X from origins elsewhere at l and sends those of
    the tokens it holds into X's siblings, shared by the workers alike but for their offsets; two
    messages to and from each stage peer (the rows, the ids) per chunk; ``then``: the next stage;
    ``chunks``: the stages pipelined in that many chunks. Each stage makes :data:`STAGE_CALLS`
    blocking calls per chunk and phase, but the first of a pipelined exchange: its chunks are
    issued at once (their row counts in one exchange, priced apart) and travel while the compute
    thread works."""
    topo = dom.topology
    g, r = topo.world_size, dom.rail_factors[lv]
    alike = math.prod(dom.sizes[: lv + 1])  # topology workers per destination worker
    sibling = hits.reshape(-1, r)
    scale = g * token_bytes / r / alike
    ingress = (scale * (r - 1) * sibling).ravel()
    egress = (scale * (sibling.sum(axis=1, keepdims=True) - sibling)).ravel()
    total = float(ingress.sum()) * alike
    ports = [ExchangePorts(egress, ingress, total) if level == lv else
             ExchangePorts(np.zeros(1), np.zeros(1), 0.0) for level in range(topo.num_levels)]
    # per receiving rank: its worker's ingress over the rank's stage peers
    ids = topo.all_coords[:, : lv + 1] // np.asarray(dom.sizes[: lv + 1])
    rank_in = ingress[np.ravel_multi_index(tuple(ids.T), tuple(dom.rail_factors[: lv + 1]))]
    flow = rank_in / topo.ranks_per_worker(lv) / (r - 1)
    return Exchange(ports=tuple(ports), peers_by_level=tuple(r - 1 if x == lv else 0 for x in range(topo.num_levels)),
                    flow_bytes=flow, groups=functools.partial(dom.rail_stage_groups, lv),
                    top_pair_bytes=functools.partial(_top_pairs, dom, lv, float(ingress.mean()) / (r - 1)),
                    messages=4 * (r - 1) * chunks, chunks=chunks, interleaved_top=False, delay_levels=(), then=then,
                    calls=0.0 if chunks > 1 and lv == dom.rail_levels()[0] else STAGE_CALLS)


def _top_pairs(dom: Domains, lv: int, pair_bytes: float) -> np.ndarray:
    """(workers x workers) of the top level: bytes one sends another in a stage over ``lv`` (top-level
    workers at the same offset exchange in the top stage; none in the others)."""
    c0 = dom.topology.counts[0]
    if lv != 0:
        return np.zeros((c0, c0))
    top = np.arange(c0) % dom.sizes[0]
    return np.where((top[:, None] == top[None, :]) & ~np.eye(c0, dtype=bool), pair_bytes, 0.0)


def packet_bytes(w: Workload) -> float:
    """Bytes one crossing carries, averaged over the four directions the evaluators charge alike: the
    dispatch sends the hidden vector, k weights and k expert ids, the combine the hidden vector, and
    their backwards the gradients of the vector and weights, and of the vector."""
    from hybridep.parallel.hierarchical import ID_BYTES  # (the runtime imports the strategies' modules)

    return w.token_bytes + w.top_k * (w.element_bytes / 2 + ID_BYTES / 4)


def staged_exchange(dom: Domains, w: Workload, dedup: tuple[int, ...], layer: int = 0) -> Exchange:
    """One layer's dispatch in stages, outermost first (each crossing :func:`packet_bytes`), pipelined
    in :func:`~hybridep.strategies.hybridep.exchange_chunks` chunks."""
    tokens = w.dispatch_bytes / (w.top_k * w.token_bytes)
    chunks = hybridep.exchange_chunks(dom, w)
    ex = None
    for lv, hits in reversed(destination_hits(dom, w, dedup, layer).items()):
        ex = _stage(dom, lv, hits, tokens * packet_bytes(w), ex, chunks)
    return ex


def build_schedule_hier(dom: Domains, w: Workload, dedup: tuple[int, ...]) -> Schedule:
    """HybridEP's iteration (:func:`~hybridep.strategies.hybridep.build_schedule`: gathers, compute,
    dense sync) with each layer's exchange in stages (pipelined in chunks where configured) and one
    split-size exchange per stage. A shortcut block's compute does not overlap it: the runtime runs
    the stages when the experts are needed."""
    base = build_schedule(dom, w)
    if dom.rail_size == 1:
        return base
    layers = range(w.layers) if w.per_layer else range(1)
    exchanges = [staged_exchange(dom, w, dedup, layer) for layer in layers]
    if not w.per_layer:
        exchanges = exchanges * w.layers
    messages = sum(2 * (dom.rail_factors[lv] - 1) for lv in dom.rail_levels())
    return dataclasses.replace(base, exchanges=tuple(exchanges), overlap_s=(0.0, 0.0),
                               counts=CountExchange(tuple(dom.rail_levels()), messages))
