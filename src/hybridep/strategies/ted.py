"""The TED family: tensor x expert x data parallelism with duplicate-token dropping (DeepSpeed-TED).

Parameters (:class:`TedSpec`): ``tp`` (ranks per tensor-parallel group, consecutive ranks of the
innermost level; a divisor of its count, at least 2), ``dtd`` (duplicate-token dropping) and
``cac`` (communication-aware activation checkpointing: the MoE blocks recomputed in backward, their
collectives' outputs kept from the forward pass). The runtime is :mod:`hybridep.parallel.ted`.

Names (``str(spec)`` / :func:`parse`)::

    ted(tp=2,dtd)      TP groups of 2, each TP rank dispatching 1/tp of the copies
    ted(tp=2)          the same without DTD (every TP rank sends every copy: the baseline)
    ted(tp=2,dtd,cac)  with communication-aware activation checkpointing
    ted(tp=2,dtd,dc=2,gpu=1)  inside HybridEP expert domains of EP positions (counted in positions)
    ted(tp=2,dtd,chunks=4)    the exchange pipelined in 4 chunks (MoNTA; left out: moe.a2a_chunks)

Schedule: the token exchange runs among the ranks with the same TP index -- the rails of HybridEP's
partition with domain size ``tp`` x the positions' at the innermost level -- so it is HybridEP's
exchange on that partition (pipelined in chunks as HybridEP's is) at the same global batch as every
family (a TP group trains on its ranks' batches together): the dispatch each rank sends is one
rank's under DTD and ``tp`` times that without; expert and dense compute are one rank's (1/tp of
every layer on ``tp`` x the tokens); with expert domains, HybridEP's gathers among the ranks of one
TP index; the TP group's own collectives (the dense layers' all-reduces, DTD's all-gathers and
reduce-scatters) as blocking stages on the innermost level (:meth:`TedSpec.tp_stages`, also when
pipelined: the model does not credit their overlap with other chunks' transfers); with ``cac`` the
backward computes the experts a third time (the
recomputation; its attention is not charged) and communicates nothing more.
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

from hybridep.config import Config
from hybridep.costmodel import Workload, held_weights_split
from hybridep.migration.sr import SRSettings
from hybridep.parallel.comm import Communicator
from hybridep.schedule import Schedule, Stage
from hybridep.strategies.base import SHORTCUT, StrategyError
from hybridep.strategies.hybridep import HybridEPSpec, build_schedule
from hybridep.topology import Domains, Topology, divisors, position_topology

FORMS = ("ted(tp=N[,dtd][,cac][,chunks=C][,LEVEL=SIZE...]) with N a divisor (>= 2) of the innermost level's count "
         "and expert-domain sizes counted in EP positions (the innermost level has count/N of them; default 1)")
_NAME = re.compile(r"^ted\((?P<args>[^()]*)\)$")


@dataclass(frozen=True)
class TedSpec(HybridEPSpec):
    """TED on ``topology``: TP groups of ``tp`` ranks, with or without duplicate-token dropping."""

    tp: int = 2
    dtd: bool = True
    cac: bool = False
    family: ClassVar[str] = "ted"

    def __post_init__(self) -> None:
        super().__post_init__()
        inner = self.topology.counts[-1]
        if not isinstance(self.tp, int) or self.tp < 2 or inner % self.tp:
            raise StrategyError(f"strategy ted: tp={self.tp!r} must divide the innermost level's count "
                                f"({self.topology.names[-1]}: {inner}); allowed: "
                                f"{[d for d in divisors(inner) if d >= 2] or 'none (the level has one rank)'}")
        positions = position_topology(self.topology, self.tp)
        for name, count, s in zip(positions.names, positions.counts, self.domain_sizes, strict=True):
            if s not in divisors(count):
                raise StrategyError(f"strategy ted(tp={self.tp}): {name} domain size {s!r} must divide the EP "
                                    f"positions of that level ({count}); allowed: {divisors(count)}")
        if self.sr_ratio is not None:
            raise StrategyError("strategy ted: takes no compression")
        if self.cac and self.a2a_chunks not in (None, 1):
            raise StrategyError(f"strategy ted: chunks={self.a2a_chunks} with cac; allowed: chunks=1 with cac (the "
                                "recomputation replays whole exchanges)")

    def __str__(self) -> str:
        flags = (",dtd" if self.dtd else "") + (",cac" if self.cac else "")
        if self.a2a_chunks is not None:
            flags += f",chunks={self.a2a_chunks}"
        if any(s > 1 for s in self.domain_sizes):
            flags += "".join(f",{n}={s}" for n, s in zip(self.topology.names, self.domain_sizes, strict=True))
        return f"ted(tp={self.tp}{flags})" + (SHORTCUT if self.shortcut else "")

    @property
    def is_ep(self) -> bool:
        return False

    def runtime_kind(self) -> str:
        return "ted"

    def exchange_domains(self) -> Domains:
        """The partition of the ranks whose rails are TED's rails: a domain holds its EP positions'
        TP groups (innermost domain size ``tp`` times the positions')."""
        return Domains(self.topology, (*self.domain_sizes[:-1], self.domain_sizes[-1] * self.tp))

    def workload(self, cfg: Config, flops: float | None = None) -> Workload:
        """HybridEP's workload at the same global batch: a TP group trains on its ``tp`` ranks'
        batches together (``tp`` x a rank's tokens), each rank computing 1/tp of every expert and
        dense layer on all of them -- the same compute as a rank's own tokens; the dispatch a rank
        sends is its 1/tp of the group's copies under DTD (one rank's), all of them without; the
        dense part's all-reduced outputs cover the group's tokens."""
        check_config(cfg, self.tp)
        w = super().workload(cfg, flops)
        return dataclasses.replace(w, dispatch_bytes=w.dispatch_bytes * (1 if self.dtd else self.tp),
                                   dense_outputs_bytes=w.dense_outputs_bytes * self.tp,
                                   a2a_chunks=self.chunks(w.a2a_chunks))

    def chunks(self, configured: int) -> int:
        """Chunks of the pipelined exchange: the name's, else the ``configured`` count; 1 with CAC."""
        return 1 if self.cac else self.a2a_chunks if self.a2a_chunks is not None else configured

    def schedule(self, w: Workload) -> Schedule:
        """HybridEP's schedule on :meth:`exchange_domains` with TED's gathers (a rank gathers only
        its TP index's shards: :meth:`shard_stages`), its held experts (its domain's positions'
        shards, not the TP groups'), its TP stages and CAC's recomputation. Its rails do not
        interleave on a DC uplink (HybridEP's rails inside a DC drift apart; TED's members of a TP
        group wait for each other at every layer's TP collectives)."""
        dom = self.exchange_domains()
        base = build_schedule(dom, w)
        chunks = base.exchanges[0].chunks if base.exchanges else 1  # HybridEP charges holding once per chunk
        extra_held = dom.domain_size - math.prod(self.domain_sizes)
        surplus, surplus_bwd = (chunks * s for s in held_weights_split(w, extra_held))
        # the TP groups' collectives keep their members' rails in lockstep: no drifting apart
        exchanges = tuple(replace(ex, interleaved_top=False) for ex in base.exchanges)
        return replace(base, exchanges=exchanges, gather=self.shard_stages(base.gather),
                       reduce_scatter=self.shard_stages(base.reduce_scatter),
                       expert_s=base.expert_s - surplus, backward_extra_s=base.backward_extra_s - surplus_bwd,
                       codec_s=0.0, tp_stages=self.tp_stages(w),
                       backward_factor=base.backward_factor + (1.0 if self.cac else 0.0))

    def shard_stages(self, stages: tuple[Stage, ...]) -> tuple[Stage, ...]:
        """HybridEP's gather (or reduce-scatter) stages on :meth:`exchange_domains` as TED runs them:
        over the innermost level only the members with this rank's TP index take part (the
        positions' domain size less one peers, groups split by TP index; none when it is 1); the
        outer levels' stages already pair ranks of one TP index. Bytes per flow stay: a rank's TP
        shard of its positions' experts is one rank's experts' bytes."""
        inner, tp = self.topology.num_levels - 1, self.tp
        out = []
        for st in stages:
            if st.level != inner:
                out.append(st)
            elif self.domain_sizes[-1] > 1:
                def groups(st=st) -> list[list[int]]:
                    return [g[j::tp] for g in st.groups() for j in range(tp)]

                def pairs(st=st) -> np.ndarray:
                    ranks = np.arange(self.topology.counts[0])
                    return st.top_pairs() & (ranks[:, None] % tp == ranks[None, :] % tp)
                out.append(replace(st, peers=self.domain_sizes[-1] - 1, groups=groups, top_pairs=pairs))
        return tuple(out)

    def tp_stages(self, w: Workload) -> tuple[Stage, ...]:
        """The TP group's collectives of one layer, forward, on the innermost level (bytes to each
        other member): the dense part's all-reduces (a ring: 2/tp of the outputs to each); with DTD
        the all-gather of the received rows, the reduce-scatter of the partial outputs and the
        all-gather of the outputs (each about the rows one member sends, ``dispatch_bytes``), without
        it the all-reduce of the partial outputs (2/tp of all rows). Each blocks the compute thread
        between two computations (:attr:`~hybridep.schedule.Stage.blocking`)."""
        tp, lv = self.tp, self.topology.num_levels - 1
        rows = w.dispatch_bytes * (1 if self.dtd else 2 / tp)
        per_peer = [2 * w.dense_outputs_bytes / tp] + ([rows] * 3 if self.dtd else [rows])
        groups = functools.partial(_tp_groups, self.topology.world_size, tp)
        return tuple(Stage(lv, tp - 1, b, groups=groups, top_pairs=lambda: None, blocking=True)
                     for b in per_peer if b > 0)

    def apply(self, model: nn.Module, comm: Communicator, sr: SRSettings | None, a2a_chunks: int) -> list:
        from hybridep.parallel.ted import parallelize_ted

        return parallelize_ted(model, comm, self.tp, self.dtd, cac=self.cac, domain_sizes=self.domain_sizes,
                               chunks=self.chunks(a2a_chunks))

    def to_dict(self) -> dict:
        return {"family": self.family, "name": str(self), "tp": self.tp, "dtd": self.dtd, "cac": self.cac,
                "domain_sizes": dict(zip(self.topology.names, self.domain_sizes, strict=True)),
                "shortcut": self.shortcut}


def _tp_groups(world: int, tp: int) -> list[list[int]]:
    return [list(range(start, start + tp)) for start in range(0, world, tp)]


def check_config(cfg: Config, tp: int) -> None:
    """The model dimensions TED shards must divide by ``tp``, the experts by the EP world (G / tp)."""
    m = cfg.moe
    if m is None:
        raise StrategyError("strategy ted: needs model dimensions (a moe section)")
    world = cfg.topology.world_size
    for key, value in (("moe.hidden", m.hidden), ("moe.ffn", m.ffn), ("bench.heads", cfg.bench.heads)):
        if value % tp:
            raise StrategyError(f"strategy ted(tp={tp}): {key} = {value} is not divisible by tp; allowed: "
                                f"multiples of {tp}")
    if m.experts % (world // tp):
        raise StrategyError(f"strategy ted(tp={tp}): moe.experts = {m.experts} is not divisible by the "
                            f"expert-parallel world {world // tp} (world {world} / tp {tp})")


# --------------------------------------------------------------------------------- the grammar
def accepts(name: str) -> bool:
    return name.startswith("ted")


def parse(name: str, topology: Topology) -> TedSpec:
    m = _NAME.match(name)
    if m is None:
        raise StrategyError(f"strategy {name!r}: allowed: {FORMS}")
    tp, flags, sizes, chunks = None, set(), {}, None
    for item in filter(None, m.group("args").split(",")):
        key, sep, val = item.partition("=")
        if key == "tp" and sep and val.isdigit() and tp is None:
            tp = int(val)
        elif item in ("dtd", "cac") and item not in flags:
            flags.add(item)
        elif key in topology.names and sep and val.isdigit() and key not in sizes:
            sizes[key] = int(val)
        elif key == "chunks" and sep and val.isdigit() and "chunks" not in flags:
            flags.add("chunks")
            chunks = int(val)
        else:
            raise StrategyError(f"strategy {name!r}: cannot read {item!r}; allowed: {FORMS}")
    if tp is None:
        raise StrategyError(f"strategy {name!r}: tp=N is required; allowed: {FORMS}")
    return TedSpec(topology, tuple(sizes.get(n, 1) for n in topology.names), a2a_chunks=chunks, tp=tp,
                   dtd="dtd" in flags, cac="cac" in flags)


@dataclass(frozen=True)
class TedRequest:
    """A ``simulate.strategies`` entry of this family (every parameter given)."""

    text: str
    template: TedSpec
    planner: bool = False

    def candidates(self) -> list[tuple[int, ...]]:
        return [self.template.domain_sizes]

    def with_sizes(self, sizes: tuple[int, ...]) -> TedSpec:
        return self.template


def parse_request(text: str, topology: Topology) -> TedRequest:
    return TedRequest(text, parse(text, topology))
