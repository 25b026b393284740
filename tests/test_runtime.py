"""Multi-process runtime tests on gloo: exactness, training equality, traffic, failures."""

import re
import time

import pytest
import workers
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridep.launch import RankFailedError, run_local
from hybridep.parallel.comm import union_seconds
from hybridep.topology import Topology
from hybridep.verify import TOLERANCE, verify_worker

TOPOLOGIES = {1: (("gpu",), (1,)), 2: (("gpu",), (2,)), 4: (("dc", "gpu"), (2, 2))}


@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_strategy_and_domain_size_matches_reference(world):
    names, counts = TOPOLOGIES[world]
    results = run_local(verify_worker, world, (names, counts, ["ep", "hybridep"], ["float64", "float32"], 7, 60.0),
                        timeout_s=240)[0]
    expected = len(Topology(names, counts).feasible_domain_sizes()) * 2 * 4
    assert len(results) == expected
    for r in results:
        assert r["finite"], r
        assert r["max_rel_err"] <= TOLERANCE[r["dtype"]], r
    scen = [r["scenario"] for r in results]
    assert {s["top_k"] for s in scen} >= {1, 2, 4}
    assert any(0 in s["tokens"] for s in scen) and any(s["capacity_factor"] for s in scen)
    assert any(s["skew"] for s in scen) and any(s["hidden"] % 2 for s in scen)
    # the pipelined exchange (3 chunks) is checked for every strategy beside the single exchange
    assert {(r["strategy"], r["a2a_chunks"]) for r in results} == {(s, c) for s in ("ep", "hybridep") for c in (1, 3)
                                                                   if s == "ep" or world > 1}


@pytest.mark.parametrize("sizes", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_twenty_adam_steps_equal_single_process(sizes):
    worst = run_local(workers.adam_steps, 4, (("dc", "gpu"), (2, 2), sizes, 20, 3), timeout_s=240)
    assert max(worst) <= 1e-5


@pytest.mark.parametrize("sizes,chunks,sr_ratio", [((1, 1), 1, None), ((2, 1), 1, None), ((1, 2), 1, None),
                                                   ((2, 2), 1, None), ((1, 1), 3, None), ((1, 2), 3, None),
                                                   ((2, 2), 1, 5.0)])
def test_counted_bytes_per_level_equal_cost_model_and_simulator(sizes, chunks, sr_ratio):
    """Conservation: the runtime's counted bytes per level = the cost model's = the bytes the flow
    simulator moved over that level's links (folded and pair-exact), for the same routing; the
    pipelined exchange (3 chunks) moves the same bytes; so do compressed gathers and gradients."""
    total, predicted, simulated = run_local(workers.traffic, 4, (("dc", "gpu"), (2, 2), sizes, 37, 12, 10, 2, 5,
                                                                 chunks, sr_ratio), timeout_s=240)[0]
    for level in ("dc", "gpu"):
        a2a = sum(v for k, v in total.items() if k.startswith("a2a/") and k.endswith("/" + level))
        assert a2a == pytest.approx(predicted[level]["a2a"], rel=1e-12)
        assert total.get(f"ag/{level}", 0) == pytest.approx(predicted[level]["ag"], rel=1e-12)
        assert total.get(f"rs/{level}", 0) == pytest.approx(predicted[level]["rs"], rel=1e-12)
        for sim in simulated:
            for op in ("ag", "rs"):
                assert sim[level].get(op, 0.0) == pytest.approx(total.get(f"{op}/{level}", 0), rel=1e-9, abs=1e-6)
            assert sim[level].get("a2a", 0.0) == pytest.approx(a2a, rel=1e-9, abs=1e-6)
    assert sum(predicted[lv]["total"] for lv in ("dc", "gpu")) > 0


def test_pipelined_exchange_in_evaluation_matches_training_mode():
    assert max(run_local(workers.chunked_without_grad, 2, (3, 11), timeout_s=120)) < 1e-12


def test_rank_that_raises_stops_the_run_with_its_name():
    start = time.monotonic()
    with pytest.raises(RankFailedError) as ei:
        run_local(workers.raise_on_rank_one, 3, (False, 30.0), timeout_s=60, collective_timeout_s=30.0)
    assert ei.value.rank == 1 and "injected failure" in str(ei.value)
    assert time.monotonic() - start < 45


def test_rank_that_stalls_becomes_a_named_timeout_error():
    start = time.monotonic()
    with pytest.raises(RankFailedError) as ei:
        run_local(workers.raise_on_rank_one, 3, (True, 4.0), timeout_s=60, collective_timeout_s=4.0)
    msg = str(ei.value)
    assert ei.value.rank == 1  # the rank that never arrived is named, not the ones that waited for it
    assert re.search(r"rank 1 stalled: ranks \[0, 2\] waited [0-9.]+ s in a2a \(call #1 in group \[0, 1, 2\]\)", msg)
    assert re.search(r"a2a in group \[0, 1, 2\] failed", msg)
    assert time.monotonic() - start < 40


def test_background_chains_run_in_order_and_count_bytes_not_their_time():
    results = run_local(workers.background_chains, 3, (False, 30.0), timeout_s=60, collective_timeout_s=30.0)
    for got, seconds, ag_bytes in results:
        assert got == [[10.0 * k + r for r in range(3) for _ in range(2)] for k in range(3)]
        assert ag_bytes == {"gpu": 3 * 2 * 2 * 4}  # 3 gathers x 2 peers x 2 float32 values
        assert set(seconds) == {"ag"}  # the waits for the results; the chains' own time is not counted


def test_rank_that_stalls_in_a_background_chain_becomes_a_named_error():
    start = time.monotonic()
    with pytest.raises(RankFailedError) as ei:
        run_local(workers.background_chains, 3, (True, 4.0), timeout_s=60, collective_timeout_s=4.0)
    assert ei.value.rank == 1
    assert "rank 1 stalled" in str(ei.value)
    assert re.search(r"ag in group \[0, 1, 2\] failed", str(ei.value))
    assert time.monotonic() - start < 40


def test_three_levels_eight_ranks_float64():
    args = (("dc", "node", "gpu"), (2, 2, 2), ["ep", "hybridep"], ["float64"], 11, 120.0)
    results = run_local(verify_worker, 8, args, timeout_s=400)[0]
    assert len(results) == 8 * 4
    assert all(r["finite"] and r["max_rel_err"] <= 1e-10 for r in results), [r for r in results if not r["passed"]]


def test_moe_counts_routed_tokens_without_dropped_ones():
    """The measured routing histogram the bench gives the cost model: kept assignments per expert."""
    import torch

    from hybridep.moe.layer import MoE

    torch.manual_seed(0)
    layer = MoE(hidden=8, ffn=16, experts=4, top_k=2, capacity_factor=0.5)
    x = torch.randn(40, 8)
    layer(x)
    layer(x)
    routing = layer.router(x)
    expected = 2 * torch.bincount(routing.expert_idx[routing.kept], minlength=4)
    assert torch.equal(layer.routed_tokens, expected)
    assert int(layer.routed_tokens.sum()) < 2 * 40 * 2  # capacity 0.5 drops some
    layer.reset_routing_stats()
    assert int(layer.routed_tokens.sum()) == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 20)), max_size=12))
def test_union_seconds_counts_each_covered_instant_once(raw):
    """The cross-DC busy time of the bench: the union of the ranks' intervals, against a unit grid."""
    intervals = [(float(a), float(a + n)) for a, n in raw]
    covered = {t for a, b in intervals for t in range(int(a), int(b))}
    assert union_seconds(intervals) == len(covered)


@pytest.mark.parametrize("sizes,chunks", [((1, 1), 1), ((1, 1), 3), ((2, 1), 1), ((1, 2), 1), ((2, 2), 1)])
def test_a_nan_token_poisons_only_its_own_output_row(sizes, chunks):
    """A NaN element in one token of rank 0 reaches that token's output row and no other row on any
    rank, under every partition and the pipelined exchange."""
    bad = run_local(workers.nan_rows, 4, (("dc", "gpu"), (2, 2), sizes, "float64", chunks), timeout_s=240)[0]
    assert bad == [[3], [], [], []]


def test_a_nan_token_poisons_only_its_own_row_in_one_process():
    import torch

    from hybridep.moe.stack import MoEStack

    torch.manual_seed(0)
    model = MoEStack(2, 16, 24, 8, 2).double()
    x = torch.randn(32, 16, dtype=torch.float64)
    x[3, 5] = float("nan")
    y = model(x)
    assert (~torch.isfinite(y)).any(dim=1).nonzero().flatten().tolist() == [3]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_with_large_finite_activations_stays_finite(dtype):
    """4096 x 64 activations of 4.0 overflow a float16 sum; no output row may turn inf or NaN."""
    import torch

    from hybridep.moe.experts import GroupedExperts

    experts = GroupedExperts(4, 64, 32).to(getattr(torch, dtype))
    for w in experts.weights().values():
        torch.nn.init.constant_(w, 1e-3)
    x = torch.full((4096, 64), 4.0, dtype=getattr(torch, dtype), requires_grad=True)
    y = experts.compute(experts.weights(), x, [1024] * 4)
    assert torch.isfinite(y).all()
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_a_nonfinite_loss_stops_the_run_naming_rank_step_and_where():
    """The rank whose loss went NaN says so; the other, whose dense gradients the all-reduce made NaN,
    says that: both are named with the step and where."""
    with pytest.raises(RankFailedError) as err:
        run_local(workers.nonfinite_step, 2, ("stop", 1, 2), timeout_s=120, collective_timeout_s=20)
    assert "rank 1, step 2: non-finite loss" in str(err.value)
    assert "rank 0, step 2: non-finite dense gradients" in str(err.value)


def test_skip_mode_skips_the_nonfinite_step_on_every_rank_and_counts_it():
    assert run_local(workers.nonfinite_step, 2, ("skip", 1, 2), timeout_s=120) == [[2], [2]]
