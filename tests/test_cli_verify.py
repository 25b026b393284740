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


THREE_LEVELS = """topology:
  levels:
    - {name: dc, count: 2, bandwidth: 100Mbit/s, latency: 20ms}
    - {name: node, count: 2, bandwidth: 1Gbit/s, latency: 1ms}
    - {name: gpu, count: 2, bandwidth: 10Gbit/s, latency: 50us}
moe: {hidden: 32, ffn: 64, experts: 8, top_k: 2, layers: 1, tokens_per_gpu: 128, seq_len: 64}
"""


def test_verify_hierarchical_exchange_and_ted_on_two_and_three_levels(tmp_path):
    """The hierarchical exchange (alone and inside HybridEP's rails at every domain size, deduplicating
    above the innermost level or at every level) and TED (TP groups of 2, with and without
    duplicate-token dropping, with and without CAC, at every partition of the EP positions into
    expert domains: 2 on 2 x 2, 4 on 2 x 2 x 2, the exchange pipelined in 2 and 3 chunks where CAC
    is off) equal the single-process reference in float64 on 2 DCs x 2 ranks and on
    2 DCs x 2 nodes x 2 GPUs, every scenario (top-k 1/2/4, a rank without tokens, skewed routing,
    capacity factors, odd hidden sizes)."""
    cfg = tmp_path / "three.yaml"
    cfg.write_text(THREE_LEVELS)
    for world, extra in ((4, []), (8, ["--config", str(cfg)])):
        out = tmp_path / f"verify{world}.json"
        proc = _run([sys.executable, "-m", "hybridep.cli", "verify", "--world-size", str(world), "--dtypes", "float64",
                     "--strategies", "hierarchical,hybridep+hier,ted", "--json", str(out), *extra], timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        data = json.loads(out.read_text())
        assert data["all_passed"] is True
        levels = 2 if world == 4 else 3
        hier = [c for c in data["cases"] if c["strategy"] != "ted"]
        partitions = {tuple(c["domain_sizes"].values()) for c in hier}
        assert len(partitions) == 2 ** levels  # every feasible partition (each count is 2)
        assert {len(c["dedup"]) for c in hier} == {levels - 1, levels}
        ted = [c for c in data["cases"] if c["strategy"] == "ted"]
        ted_partitions = {tuple(c["domain_sizes"].values()) for c in ted}
        assert len(ted_partitions) == 2 ** (levels - 1) and (2,) + (1,) * (levels - 1) in ted_partitions
        assert len(ted) == 8 * len(ted_partitions) and {(c["tp"], c["dtd"], c["cac"]) for c in ted} == {
            (2, dtd, cac) for dtd in (True, False) for cac in (True, False)}
        assert any(c["prefetch"] for c in ted)  # a domain's gathers prefetched
        assert {c["a2a_chunks"] for c in ted} == {1, 2, 3}  # the exchange pipelined (MoNTA) in some
        assert {c["scenario"]["top_k"] for c in data["cases"]} >= {1, 2, 4}
        assert any(0 in c["scenario"]["tokens"] for c in data["cases"])
        assert max(c["max_rel_err"] for c in data["cases"]) <= 1e-10
