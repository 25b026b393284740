"""Flow-level (fluid) network simulation with max-min fair bandwidth sharing.

Units: bytes, seconds, bytes/s. A *link* is one direction of one port (capacity in bytes/s).
A *flow class* is a set of ``count`` identical flows of ``size`` bytes each that, by symmetry,
always run at the same rate; it says how many of its flows cross each link:

* real entries ``(class, link, k)``: link ``link`` carries ``k`` of the class's flows;
* broadcast entries ``(class, group, k)``: every link of the link group carries ``k`` flows of
  the class on average (a mean-field fold over symmetric senders or receivers; see
  :mod:`hybridep.sim.iteration`).

Rates are max-min fair (progressive filling): all unfrozen flows grow at the same speed until a
link saturates; the flows crossing it freeze. A flow finishes its transmission when its bytes are
sent and is *delivered* ``latency`` seconds later (per-message latency, paid once per flow).

Classes are added in :class:`Batch` es, each with a per-class release time and callbacks run when
classes are delivered; the :class:`Engine` is a discrete-event loop over releases, completions
and timers, so transfers of different streams (all-to-all, prefetched gathers, reduce-scatters,
gradient sync) contend for the same links.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

_REL = 1e-9  # relative tolerance for "finished" and "saturated"


@dataclass(eq=False)
class Batch:
    """Flow classes released together by one collective (or one phase of it)."""

    op: str
    """Operation label (``a2a``, ``ag``, ``rs``, ``allreduce``) for byte accounting and traces."""
    size: np.ndarray
    """Bytes of one flow, per class."""
    count: np.ndarray
    """Number of flows, per class."""
    latency: np.ndarray
    """Delivery delay after transmission (seconds), per class."""
    release: np.ndarray
    """Absolute release time (seconds), per class."""
    entries: tuple[np.ndarray, np.ndarray, np.ndarray]
    """(class, link, flows on that link) for real links."""
    group_entries: tuple[np.ndarray, np.ndarray, np.ndarray] = field(
        default_factory=lambda: (np.zeros(0, int), np.zeros(0, int), np.zeros(0)))
    """(class, link group, flows on every link of the group)."""
    cost: np.ndarray | None = None
    """Link capacity one byte of a class uses, per class (1 / the operation's efficiency; None = 1):
    it slows the class down without changing the bytes it carries."""
    on_delivered: Callable[[np.ndarray, float], None] | None = None
    """Called with the indices of classes delivered at a time (once per distinct time)."""
    on_all_delivered: Callable[[float], None] | None = None
    on_sent: Callable[[np.ndarray, float], None] | None = None
    """Called with the indices of classes whose last byte left at a time (before their latency)."""
    label: str = ""

    def __post_init__(self) -> None:
        n = len(self.size)
        self.remaining = np.asarray(self.size, dtype=float).copy()
        self.rate = np.zeros(n)
        self.state = np.zeros(n, dtype=np.int8)  # 0 pending, 1 sending, 2 sent, 3 delivered
        self.release = np.asarray(self.release, dtype=float).copy()
        self.done_at = float("nan")

    @property
    def classes(self) -> int:
        return len(self.size)


class Engine:
    """Discrete-event fluid simulator over a fixed set of links."""

    def __init__(self, capacity: np.ndarray, link_group: np.ndarray, groups: int, coalesce: float = 0.0,
                 coalesce_min_classes: int = 256):
        self.capacity = np.asarray(capacity, dtype=float)
        self.link_group = np.asarray(link_group, dtype=int)
        """Group of every link (-1: none)."""
        self.groups = groups
        self.coalesce = coalesce
        """In batches of at least ``coalesce_min_classes`` classes, classes due to finish within
        ``coalesce`` x (time since the batch's first release) of a completion finish with it
        (fewer events under skewed routing; 0 = exact)."""
        self.coalesce_min_classes = coalesce_min_classes
        self.now = 0.0
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._batches: list[Batch] = []
        self._dirty = True
        self.link_bytes: dict[str, np.ndarray] = {}
        """Bytes carried per link, by operation label (integrated transmission)."""
        self.events = 0
        self._grouped = self.link_group >= 0

    # ------------------------------------------------------------------ scheduling
    def at(self, t: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` at absolute time ``t`` (not before now)."""
        heapq.heappush(self._timers, (max(t, self.now), next(self._seq), fn))

    def submit(self, batch: Batch) -> Batch:
        """Add a batch; its classes start sending at their release times."""
        if batch.classes == 0:
            batch.done_at = self.now
            if batch.on_all_delivered:
                self.at(self.now, lambda: batch.on_all_delivered(self.now))
            return batch
        self._batches.append(batch)
        self.link_bytes.setdefault(batch.op, np.zeros(len(self.capacity)))
        for t in np.unique(batch.release[np.isfinite(batch.release)]):
            self.at(float(t), self._release_due)
        return batch

    def release_at(self, batch: Batch, idx: np.ndarray, times: np.ndarray) -> None:
        """Set the release times of classes submitted with an infinite (not yet known) one."""
        batch.release[idx] = times
        for t in np.unique(times):
            self.at(float(t), self._release_due)

    def _release_due(self) -> None:
        for b in self._batches:
            due = (b.state == 0) & (b.release <= self.now * (1 + _REL) + 1e-15)
            if due.any():
                b.state[due] = 1
                zero = due & (b.remaining <= 0)
                if zero.any():
                    self._sent(b, np.flatnonzero(zero))
                self._dirty = True

    # ------------------------------------------------------------------ rates
    def _recompute_rates(self) -> None:
        """Max-min fair rates by progressive filling."""
        unfrozen = [(b.state == 1).astype(float) for b in self._batches]
        for b in self._batches:
            b.rate[:] = 0.0
        residual = self.capacity.copy()
        while any(u.any() for u in unfrozen):
            coef = sum(self._link_load(b, u if b.cost is None else u * b.cost)
                       for b, u in zip(self._batches, unfrozen, strict=True))
            used = coef > 0
            if not used.any():
                raise RuntimeError("a sending flow class crosses no link")
            inc = float(np.min(residual[used] / coef[used]))
            for b, u in zip(self._batches, unfrozen, strict=True):
                b.rate += inc * u
            residual -= coef * inc
            sat = used & (residual <= _REL * self.capacity)
            gsat = np.zeros(self.groups, dtype=bool)
            sat_groups = self.link_group[sat]
            gsat[sat_groups[sat_groups >= 0]] = True
            for b, u in zip(self._batches, unfrozen, strict=True):
                c, link, _ = b.entries
                hit = c[sat[link]]
                c, grp, _ = b.group_entries
                hit = np.concatenate([hit, c[gsat[grp]]])
                u[hit] = 0.0
        self._dirty = False

    def _link_load(self, b: Batch, per_flow: np.ndarray) -> np.ndarray:
        """Per-link sum of ``per_flow`` (a rate or a byte count of one flow, per class) over the
        flows each link carries."""
        n = len(self.capacity)
        c, link, k = b.entries
        out = np.bincount(link, weights=k * per_flow[c], minlength=n) if len(c) else np.zeros(n)
        c, grp, k = b.group_entries
        if len(c):
            g = np.bincount(grp, weights=k * per_flow[c], minlength=self.groups)
            out[self._grouped] += g[self.link_group[self._grouped]]
        return out

    # ------------------------------------------------------------------ completion
    def _sent(self, b: Batch, idx: np.ndarray) -> None:
        left = np.zeros(b.classes)
        left[idx] = b.remaining[idx]
        if left.any():  # bytes of classes completed early by coalescing still cross their links
            self.link_bytes[b.op] += self._link_load(b, left)
        b.state[idx] = 2
        b.remaining[idx] = 0.0
        b.rate[idx] = 0.0
        if b.on_sent is not None:
            b.on_sent(idx, self.now)
        for lat in np.unique(b.latency[idx]):
            sub = idx[b.latency[idx] == lat]
            self.at(self.now + float(lat), lambda b=b, sub=sub: self._deliver(b, sub))

    def _deliver(self, b: Batch, idx: np.ndarray) -> None:
        b.state[idx] = 3
        if b.on_delivered:
            b.on_delivered(idx, self.now)
        if (b.state == 3).all():
            b.done_at = self.now
            self._batches.remove(b)
            self._dirty = True
            if b.on_all_delivered:
                b.on_all_delivered(self.now)

    def run(self, until: float = float("inf")) -> float:
        """Advance until nothing is left to do; returns the time of the last event."""
        while True:
            if self._dirty:
                self._recompute_rates()
            t_next = self._timers[0][0] if self._timers else float("inf")
            t_done = float("inf")
            for b in self._batches:
                sending = (b.state == 1) & (b.rate > 0)
                if sending.any():
                    t_done = min(t_done, self.now + float(np.min(b.remaining[sending] / b.rate[sending])))
            t = min(t_next, t_done)
            if t == float("inf") or t > until:
                return self.now
            self._advance(t)
            if t_done <= t_next:
                for b in list(self._batches):
                    sending = b.state == 1
                    done = sending & (b.remaining <= _REL * np.maximum(b.size, 1.0))
                    if self.coalesce > 0 and b.classes >= self.coalesce_min_classes:
                        started = float(b.release[sending].min()) if sending.any() else self.now
                        window = self.coalesce * max(self.now - started, 0.0)
                        with np.errstate(divide="ignore", invalid="ignore"):
                            done |= sending & (b.rate > 0) & (b.remaining / b.rate <= window)
                    if done.any():
                        self._sent(b, np.flatnonzero(done))
                        self._dirty = True
            while self._timers and self._timers[0][0] <= self.now:
                _, _, fn = heapq.heappop(self._timers)
                fn()
            self.events += 1

    def _advance(self, t: float) -> None:
        dt = t - self.now
        if dt > 0:
            for b in self._batches:
                if (b.rate > 0).any():
                    b.remaining = np.maximum(b.remaining - b.rate * dt, 0.0)
                    self.link_bytes[b.op] += self._link_load(b, b.rate) * dt
        self.now = t
