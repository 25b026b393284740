import json
import os
import subprocess
import sys


def _run(args, timeout=240):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def test_verify_local_processes_json(tmp_path):
    out = tmp_path / "verify.json"
    proc = _run([sys.executable, "-m", "hybridep.cli", "verify", "--world-size", "2", "--dtypes", "float64",
                 "--json", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["all_passed"] is True
    assert {c["strategy"] for c in data["cases"]} == {"ep", "hybridep"}
    for c in data["cases"]:
        assert set(c) >= {"strategy", "domain_sizes", "dtype", "max_abs_err", "max_rel_err", "passed"}
        assert c["max_rel_err"] <= 1e-10


def test_verify_inside_torchrun(tmp_path):
    out = tmp_path / "verify.json"
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 "-m", "hybridep.cli", "verify", "--dtypes", "float64", "--strategies", "hybridep",
                 "--json", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["all_passed"] and {c["strategy"] for c in data["cases"]} == {"hybridep"}


def test_verify_bad_arguments_are_clear_errors():
    proc = _run([sys.executable, "-m", "hybridep.cli", "verify", "--strategies", "ep,magic"])
    assert proc.returncode == 2 and "--strategies" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr
    proc = _run([sys.executable, "-m", "hybridep.cli", "verify", "--world-size", "3",
                 "--set", "topology.levels.0.count=2"])
    assert proc.returncode == 2 and "world size 3" in proc.stdout
