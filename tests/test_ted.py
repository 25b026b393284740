"""TED: names, configuration errors and duplicate-token dropping's bytes (exactness: verify)."""

import dataclasses
import re

import pytest

from hybridep.config import load_config
from hybridep.launch import run_local
from hybridep.strategies import StrategyError, TedSpec, parse
from hybridep.topology import Topology
from tests.workers import ted_bytes, ted_domain_traffic, ted_lm_errors

TOPO = Topology(("dc", "gpu"), (2, 2))


@pytest.mark.parametrize("name", ["ted(tp=2,dtd)", "ted(tp=2)", "ted(tp=2,dtd)+shortcut", "ted(tp=2,dtd,cac)",
                                  "ted(tp=2,cac)", "ted(tp=2,dtd,dc=2,gpu=1)", "ted(tp=2,cac,dc=2,gpu=1)+shortcut",
                                  "ted(tp=2,dtd,chunks=4)"])
def test_ted_names_read_back(name):
    spec = parse(name, TOPO)
    assert isinstance(spec, TedSpec) and str(spec) == name and spec.tp == 2 and spec.dtd == (",dtd" in name)
    assert spec.cac == (",cac" in name)


@pytest.mark.parametrize("name,says", [("ted(tp=3)", "must divide the innermost level's count (gpu: 2)"),
                                       ("ted(dtd)", "tp=N is required"), ("ted(tp=2,dtd,dtd)", "cannot read 'dtd'"),
                                       ("ted(tp=2,x)", "cannot read 'x'"),
                                       ("ted(tp=2,gpu=2)", "gpu domain size 2 must divide the EP positions of "
                                                           "that level (1); allowed: [1]"),
                                       ("ted(tp=2,dc=3)", "dc domain size 3 must divide"),
                                       ("ted(tp=2,dtd,cac,chunks=2)", "chunks=2 with cac; allowed: chunks=1")])
def test_bad_ted_names_say_what_is_allowed(name, says):
    with pytest.raises(StrategyError, match=re.escape(says)):
        parse(name, TOPO)


@pytest.mark.parametrize("key,value,says", [("moe.hidden", 33, "moe.hidden = 33 is not divisible by tp"),
                                            ("moe.ffn", 99, "moe.ffn = 99 is not divisible by tp"),
                                            ("bench.heads", 3, "bench.heads = 3 is not divisible by tp")])
def test_dimensions_ted_cannot_shard_are_named(key, value, says):
    cfg = load_config(None, ["moe.hidden=48", "bench.heads=4", f"{key}={value}"])
    with pytest.raises(StrategyError, match=re.escape(says)):
        parse("ted(tp=2,dtd)", cfg.topology.as_topology()).workload(cfg, 1e12)


def test_duplicate_token_dropping_sends_each_copy_over_the_slow_link_once():
    """Counted cross-DC all-to-all bytes: with DTD, each copy routed to the other DC crosses once in
    each of the four exchanges (dispatch, combine and their backward), pipelined in chunks or not;
    without, once per TP rank -- tp = 2 times as many. The schedule says the same ratio."""
    per_rank = run_local(ted_bytes, 4, (), timeout_s=120)
    with_dtd, without = [r[0] for r in per_rank], [r[1] for r in per_rank]
    assert [r[2] for r in per_rank] == with_dtd  # pipelined in chunks (MoNTA): the same bytes
    crossing = sum(c for _, c in with_dtd) / 2  # both TP ranks of a group route the same copies
    assert sum(b for b, _ in with_dtd) == 4 * crossing
    assert sum(b for b, _ in without) == 2 * 4 * crossing
    cfg = load_config(None, ["bench.heads=4"])
    dc = {name: parse(name, TOPO).schedule(parse(name, TOPO).workload(cfg, 1e12)).exchanges[0].ports[0].total_bytes
          for name in ("ted(tp=2,dtd)", "ted(tp=2)")}
    assert dc["ted(tp=2)"] == pytest.approx(2 * dc["ted(tp=2,dtd)"])


def test_the_language_model_under_ted_is_the_single_process_model_and_cac_sends_nothing_more():
    """Attention and dense FFNs tensor-parallel (PyTorch's parallelize_module), experts sharded by EP
    position and FFN slice, with and without DTD: loss and every parameter gradient within 1e-10 in
    float64. With the MoE blocks checkpointed the backward recomputes them: plain checkpointing
    repeats every all-to-all of the forward (2 more per layer), CAC replays the recorded outputs and
    makes exactly as many all-to-all calls as the run without checkpointing; gradients stay exact."""
    modes = {"dtd": (True, False, False), "no dtd": (False, False, False), "checkpoint": (True, False, True),
             "cac": (True, True, True), "domains": (True, False, False, (2, 1)),
             "domains cac": (True, True, True, (2, 1))}
    per_rank = run_local(ted_lm_errors, 4, (list(modes.values()),), timeout_s=180)
    for results in per_rank:
        for loss, ref_loss, worst, _ in results:
            assert loss == pytest.approx(ref_loss, rel=1e-12)
            assert worst < 1e-10
    calls = dict(zip(modes, [r[3] for r in per_rank[0]], strict=True))
    layers = 2
    assert calls["cac"] == calls["dtd"] and calls["checkpoint"] == calls["dtd"] + 2 * layers
    assert calls["domains cac"] == calls["domains"]


def test_ted_inside_expert_domains_gathers_shards_and_its_schedule_says_so():
    """TED with both EP positions of 2 DCs x 2 in one expert domain: no token crosses the DC link;
    each rank's expert shards cross it once as the gather and once as the gradients' reduce-scatter
    (counted), only between ranks of one TP index -- and the schedule's gather is one stage over the
    DC level, one peer, one rank's experts' bytes, in those groups, with no cross-DC exchange."""
    per_rank = run_local(ted_domain_traffic, 4, (), timeout_s=120)
    for by, shard in per_rank:
        assert by.get("a2a/dc", 0) == 0 and by.get("ag/dc") == shard and by.get("rs/dc") == shard
        assert by.get("ag/gpu", 0) == 0 and by.get("tp/gpu", 0) > 0  # no gather inside the TP group
    cfg = load_config(None, ["bench.heads=4"])
    spec = parse("ted(tp=2,dtd,dc=2)", TOPO)
    w = spec.workload(cfg, 1e12)
    s = spec.schedule(w)
    assert [(st.level, st.peers, st.flow_bytes) for st in s.gather] == [(0, 1, w.sent_expert_bytes)]
    assert sorted(s.gather[0].groups()) == [[0, 2], [1, 3]]
    assert s.exchanges[0].ports[0].total_bytes == 0
    held = dataclasses.replace(w, expert_weight_s_per_byte=1e-9)  # a rank holds its domain's 2 shards, not 4
    assert spec.schedule(held).expert_s == pytest.approx(parse("hybridep(dc=2,gpu=1)", TOPO).schedule(held).expert_s)


def test_verify_runs_a_ted_plan_at_its_tp_and_partition():
    """``verify --plan`` with a TED plan runs TED cases at the plan's TP group size and position
    partition (dimensions rounded up to what tp shards divide)."""
    from hybridep.cli import _verify_family
    from hybridep.verify import make_cases

    topo = Topology(("dc", "gpu"), (2, 4))
    spec = parse("ted(tp=4,dtd,dc=2)", topo)
    assert _verify_family(spec) == "ted"
    cases = make_cases(topo, ["ted"], ["float64"], 8, 0, only=[spec.domain_sizes], tp=spec.tp)
    assert cases and {(c.tp, c.domain_sizes) for c in cases} == {(4, (2, 1))}
    assert all(c.scenario.hidden % 4 == 0 and c.scenario.ffn % 4 == 0 for c in cases)


def test_the_tp_groups_collectives_wait_for_the_rendezvous_not_the_gathers_delay():
    """TED's TP collectives block the compute thread between two computations: each pays the
    measured rendezvous (one per stage, forward and backward, every layer), at the all-to-all's rate
    -- not the background gather chains' delay per stage or efficiency (both evaluators)."""
    from hybridep.costmodel import Network, evaluate
    from hybridep.sim.iteration import run_schedule

    cfg = load_config(None, ["bench.heads=4"])
    spec = parse("ted(tp=2,dtd)", TOPO)
    s = spec.schedule(spec.workload(cfg, 1e12))
    assert s.tp_stages and all(st.blocking for st in s.tp_stages) and not s.gather
    rates, latency = (12.5e6, 125e6), (0.0, 0.0)

    def net(delay: float, gather_efficiency: float, rendezvous: float) -> Network:
        return Network(TOPO, rates, latency, None, (1.0, gather_efficiency), (delay, delay), rendezvous_s=rendezvous)

    base, busy = net(0.0, 1.0, 0.002), net(0.05, 0.5, 0.002)
    assert evaluate(s, busy, cfg.terms).iteration_s == pytest.approx(evaluate(s, base, cfg.terms).iteration_s)
    assert run_schedule(s, busy, cfg.terms, False).iteration_s == pytest.approx(
        run_schedule(s, base, cfg.terms, False).iteration_s)
    calls = 2 * s.layers * s.micro_batches * len(s.tp_stages)
    slower = net(0.0, 1.0, 0.012)
    assert evaluate(s, slower, cfg.terms).iteration_s - evaluate(s, base, cfg.terms).iteration_s == pytest.approx(
        calls * 0.010)
    assert run_schedule(s, slower, cfg.terms, False).iteration_s - run_schedule(
        s, base, cfg.terms, False).iteration_s == pytest.approx(calls * 0.010, rel=0.05)
