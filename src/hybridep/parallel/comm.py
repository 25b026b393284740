"""The one place where the runtime issues collectives.

Every collective goes through :class:`Communicator`, which

* builds the process groups once, from the topology's group lists, each with the configured
  timeout (so a rank that stalls while alive becomes a named error, not a hang);
* counts the payload bytes each rank sends to each peer, per operation and per topology level
  (the coarsest level at which the two ranks differ -- the port the cost model charges), and
  the wall time of each operation (seconds);
* turns a failed collective into a :class:`CommunicationError` that names rank, operation and group;
* runs *chains* of blocking collectives (a hierarchical gather's stages, one after the other) on
  one background thread (:meth:`Communicator.in_background`), so a chain's inner stages go out the
  moment its outer stage lands instead of when this rank next reaches the layer: the calling
  thread waits only for the result (:meth:`Communicator.result`). Chains run one at a time, in
  submission order -- the same order on every rank, since every rank submits them in program
  order -- and use only groups the calling thread does not use meanwhile.

Seconds are the calling thread's: what it spends issuing, transferring or waiting; a background
chain's transfers count their bytes but not their time (the wait for its result counts).

Byte counts are *logical* payload: for an all-to-all the rows sent to each other member; for an
all-gather one shard to each other member; for a reduce-scatter each other member's shard. Split
size exchanges are counted under the operation ``"meta"``.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from hybridep.parallel.progress import ProgressLog
from hybridep.topology import Topology


class CommunicationError(RuntimeError):
    """A collective failed or timed out; the message names the rank, the operation and the group."""


@dataclass
class Traffic:
    """Counters of one rank. Bytes are payload bytes sent; seconds are wall time."""

    bytes_by_op_level: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    bytes_by_op_peer: dict[tuple[str, int], int] = field(default_factory=lambda: defaultdict(int))
    seconds_by_op: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls_by_op: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    record_outer_intervals: bool = False
    """Keep :attr:`outer_intervals` (off by default: the list grows with every cross-DC call)."""
    outer_intervals: list[tuple[float, float]] = field(default_factory=list)
    """(start, end) in seconds of the host's monotonic clock of every call that kept this rank busy
    in an operation whose group spans the outermost level (issue, blocking transfer or wait)."""
    record_spans: bool = False
    """Keep :attr:`spans`, this rank's timeline (``hybridep bench --trace``)."""
    spans: list[tuple[str, str, float, float]] = field(default_factory=list)
    """(track, name, start, end) of every call into the communicator (seconds of the host's monotonic
    clock): track ``comm`` on the training thread, ``comm (background)`` on the communication thread,
    and whatever the caller notes (:meth:`Communicator.note_span`)."""

    def reset(self) -> None:
        for d in (self.bytes_by_op_level, self.bytes_by_op_peer, self.seconds_by_op, self.calls_by_op):
            d.clear()
        self.outer_intervals.clear()
        self.spans.clear()

    def bytes_by_level(self, ops: Sequence[str] | None = None) -> dict[str, int]:
        """Bytes sent over each topology level by the operation families ``ops`` (None = all)."""
        return _sum_over_ops(self.bytes_by_op_level, ops)

    def bytes_by_peer(self, ops: Sequence[str] | None = None) -> dict[int, int]:
        """Bytes sent to each peer rank by the operation families ``ops`` (None = all)."""
        return _sum_over_ops(self.bytes_by_op_peer, ops)

    def to_dict(self) -> dict:
        return {
            "bytes_by_op_level": {f"{op}/{lv}": b for (op, lv), b in self.bytes_by_op_level.items()},
            "bytes_by_peer": {str(k): v for k, v in self.bytes_by_peer().items()},
            "seconds_by_op": dict(self.seconds_by_op),
            "calls_by_op": dict(self.calls_by_op),
        }


def _sum_over_ops(counter: dict, ops: Sequence[str] | None) -> dict:
    """``{key: bytes}`` from an ``{(op, key): bytes}`` counter, summed over the ops in ``ops``."""
    out: dict = defaultdict(int)
    for (op, key), b in counter.items():
        if ops is None or op in ops:
            out[key] += b
    return dict(out)


def union_seconds(intervals: Sequence[tuple[float, float]]) -> float:
    """Seconds covered by at least one of the (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def op_kind(op: str) -> str:
    """Operation family for accounting: 'a2a', 'ag', 'rs', 'meta', ... (suffixes like '_bwd' dropped)."""
    return op.split("_", 1)[0]


def _chunks(inp: torch.Tensor, splits: Sequence[int]) -> list[torch.Tensor]:
    """``inp`` cut into consecutive row blocks of the given sizes."""
    return list(torch.split(inp, list(splits)))


class Requests:
    """In-flight point-to-point requests as one work handle: ``wait()`` waits for all of them."""

    def __init__(self, reqs: list):
        self.reqs = reqs

    def wait(self) -> None:
        for req in self.reqs:
            req.wait()


class _Background:
    """One daemon thread running submitted functions one at a time, in submission order."""

    def __init__(self, device: torch.device | None):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.device = device
        self.thread = threading.Thread(target=self._loop, name="hybridep-comm", daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[[], object]) -> Future:
        future: Future = Future()
        self.jobs.put((future, fn))
        return future

    def _loop(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        while True:
            future, fn = self.jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as err:  # handed to the waiting thread
                future.set_exception(err)


class Pending:
    """The result of a background chain: ``wait()`` returns it (the wait is timed under ``op``)."""

    def __init__(self, comm: Communicator, future: Future, op: str, ranks: Sequence[int]):
        self.comm, self.future, self.op, self.ranks = comm, future, op, ranks

    def wait(self):
        return self.comm.result(self.future, self.op, self.ranks)


class Communicator:
    """Process groups of one topology and counted, timed, error-wrapped collectives."""

    def __init__(self, topology: Topology, timeout_s: float = 300.0, a2a_impl: str = "p2p",
                 parent: Communicator | None = None):
        if not dist.is_initialized():
            raise CommunicationError("torch.distributed is not initialised: call init_process_group first")
        self.topology = topology
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        if self.world_size != topology.world_size:
            raise CommunicationError(f"the topology has {topology.world_size} ranks but the job has "
                                     f"{self.world_size}")
        if a2a_impl not in ("p2p", "collective"):
            raise ValueError(f"a2a_impl must be 'p2p' or 'collective', got {a2a_impl!r}")
        self.a2a_impl = a2a_impl
        self.timeout = timedelta(seconds=timeout_s)
        self.traffic = parent.traffic if parent is not None else Traffic()
        self._groups: dict[tuple[int, ...], object] = {}
        self._level = [topology.level_of_pair(self.rank, p) if p != self.rank else topology.num_levels
                       for p in range(self.world_size)]
        self._level_name = [topology.names[lv] if lv < topology.num_levels else "self" for lv in self._level]
        self._lock = threading.Lock()
        self._background: _Background | None = None
        self.progress = parent.progress if parent is not None else ProgressLog.from_environment(self.rank)
        """Where this rank is in its calls, for the launcher to name a stalled rank (see progress.py)."""

    def sibling(self) -> Communicator:
        """A communicator over the same ranks with process groups of its own, counting into the same
        :attr:`traffic` and progress log: for collectives issued from another thread (DDP's hooks)
        on the same rank sets as this one's, which must not share a gloo group with them."""
        return Communicator(self.topology, self.timeout.total_seconds(), self.a2a_impl, parent=self)

    # --- background chains ----------------------------------------------------------------
    def in_background(self, fn: Callable[[], object]) -> Future:
        """Run ``fn`` (blocking collectives on groups this thread leaves alone meanwhile) on the
        background thread, after every chain submitted before it; returns its future."""
        if self._background is None:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
            self._background = _Background(device)
        return self._background.submit(fn)

    def quiesce(self) -> None:
        """Wait until every background chain submitted so far has finished (before counters are
        reset, so that a chain in flight is counted wholly before or wholly after)."""
        if self._background is not None:
            self.result(self._background.submit(lambda: None), "quiesce", [self.rank])

    def result(self, future: Future, op: str, ranks: Sequence[int]):
        """Wait for a background chain's result, timing the wait under ``op``; its failure (or no
        result within the groups' timeout and a minute) becomes a :class:`CommunicationError`."""
        start = time.perf_counter()
        try:
            out = future.result(timeout=self.timeout.total_seconds() + 60.0)
        except FutureTimeout:
            raise CommunicationError(f"rank {self.rank}: {op} in group {list(ranks)} gave no result within "
                                     f"{self.timeout.total_seconds() + 60.0:.0f} s") from None
        except Exception as err:
            if isinstance(err, CommunicationError):
                raise
            raise CommunicationError(
                f"rank {self.rank}: {op} in group {list(ranks)} failed ({type(err).__name__}): {err}. "
                "Another rank probably failed or stalled; see its output.") from err
        end = time.perf_counter()
        self._add_seconds(op, end - start)
        self.note_span(f"{op} (wait)", start, end)
        return out

    def _on_background_thread(self) -> bool:
        return self._background is not None and threading.current_thread() is self._background.thread

    def _add_seconds(self, op: str, seconds: float) -> None:
        """Count ``seconds`` under ``op``'s family, unless spent on the background thread."""
        if self._on_background_thread():
            return
        with self._lock:
            self.traffic.seconds_by_op[op_kind(op)] += seconds

    def create_groups(self, groups: Sequence[Sequence[int]]) -> None:
        """Create process groups for a partition of the ranks. Every rank must call this with the
        same lists in the same order (torch.distributed requires it)."""
        for ranks in groups:
            key = tuple(sorted(ranks))
            if len(key) > 1 and key not in self._groups:
                self._groups[key] = dist.new_group(list(key), timeout=self.timeout)

    def group(self, ranks: Sequence[int]):
        key = tuple(ranks)
        if len(key) == 1:
            return None
        try:
            return self._groups[key]
        except KeyError:
            raise CommunicationError(f"rank {self.rank}: no process group for ranks {list(key)}; "
                                     "create_groups was not called for it") from None

    def _record(self, op: str, ranks: Sequence[int], bytes_to_each: Sequence[int], seconds: float) -> None:
        tr = self.traffic
        kind = op_kind(op)
        with self._lock:
            for peer, b in zip(ranks, bytes_to_each, strict=True):
                if peer == self.rank or b == 0:
                    continue
                tr.bytes_by_op_level[(kind, self._level_name[peer])] += b
                tr.bytes_by_op_peer[(kind, peer)] += b
            tr.calls_by_op[kind] += 1
        self._add_seconds(op, seconds)

    def _run(self, op: str, ranks: Sequence[int], fn):
        start = time.perf_counter()
        if self.progress is not None:
            self.progress.enter(op, ranks)
        try:
            work = fn()
        except Exception as err:  # gloo/NCCL raise RuntimeError subclasses; keep the cause
            raise CommunicationError(
                f"rank {self.rank}: {op} in group {list(ranks)} failed ({type(err).__name__}): {err}. "
                "Another rank probably failed or stalled; see its output.") from err
        if self.progress is not None:  # a failed call stays "inside": that is where this rank waited
            self.progress.leave(ranks)
        end = time.perf_counter()
        self.note_outer_interval(ranks, start, end)
        self.note_span(op, start, end)
        return work, end - start

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int],
                   ranks: Sequence[int], op: str = "a2a") -> None:
        """Uneven all-to-all of rows within ``ranks`` (sorted); splits are row counts per member."""
        self._all_to_all(out, inp, out_splits, in_splits, ranks, op, blocking=True)

    def all_to_all_start(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int],
                         ranks: Sequence[int], op: str = "a2a"):
        """Issue :meth:`all_to_all` and return its work handle (None when nothing travels) for
        :meth:`wait`; ``inp`` and ``out`` must stay untouched until then."""
        return self._all_to_all(out, inp, out_splits, in_splits, ranks, op, blocking=False)

    def _all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int],
                    ranks: Sequence[int], op: str, blocking: bool):
        """One all-to-all call: issued, and waited for when ``blocking`` (returns the work handle
        otherwise); bytes counted at the issue."""
        if len(ranks) == 1:
            out.copy_(inp)
            return None
        row = inp.shape[1:].numel() * inp.element_size()

        def issue():
            if self.a2a_impl == "p2p":
                work = Requests(self._p2p_start(out, out_splits, _chunks(inp, in_splits), ranks))
            else:
                work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group(ranks),
                                              async_op=True)
            if blocking:
                work.wait()
            return work

        work, secs = self._run(op, ranks, issue)
        self._record(op, ranks, [s * row for s in in_splits], secs)
        return None if blocking else work

    def _p2p_start(self, out: torch.Tensor, out_splits: list[int], sends: Sequence[torch.Tensor],
                   ranks: Sequence[int]) -> list:
        """Start receiving member i's rows into the i-th ``out_splits`` part of ``out`` and sending
        ``sends[i]`` to member i (our own part is copied). Returns the requests.

        Every receive is posted before any send: gloo's sender waits until the receiver has posted,
        and a receiver's notice travels on the same connection as its own outgoing data, so posting
        a send first can queue that notice behind megabytes of data -- one direction of a DC link
        then idles until the other's transfer ends (measured: the two directions of each exchange
        ran one after the other). The slowest (outermost) links go first, so every cross-DC
        transfer is in flight from the start."""
        out_off = [0, *itertools.accumulate(out_splits)]
        me = ranks.index(self.rank)
        out[out_off[me]:out_off[me + 1]].copy_(sends[me].reshape(-1, *out.shape[1:]))
        peers = [i for i, r in enumerate(ranks) if r != self.rank]
        return self._issue([(out[out_off[i]:out_off[i + 1]], ranks[i], 0) for i in peers],
                           [(sends[i], ranks[i], 0) for i in peers], ranks)

    def _issue(self, recvs: Sequence[tuple[torch.Tensor, int, int]], sends: Sequence[tuple[torch.Tensor, int, int]],
               ranks: Sequence[int]) -> list:
        """Issue ``(buffer, peer, tag)`` receives, then sends, each outermost peer first (empty ones
        skipped), in the group ``ranks``; returns the requests (see :meth:`_p2p_start`)."""
        group = self.group(ranks)

        def level(item: tuple[torch.Tensor, int, int]) -> int:
            return self._level[item[1]]

        ops = [dist.P2POp(dist.irecv, buf, peer, group, tag) for buf, peer, tag in sorted(recvs, key=level)
               if buf.numel()]
        ops += [dist.P2POp(dist.isend, buf.contiguous(), peer, group, tag)
                for buf, peer, tag in sorted(sends, key=level) if buf.numel()]
        return dist.batch_isend_irecv(ops) if ops else []

    def post(self, recvs: Sequence[tuple[torch.Tensor, int, int]], sends: Sequence[tuple[torch.Tensor, int, int]],
             ranks: Sequence[int], op: str) -> Requests:
        """Post tagged point-to-point transfers inside the group ``ranks``: ``(buffer, peer, tag)``
        receives first, then sends, outermost peers first (see :meth:`_p2p_start`); counts the sent
        bytes under ``op``. Transfers with the same peer and tag are matched in posting order."""
        reqs, secs = self._run(op, ranks, lambda: self._issue(recvs, sends, ranks))
        sent = dict.fromkeys(ranks, 0)
        for buf, peer, _ in sends:
            sent[peer] += buf.numel() * buf.element_size()
        self._record(op, ranks, [sent[r] for r in ranks], secs)
        return Requests(reqs)

    def note_span(self, name: str, start: float, end: float, track: str | None = None) -> None:
        """Add ``[start, end]`` (``time.perf_counter`` seconds) to this rank's timeline when spans are
        being recorded; ``track`` defaults to the calling thread's (``comm`` or ``comm (background)``)."""
        if self.traffic.record_spans:
            if track is None:
                track = "comm (background)" if self._on_background_thread() else "comm"
            with self._lock:
                self.traffic.spans.append((track, name, start, end))

    def note_outer_interval(self, ranks: Sequence[int], start: float, end: float) -> None:
        """Record ``[start, end]`` (``time.perf_counter`` seconds) as time in a cross-DC exchange
        when ``ranks`` span the outermost level and intervals are being recorded."""
        if self.traffic.record_outer_intervals and min(self._level[r] for r in ranks) == 0:
            self.traffic.outer_intervals.append((start, end))

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, ranks: Sequence[int], op: str = "ag") -> None:
        """All-gather of equal shards into ``out`` (member order)."""
        if len(ranks) == 1:
            out.copy_(inp)
            return
        if self.a2a_impl == "p2p":  # direct transfers, receives first (see _p2p_start)
            n = len(ranks)
            _, secs = self._run(op, ranks, lambda: Requests(
                self._p2p_start(out.view(n, -1), [1] * n, [inp] * n, ranks)).wait())
        else:
            _, secs = self._run(op, ranks, lambda: dist.all_gather_single(out, inp, group=self.group(ranks)))
        self._record(op, ranks, [inp.numel() * inp.element_size()] * len(ranks), secs)

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, ranks: Sequence[int], op: str = "rs") -> None:
        """Sum-reduce-scatter of ``inp`` (flat, member-major) into this member's shard ``out``.

        Done as one all-to-all of the shards plus a local sum: each member's shard crosses each link
        exactly once (gloo's own reduce-scatter moves about twice that).
        """
        if len(ranks) == 1:
            out.copy_(inp)
            return
        n = len(ranks)
        recv = inp.new_empty(inp.numel())
        split = [out.numel()] * n
        self.all_to_all(recv, inp, split, split, ranks, op)
        torch.sum(recv.view(n, -1), dim=0, out=out)

    def all_reduce(self, tensor: torch.Tensor, ranks: Sequence[int], op: str = "allreduce",
                   async_op: bool = False):
        """Sum-all-reduce in place; counted as the ring's 2 (n-1)/n of the tensor to each neighbour."""
        if len(ranks) == 1:
            return None
        work, secs = self._run(op, ranks, lambda: dist.all_reduce(tensor, group=self.group(ranks), async_op=async_op))
        self.count_allreduce(tensor, ranks, op, secs)
        return work

    def count_allreduce(self, tensor: torch.Tensor, ranks: Sequence[int], op: str, seconds: float = 0.0) -> None:
        """Count an all-reduce of ``tensor`` over ``ranks`` as a ring's: 2 (n-1)/n of its bytes to the
        next member (one issued elsewhere too, e.g. DDP's own)."""
        n = len(ranks)
        share = int(2 * (n - 1) * tensor.numel() * tensor.element_size() / n)
        me = list(ranks).index(self.rank)
        self._record(op, ranks, [share if i == (me + 1) % n else 0 for i in range(n)], seconds)

    def wait(self, work, op: str, ranks: Sequence[int]) -> None:
        """Wait for an asynchronous collective, timing the wait."""
        if work is None:
            return
        _, secs = self._run(op, ranks, lambda: work.wait())
        self._add_seconds(op, secs)


class RankView:
    """A :class:`Communicator` seen from inside one of several alike rank sets (``families``: a
    partition of the ranks into equal, sorted lists -- TED's expert-parallel groups, one per TP
    index): member i of this rank's set is rank i here, so a strategy written for a world of
    ``len(set)`` ranks runs unchanged on it. Every call goes to the communicator with the ranks
    translated (counted and timed there, per topology level); process groups are created for the
    corresponding ranks of every set, as torch.distributed wants every rank to create each group."""

    def __init__(self, comm: Communicator, families: Sequence[Sequence[int]]):
        mine = [list(f) for f in families if comm.rank in f]
        if len(mine) != 1 or len({len(f) for f in families}) != 1:
            raise ValueError(f"families must be equal-sized rank sets, rank {comm.rank} in exactly one")
        self.base, self.families, self.members = comm, [list(f) for f in families], mine[0]
        self.rank, self.world_size = self.members.index(comm.rank), len(self.members)

    def __getattr__(self, name: str):  # counters, spans, background thread: the communicator's own
        return getattr(self.base, name)

    def _ranks(self, ranks: Sequence[int]) -> list[int]:
        return [self.members[r] for r in ranks]

    def create_groups(self, groups: Sequence[Sequence[int]]) -> None:
        self.base.create_groups([[f[r] for r in g] for f in self.families for g in groups])

    def group(self, ranks: Sequence[int]):
        return self.base.group(self._ranks(ranks))

    def all_to_all(self, out, inp, out_splits, in_splits, ranks, op="a2a") -> None:
        self.base.all_to_all(out, inp, out_splits, in_splits, self._ranks(ranks), op)

    def all_to_all_start(self, out, inp, out_splits, in_splits, ranks, op="a2a"):
        return self.base.all_to_all_start(out, inp, out_splits, in_splits, self._ranks(ranks), op)

    def post(self, recvs, sends, ranks, op) -> Requests:
        def peer(items):
            return [(buf, self.members[p], tag) for buf, p, tag in items]
        return self.base.post(peer(recvs), peer(sends), self._ranks(ranks), op)

    def note_outer_interval(self, ranks, start, end) -> None:
        self.base.note_outer_interval(self._ranks(ranks), start, end)

    def all_gather(self, out, inp, ranks, op="ag") -> None:
        self.base.all_gather(out, inp, self._ranks(ranks), op)

    def reduce_scatter(self, out, inp, ranks, op="rs") -> None:
        self.base.reduce_scatter(out, inp, self._ranks(ranks), op)

    def all_reduce(self, tensor, ranks, op="allreduce", async_op=False):
        return self.base.all_reduce(tensor, self._ranks(ranks), op, async_op)

    def count_allreduce(self, tensor, ranks, op, seconds=0.0) -> None:
        self.base.count_allreduce(tensor, self._ranks(ranks), op, seconds)

    def wait(self, work, op, ranks) -> None:
        self.base.wait(work, op, self._ranks(ranks))

    def result(self, future, op, ranks):
        return self.base.result(future, op, self._ranks(ranks))
