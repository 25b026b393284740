"""Where each rank is in its collectives, so that a launcher can name the rank that stalled.

Every call the communicator issues on a group is numbered per group (all members make the same
calls on a group in the same order). A rank keeps its position -- per group: the number of calls
entered, the last one's name, whether it is still inside it, and when it entered or left -- in a
small file of its own in a folder the launcher gives (``PROGRESS_DIR_ENV``; our launchers set it,
as torchrun sets ``RANK``). When a run fails or times out, :func:`diagnose` reads every rank's file:
a member of a group whose other members wait inside call n, which has entered fewer than n calls
there and is not waiting in one itself, is the rank that did not arrive. Writing costs one
``pwrite`` per call entry and exit. Under torchrun (ranks on other hosts, no shared folder) only the
waiting ranks' own errors name the group and the call.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

PROGRESS_DIR_ENV = "HYBRIDEP_PROGRESS_DIR"
"""Folder of the rank progress files, set by our launchers for their ranks."""


class ProgressLog:
    """One rank's position in its groups, rewritten in place at every call entry and exit."""

    def __init__(self, directory: str | Path, rank: int):
        self.path = Path(directory) / f"rank{rank}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        self._groups: dict[str, list] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_environment(cls, rank: int) -> ProgressLog | None:
        directory = os.environ.get(PROGRESS_DIR_ENV)
        return cls(directory, rank) if directory else None

    def enter(self, op: str, ranks: Sequence[int]) -> None:
        """This rank enters its next call ``op`` on group ``ranks``."""
        with self._lock:
            entry = self._groups.setdefault(_key(ranks), [0, "", False, 0.0])
            entry[:] = [entry[0] + 1, op, True, time.time()]
            self._write()

    def leave(self, ranks: Sequence[int]) -> None:
        """This rank's call on group ``ranks`` returned (or raised)."""
        with self._lock:
            entry = self._groups.get(_key(ranks))
            if entry is not None:
                entry[2], entry[3] = False, time.time()
                self._write()

    def _write(self) -> None:
        data = json.dumps(self._groups).encode()
        os.pwrite(self._fd, data, 0)
        os.ftruncate(self._fd, len(data))


def _key(ranks: Sequence[int]) -> str:
    return ",".join(str(r) for r in sorted(ranks))


def _read(directory: Path, world: int) -> dict[int, dict[str, list]]:
    out = {}
    for rank in range(world):
        for _ in range(3):  # a file caught in the middle of a rewrite reads again
            try:
                out[rank] = json.loads((directory / f"rank{rank}.json").read_text() or "{}")
                break
            except (OSError, ValueError):
                time.sleep(0.01)
    return out


def diagnose(directory: str | Path | None, world: int) -> tuple[int, str] | None:
    """(rank, explanation) of a rank that never reached a call its group's other members are waiting
    in, or None when the files show none (or there are no files)."""
    if directory is None or not Path(directory).is_dir():
        return None
    state = _read(Path(directory), world)
    now = time.time()
    for key in sorted({k for groups in state.values() for k in groups}):
        members = [int(r) for r in key.split(",")]
        waiting = {r: state[r][key] for r in members if r in state and key in state[r] and state[r][key][2]}
        if not waiting:
            continue
        call = max(entry[0] for entry in waiting.values())
        op = next(entry[1] for entry in waiting.values() if entry[0] == call)
        # behind: a member that has made fewer calls here and is not waiting in one of them itself
        behind = [r for r in members if r in state and r not in waiting and state[r].get(key, [0])[0] < call]
        if not behind:
            continue
        rank = behind[0]
        who = f"rank {rank}" if len(behind) == 1 else f"ranks {behind}"
        last = state[rank].get(key)
        where = (f"its last call there was {last[1]} #{last[0]}, {'entered' if last[2] else 'left'} "
                 f"{now - last[3]:.1f} s ago" if last else "it never called into that group")
        since = now - min(entry[3] for r, entry in waiting.items() if entry[0] == call)
        ranks_waiting = sorted(r for r, entry in waiting.items() if entry[0] == call)
        return rank, (f"{who} stalled: ranks {ranks_waiting} waited {since:.1f} s in {op} (call #{call} in "
                      f"group [{key.replace(',', ', ')}]) which {who} never reached; rank {rank}: {where}")
    return None
