"""Shortcut-connected MoE blocks (ScMoE): the model, its configuration, and the runtime's overlap."""

import pytest
import torch

from hybridep.bench import bench_strategies
from hybridep.config import ConfigError, load_config
from hybridep.launch import run_local
from hybridep.lm.model import LMConfig, MoELM, dense_shapes
from hybridep.parallel.strategy import expert_param_names
from hybridep.planner import plan
from tests.workers import shortcut_timeline


def test_a_shortcut_block_keeps_a_dense_ffn_and_its_branch_reads_the_block_input():
    cfg = LMConfig(seq_len=8, hidden=8, heads=2, layers=2, ffn=12, experts=4, dense_blocks=1, shortcut=True)
    torch.manual_seed(0)
    model = MoELM(cfg).double()
    block = model.moe_blocks[0]
    assert block.dense is not None and block.ln_moe is not None
    x = torch.randn(2, 8, 8, dtype=torch.float64)
    a = x + block.attn(block.ln1(x))
    expected = a + block.dense(block.ln2(a)) + block.moe(block.ln_moe(x))
    assert torch.allclose(block(x), expected, rtol=0, atol=1e-12)
    experts = set(expert_param_names(model))
    assert dense_shapes(cfg) == [tuple(p.shape) for n, p in model.named_parameters() if n not in experts]


def test_a_shortcut_needs_a_block_before_each_moe_block():
    with pytest.raises(ConfigError, match=r"moe\.shortcut"):
        load_config(None, ["moe.shortcut=true", "moe.blocks_before_moe=0"])
    with pytest.raises(ValueError, match="dense_blocks"):
        LMConfig(shortcut=True, dense_blocks=0)


def test_the_exchange_is_in_flight_while_the_block_computes_forward_and_backward():
    """Forward: the dispatch is issued before the attention and waited for after it, the combine
    issued before the dense FFN and waited for after it. Backward: the combine's mirror goes out
    before the dense FFN's backward and is waited for after it, the dispatch's mirror likewise around
    the attention's backward. Each exchange is one all-to-all call (as in the standard block)."""
    for spans, events, calls in run_local(shortcut_timeline, 2, (), timeout_s=120):
        at = dict(events)
        by_op: dict[str, list] = {}
        for name, start, end in spans:
            by_op.setdefault(name, []).append((start, end))
        for op, (before, after) in {"a2a_dispatch": ("attn start", "attn end"),
                                    "a2a_combine": ("dense start", "dense end"),
                                    "a2a_combine_bwd": ("dense bwd start", "dense bwd end"),
                                    "a2a_dispatch_bwd": ("attn bwd start", "attn bwd end")}.items():
            (_, issued), (waited, _) = by_op[op]  # the issue, then the wait
            assert issued <= at[before] and waited >= at[after], op
        assert calls["a2a"] == 4


def test_bench_runs_ep_and_the_choice_shortcut_connected_beside_the_standard_ones():
    cfg = load_config(None, ["moe.blocks_before_moe=1", "bench.hierarchical=false", "bench.sr_ratios=[]",
                             "compute.flops=1e12"])
    names = [str(s) for s in bench_strategies(cfg, plan(cfg))]
    choice = str(plan(cfg).choice.spec)
    assert "ep+shortcut" in names and f"{choice}+shortcut" in names and "ep" in names and choice in names
    off = load_config(None, ["moe.blocks_before_moe=0", "bench.hierarchical=false", "compute.flops=1e12"])
    assert not any("shortcut" in str(s) for s in bench_strategies(off, plan(off)))
    every = load_config(None, ["moe.blocks_before_moe=1", "moe.shortcut=true", "compute.flops=1e12"])
    assert all(s.shortcut for s in bench_strategies(every, plan(every)))


def test_the_planner_weighs_shortcut_blocks_only_when_allowed():
    """planner.allow: [shortcut] adds every candidate on shortcut-connected blocks (a different model,
    so never silently); where the exchange is slow and the block's attention long, one of them wins,
    its prediction being its own schedule's; EP on the configured blocks stays the baseline."""
    from pathlib import Path

    from hybridep.costmodel import Network, evaluate

    path = Path(__file__).parents[1] / "configs" / "bench_shortcut.yaml"
    over = ["moe.ffn=256", "moe.experts=256", "topology.levels.0.bandwidth=30Mbit/s"]
    standard, allowed = load_config(path, over), load_config(path, [*over, "planner.allow=[shortcut]"])
    p0, p1 = plan(standard), plan(allowed)
    assert not any(c.shortcut for c in p0.candidates)
    assert len(p1.candidates) == 2 * len(p0.candidates) and str(p1.ep.spec) == "ep"
    spec = p1.choice.spec
    assert spec.shortcut and p1.choice.prediction.iteration_s < p0.choice.prediction.iteration_s
    own = evaluate(spec.schedule(spec.workload(allowed)), Network.from_config(allowed), allowed.terms)
    assert own.iteration_s == pytest.approx(p1.choice.prediction.iteration_s, rel=1e-12)
    with pytest.raises(ConfigError, match=r"planner\.allow\.0"):
        load_config(None, ["planner.allow=[shortcut]", "moe.blocks_before_moe=0"])
