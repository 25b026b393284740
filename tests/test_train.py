"""hybridep train: resume equivalence under the same plan, another plan and another world size;
a killed rank; a checkpoint cut mid-write; torchrun; the public API's example script."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import descendants

from hybridep.checkpoint import CheckpointError, latest
from hybridep.cli import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
SMALL = ["moe.tokens_per_gpu=512", "moe.hidden=32", "moe.ffn=64", "train.batch_size=8", "train.eval_every=0",
         "train.warmup_steps=2", "train.lr=3e-3"]
EXACT = [*SMALL, "moe.dtype=float64", "train.aux_loss_coef=0", "train.steps=6", "train.checkpoint_every=3",
         "dense_sync=ring"]


def _sets(items: list[str]) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _assert_follows(got: dict[int, float], want: dict[int, float]) -> None:
    """Every step of ``got`` has ``want``'s loss within 1e-10 (relative)."""
    for step, loss in got.items():
        assert abs(loss - want[step]) <= 1e-10 * abs(want[step])


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """Six float64 steps under the planner's hybridep(dc=2,gpu=2) on 4 ranks, a checkpoint at 3 and 6."""
    out = tmp_path_factory.mktemp("straight")
    assert main(["train", "--out", str(out), *_sets(EXACT)]) == 0
    assert json.loads((out / "plan.json").read_text())["strategy"] == "hybridep(dc=2,gpu=2)"
    return out


def _resume(straight: Path, tmp_path: Path, *extra: str) -> dict[int, float]:
    """Resume the straight run from its step-3 checkpoint and run steps 4..6."""
    out = tmp_path / "resumed"
    assert main(["train", "--out", str(out), "--resume", str(straight / "checkpoints" / "step_00000003"),
                 *_sets(EXACT), *extra]) == 0
    return _losses(out)


def test_resume_under_the_same_plan_gives_identical_losses(straight, tmp_path):
    want, got = _losses(straight), _resume(straight, tmp_path)
    assert sorted(got) == [4, 5, 6]
    _assert_follows(got, want)


def test_resume_under_another_plan_and_on_two_ranks_follows_the_straight_run(straight, tmp_path):
    """Saved under hybridep(dc=2,gpu=2) on 4 ranks; resumed under ep on 4 ranks, and under the
    planner's choice on 1 x 2 ranks (experts resharded by the checkpoint): the same losses within
    float64 rounding (the reductions run in another order)."""
    ep_plan = tmp_path / "ep.json"
    assert main(["plan", "--out", str(ep_plan), *_sets(SMALL)]) == 0
    doc = json.loads(ep_plan.read_text())
    ep_plan.write_text(json.dumps({**doc, "strategy": "ep"}))
    want = _losses(straight)
    for extra in (("--plan", str(ep_plan)), ("--set", "topology.levels.0.count=1")):
        got = _resume(straight, tmp_path / extra[-1].replace("/", "_"), *extra)
        assert sorted(got) == [4, 5, 6]
        for step, loss in got.items():
            assert abs(loss - want[step]) <= 1e-9 * abs(want[step]), (extra, step, loss, want[step])


def test_a_rank_killed_while_writing_a_checkpoint_leaves_the_previous_one_loadable(tmp_path):
    """Rank 1 dies (SIGKILL) after writing its part of step 2's checkpoint, before it is complete:
    the run stops naming rank 1, step 2's folder stays .partial, and a resumed run starts from
    step 1's checkpoint and finishes."""
    import workers

    from hybridep.config import config_to_dict, load_config
    from hybridep.launch import RankFailedError, run_local
    from hybridep.planfile import make_plan

    cfg = load_config(None, [*SMALL, "train.steps=2", "train.checkpoint_every=1"])
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(RankFailedError, match="killed by SIGKILL") as err:
        run_local(workers.killed_while_checkpointing, 4, (config_to_dict(cfg), make_plan(cfg).document, str(out)),
                  timeout_s=240, collective_timeout_s=60)
    assert err.value.rank == 1
    assert (out / "checkpoints" / "step_00000002.partial").is_dir()
    assert latest(out).name == "step_00000001"
    resumed = tmp_path / "resumed"
    assert main(["train", "--out", str(resumed), "--resume", str(out), *_sets([*SMALL, "train.steps=2"])]) == 0
    assert sorted(_losses(resumed)) == [2] and latest(resumed).name == "step_00000002"


def test_a_checkpoint_cut_mid_write_is_never_resumed_from(straight, tmp_path):
    """A half-written checkpoint (its ``.partial`` folder, files truncated) is skipped: the newest
    complete one loads and training continues from it."""
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.copytree(straight / "checkpoints", ckpts)
    cut = ckpts / "step_00000009.partial"
    shutil.copytree(ckpts / "step_00000006", cut)
    for f in cut.iterdir():
        f.write_bytes(f.read_bytes()[:7])
    assert latest(tmp_path / "run") == ckpts / "step_00000006"
    out = tmp_path / "more"
    assert main(["train", "--out", str(out), "--resume", str(tmp_path / "run"),
                 *_sets([*EXACT, "train.steps=7"])]) == 0
    assert sorted(_losses(out)) == [7]
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        latest(tmp_path / "nothing")


def test_a_killed_rank_stops_the_run_naming_it_and_resume_completes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "hybridep.cli", "train", "--out", str(out),
           *_sets([*SMALL, "train.steps=400", "train.checkpoint_every=2", "train.timeout_s=60"])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not list((out / "checkpoints").glob("step_*[0-9]")):
        time.sleep(0.2)
    ranks = [p for p in descendants(proc.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
    assert len(ranks) == 4, "the run never reached its first checkpoint with 4 ranks"
    victim = sorted(ranks)[2]
    os.kill(victim, signal.SIGKILL)
    start = time.monotonic()
    said, _ = proc.communicate(timeout=90)
    assert time.monotonic() - start < 60
    assert proc.returncode == 1 and "failed: died with exit code -9 (killed by SIGKILL)" in said, said[-2000:]
    assert "Traceback" not in said.split("train failed:")[0]
    done = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    resumed = tmp_path / "resumed"
    steps = done + 2
    assert main(["train", "--out", str(resumed), "--resume", str(out),
                 *_sets([*SMALL, f"train.steps={steps}", "train.checkpoint_every=2"])]) == 0
    assert max(_losses(resumed)) == steps


def test_train_under_torchrun(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "hybridep.cli", "train",
         "--out", str(out), "--json", str(tmp_path / "train.json"),
         *_sets([*SMALL, "topology.levels.0.count=1", "train.steps=3"])],
        capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(_losses(out)) == [1, 2, 3] and latest(out).name == "step_00000003"
    assert json.loads((tmp_path / "train.json").read_text())["strategy"] == "hybridep(dc=1,gpu=2)"


def test_the_example_script_trains_a_users_model_with_the_public_api(tmp_path):
    plan = tmp_path / "plan.json"
    assert main(["plan", "--out", str(plan), "--set", "topology.levels.0.count=1"]) == 0
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         str(ROOT / "examples" / "train_moe.py"), "--plan", str(plan), "--steps", "4"],
        capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    losses = [float(line.split()[-1]) for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == 4 and all(x == x for x in losses)


def test_micro_batches_accumulate_to_the_same_step(straight, tmp_path):
    """moe.micro_batches=2 splits every rank's batch in two and sums the gradients: the same losses
    as the straight run (float64)."""
    out = tmp_path / "mb"
    assert main(["train", "--out", str(out), *_sets([*EXACT, "moe.micro_batches=2", "train.steps=3"])]) == 0
    _assert_follows(_losses(out), _losses(straight))


def test_bfloat16_trains_under_autocast(tmp_path):
    out = tmp_path / "bf16"
    assert main(["train", "--out", str(out), *_sets([*SMALL, "moe.dtype=bfloat16", "train.steps=2",
                                                       "train.checkpoint_every=0"])]) == 0
    losses = _losses(out)
    assert sorted(losses) == [1, 2] and all(5.0 < x < 6.0 for x in losses.values())


def test_hierarchical_dense_sync_trains_the_same_run(straight, tmp_path):
    out = tmp_path / "hier"
    assert main(["train", "--out", str(out), *_sets([*EXACT, "dense_sync=hierarchical", "train.steps=3"])]) == 0
    _assert_follows(_losses(out), _losses(straight))


def test_powersgd_dense_sync_trains(tmp_path):
    out = tmp_path / "psgd"
    assert main(["train", "--out", str(out), *_sets([*SMALL, "dense_sync=powersgd(rank=2,start=2)", "train.steps=5",
                                                      "train.checkpoint_every=0"])]) == 0
    losses = _losses(out)
    assert sorted(losses) == [1, 2, 3, 4, 5] and losses[5] < losses[1]


def test_a_hierarchical_plan_trains_the_same_run_as_ep(tmp_path):
    """Where plain EP wins and tokens go to 4 experts the planner picks ``hierarchical``; ``train --plan``
    runs it and follows EP's losses (float64, 1e-10)."""
    sets = _sets(["moe.top_k=4", "moe.experts=16", "moe.dtype=float64", "train.steps=2", "train.eval_every=0",
                  "train.checkpoint_every=0", "train.batch_size=8", "dense_sync=ring"])
    config = ["--config", str(ROOT / "configs" / "bench_ep_wins.yaml")]
    plan = tmp_path / "plan.json"
    assert main(["plan", *config, *sets, "--out", str(plan)]) == 0
    doc = json.loads(plan.read_text())
    assert doc["strategy"] == "hierarchical"
    ep = tmp_path / "ep.json"
    ep.write_text(json.dumps({**doc, "strategy": "ep", "spec": {"family": "hybridep", "name": "ep"}}))
    losses = {}
    for name, path in (("hier", plan), ("ep", ep)):
        assert main(["train", *config, *sets, "--plan", str(path), "--out", str(tmp_path / name)]) == 0
        losses[name] = _losses(tmp_path / name)
    assert sorted(losses["hier"]) == [1, 2]
    _assert_follows(losses["hier"], losses["ep"])
