"""Run a function on N local processes joined by torch.distributed, with failure propagation.

:func:`run_local` starts one process per rank (gloo on 127.0.0.1, or NCCL when asked), collects
each rank's return value, and if any rank raises, dies or the whole run exceeds ``timeout_s``,
stops all the others and raises :class:`RankFailedError` naming the rank and its error.
Inside an existing ``torchrun`` job use :func:`init_from_torchrun` instead.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hybridep.parallel.progress import PROGRESS_DIR_ENV, diagnose


class RankFailedError(RuntimeError):
    """A rank of a local run failed; ``rank`` is the first rank that failed (None for a timeout)."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, backend, timeout_s, args, out, progress_dir) -> None:
    torch.set_num_threads(1)
    os.environ[PROGRESS_DIR_ENV] = progress_dir  # where this rank's communicator notes its calls
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=timeout_s))
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        result = fn(rank, world, *args)
        out.put((rank, True, result))
    except BaseException as err:  # report everything, including KeyboardInterrupt
        out.put((rank, False, f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
        out.close()
        out.join_thread()  # deliver the message before leaving
        os._exit(1)  # do not wait for peers that may be blocked
    try:
        dist.destroy_process_group()
    except Exception:
        pass


def secondary(msg: str) -> bool:
    """Whether a rank's error is a consequence of another rank's: its collective broke (through the
    communicator, or a peer's connection closed under a direct collective)."""
    return "CommunicationError" in msg or "Connection closed by peer" in msg or "Connection reset by peer" in msg


def died(exitcode: int | None) -> str:
    """A rank's death with no report of its own: ``died with exit code N`` (and the signal's name)."""
    if exitcode is not None and exitcode < 0:
        return f"died with exit code {exitcode} (killed by {signal.Signals(-exitcode).name})"
    return f"died with exit code {exitcode}"


def _dead(procs: list, results: dict) -> list[int]:
    """Ranks whose process ended with a non-zero code and no result."""
    return [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]


def root_cause(errors: dict[int, str]) -> RankFailedError:
    """The failure to report: a rank that failed on its own, not one whose collective broke."""
    rank = min(errors, key=lambda r: (secondary(errors[r]), r))
    others = "; ".join(f"rank {r}: {errors[r].splitlines()[0]}" for r in sorted(errors) if r != rank)
    tail = f"\n(then also failed: {others})" if others else ""
    return RankFailedError(f"rank {rank} failed: {errors[rank]}{tail}", rank)


def stalled_or(failure: RankFailedError, progress_dir: str | Path | None, world: int) -> RankFailedError:
    """``failure``, or -- when the ranks' progress files show a rank that never reached a call the
    others waited in (:func:`~hybridep.parallel.progress.diagnose`) -- an error that names that rank
    first, with ``failure`` after it."""
    found = diagnose(progress_dir, world)
    if found is None:
        return failure
    rank, why = found
    return RankFailedError(f"{why}\n(what the ranks reported: {failure})", rank)


def run_local(fn: Callable[..., Any], world_size: int, args: tuple = (), timeout_s: float = 300.0,
              backend: str = "gloo", collective_timeout_s: float | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return the results by rank.

    ``fn`` must be importable (a module-level function). ``collective_timeout_s`` is the
    process-group timeout of each rank (default: ``timeout_s``).
    """
    with tempfile.TemporaryDirectory(prefix="hybridep-progress-") as progress_dir:
        return _run_local(fn, world_size, args, timeout_s, backend, collective_timeout_s or timeout_s, progress_dir)


def _run_local(fn, world_size: int, args: tuple, timeout_s: float, backend: str, ct: float,
               progress_dir: str) -> list[Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, backend, ct, args, out, progress_dir),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    failure: RankFailedError | None = None
    finished = False
    try:
        dead: list[int] = []
        while len(results) < world_size and not errors and not dead:
            try:
                rank, ok, payload = out.get(timeout=0.2)
            except queue.Empty:
                dead = _dead(procs, results)
                if not dead and time.monotonic() > deadline:
                    missing = [r for r in range(world_size) if r not in results]
                    failure = stalled_or(RankFailedError(f"local run timed out after {timeout_s:.0f} s; ranks "
                                                         f"{missing} did not finish"), progress_dir, world_size)
                    break
                continue
            if ok:
                results[rank] = payload
            else:
                errors[rank] = payload
        if errors or dead:
            # collect the other ranks' reports for a moment: the root cause may arrive second
            grace = time.monotonic() + 3.0
            while time.monotonic() < grace and len(errors) + len(results) < world_size:
                try:
                    rank, ok, payload = out.get(timeout=0.2)
                except queue.Empty:
                    continue
                if ok:
                    results[rank] = payload
                else:
                    errors[rank] = payload
            for r in _dead(procs, results):  # died without a word (killed): that is the cause
                errors.setdefault(r, died(procs[r].exitcode))
            failure = root_cause(errors)
            if all(secondary(msg) for msg in errors.values()):  # nobody failed on its own: who stalled?
                failure = stalled_or(failure, progress_dir, world_size)
        finished = True
    finally:
        # a clean finish lets the ranks leave on their own; a failure or an interruption (a signal
        # unwinding the caller) stops them at once
        for p in procs:
            p.join(timeout=10.0 if finished and failure is None else 0.5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
    if failure is not None:
        raise failure
    return [results[r] for r in range(world_size)]


def leave(code: int) -> NoReturn:
    """End this rank's process now with ``code`` (a torchrun rank, a bench rank), its output flushed,
    skipping the interpreter's teardown: after the work is done and the groups destroyed, threads
    left from gloo and the communicator's daemon thread could still abort the process there
    ('terminate called without an active exception': 1 in 15 runs of ``hybridep verify`` under
    torchrun on busy cores, 0 in 30 with this exit)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def init_from_torchrun(backend: str = "gloo", timeout_s: float = 300.0) -> tuple[int, int]:
    """Initialise torch.distributed from the variables torchrun sets; returns (rank, world size)."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"not inside a torchrun job: {', '.join(missing)} not set")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()
