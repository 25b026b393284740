"""The planner's search space beyond the partitions: chunk counts, SR ratios and shortcut blocks
from configured lists, each only where allowed, each candidate priced by its own schedule."""

import time

import pytest

from hybridep.config import ConfigError, load_config
from hybridep.costmodel import Network, evaluate
from hybridep.planner import plan


def _own(cfg, candidate) -> float:
    spec = candidate.spec
    w = spec.workload(cfg)
    if candidate.dense_sync != w.dense_sync:
        import dataclasses

        w = dataclasses.replace(w, dense_sync=candidate.dense_sync)
    return evaluate(spec.schedule(w), Network.from_config(cfg), cfg.terms).iteration_s


def test_chunk_counts_and_sr_ratios_are_weighed_only_as_listed_and_allowed():
    base = load_config(None, [])
    listed = load_config(None, ["planner.a2a_chunks=[1,2,4]", "planner.allow=[sr]", "planner.sr_ratios=[10,50]"])
    p0, p1 = plan(base), plan(listed)
    names0 = {str(c.spec) for c in p0.candidates}
    names1 = {str(c.spec) for c in p1.candidates}
    assert not any("+sr" in n or "+chunks" in n for n in names0)
    assert {"ep+chunks2", "ep+chunks4", "hybridep+sr10(dc=2,gpu=2)", "hybridep+sr50(dc=2,gpu=2)",
            "ep+chunks2+hier", "ep+chunks4+hier"} <= names1  # the hierarchical stages pipelined too
    assert not any("+chunks1" in n for n in names1)  # the configured count: the base candidates
    assert not any(n.startswith(("ep+sr", "hierarchical+")) for n in names1)  # compression acts on gathers
    assert p1.choice.prediction.iteration_s <= p0.choice.prediction.iteration_s
    for c in p1.candidates:  # every candidate is its own spec, priced by its own schedule
        if c.spec.a2a_chunks is not None or c.spec.sr_ratio is not None:
            assert c.prediction.iteration_s == pytest.approx(_own(listed, c), rel=1e-12), str(c.spec)
    assert str(p1.ep.spec) == "ep"


@pytest.mark.parametrize("over,key", [(["planner.a2a_chunks=[0]"], "planner.a2a_chunks.0"),
                                      (["planner.a2a_chunks=[]"], "planner.a2a_chunks"),
                                      (["planner.sr_ratios=[]"], "planner.sr_ratios"),
                                      (["planner.allow=[tutel]"], "planner.allow.0")])
def test_bad_planner_lists_name_the_key(over, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, over)
    assert key in str(err.value)


def test_planning_1000_dcs_over_the_whole_space_stays_interactive():
    """1000 DCs x 8 GPUs, every partition x {one-stage, +hier} x dense-sync modes x 3 chunk counts x
    2 SR ratios: scored in seconds (the figure goes to the notes; the assert is loose, not a timing
    target)."""
    cfg = load_config(None, ["topology.levels.0.count=1000", "topology.levels.1.count=8", "moe.experts=8000",
                             "planner.a2a_chunks=[1,2,4]", "planner.allow=[sr]", "compute.flops=1e14"])
    start = time.perf_counter()
    result = plan(cfg)
    assert len(result.candidates) > 100 and time.perf_counter() - start < 60


def test_a_ted_candidate_reports_its_rails_and_holders_not_its_position_sizes_as_ranks():
    """TED's domain sizes partition the EP positions: its plan row's p is the positions' (share of
    the experts a position does not hold), its token pairs are its rails' among the ranks (one TP
    index each) and its gather pairs every TP index's among the positions."""
    cfg = load_config(None, ["topology.levels.1.count=4", "moe.experts=16"])
    rows = [c for c in plan(cfg).candidates if c.tp == 2]
    assert rows
    for c in rows:
        row, ranks, positions, held = c.to_dict(), 8, 4, c.domains.domain_size  # positions per domain
        assert row["p"] == pytest.approx(1 - held / positions)
        assert row["a2a_pairs"] == ranks * (positions // held - 1)  # a rail: one rank of each domain
        assert row["ag_pairs"] == 2 * positions * (held - 1)  # each TP index's positions gather apart


def test_prefetch_is_weighed_where_it_can_win_and_unprefetched_gathers_are_exposed_alike():
    """Unprefetched, each layer's gather runs when its experts are needed, alone: the model and the
    simulator agree and expose every gather second; the planner weighs the unprefetched twin only
    where the prefetched forward exposes more than all its gathers (none on the default
    configuration), and with ``bench.prefetch: false`` chooses the prefetched twin of the best."""
    from hybridep.sim.iteration import run_schedule
    from hybridep.strategies import parse

    cfg = load_config(None, ["moe.top_k=4"])
    net = Network.from_config(cfg)
    for name in ("hybridep+noprefetch(dc=2,gpu=2)", "hybridep+chunks2+noprefetch(dc=1,gpu=2)+hier"):
        spec = parse(name, net.topology)
        s = spec.schedule(spec.workload(cfg))
        assert not s.prefetch
        pr = evaluate(s, net, cfg.terms)
        assert pr.exposed_ag_s == pytest.approx(pr.ag_s)  # every gather second exposed
        assert run_schedule(s, net, cfg.terms).iteration_s == pytest.approx(pr.iteration_s, rel=0.02)
        prefetched = parse(name.replace("+noprefetch", "+prefetch"), net.topology)
        assert evaluate(prefetched.schedule(prefetched.workload(cfg)), net, cfg.terms).iteration_s < pr.iteration_s
    assert not any(c.prefetch is not None for c in plan(cfg).candidates)
    off = plan(load_config(None, ["moe.top_k=4", "bench.prefetch=false"]))
    assert off.choice.prefetch is True and "+prefetch" in str(off.choice.spec)
    twins = [c for c in off.candidates if c.prefetch]
    assert twins and all(c.domains.domain_size > 1 and c.tp == 1 for c in twins)
