import json
import subprocess
import sys
from pathlib import Path

from hybridep.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_plan_json_schema(tmp_path):
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", str(CONFIGS / "paper_table4_mix1.yaml"), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["choice"]["domain_sizes"] == {"gpu": 2}
    assert data["choice"]["p"] == 0.75
    assert data["ep_predicted_iteration_s"] >= data["choice"]["predicted_iteration_s"]
    assert len(data["candidates"]) == 4
    for c in data["candidates"]:
        assert set(c) >= {"domain_sizes", "p", "predicted_iteration_s", "a2a_pairs", "ag_pairs", "bytes_by_level"}
        assert set(c["bytes_by_level"]) == {"gpu"}


def test_plan_bad_input_is_a_clear_error_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "hybridep.cli", "plan", "--set", "moe.top_k=99"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "moe.top_k" in proc.stdout and "99" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr
