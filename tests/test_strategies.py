"""The strategy contract: one grammar for names, and the plan file that every command runs."""

import dataclasses
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridep.bench import runs
from hybridep.cli import main
from hybridep.config import ConfigError, load_config
from hybridep.planfile import planned_spec
from hybridep.planner import plan
from hybridep.strategies import HybridEPSpec, StrategyError, parse, parse_request
from hybridep.topology import Topology, divisors
from hybridep.verify import make_cases

NAMES = ("dc", "node", "gpu")


@st.composite
def specs(draw):
    """A random HybridEP spec on a random topology of 1-3 levels."""
    levels = draw(st.integers(1, 3))
    counts = tuple(draw(st.sampled_from([1, 2, 3, 4, 6, 8])) for _ in range(levels))
    topo = Topology(NAMES[-levels:] if levels < 3 else NAMES, counts)
    sizes = tuple(draw(st.sampled_from(divisors(c))) for c in counts)
    ratio = draw(st.one_of(st.none(), st.sampled_from([1.0, 2.5, 50.0, 1e6]), st.floats(1, 1e6)))
    grads = draw(st.sampled_from(["dense", "topk"])) if ratio is not None else "dense"
    chunks = draw(st.one_of(st.none(), st.integers(1, 64)))
    prefetch = draw(st.sampled_from([None, True, False]))
    return HybridEPSpec(topo, sizes, ratio, grads, chunks, prefetch, draw(st.booleans()))


@settings(max_examples=300, deadline=None)
@given(specs())
def test_every_spec_survives_its_name(spec):
    """str(spec) is the one grammar: parse(str(spec)) gives the same spec back, whatever its parameters."""
    name = str(spec)
    assert parse(name, spec.topology) == spec
    assert (name == "ep" or name.startswith("ep+")) == spec.is_ep
    assert name.endswith("+shortcut") == spec.shortcut


@pytest.mark.parametrize("name", ["ep+shortcut", "hybridep(dc=1,gpu=2)+shortcut", "hierarchical+shortcut",
                                  "hybridep(dc=1,gpu=2)+hier+shortcut", "ep+chunks3+shortcut"])
def test_any_family_runs_shortcut_connected_blocks_by_its_name(name):
    topo = Topology(("dc", "gpu"), (2, 2))
    spec = parse(name, topo)
    assert spec.shortcut and str(spec) == name
    assert parse(name.removesuffix("+shortcut"), topo) == dataclasses.replace(spec, shortcut=False)


def test_names_of_the_stored_results_are_read_back_unchanged():
    topo = Topology(("dc", "gpu"), (2, 2))
    for name in ("ep", "hybridep(dc=2,gpu=1)", "hybridep+sr50(dc=2,gpu=2)", "hybridep+sr50+topkgrads(dc=2,gpu=2)"):
        assert str(parse(name, topo)) == name
    spec = parse("hybridep+sr50+topkgrads(dc=2,gpu=2)", topo)
    assert (spec.domain_sizes, spec.sr_ratio, spec.sr_grads, spec.runtime_kind()) == ((2, 2), 50.0, "topk",
                                                                                       "hybridep+sr")


@pytest.mark.parametrize("name,says", [
    ("hybridep(dc=3,gpu=1)", "must divide 2"),
    ("hybridep(dc=2)", "every level"),
    ("hybridep(dc=2,gpu=1,tpu=1)", "unknown key 'tpu'"),
    ("hybridep+sr0(dc=2,gpu=2)", "SR ratio"),
    ("hybridep+topkgrads(dc=2,gpu=2)", "needs +srRATIO"),
    ("hybridep+chunks2+sr50(dc=2,gpu=2)", "order"),
    ("hybridep+chunks0(dc=2,gpu=2)", "chunks"),
    ("ep(dc=1,gpu=1)", "ep takes no"),
    ("tutel", "no family accepts"),
    ("planner", "not a strategy name"),
    ("ep+shortcut+chunks3", "cannot read"),
])
def test_bad_names_are_refused_with_what_is_allowed(name, says):
    with pytest.raises(StrategyError, match=re.escape(says)):
        parse(name, Topology(("dc", "gpu"), (2, 2)))


def test_requests_leave_to_the_planner_what_they_do_not_fix():
    topo = Topology(("dc", "gpu"), (2, 4))
    assert parse_request("planner", topo).planner
    assert not parse_request("ep", topo).planner
    assert parse_request("hybridep(dc=2)", topo).candidates() == [(2, 1), (2, 2), (2, 4)]
    assert parse_request("hybridep(p=0.75)", topo).candidates() == [(1, 2), (2, 1)]
    with pytest.raises(StrategyError, match="feasible p"):
        parse_request("hybridep(p=0.3)", topo)


def _plan_file(tmp_path, *overrides):
    path = tmp_path / "plan.json"
    args = ["plan", "--out", str(path)] + [x for o in overrides for x in ("--set", o)]
    assert main(args) == 0
    return path


def test_plan_out_is_what_bench_verify_and_simulate_run(tmp_path):
    """plan --out -> bench --plan / verify --plan / simulate --plan run exactly the planned spec."""
    path = _plan_file(tmp_path)
    doc = json.loads(path.read_text())
    cfg = load_config()
    result = plan(cfg)
    assert doc["strategy"] == str(result.choice.spec) != "ep"
    assert doc["topology"]["world_size"] == 4 and doc["predicted"]["strategy"] == doc["strategy"]
    spec = planned_spec(path, cfg.topology.as_topology())
    assert spec == result.choice.spec
    # bench: the compute-only reference, EP and the planned strategy -- nothing else, no peers
    names = [r["name"] for r in runs(cfg, result, ["deepspeed"], 5, spec)]
    assert names == ["compute-only", "ep", doc["strategy"]]
    # verify: every scenario, the planned partition only
    cases = make_cases(spec.topology, ["hybridep"], ["float64"], 8, 0, [spec.domain_sizes])
    assert cases and {c.domain_sizes for c in cases} == {spec.domain_sizes}
    # simulate: EP and the planned strategy
    out = tmp_path / "sim.json"
    assert main(["simulate", "--plan", str(path), "--json", str(out)]) == 0
    assert [p["strategy"] for p in json.loads(out.read_text())["points"]] == ["ep", doc["strategy"]]


def test_a_compressed_plan_runs_compressed_in_the_bench(tmp_path):
    cfg = load_config()
    spec = parse("hybridep+sr50+topkgrads(dc=2,gpu=2)", cfg.topology.as_topology())
    entry = runs(cfg, plan(cfg), [], 5, spec)[-1]
    assert (entry["name"], entry["strategy"], entry["sr_ratio"], entry["sr_grads"]) == (
        str(spec), "hybridep+sr", 50.0, "topk")


@pytest.mark.parametrize("command", ["bench", "verify", "simulate"])
def test_a_plan_for_another_topology_is_refused_naming_both(tmp_path, command, capsys):
    path = _plan_file(tmp_path, "topology.levels.0.count=4", "moe.experts=16")
    capsys.readouterr()
    assert main([command, "--plan", str(path)]) == 2
    said = capsys.readouterr().out
    assert "--plan" in said and "world size 4" in said and "world size 8" in said


def test_a_file_that_is_not_a_plan_is_refused(tmp_path):
    bad = tmp_path / "bad.json"
    for text in ("{}", "not json", '{"format": "hybridep-plan", "version": 99}'):
        bad.write_text(text)
        with pytest.raises(ConfigError, match="--plan"):
            planned_spec(bad, Topology(("dc", "gpu"), (2, 2)))
    with pytest.raises(ConfigError, match="readable"):
        planned_spec(tmp_path / "missing.json", Topology(("dc", "gpu"), (2, 2)))


def test_the_evaluators_know_no_family():
    """The cost model, the schedule and the simulator import no strategy family and no partition:
    what runs comes from a Schedule (a new family is its schedule, nothing in them)."""
    import ast
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "hybridep"
    for rel in ("costmodel.py", "schedule.py", "sim/iteration.py", "sim/fluid.py"):
        tree = ast.parse((src / rel).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        assert not any(m and m.startswith("hybridep.strategies") for m in imported), rel
        assert "Domains" not in names, rel


def test_one_schedule_puts_the_same_bytes_on_every_level_in_model_and_simulator():
    """The cost model and the simulator read one Schedule: for every partition of 2 x 2 both move
    the same all-to-all and gather bytes over every level."""
    from hybridep.config import CostTerms
    from hybridep.costmodel import Network, evaluate
    from hybridep.sim.iteration import run_schedule

    cfg = load_config(None, ["cost_model=paper"])
    net = Network.from_config(cfg)
    terms = CostTerms(backward=False, latency=False, expert_compute=False, grad_sync=False, overlap=False,
                      port_sharing=False, rail_interleave=False)
    for sizes in cfg.topology.as_topology().feasible_domain_sizes():
        spec = HybridEPSpec(cfg.topology.as_topology(), sizes)
        schedule = spec.schedule(spec.workload(cfg))
        model, sim = evaluate(schedule, net, terms), run_schedule(schedule, net, terms)
        for level, ops in model.bytes_by_level.items():  # the same bytes on every level
            for op in ("a2a", "ag"):
                assert sim.bytes_by_level[level].get(op, 0.0) == pytest.approx(ops[op], rel=1e-9, abs=1e-6)


def test_bench_and_verify_run_exactly_the_plan(tmp_path):
    """The commands themselves, not only their run lists: bench --plan trains the compute-only
    reference, ep and the planned strategy; verify --plan checks the planned partition only."""
    small = ["moe.tokens_per_gpu=256", "moe.hidden=32", "moe.ffn=32", "bench.warmup=1"]
    sets = [x for s in small for x in ("--set", s)]
    path = _plan_file(tmp_path, *small)
    planned = json.loads(path.read_text())["strategy"]
    out = tmp_path / "bench.json"
    assert main(["bench", "--plan", str(path), "--testbed", "off", "--steps", "2", "--out", str(tmp_path / "b"),
                 "--json", str(out), *sets]) == 0
    report = json.loads(out.read_text())
    assert set(report["strategies"]) == {"compute-only", "ep", planned} and report["plan"] == str(path)
    out = tmp_path / "verify.json"
    assert main(["verify", "--plan", str(path), "--dtypes", "float64", "--json", str(out), *sets]) == 0
    cases = json.loads(out.read_text())["cases"]
    spec = planned_spec(path, load_config(None, small).topology.as_topology())
    assert cases and {tuple(c["domain_sizes"].values()) for c in cases} == {spec.domain_sizes}
