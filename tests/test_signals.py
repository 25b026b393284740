"""SIGTERM and SIGINT to commands that start ranks: every rank stops, the testbed comes down, one
line, exit 128 + signal, no traceback."""

import os
import signal
import subprocess
import sys
import time

import pytest
from procs import alive, descendants

from hybridep.testbed import netns

ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}


def _wait_for(predicate, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def _stop_and_check(proc: subprocess.Popen, sig: int) -> str:
    """Send ``sig`` once the command has ranks running; within 10 s: exit 128 + sig, no rank left."""
    ranks = descendants(proc.pid)
    assert ranks, "the command had started no processes"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 128 + sig, out[-2000:]
    assert _wait_for(lambda: not any(alive(p) for p in ranks), 10), [p for p in ranks if alive(p)]
    assert "Traceback" not in out and f"stopped by {signal.Signals(sig).name}" in out
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_verify_stops_every_rank(sig):
    proc = subprocess.Popen([sys.executable, "-m", "hybridep.cli", "verify", "--world-size", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    assert _wait_for(lambda: len(descendants(proc.pid)) >= 4, 60)
    time.sleep(2.0)  # the ranks are inside their cases
    _stop_and_check(proc, sig)


@pytest.mark.skipif(os.geteuid() != 0, reason="the testbed needs root (CI runs as root)")
def test_sigterm_to_bench_stops_every_rank_and_takes_the_testbed_down(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "hybridep.cli", "bench", "--testbed", "on", "--steps", "50",
                             "--set", "bench.peers=[]", "--set", "bench.warmup=1", "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    log = tmp_path / "logs" / "rank0.log"
    assert _wait_for(lambda: log.exists() and "[calibrate]" in log.read_text(errors="replace"), 240), \
        "the bench's ranks never started"
    assert netns.existing_namespaces()
    _stop_and_check(proc, signal.SIGTERM)
    assert netns.existing_namespaces() == []


def test_sigterm_to_train_stops_every_rank(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "hybridep.cli", "train", "--out", str(tmp_path), "--set",
                             "train.steps=1000", "--set", "moe.tokens_per_gpu=512"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    assert _wait_for(lambda: (tmp_path / "metrics.jsonl").exists(), 120), "the run never trained a step"
    _stop_and_check(proc, signal.SIGTERM)
