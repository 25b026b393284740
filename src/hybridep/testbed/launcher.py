"""Start one process per rank (inside its testbed namespace, or locally) and supervise them.

Each rank gets what torch.distributed needs in its environment -- RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT and, on the testbed, GLOO_SOCKET_IFNAME -- exactly like torchrun provides. Output of
rank r goes to ``LOGDIR/rank{r}.log``. If a rank exits non-zero, the others are stopped and
:class:`~hybridep.launch.RankFailedError` names it with the end of its log; Ctrl-C or the overall
timeout stop all ranks too. No rank outlives :func:`launch`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from hybridep.launch import RankFailedError, free_port, root_cause, stalled_or
from hybridep.parallel.progress import PROGRESS_DIR_ENV, diagnose
from hybridep.testbed.netns import IFACE, rank_ip, rank_ns


def rank_command(rank: int, argv: list[str], namespaced: bool) -> list[str]:
    """The command line of one rank (pure)."""
    return (["ip", "netns", "exec", rank_ns(rank)] if namespaced else []) + argv


def rank_env(rank: int, world: int, port: int, namespaced: bool, base: dict[str, str] | None = None,
             progress_dir: Path | None = None) -> dict[str, str]:
    """The environment of one rank (pure); ``progress_dir``: where its communicator notes its calls."""
    env = dict(os.environ if base is None else base)
    env.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                "MASTER_ADDR": rank_ip(0) if namespaced else "127.0.0.1", "MASTER_PORT": str(port),
                "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    if progress_dir is not None:
        env[PROGRESS_DIR_ENV] = str(progress_dir)
    if namespaced:
        env["GLOO_SOCKET_IFNAME"] = IFACE
    else:
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)


def launch(argv: list[str], world: int, logdir: Path, namespaced: bool, timeout_s: float,
           on_line=None) -> None:
    """Run ``argv`` once per rank; return when all exit 0, raise RankFailedError otherwise.

    ``on_line(text)`` is called with each new line of rank 0's log (progress display).
    """
    logdir.mkdir(parents=True, exist_ok=True)
    progress = logdir / "progress"
    shutil.rmtree(progress, ignore_errors=True)
    port = free_port()
    procs, logs = [], []
    for r in range(world):
        log = logdir / f"rank{r}.log"
        logs.append(log)
        with open(log, "w") as fh:
            procs.append(subprocess.Popen(rank_command(r, argv, namespaced),
                                          env=rank_env(r, world, port, namespaced, progress_dir=progress),
                                          stdout=fh, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + timeout_s
    seen = 0
    try:
        while True:
            codes = [p.poll() for p in procs]
            if on_line is not None:
                lines = logs[0].read_text(errors="replace").splitlines() if logs[0].exists() else []
                for line in lines[seen:]:
                    on_line(line)
                seen = len(lines)
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                time.sleep(1.0)  # let the first failure's peers report too, then pick the root cause
                codes = [p.poll() for p in procs]
                _stop(procs)
                failure = root_cause({r: f"exited with code {codes[r]}; end of its log ({logs[r]}):\n{_tail(logs[r])}"
                                      for r in failed})
                found = diagnose(progress, world)
                if found is not None and found[0] not in failed:  # alive, but never arrived: it stalled
                    failure = stalled_or(failure, progress, world)
                raise failure
            if all(c == 0 for c in codes):
                return
            if time.monotonic() > deadline:
                _stop(procs)
                raise stalled_or(RankFailedError(f"run timed out after {timeout_s:.0f} s; logs in {logdir}"),
                                 progress, world)
            time.sleep(0.2)
    except KeyboardInterrupt:
        _stop(procs)
        raise
    finally:
        _stop(procs)
