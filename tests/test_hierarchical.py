"""The hierarchical token exchange (family ``hierarchical``, ``+hier``): bytes per level, the closed
form, names and bad input. Exactness against the single-process reference: ``tests/test_cli_verify.py``."""

import math

import numpy as np
import pytest
import workers

from hybridep.config import load_config
from hybridep.costmodel import Network, evaluate
from hybridep.launch import run_local
from hybridep.strategies import HierarchicalSpec, StrategyError, parse
from hybridep.strategies.hierarchical import crossings_per_token
from hybridep.topology import Domains, Topology


@pytest.mark.parametrize("names,counts,sizes,dedup,top_k,chunks", [
    (("dc", "gpu"), (4, 1), (1, 1), (0,), 4, 1),
    (("dc", "gpu"), (2, 2), (1, 1), (0,), 4, 1),
    (("dc", "gpu"), (2, 2), (1, 1), (0,), 4, 3),
    (("dc", "gpu"), (2, 2), (1, 1), (0, 1), 2, 1),
    (("dc", "gpu"), (2, 2), (1, 2), (0,), 3, 1),
    (("dc", "node", "gpu"), (2, 2, 2), (1, 1, 1), (0, 1), 4, 2),
    (("dc", "node", "gpu"), (2, 2, 2), (1, 1, 1), (), 2, 1),
])
def test_counted_bytes_are_one_crossing_per_distinct_destination(names, counts, sizes, dedup, top_k, chunks):
    """The runtime's all-to-all bytes per level (all ranks, one forward) are the crossings counted from
    the routing -- a token crosses a deduplicating level once per distinct destination worker other
    than its own, else once per (token, expert) pair -- times the dispatch's packet (hidden vector,
    k weights, k int32 ids) plus the combine's (the hidden vector); the same with the stages
    pipelined in chunks."""
    world = math.prod(counts)
    out = run_local(workers.hierarchical_bytes, world, (names, counts, sizes, dedup, top_k, 40, chunks),
                    timeout_s=240)
    hidden, k = out[0][2], out[0][3]
    for name in names:
        counted = sum(o[0].get(name, 0) for o in out)
        crossings = sum(o[1].get(name, 0) for o in out)
        assert counted == crossings * ((2 * hidden + k) * 8 + 4 * k), name
    assert sum(o[1].get("dc", 0) for o in out) > 0


@pytest.mark.parametrize("counts,sizes,k,experts", [((4, 1), (1, 1), 4, 16), ((2, 2), (1, 1), 2, 8),
                                                    ((8, 2), (1, 1), 4, 64), ((4, 2), (2, 1), 3, 16)])
def test_the_closed_form_is_the_expected_crossings_of_uniform_routing(counts, sizes, k, experts):
    """Uniform top-k routing (k distinct experts): the schedule's crossings per token per level equal a
    Monte Carlo count of distinct destination workers (dedup) within 1 %."""
    from hybridep.costmodel import Workload

    topo = Topology(("dc", "gpu"), counts)
    dom = Domains(topo, sizes)
    w = Workload(dispatch_bytes=0, expert_bytes=0, pre_expert_s=0, experts=experts, top_k=k)
    model = crossings_per_token(dom, w, dedup=(0, 1))
    rng = np.random.default_rng(0)
    g = topo.world_size
    owners = np.arange(experts) // (experts // g)
    ids = np.stack(np.unravel_index(owners, counts), axis=1) // np.asarray(sizes)
    origin = rng.integers(0, g, 20000)
    mine = np.stack(np.unravel_index(origin, counts), axis=1) // np.asarray(sizes)
    picks = np.argsort(rng.random((len(origin), experts)), axis=1)[:, :k]
    for lv in dom.rail_levels():
        far = ids[picks][:, :, lv] != mine[:, None, lv]
        hits = [len({tuple(p) for p in ids[picks[t]][far[t], : lv + 1]}) for t in range(len(origin))]
        assert model[lv] == pytest.approx(np.mean(hits), rel=0.01)
    if counts == (4, 1):  # the closed form itself: 3 other DCs, each holding 4 of 16 experts
        assert model[0] == pytest.approx(3 * (1 - math.comb(12, 4) / math.comb(16, 4)))


def test_pipelined_stages_overlap_the_slow_stage_in_the_model_and_the_simulator():
    """MoNTA's pipelining of the hierarchical stages: one dispatch in C chunks is never shorter than
    its slowest stage's bytes alone nor longer than the stages one after the other plus a latency
    per chunk and stage; the iteration falls from 1 to 4 chunks in the cost model and in the
    simulator, which agree within 15 %, and the bytes stay."""
    from hybridep.costmodel import Network, _a2a_phase, evaluate
    from hybridep.sim.iteration import run_schedule

    cfg = load_config(None, ["moe.top_k=4"])
    topo, net = cfg.topology.as_topology(), Network.from_config(cfg)
    one = parse("hierarchical", topo)
    w = one.workload(cfg)
    base = _a2a_phase(one.schedule(w).exchanges[0], net, cfg.terms)
    slow = max(base[2])  # the busiest level's port carries its bytes, chunked or not
    iters = {}
    for c in (1, 2, 4):
        spec = parse(f"ep+chunks{c}+hier", topo)
        s = spec.schedule(spec.workload(cfg))
        t, total, _ = _a2a_phase(s.exchanges[0], net, cfg.terms)
        assert total == pytest.approx(base[1])
        assert slow <= t <= base[0] + (c - 1) * sum(net.latency_s) + 1e-12
        iters[c] = (evaluate(s, net, cfg.terms).iteration_s, run_schedule(s, net, cfg.terms).iteration_s)
        assert iters[c][0] == pytest.approx(iters[c][1], rel=0.15)
    assert iters[4][0] < iters[1][0] and iters[4][1] < iters[1][1]


def test_each_blocking_call_of_the_stages_pays_the_rendezvous_in_the_model_and_the_simulator():
    """``topology.rendezvous`` r: every stage of the staged exchange makes 1.5 blocking calls per
    phase (counts, rows, ids; the combine's rows; one each in the backward), so the unchunked
    hierarchical exchange on 2 levels takes 4 phases x 2 stages x 1.5 r longer per layer in both
    evaluators; the one-stage exchange makes none. Pipelined, the inner stages run on the compute
    thread: with experts longer than the transfers, every chunk's calls add to the iteration (C x
    the unchunked inner stage's), in both evaluators."""
    from hybridep.sim.iteration import run_schedule

    r = 2e-3
    for flops, chunks in (("20TFLOP/s", 1), ("500MFLOP/s", 4)):
        cfgs = [load_config(None, ["moe.top_k=4", f"compute.flops={flops}", f"topology.rendezvous={x}"])
                for x in (0.0, r)]
        topo = cfgs[0].topology.as_topology()
        layers = cfgs[0].moe.layers
        for name, calls in (("ep", 0.0), ("hierarchical" if chunks == 1 else f"ep+chunks{chunks}+hier", 1.5)):
            spec = parse(name, topo)
            s = spec.schedule(spec.workload(cfgs[0]))
            model = [evaluate(s, Network.from_config(c), c.terms).iteration_s for c in cfgs]
            sim = [run_schedule(s, Network.from_config(c), c.terms).iteration_s for c in cfgs]
            if chunks == 1:
                extra = 4 * 2 * calls * r * layers
                assert model[1] - model[0] == pytest.approx(extra, abs=1e-9), name
                assert sim[1] - sim[0] == pytest.approx(extra, rel=1e-3, abs=1e-9), name
            else:  # the inner stage's calls of every chunk, forward and backward, on the compute thread
                assert model[1] - model[0] >= 4 * chunks * calls * r * layers - 1e-9
                assert sim[1] - sim[0] >= 4 * chunks * calls * r * layers - 1e-9
                assert model[1] == pytest.approx(sim[1], rel=0.1)


def test_the_cost_model_charges_the_stages_bytes():
    """Top-4 over 4 DCs x 1: the model's cross-DC all-to-all bytes of ``hierarchical`` are EP's times
    E[distinct other DCs] / E[other-DC pairs] (and per crossing the mean of the four directions' k
    weights and ids: (k/2) elements and k int32 ids over the dispatch and its backward)."""
    cfg = load_config(None, ["topology.levels.0.count=4", "topology.levels.1.count=1", "moe.top_k=4",
                             "moe.experts=16"])
    net = Network.from_config(cfg)
    topo = cfg.topology.as_topology()
    by = {n: evaluate(parse(n, topo).schedule(parse(n, topo).workload(cfg)), net, cfg.terms).bytes_by_level["dc"]
          for n in ("ep", "hierarchical")}
    distinct = 3 * (1 - math.comb(12, 4) / math.comb(16, 4))
    pairs = 4 * 3 / 4
    h = cfg.moe.hidden
    e = cfg.moe.dtype_bytes
    packet = h * e + 4 * (e / 2 + 4 / 4)
    assert by["hierarchical"]["a2a"] / by["ep"]["a2a"] == pytest.approx(distinct / pairs * packet / (h * e))


def test_names_read_back_and_the_whole_world_one_domain_is_a_no_op():
    topo = Topology(("dc", "node", "gpu"), (2, 2, 2))
    for name in ("hierarchical", "hierarchical(dedup=none)", "hierarchical(dedup=dc)",
                 "hybridep(dc=1,node=2,gpu=1)+hier", "hybridep+sr50(dc=1,node=1,gpu=2)+hier(dedup=dc+gpu)",
                 "ep+chunks4+hier", "hybridep+chunks2(dc=1,node=2,gpu=1)+hier(dedup=dc)"):
        spec = parse(name, topo)
        assert isinstance(spec, HierarchicalSpec) and str(spec) == name and parse(str(spec), topo) == spec
    assert parse("hierarchical(dedup=dc+node)", topo) == parse("hierarchical", topo)  # the default, one name
    whole = parse("hybridep(dc=2,node=2,gpu=2)+hier", topo)
    cfg = load_config(None, ["topology.levels.0.count=2", "topology.levels.1.count=4"])
    t2 = cfg.topology.as_topology()
    one = parse("hybridep(dc=2,gpu=4)+hier", t2)
    assert one.schedule(one.workload(cfg)).exchanges[0].then is None
    assert whole.domains().rail_size == 1


@pytest.mark.parametrize("name,says", [
    ("hierarchical(dedup=rack)", "dedup level 'rack' does not exist; allowed: dc, node, gpu"),
    ("hierarchical(levels=dc)", "unknown argument"),
    ("hierarchical+chunks2", "cannot read"),
    ("hybridep(dc=3,node=1,gpu=1)+hier", "must divide"),
    ("hierarchical(dedup=dc", "cannot read"),
])
def test_bad_names_say_what_is_allowed(name, says):
    with pytest.raises(StrategyError, match="strategy") as err:
        parse(name, Topology(("dc", "node", "gpu"), (2, 2, 2)))
    assert says in str(err.value)


def test_the_planner_considers_the_hierarchical_exchange_where_it_deduplicates():
    """Every partition whose rails cross a deduplicating level is a candidate with ``+hier`` too; where
    plain EP wins (few tokens, big experts) and tokens go to 4 experts, the planner picks
    ``hierarchical`` -- predicted faster than EP's one-stage exchange -- and the plan file runs it."""
    from hybridep.planfile import Plan, plan_document
    from hybridep.planner import plan

    cfg = load_config("configs/bench_ep_wins.yaml", ["moe.top_k=4", "moe.experts=16"])
    result = plan(cfg)
    hier = {str(c.spec) for c in result.candidates if c.hier}
    assert hier == {"hierarchical", "hybridep(dc=1,gpu=2)+hier"}  # rails crossing the DC level
    assert str(result.choice.spec) == "hierarchical"
    assert result.choice.prediction.iteration_s < result.ep.prediction.iteration_s
    doc = plan_document(cfg, result)
    assert doc["strategy"] == "hierarchical" and doc["spec"]["family"] == "hierarchical"
    assert parse(doc["strategy"], cfg.topology.as_topology()) == Plan(result.choice.spec, doc).spec
    best = result.best_by_family()
    assert set(best) == {"hybridep", "hierarchical", "ted"} and best["hierarchical"] is result.choice
    assert all(c.prediction.iteration_s >= best[c.spec.family].prediction.iteration_s for c in result.candidates)
    assert result.to_dict()["best_by_family"]["hybridep"]["strategy"] == str(best["hybridep"].spec)
    one_level = plan(load_config(None, ["topology.levels.0.count=1", "topology.levels.1.count=4"]))
    assert not any(c.hier for c in one_level.candidates)  # nothing above the innermost level to deduplicate
