"""Topology: rank <-> coordinates (paper Eq. 13), expert domains, the pair rule, group lists.

A topology has L levels, outermost first, with scaling factors ``SF = (SF_0, ..., SF_{L-1})``
(``SF_l`` workers of level l inside each worker of level l-1). Global rank m has coordinates
``x_i = floor(m / prod_{j>i} SF_j) mod SF_i`` (Eq. 13): row-major over the levels.

Per-level domain sizes ``S = (S_0, ..., S_{L-1})`` (each a divisor of ``SF_l``) split every
coordinate into a *domain id* ``x_l // S_l`` and an *offset* ``x_l % S_l``.

Composition of levels (a gap in the paper, decided here): a rank's **expert domain** is the set
of ranks with the same domain id at *every* level (``prod S_l`` members); its **rail** is the set
of ranks with the same offset at every level (``prod SF_l / S_l`` members). The pair rule:

* ``ag``  -- a != b and, at every level where they differ, same domain id (-> same expert domain);
* ``a2a`` -- a != b and, at every level where they differ, same offset (-> same rail);
* ``None`` -- otherwise: no direct communication.

With a single level this is exactly Algorithm 1. With several levels it is the only composition
in which every token reaches every expert in one hop: the token of rank r for an expert owned by
rank o goes to the unique rank q with q's domain ids equal to o's and q's offsets equal to r's;
(r, q) is an ``a2a`` pair and (q, o) an ``ag`` pair, so q holds o's experts after the gather.

This module is the single source of group membership for the runtime.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import product

import numpy as np


def divisors(n: int) -> list[int]:
    """All positive divisors of n, ascending."""
    small, large = [], []
    i = 1
    while i * i <= n:
        if n % i == 0:
            small.append(i)
            if i != n // i:
                large.append(n // i)
        i += 1
    return small + large[::-1]


@dataclass(frozen=True)
class Topology:
    """Level names and scaling factors (outermost first)."""

    names: tuple[str, ...]
    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.counts) or not self.counts:
            raise ValueError("topology needs one name per level and at least one level")
        if any(c < 1 for c in self.counts):
            raise ValueError(f"level counts must be >= 1, got {self.counts}")

    @property
    def world_size(self) -> int:
        return math.prod(self.counts)

    @property
    def num_levels(self) -> int:
        return len(self.counts)

    @cached_property
    def all_coords(self) -> np.ndarray:
        """[rank, level]: every rank's coordinates (row-major over the levels; read-only)."""
        out = np.stack(np.unravel_index(np.arange(self.world_size), self.counts), axis=1)
        out.setflags(write=False)
        return out

    def coords(self, rank: int) -> tuple[int, ...]:
        """Coordinates of a global rank (Eq. 13)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} out of range 0..{self.world_size - 1}")
        out = []
        for i in range(self.num_levels):
            inner = math.prod(self.counts[i + 1:])
            out.append((rank // inner) % self.counts[i])
        return tuple(out)

    def rank(self, coords: Sequence[int]) -> int:
        """Inverse of :meth:`coords`."""
        r = 0
        for x, c in zip(coords, self.counts, strict=True):
            r = r * c + x
        return r

    def level_of_pair(self, a: int, b: int) -> int | None:
        """The coarsest level at which ranks a and b differ: the port their traffic crosses."""
        for lvl, (xa, xb) in enumerate(zip(self.coords(a), self.coords(b), strict=True)):
            if xa != xb:
                return lvl
        return None

    def ranks_per_worker(self, level: int) -> int:
        """Ranks inside one worker of ``level`` (n_l = prod_{j>l} SF_j)."""
        return math.prod(self.counts[level + 1:])

    def feasible_domain_sizes(self) -> list[tuple[int, ...]]:
        """Every combination of per-level domain sizes (divisors of each level's count)."""
        return list(product(*(divisors(c) for c in self.counts)))


@dataclass(frozen=True)
class Domains:
    """A topology partitioned into expert domains by per-level sizes."""

    topology: Topology
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.sizes) != self.topology.num_levels:
            raise ValueError(f"need one domain size per level ({self.topology.num_levels}), "
                             f"got {self.sizes}")
        for name, c, s in zip(self.topology.names, self.topology.counts, self.sizes, strict=True):
            if s < 1 or c % s:
                raise ValueError(f"domain size of level {name!r} must divide its count {c}; "
                                 f"allowed: {divisors(c)}, got {s}")

    @property
    def rail_factors(self) -> tuple[int, ...]:
        """R_l = SF_l / S_l: domains per level."""
        return tuple(c // s for c, s in zip(self.topology.counts, self.sizes, strict=True))

    @property
    def domain_size(self) -> int:
        """Members of one expert domain (all-gather group size)."""
        return math.prod(self.sizes)

    def exchange_chunks(self, chunks: int) -> int:
        """Chunks of the pipelined exchange (``moe.a2a_chunks``) in force for this partition: as
        configured when the rails cross the outermost level (the slow links the pipeline keeps
        busy in both directions), else 1 (a rail inside a DC exchanges once)."""
        return chunks if self.rail_factors[0] > 1 else 1

    @property
    def rail_size(self) -> int:
        """Members of one rail (all-to-all group size)."""
        return math.prod(self.rail_factors)

    @property
    def p(self) -> float:
        """Transmission proportion as the paper tabulates it: 1 - S_ED/G (share of all experts
        whose tokens travel by A2A). The paper's example labels plain EP as 1 (exactly 1 - 1/G)."""
        return 1.0 - self.domain_size / self.topology.world_size

    @property
    def p_volume(self) -> float:
        """The p of the paper's volume equations: V_A2A = p*D*(G-1)/G, V_AG = (1-p)*(G-1)*P_E.
        Equals (G - S_ED) / (G - 1)."""
        g = self.topology.world_size
        return 1.0 if g == 1 else (g - self.domain_size) / (g - 1)

    def domain_ids(self, rank: int) -> tuple[int, ...]:
        return tuple(x // s for x, s in zip(self.topology.coords(rank), self.sizes, strict=True))

    def offsets(self, rank: int) -> tuple[int, ...]:
        return tuple(x % s for x, s in zip(self.topology.coords(rank), self.sizes, strict=True))

    def pair_kind(self, a: int, b: int) -> str | None:
        """The pair rule: 'ag', 'a2a' or None (see module docstring)."""
        if a == b:
            return None
        ca, cb = self.topology.coords(a), self.topology.coords(b)
        same_domain = same_offset = True
        for xa, xb, s in zip(ca, cb, self.sizes, strict=True):
            if xa == xb:
                continue
            same_domain &= xa // s == xb // s
            same_offset &= xa % s == xb % s
        if same_domain:
            return "ag"
        if same_offset:
            return "a2a"
        return None

    @cached_property
    def _grid(self) -> np.ndarray:
        """Ranks as an array of shape (R_0, S_0, R_1, S_1, ...)."""
        shape = []
        for r, s in zip(self.rail_factors, self.sizes, strict=True):
            shape += [r, s]
        return np.arange(self.topology.world_size).reshape(shape)

    def _groups(self, fixed_axes: list[int], varying_axes: list[int]) -> list[list[int]]:
        arr = self._grid.transpose(fixed_axes + varying_axes)
        width = math.prod(arr.shape[len(fixed_axes):])
        return arr.reshape(-1, width).tolist()

    def domain_groups(self) -> list[list[int]]:
        """Expert domains (all-gather groups), each sorted by rank; member i has offset index i."""
        n = self.topology.num_levels
        return self._groups([2 * i for i in range(n)], [2 * i + 1 for i in range(n)])

    def rail_groups(self) -> list[list[int]]:
        """Rails (all-to-all groups), each sorted by rank; member i lies in domain index i."""
        n = self.topology.num_levels
        return self._groups([2 * i + 1 for i in range(n)], [2 * i for i in range(n)])

    def stage_groups(self, level: int) -> list[list[int]]:
        """Members of one domain that differ only in their offset at ``level`` (size S_level): the
        groups of one stage of the hierarchical expert gather. Member i has offset i at ``level``."""
        n = self.topology.num_levels
        vary = 2 * level + 1
        return self._groups([a for a in range(2 * n) if a != vary], [vary])

    def rail_stage_groups(self, level: int) -> list[list[int]]:
        """Members of one rail that differ only in their domain id at ``level`` (size R_level): the
        groups of one stage of the hierarchical token exchange. Member i has domain id i at ``level``."""
        n = self.topology.num_levels
        vary = 2 * level
        return self._groups([a for a in range(2 * n) if a != vary], [vary])

    def gather_levels(self) -> list[int]:
        """Levels whose domain size exceeds 1, outermost first: the stages of the expert gather."""
        return [lv for lv, s in enumerate(self.sizes) if s > 1]

    def rail_levels(self) -> list[int]:
        """Levels at which a rail has more than one member, outermost first: the levels the
        all-to-all crosses."""
        return [lv for lv, r in enumerate(self.rail_factors) if r > 1]

    def ag_shards_by_level(self) -> list[int]:
        """Expert shards one rank receives over level l in the hierarchical gather:
        (S_l - 1) * prod_{j<l} S_j. Outer levels move only single shards; what a rank received over
        an outer level is forwarded over the inner (faster) ones. Sum over levels = S_ED - 1."""
        return [(s - 1) * math.prod(self.sizes[:lv]) for lv, s in enumerate(self.sizes)]

    def domain_of(self, rank: int) -> list[int]:
        return self.domain_groups()[self.domain_index(rank)]

    def domain_index(self, rank: int) -> int:
        """Index of the rank's domain in :meth:`domain_groups` (row-major over domain ids)."""
        idx = 0
        for d, r in zip(self.domain_ids(rank), self.rail_factors, strict=True):
            idx = idx * r + d
        return idx

    def offset_index(self, rank: int) -> int:
        """Index of the rank's rail in :meth:`rail_groups` (row-major over offsets)."""
        idx = 0
        for o, s in zip(self.offsets(rank), self.sizes, strict=True):
            idx = idx * s + o
        return idx

    def a2a_pairs(self) -> int:
        """Ordered pairs that exchange tokens: G * (rail size - 1)."""
        return self.topology.world_size * (self.rail_size - 1)

    def ag_pairs(self) -> int:
        """Ordered pairs that exchange experts: G * (domain size - 1)."""
        return self.topology.world_size * (self.domain_size - 1)

    def peers_by_level(self, kind: str) -> list[int]:
        """For one rank: number of ``kind`` peers ('a2a' or 'ag') whose coarsest differing level is l.

        a2a: (R_l - 1) * prod_{j>l} R_j;  ag: (S_l - 1) * prod_{j>l} S_j.
        """
        per = self.rail_factors if kind == "a2a" else self.sizes
        return [(per[lv] - 1) * math.prod(per[lv + 1:]) for lv in range(len(per))]


def position_topology(topology: Topology, tp: int) -> Topology:
    """The topology of the EP positions: ``topology`` with its innermost count divided by ``tp``
    (position p = ranks ``p*tp .. p*tp+tp-1``)."""
    return Topology(topology.names, (*topology.counts[:-1], topology.counts[-1] // tp))
