"""TED: names, configuration errors and duplicate-token dropping's bytes (exactness: verify)."""

import re

import pytest

from hybridep.config import load_config
from hybridep.launch import run_local
from hybridep.strategies import StrategyError, TedSpec, parse
from hybridep.topology import Topology
from tests.workers import ted_bytes, ted_lm_errors

TOPO = Topology(("dc", "gpu"), (2, 2))


@pytest.mark.parametrize("name", ["ted(tp=2,dtd)", "ted(tp=2)", "ted(tp=2,dtd)+shortcut", "ted(tp=2,dtd,cac)",
                                  "ted(tp=2,cac)"])
def test_ted_names_read_back(name):
    spec = parse(name, TOPO)
    assert isinstance(spec, TedSpec) and str(spec) == name and spec.tp == 2 and spec.dtd == (",dtd" in name)
    assert spec.cac == (",cac" in name)


@pytest.mark.parametrize("name,says", [("ted(tp=3)", "must divide the innermost level's count (gpu: 2)"),
                                       ("ted(dtd)", "tp=N is required"), ("ted(tp=2,dtd,dtd)", "cannot read 'dtd'"),
                                       ("ted(tp=2,x)", "cannot read 'x'")])
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
    each of the four exchanges (dispatch, combine and their backward); without, once per TP rank --
    tp = 2 times as many. The schedule says the same ratio."""
    per_rank = run_local(ted_bytes, 4, (), timeout_s=120)
    with_dtd, without = [r[0] for r in per_rank], [r[1] for r in per_rank]
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
             "cac": (True, True, True)}
    per_rank = run_local(ted_lm_errors, 4, (list(modes.values()),), timeout_s=180)
    for results in per_rank:
        for loss, ref_loss, worst, _ in results:
            assert loss == pytest.approx(ref_loss, rel=1e-12)
            assert worst < 1e-10
    calls = dict(zip(modes, [r[3] for r in per_rank[0]], strict=True))
    layers = 2
    assert calls["cac"] == calls["dtd"] and calls["checkpoint"] == calls["dtd"] + 2 * layers
