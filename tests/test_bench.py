"""A short bench smoke run end to end (shaped on the testbed when root, else unshaped)."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest

from hybridep.bench import COMPUTE_ONLY, lm_config, our_spec, runs
from hybridep.config import ConfigError, load_config
from hybridep.planner import plan


def test_run_list_has_compute_only_ep_choice_every_size_and_peers():
    cfg = load_config()
    planned = plan(cfg)
    names = [r["name"] for r in runs(cfg, planned, ["deepspeed"], 5)]
    assert names[:2] == [COMPUTE_ONLY, "ep"]
    assert str(planned.choice.spec) == names[2]
    assert set(names) == {COMPUTE_ONLY, "ep", "hybridep(dc=1,gpu=2)", "hybridep(dc=2,gpu=1)",
                          "hybridep(dc=2,gpu=2)", "hybridep+sr50(dc=2,gpu=2)", "hierarchical", "ted(tp=2,dtd)",
                          "ted(tp=2)", "ted(tp=2,dtd,dc=2,gpu=1)", "deepspeed"}
    entry = next(r for r in runs(cfg, planned, [], 5) if r["name"] == "ted(tp=2,dtd)")
    assert (entry["strategy"], entry["tp"], entry["dtd"]) == ("ted", 2, True)
    entry = next(r for r in runs(cfg, planned, [], 5) if r["name"] == "hierarchical")
    assert (entry["strategy"], entry["dedup"], entry["domain_sizes"]) == ("hierarchical", [0], [1, 1])
    # the choice's partition too where its rails cross a deduplicating level; never without the key
    one_dc = load_config(None, ["topology.levels.0.bandwidth=10Gbit/s", "bench.hierarchical=false"])
    assert not any(r["name"].endswith("+hier") or r["name"] == "hierarchical"
                   for r in runs(one_dc, plan(one_dc), [], 5))
    topo = cfg.topology.as_topology()
    sr = our_spec("hybridep+sr50(dc=2,gpu=2)", topo)
    assert (sr.domain_sizes, sr.sr_ratio, sr.sr_grads) == ((2, 2), 50.0, "dense")
    assert our_spec("ep", topo).is_ep
    topk = our_spec("hybridep+sr50+topkgrads(dc=2,gpu=2)", topo)
    assert (topk.domain_sizes, topk.sr_ratio, topk.sr_grads) == ((2, 2), 50.0, "topk")
    assert our_spec("deepspeed", topo) is None and our_spec(COMPUTE_ONLY, topo) is None
    lm, batch = lm_config(cfg)
    assert batch * lm.seq_len == cfg.moe.tokens_per_gpu


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, "-m", "hybridep.cli", "bench", "--steps", "3", "--set", "bench.warmup=1",
         "--set", "moe.tokens_per_gpu=512", "--set", "moe.hidden=32", "--set", "moe.ffn=32",
         "--set", "moe.blocks_before_moe=1",  # a dense block before each MoE block: DDP covers its FFN
         "--out", str(tmp_path / "run"), "--json", str(out), "--trace", str(tmp_path / "trace.json")],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report) >= {"strategies", "planner_choice", "config"}
    strategies = report["strategies"]
    assert {"ep", "hybridep(dc=2,gpu=2)", COMPUTE_ONLY} <= set(strategies)
    for name, v in strategies.items():
        assert set(v) >= {"median_iter_s", "p10_iter_s", "p90_iter_s", "cross_dc_bytes", "link_utilisation",
                          "predicted_iter_s", "final_loss"}
        assert math.isfinite(v["final_loss"]) and v["median_iter_s"] > 0, name
    if report["shaped"]:
        # the testbed's own counters: full-domain HybridEP moves far fewer bytes across the DCs than EP
        assert strategies["hybridep(dc=2,gpu=2)"]["cross_dc_bytes"] < strategies["ep"]["cross_dc_bytes"] / 2
        assert strategies["ep"]["predicted_iter_s"] > 0
    for name in ("ep", "hybridep(dc=2,gpu=2)"):  # DDP's dense-gradient all-reduce, counted apart (ring)
        assert strategies[name]["dense_bytes_by_level"]["dc"] > 0
    cal = report["calibration"]
    assert cal["processors"] >= 1 and cal["optimizer_s_per_byte"] > 0 and cal["expert_weight_s_per_byte"] >= 0
    assert 0 <= cal["expert_weight_forward_share"] <= 1 and cal["expert_backward_factor"] > 0
    assert cal["rendezvous_s"] >= 0 and 0 <= cal["overlap_efficiency"] <= 1
    assert (tmp_path / "run" / "bench.png").stat().st_size > 1000
    # the measured timelines: every rank's forward, backward and optimizer step in each timed step, and
    # the expert gathers and reduce-scatters of full-domain HybridEP on the communication thread
    ev = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in ev if e["name"] == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in ev if e["name"] == "thread_name"}
    assert COMPUTE_ONLY not in procs.values() and {"ep", "hybridep(dc=2,gpu=2)"} <= set(procs.values())
    timed = 3 - 1
    for pid, name in procs.items():
        spans = [e for e in ev if e["ph"] == "X" and e["pid"] == pid]
        assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
        for rank in range(4):
            mine = [e for e in spans if threads[(pid, e["tid"])] == f"rank {rank} compute"]
            assert sorted(e["name"] for e in mine) == sorted(["forward", "backward", "optimizer"] * timed), name
        background = {e["name"] for e in spans if threads[(pid, e["tid"])].endswith("comm (background)")}
        if name == "hybridep(dc=2,gpu=2)":
            assert {"ag", "rs"} <= background
        if name == "ep":
            assert not background and any(e["name"].startswith("a2a") for e in spans)
    # same seed, same data: our strategies compute the same model, so the same losses (the
    # shortcut-connected runs compute another model, the same under every strategy)
    for shortcut in (False, True):
        losses = [v["final_loss"] for n, v in strategies.items()
                  if (n == "ep" or n.startswith(("ep+", "hybridep("))) and n.endswith("+shortcut") == shortcut]
        assert len(losses) >= 2 and max(losses) - min(losses) == pytest.approx(0.0, abs=1e-3)


def test_compute_calibration_takes_the_compute_only_optimizer_step_out():
    """The compute-only ranks hold and update every expert; strategies update only their own. The
    compute rate comes from the compute-only time less its measured optimizer step and the cost of
    holding every expert in the expert computation."""
    from hybridep.calibration import CalibrationError, calibrated_model
    from hybridep.costmodel import optimizer_s, workload_from_config

    cfg = load_config()
    rates = [lv.bandwidth_bps for lv in cfg.topology.levels]
    results = {COMPUTE_ONLY: {"median_iter_s": 0.5}}
    _, flops0 = calibrated_model(cfg, results, rates, {"efficiency_by_level": [1.0, 1.0]})
    per_byte = 1e-9
    w = workload_from_config(cfg, flops=1.0, sr_ratio=None)
    opt_all = optimizer_s(dataclasses.replace(w, optimizer_s_per_byte=per_byte), cfg.topology.world_size)
    assert opt_all > optimizer_s(dataclasses.replace(w, optimizer_s_per_byte=per_byte)) > 0
    _, flops1 = calibrated_model(cfg, results, rates, {"optimizer_s_per_byte": per_byte})
    assert flops1 == pytest.approx(flops0 * 0.5 / (0.5 - opt_all))
    with pytest.raises(CalibrationError, match="optimizer step"):
        calibrated_model(cfg, {COMPUTE_ONLY: {"median_iter_s": opt_all / 2}}, rates,
                         {"optimizer_s_per_byte": per_byte})
    held = 1e-9 * cfg.topology.world_size * w.expert_bytes * w.layers  # all experts, forward + backward
    _, flops2 = calibrated_model(cfg, results, rates,
                                 {"optimizer_s_per_byte": per_byte, "expert_weight_s_per_byte": 1e-9})
    assert flops2 == pytest.approx(flops0 * 0.5 / (0.5 - opt_all - held))


def test_the_calibrated_planner_prices_what_the_predictions_price():
    """The bench's measured compute costs reach the planner's calibrated choice as they reach the
    predictions of the runs: unset ``compute`` keys from the calibration (configured ones kept, the
    processors only when fewer than the ranks, earlier key names read)."""
    from hybridep.bench import calibrated_choice, predictions
    from hybridep.calibration import calibrated_config, calibrated_model

    cfg = load_config(overrides=["compute.expert_backward_factor=2.5"])
    cal = {"efficiency_by_level": [1.0, 0.9], "optimizer_byte_s": 4e-9, "expert_weight_s_per_byte": 3e-9,
           "expert_weight_forward_share": 0.05, "expert_backward_factor": 3.0, "processors": 2}
    got = calibrated_config(cfg, cal).compute
    measured = (got.optimizer_s_per_byte, got.expert_weight_s_per_byte, got.expert_weight_forward_share)
    assert measured == (4e-9, 3e-9, 0.05)
    assert got.expert_backward_factor == 2.5 and got.processors == 2  # configured: kept
    assert calibrated_config(cfg, {**cal, "processors": 64}).compute.processors is None
    assert calibrated_config(cfg, {}) is cfg
    rates = [lv.bandwidth_bps for lv in cfg.topology.levels]
    results = {COMPUTE_ONLY: {"median_iter_s": 0.5}, "ep": {"median_iter_s": 0.4}}
    model = calibrated_model(cfg, results, rates, cal)
    predicted = predictions(cfg, model, results, cal)["ep"]
    ep = [c for c in plan(calibrated_config(cfg, cal), model[1], model[0]).candidates if str(c.spec) == "ep"]
    assert ep[0].prediction.iteration_s == pytest.approx(predicted)
    uncalibrated = [c for c in plan(cfg, model[1], model[0]).candidates if str(c.spec) == "ep"]
    assert uncalibrated[0].prediction.iteration_s < predicted  # the measured optimizer and held costs
    assert calibrated_choice(cfg, model, results, cal) == "ep"


def test_gather_stages_and_exchanges_inside_a_dc_pay_the_delay_measured_while_computing():
    from hybridep.calibration import calibrated_model
    from hybridep.costmodel import workload_from_config
    from hybridep.strategies.hybridep import predict, simulate
    from hybridep.topology import Domains

    cfg = load_config()
    rates = [lv.bandwidth_bps for lv in cfg.topology.levels]
    results = {COMPUTE_ONLY: {"median_iter_s": 0.5}}
    idle = {"efficiency_by_level": [1.0, 0.8], "gather_efficiency_by_level": [1.0, 0.8]}
    busy = {**idle, "gather_delay_s_by_level": [0.004, 0.01]}
    (net_idle, flops), (net_busy, _) = (calibrated_model(cfg, results, rates, c) for c in (idle, busy))
    assert net_busy.stage_delay_s == (0.004, 0.01) and net_idle.stage_delay_s is None
    w = workload_from_config(cfg, flops=flops)
    # all-to-all (2,2): none; (1,2): over the DC links, set by them; (2,1): inside each DC, beside
    # the gather chains over the DC links, pays the delay of its level once per phase
    for sizes, stages, a2a in (((2, 2), 0.014, 0.0), ((1, 2), 0.01, 0.0), ((2, 1), 0.004, 0.01)):
        dom = Domains(net_idle.topology, sizes)
        a, b = predict(dom, w, net_idle, cfg.terms), predict(dom, w, net_busy, cfg.terms)
        assert b.ag_phase_s == pytest.approx(a.ag_phase_s + stages)  # one delay per stage
        assert b.a2a_phase_s == pytest.approx(a.a2a_phase_s + a2a)  # beside the chains, once per phase
        assert simulate(dom, w, net_busy, cfg.terms, False).iteration_s >= simulate(
            dom, w, net_idle, cfg.terms, False).iteration_s
    ep = Domains(net_idle.topology, (1, 1))  # no gather, no chains beside its all-to-all: no delay
    assert predict(ep, w, net_busy, cfg.terms).iteration_s == predict(ep, w, net_idle, cfg.terms).iteration_s
    assert simulate(ep, w, net_busy, cfg.terms, False).iteration_s == pytest.approx(
        simulate(ep, w, net_idle, cfg.terms, False).iteration_s)


def test_link_calibration_measures_the_gather_while_computing():
    import workers

    from hybridep.launch import run_local

    for cal in run_local(workers.link_calibration, 4, (), timeout_s=120):
        for key in ("efficiency_by_level", "gather_efficiency_by_level"):
            assert len(cal[key]) == 2 and all(0 < e <= 1 for e in cal[key]), (key, cal[key])
        assert len(cal["gather_delay_s_by_level"]) == 2 and all(d >= 0 for d in cal["gather_delay_s_by_level"])
        assert [len(t) for t in cal["busy_gather_seconds_by_level"]] == [2, 2]
        assert all(t > 0 for level in cal["busy_gather_seconds_by_level"] for t in level)
        assert 0 < cal["message_s"] < 0.01  # gloo over loopback: microseconds per message, not ms
        assert 0 <= cal["rendezvous_s"] < 1.0 and 0 <= cal["overlap_efficiency"] <= 1
        seconds = cal["overlap_seconds"]  # the exchange sized to take about as long as the experts
        assert min(seconds["transfer"], seconds["compute"], seconds["both"]) > 0 and seconds["rows_per_peer"] >= 1


def test_bench_candidates_runs_the_best_of_every_family_instead_of_every_size():
    cfg = load_config(None, ["bench.candidates=1"])
    planned = plan(cfg)
    names = [r["name"] for r in runs(cfg, planned, [], 5)]
    best = {}
    for c in sorted(planned.candidates, key=lambda c: c.prediction.iteration_s):
        best.setdefault(c.spec.family, str(c.spec))
    assert names[:2] == [COMPUTE_ONLY, "ep"] and set(best.values()) <= set(names)
    assert set(names) == {COMPUTE_ONLY, "ep", str(planned.choice.spec), *best.values()}
    two = [r["name"] for r in runs(load_config(None, ["bench.candidates=2"]), planned, [], 5)]
    assert len(two) > len(names)


def test_bench_strategies_runs_exactly_the_named_ones_and_refuses_a_bad_name():
    cfg = load_config(None, ["moe.top_k=4", "moe.experts=16",
                             'bench.strategies=[hierarchical, "ep+chunks4+hier", ep, "ted(tp=2,dtd,dc=2,gpu=1)"]'])
    names = [r["name"] for r in runs(cfg, plan(cfg), ["deepspeed"], 5)]
    assert names == [COMPUTE_ONLY, "ep", "hierarchical", "ep+chunks4+hier", "ted(tp=2,dtd,dc=2,gpu=1)", "deepspeed"]
    with pytest.raises(ConfigError) as err:
        load_config(None, ['bench.strategies=[ep, "hybridep(dc=3,gpu=1)"]'])
    assert "bench.strategies.1" in str(err.value) and "allowed: [1, 2]" in str(err.value)
