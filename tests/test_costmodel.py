import dataclasses
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridep.config import CostTerms, load_config
from hybridep.costmodel import Network, Workload, device_expert_s, optimizer_s
from hybridep.planner import paper_latency, plan, plan_workload
from hybridep.strategies.hybridep import _a2a_level_bytes, codec_s, domain_load_grid, lower_bound, predict
from hybridep.topology import Domains, Topology, divisors

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
OFF = CostTerms(backward=False, latency=False, expert_compute=False, grad_sync=False, overlap=False)
ALL = CostTerms()


@pytest.mark.parametrize("name,p", [("mix1", 0.75), ("mix2", 0.5), ("agonly1", 0.0), ("agonly2", 0.0)])
def test_table_iv_paper_mode(name, p):
    result = plan(load_config(CONFIGS / f"paper_table4_{name}.yaml"))
    assert result.choice.domains.p == pytest.approx(p)
    assert result.choice.prediction.iteration_s <= result.ep.prediction.iteration_s


def _net(counts, bps, lat=None):
    topo = Topology(tuple(f"l{i}" for i in range(len(counts))), tuple(counts))
    return Network(topo, tuple(b / 8 for b in bps), tuple(lat or [0.0] * len(counts)))


workloads = st.builds(
    Workload,
    dispatch_bytes=st.floats(1e3, 1e9), expert_bytes=st.floats(1e2, 1e9), pre_expert_s=st.floats(1e-6, 1.0))


@settings(max_examples=300)
@given(workloads, st.sampled_from([2, 4, 6, 8, 12, 16, 32]), st.floats(1e8, 1e12))
def test_closed_form_snapped_agrees_with_exhaustive_search(w, g, bps):
    net = _net([g], [bps])
    result = plan_workload(net, w, OFF)
    snapped = result.closed_form["snapped_domain_size"]
    best = min(c.prediction.iteration_s for c in result.candidates)
    assert paper_latency(w, g, bps / 8, snapped) == pytest.approx(best, rel=1e-9)


@settings(max_examples=200)
@given(workloads, st.sampled_from([2, 4, 8, 12, 16]), st.floats(1e8, 1e12), st.data())
def test_full_mode_with_extra_terms_off_is_the_paper_model(w, g, bps, data):
    size = data.draw(st.sampled_from(divisors(g)))
    pred = predict(Domains(_net([g], [bps]).topology, (size,)), w, _net([g], [bps], [0.01]), OFF)
    assert pred.iteration_s == pytest.approx(paper_latency(w, g, bps / 8, size), rel=1e-12)
    # switching any term on can only add time ...
    w2 = Workload(w.dispatch_bytes, w.expert_bytes, w.pre_expert_s, expert_s=0.001)
    for term in ("backward", "latency", "expert_compute"):
        on = OFF.model_copy(update={term: True})
        assert predict(Domains(_net([g], [bps]).topology, (size,)), w2, _net([g], [bps], [0.01]), on
                       ).iteration_s >= pred.iteration_s
    # ... except the prefetch chain, which may also hide the gather behind the dispatch, at most
    on = OFF.model_copy(update={"overlap": True, "port_sharing": False})
    chained = predict(Domains(_net([g], [bps]).topology, (size,)), w2, _net([g], [bps], [0.01]), on)
    assert chained.iteration_s >= pred.iteration_s - w2.layers * pred.a2a_phase_s - 1e-12
    assert chained.iteration_s <= pred.iteration_s + 1e-12
    # a prefetched gather shares its port with the combine and the next dispatch it runs beside:
    # never faster, and each of those two exchanges takes at most its own bytes' time longer
    shared = predict(Domains(_net([g], [bps]).topology, (size,)), w2, _net([g], [bps], [0.01]),
                     OFF.model_copy(update={"overlap": True}))
    assert chained.iteration_s - 1e-12 <= shared.iteration_s
    assert shared.iteration_s <= max(chained.iteration_s + 2 * w2.layers * shared.a2a_phase_s,
                                     shared.port_bound_s) + 1e-12


@st.composite
def loaded_partitions(draw):
    levels = draw(st.integers(1, 3))
    counts = tuple(draw(st.sampled_from([1, 2, 3, 4])) for _ in range(levels))
    sizes = tuple(draw(st.sampled_from(divisors(c))) for c in counts)
    g = math.prod(counts)
    per = draw(st.integers(1, 2))
    load = draw(st.lists(st.floats(0.0, 10.0), min_size=g * per, max_size=g * per).filter(lambda x: sum(x) > 0))
    total = sum(load)
    w = Workload(dispatch_bytes=1000.0, expert_bytes=10.0, pre_expert_s=0.0, experts=g * per,
                 expert_load=tuple(x / total for x in load))
    return Domains(Topology(tuple(f"l{i}" for i in range(levels)), counts), sizes), w


@settings(max_examples=150)
@given(loaded_partitions())
def test_a2a_port_bytes_match_brute_force(case):
    """Charge every rank pair's dispatch bytes to the port of its coarsest differing level."""
    dom, w = case
    topo = dom.topology
    g = topo.world_size
    per_rank_load = np.asarray(w.expert_load).reshape(g, -1).sum(axis=1)
    doms = {r: grp for grp in dom.domain_groups() for r in grp}
    egress = [dict() for _ in range(topo.num_levels)]
    ingress = [dict() for _ in range(topo.num_levels)]
    for r, q in itertools.product(range(g), repeat=2):
        if dom.pair_kind(r, q) != "a2a":
            continue
        lv = topo.level_of_pair(r, q)
        b = w.dispatch_bytes * per_rank_load[doms[q]].sum()
        src, dst = topo.coords(r)[: lv + 1], topo.coords(q)[: lv + 1]
        egress[lv][src] = egress[lv].get(src, 0.0) + b
        ingress[lv][dst] = ingress[lv].get(dst, 0.0) + b
    grid = domain_load_grid(dom, w)
    for lv in range(topo.num_levels):
        eg, ing = _a2a_level_bytes(dom, w, grid, lv)
        assert max(egress[lv].values(), default=0.0) == pytest.approx(float(eg.max()), abs=1e-6)
        assert max(ingress[lv].values(), default=0.0) == pytest.approx(float(ing.max()), abs=1e-6)
        total = sum(egress[lv].values())
        pred = predict(dom, w, Network(topo, (1.0,) * topo.num_levels, (0.0,) * topo.num_levels), OFF)
        assert pred.bytes_by_level[topo.names[lv]]["a2a"] == pytest.approx(2 * total, abs=1e-6)


def test_ag_bytes_and_rs_in_full_mode():
    net = _net([2, 4], [1e8, 1e10])
    w = Workload(dispatch_bytes=1e6, expert_bytes=3e5, pre_expert_s=0.0, layers=3)
    pred = predict(Domains(net.topology, (2, 2)), w, net, ALL)
    # hierarchical gather of 2*2 - 1 = 3 shards: 1 across the top level, then 2 (own + received) inside
    assert pred.bytes_by_level["l0"]["ag"] == pytest.approx(8 * 1 * 3e5 * 3)
    assert pred.bytes_by_level["l1"]["ag"] == pytest.approx(8 * 2 * 3e5 * 3)
    assert pred.bytes_by_level["l0"]["rs"] == pred.bytes_by_level["l0"]["ag"]
    # stages in sequence: the top port carries 4 ranks x 1 shard, then each rank port 2 shards
    assert pred.ag_phase_s == pytest.approx(4 * 1 * 3e5 / (1e8 / 8) + 2 * 3e5 / (1e10 / 8))


def test_hot_expert_slows_all_to_all_and_experts():
    net = _net([4], [1e9])
    uniform = Workload(1e6, 1e4, 1e-3, expert_s=1e-3, experts=8)
    hot = Workload(1e6, 1e4, 1e-3, expert_s=1e-3, experts=8, expert_load=(0.65,) + (0.05,) * 7)
    d = Domains(net.topology, (1,))
    assert predict(d, hot, net, ALL).a2a_phase_s > predict(d, uniform, net, ALL).a2a_phase_s
    assert predict(d, hot, net, ALL).compute_s > predict(d, uniform, net, ALL).compute_s


def test_ranks_sharing_processors_charge_the_busy_rank_less():
    """G ranks on C < G cores, expert_s measured with every rank busy: the busy rank's phase takes
    max(its work on one core, all work on C cores) = expert_s * max(factor * C / G, 1)."""
    net = _net([4], [1e9])
    d = Domains(net.topology, (1,))
    hot = Workload(1e6, 1e4, 1e-3, expert_s=1e-3, experts=8, expert_load=(0.65,) + (0.05,) * 7)
    # the busiest device owns experts 0, 1: 0.70 of the tokens = 2.8 x the uniform share
    assert device_expert_s(hot, 2.8, 4) == pytest.approx(2.8e-3)
    shared = dataclasses.replace(hot, processors=2)
    assert device_expert_s(shared, 2.8, 4) == pytest.approx(1e-3 * 2.8 * 2 / 4)
    assert device_expert_s(shared, 1.0, 4) == pytest.approx(1e-3)  # uniform: as measured
    assert device_expert_s(dataclasses.replace(hot, processors=8), 2.8, 4) == pytest.approx(2.8e-3)
    p_hot, p_shared = predict(d, hot, net, ALL), predict(d, shared, net, ALL)
    assert p_shared.compute_s < p_hot.compute_s
    assert p_shared.compute_s > predict(d, dataclasses.replace(shared, expert_load=None), net, ALL).compute_s
    assert p_shared.iteration_s >= lower_bound(d, shared, net, ALL)


def test_codec_time_is_charged_to_compressed_gathers_only():
    """Per layer a device encodes its n own experts and decodes the other members' (S-1) n."""
    net = _net([2, 2], [1e8, 1e9])
    base = Workload(1e6, 1e4, 1e-3, expert_s=1e-3, experts=8, layers=2, gather_bytes=200.0)
    slow = dataclasses.replace(base, codec_expert_s=1e-4)
    full, ep = Domains(net.topology, (2, 2)), Domains(net.topology, (1, 1))
    assert codec_s(full, slow) == pytest.approx(1e-4 * (2 + 3 * 2))
    assert codec_s(ep, slow) == 0.0
    assert codec_s(full, dataclasses.replace(slow, gather_bytes=None)) == 0.0  # uncompressed: no codec
    p0, p1 = predict(full, base, net, ALL), predict(full, slow, net, ALL)
    assert p1.compute_s == pytest.approx(p0.compute_s + 2 * 8e-4)
    assert p1.iteration_s >= p0.iteration_s + 2 * 8e-4 - 1e-12
    assert predict(ep, slow, net, ALL) == predict(ep, base, net, ALL)


def test_optimizer_step_is_charged_after_the_backward_on_owned_parameters():
    """Every strategy steps the same owned parameters (dense + own experts): the same seconds are
    added to the model's and the simulator's iteration, whatever the domain sizes."""
    from hybridep.strategies.hybridep import simulate

    net = _net([2, 2], [1e8, 1e9])
    base = Workload(1e6, 4e4, 1e-3, expert_s=1e-3, experts=8, layers=2, dense_grad_bytes=3e4)
    slow = dataclasses.replace(base, optimizer_s_per_byte=1e-8)
    opt = 1e-8 * (3e4 + 2 * 4e4)
    assert optimizer_s(slow) == pytest.approx(opt)
    assert optimizer_s(slow, expert_copies=4) == pytest.approx(1e-8 * (3e4 + 4 * 2 * 4e4))
    for sizes in [(1, 1), (1, 2), (2, 1), (2, 2)]:
        dom = Domains(net.topology, sizes)
        for fn in (predict, simulate):
            assert fn(dom, slow, net, ALL).iteration_s == pytest.approx(fn(dom, base, net, ALL).iteration_s + opt)
    full = Domains(net.topology, (2, 2))
    assert predict(full, slow, net, OFF) == predict(full, base, net, OFF)  # forward-only: no step


def test_recomputed_experts_cost_one_more_expert_forward_and_decode_in_backward():
    from hybridep.strategies.hybridep import recompute_s, simulate

    net = _net([2, 2], [1e8, 1e9])
    base = Workload(1e6, 4e4, 1e-3, expert_s=2e-3, experts=8, layers=2, gather_bytes=800.0, codec_expert_s=1e-4)
    redo = dataclasses.replace(base, expert_recompute=True)
    full = Domains(net.topology, (2, 2))
    assert recompute_s(full, base) == (0.0, 0.0)
    rc, dec = recompute_s(full, redo)
    assert rc == 1.0 and dec == pytest.approx(1e-4 * 3 * 2)  # the 3 other members' 2 experts each
    p0, p1 = predict(full, base, net, ALL), predict(full, redo, net, ALL)
    extra = 2 * (2e-3 + dec)  # 2 layers x (expert forward + decode)
    assert p1.compute_s == pytest.approx(p0.compute_s + extra)
    # more backward compute: a longer iteration, by at most the extra (it may hide the gradient tail)
    assert p0.iteration_s < p1.iteration_s <= p0.iteration_s + extra + 1e-12
    s0, s1 = simulate(full, base, net, ALL).iteration_s, simulate(full, redo, net, ALL).iteration_s
    assert s0 < s1 <= s0 + extra + 1e-9


def test_holding_more_experts_costs_the_expert_computation_per_byte_held():
    """A device holds its domain's experts: S times its own; the cost is per byte held, split
    between forward and backward by ``expert_weight_forward_share`` (a third by default; on a CPU
    host the bench measures ~0: all in the backward's weight gradients), whatever the experts'
    backward factor -- the same total in the model and the simulator, and with share 0 none of it
    in the forward."""
    from hybridep.costmodel import held_weights_s, held_weights_split
    from hybridep.strategies.hybridep import build_schedule, simulate

    net = _net([2, 2], [1e8, 1e9])
    base = Workload(1e6, 4e4, 1e-3, expert_s=1e-3, experts=8, layers=2)
    held = dataclasses.replace(base, expert_weight_s_per_byte=3e-8)
    assert held_weights_s(held, 4) == pytest.approx(4 * 4e4 * 3e-8)
    assert held_weights_split(held, 4) == pytest.approx((4 * 4e4 * 1e-8, 0.0))
    backward_only = dataclasses.replace(held, expert_weight_forward_share=0.0, expert_backward_factor=2.6)
    assert held_weights_split(backward_only, 4) == pytest.approx((0.0, 4 * 4e4 * 3e-8))
    for sizes in [(1, 1), (1, 2), (2, 2)]:
        dom = Domains(net.topology, sizes)
        extra = 2 * 3e-8 * dom.domain_size * 4e4  # 2 layers x (forward + backward)
        for w0, w1 in [(base, held), (dataclasses.replace(base, expert_backward_factor=2.6), backward_only)]:
            p0, p1 = predict(dom, w0, net, ALL), predict(dom, w1, net, ALL)
            assert p1.compute_s == pytest.approx(p0.compute_s + extra)
            assert p0.iteration_s < p1.iteration_s <= p0.iteration_s + extra + 1e-12
            s0, s1 = simulate(dom, w0, net, ALL).iteration_s, simulate(dom, w1, net, ALL).iteration_s
            assert s0 < s1 <= s0 + extra + 1e-9
        # all in the backward: the forward expert compute is the FLOPs' alone
        assert np.array_equal(build_schedule(dom, backward_only).expert_s,
                              build_schedule(dom, dataclasses.replace(base, expert_backward_factor=2.6)).expert_s)


def test_per_layer_routing():
    """Measured per-layer histograms: the same histogram on every layer equals ``expert_load``; two
    layers each hot on a different DC cost more than their averaged histogram (which looks even)."""
    net = _net([2, 2], [1e8, 1e9])
    d = Domains(net.topology, (1, 1))
    hot0 = (0.4, 0.4, 0.1, 0.1)
    hot1 = (0.1, 0.1, 0.4, 0.4)
    base = Workload(1e6, 1e4, 1e-3, expert_s=1e-3, experts=4, layers=2)
    same = dataclasses.replace(base, layer_loads=(hot0, hot0))
    assert predict(d, same, net, ALL) == predict(d, dataclasses.replace(base, expert_load=hot0), net, ALL)
    split = dataclasses.replace(base, layer_loads=(hot0, hot1))
    averaged = dataclasses.replace(base, expert_load=(0.25,) * 4)
    p_split, p_avg = predict(d, split, net, ALL), predict(d, averaged, net, ALL)
    # each layer's dispatch: the hot DC receives 0.8 of the other DC's tokens instead of 0.5
    assert p_split.a2a_phase_s == pytest.approx(p_avg.a2a_phase_s * 0.8 / 0.5)
    assert p_split.compute_s > p_avg.compute_s
    assert p_split.bytes_by_level["l0"]["a2a"] == pytest.approx(p_avg.bytes_by_level["l0"]["a2a"])
    assert p_split.iteration_s >= lower_bound(d, split, net, ALL)
    # the flow simulator reads the same per-layer routing: slower than the averaged histogram, and
    # never below the bound
    from hybridep.strategies.hybridep import simulate

    for fold in (True, False):
        sim_split, sim_avg = simulate(d, split, net, ALL, fold), simulate(d, averaged, net, ALL, fold)
        assert sim_split.iteration_s > sim_avg.iteration_s
        assert sim_split.iteration_s >= lower_bound(d, split, net, ALL) * (1 - 1e-9)


def test_latency_is_paid_per_phase():
    w = Workload(1e6, 1e4, 0.0)
    d = Domains(Topology(("dc",), (4,)), (1,))
    slow = predict(d, w, _net([4], [1e9], [0.02]), OFF.model_copy(update={"latency": True}))
    fast = predict(d, w, _net([4], [1e9], [0.02]), OFF)
    # forward: the row-count exchange, the dispatch and the combine each wait one latency
    assert slow.iteration_s - fast.iteration_s == pytest.approx(3 * 0.02)


def test_dc_matrix_slow_pair_dominates():
    topo = Topology(("dc", "gpu"), (3, 2))
    w = Workload(1e6, 1e4, 0.0)
    d = Domains(topo, (1, 1))
    even = Network(topo, (1e9, 1e10), (0.0, 0.0), np.full((3, 3), 1e9))
    uneven_m = np.full((3, 3), 1e9)
    uneven_m[0, 2] = uneven_m[2, 0] = 1e8
    uneven = Network(topo, (1e9, 1e10), (0.0, 0.0), uneven_m)
    assert predict(d, w, uneven, OFF).a2a_phase_s == pytest.approx(10 * predict(d, w, even, OFF).a2a_phase_s)


@settings(max_examples=50)
@given(st.sampled_from([(2, 2), (4, 2), (2, 4), (8,), (3, 2, 2)]), workloads)
def test_plan_never_slower_than_ep(counts, w):
    net = _net(list(counts), [1e8] + [1e10] * (len(counts) - 1), [0.02] + [1e-5] * (len(counts) - 1))
    result = plan_workload(net, w, ALL)
    assert result.choice.prediction.iteration_s <= result.ep.prediction.iteration_s


def test_default_config_prefers_hybrid_over_ep_on_slow_wan():
    result = plan(load_config())
    assert result.speedup_over_ep > 1.0
    assert result.choice.domains.sizes != (1, 1)


@settings(max_examples=100)
@given(workloads, st.integers(1, 6), st.integers(1, 3))
def test_overlap_never_slower_and_exact_for_one_layer(w, layers, mb):
    net = _net([2, 2], [1e8, 1e10])
    w = Workload(w.dispatch_bytes, w.expert_bytes, w.pre_expert_s, expert_s=1e-3, layers=layers, micro_batches=mb)
    d = Domains(net.topology, (2, 2))
    on, off = predict(d, w, net, ALL), predict(d, w, net, ALL.model_copy(update={"overlap": False}))
    assert on.iteration_s <= off.iteration_s * (1 + 1e-12)
    if layers == 1:
        assert on.iteration_s == pytest.approx(off.iteration_s, rel=1e-12)


def test_compression_shrinks_the_gather_and_can_enlarge_the_chosen_domain():
    from hybridep.costmodel import workload_from_config

    over = ["moe.tokens_per_gpu=1024", "moe.ffn=1024"]
    base = load_config(CONFIGS / "bench_ep_wins.yaml", over)
    comp = load_config(CONFIGS / "bench_ep_wins.yaml", [*over, "moe.sr_ratio=50"])
    w = workload_from_config(comp)
    assert w.expert_bytes / w.gather_bytes == pytest.approx(50, rel=0.01)
    assert workload_from_config(base).gather_bytes is None
    def one_stage_choice(cfg):  # the exchange of the paper's method (the planner also weighs +hier)
        return min((c for c in plan(cfg).candidates if not c.hier), key=lambda c: c.prediction.iteration_s)

    assert one_stage_choice(base).domains.domain_size == 1
    assert one_stage_choice(comp).domains.domain_size > 1
    assert plan(comp).choice.domains.domain_size > 1


def test_compressed_gradients_shrink_the_reduce_scatter_over_the_dc_level_only():
    """``moe.sr_grads: topk``: the reduce-scatter's stage over the DC level sends the compressed size
    (model and simulator alike), the stage inside a DC stays dense, the gather is unchanged."""
    from hybridep.costmodel import workload_from_config
    from hybridep.strategies.hybridep import simulate

    over = ["moe.sr_ratio=50", "compute.codec_expert_s=0"]
    dense = load_config(CONFIGS / "bench_paper_regime.yaml", over)
    topk = load_config(CONFIGS / "bench_paper_regime.yaml", [*over, "moe.sr_grads=topk"])
    wd, wt = workload_from_config(dense), workload_from_config(topk)
    assert wd.grad_bytes is None and wt.grad_bytes == wt.gather_bytes == wd.gather_bytes
    net = Network.from_config(dense)
    dom = Domains(net.topology, (2, 2))
    pd, pt = predict(dom, wd, net, ALL), predict(dom, wt, net, ALL)
    assert pd.bytes_by_level["dc"]["rs"] / pt.bytes_by_level["dc"]["rs"] == pytest.approx(
        wd.expert_bytes / wd.gather_bytes)
    assert pd.bytes_by_level["gpu"]["rs"] == pt.bytes_by_level["gpu"]["rs"] > 0
    assert pd.bytes_by_level["dc"]["ag"] == pt.bytes_by_level["dc"]["ag"]
    assert pt.rs_s < pd.rs_s and pt.iteration_s <= pd.iteration_s
    sd, st_ = simulate(dom, wd, net, ALL), simulate(dom, wt, net, ALL)
    assert sd.bytes_by_level["dc"]["rs"] == pytest.approx(pd.bytes_by_level["dc"]["rs"], rel=1e-9)
    assert st_.bytes_by_level["dc"]["rs"] == pytest.approx(pt.bytes_by_level["dc"]["rs"], rel=1e-9)
    assert st_.bytes_by_level["gpu"]["rs"] == pytest.approx(pt.bytes_by_level["gpu"]["rs"], rel=1e-9)
    inside = Domains(net.topology, (1, 2))  # a domain inside each DC: nothing compressed
    assert predict(inside, wt, net, ALL).rs_s == predict(inside, wd, net, ALL).rs_s


def test_rails_sharing_an_uplink_interleave_under_skew():
    """Two rails per DC ((dc=1,gpu=2)): each direction of the DC uplink carries the mean of the two
    directions' dispatch loads; one rail (EP) keeps the heavier direction; uniform routing: no change."""
    net = _net([2, 2], [1e8, 1e9])
    hot = Workload(1e6, 1e4, 1e-3, expert_s=1e-3, experts=8, expert_load=(0.2,) * 3 + (0.1,) + (0.1 / 3,) * 3 + (0.1,))
    lockstep = OFF.model_copy(update={"rail_interleave": False})
    on = OFF.model_copy(update={"rail_interleave": True})
    rails = Domains(net.topology, (1, 2))
    eg, ing = _a2a_level_bytes(rails, hot, domain_load_grid(rails, hot), 0)
    assert eg.max() != ing.max() or eg.tolist() != ing.tolist()  # the skew makes the directions differ
    mean_s = float(((eg + ing) / 2).max()) / net.port_bytes_per_s[0]
    heavy_s = float(max(eg.max(), ing.max())) / net.port_bytes_per_s[0]
    assert predict(rails, hot, net, on).a2a_phase_s == pytest.approx(mean_s)
    assert predict(rails, hot, net, lockstep).a2a_phase_s == pytest.approx(heavy_s)
    assert mean_s < heavy_s
    ep = Domains(net.topology, (1, 1))
    assert predict(ep, hot, net, on) == predict(ep, hot, net, lockstep)
    uniform = dataclasses.replace(hot, expert_load=None)
    assert predict(rails, uniform, net, on) == predict(rails, uniform, net, lockstep)


@pytest.mark.parametrize("chunks", [1, 2, 4, 1000])
def test_pipelined_exchange_charges_both_directions_of_a_port(chunks):
    """Skewed pair of DCs: DC 1 sends 0.9 d of its tokens to DC 0 and DC 0 sends 0.1 d back. One
    exchange waits for the busier direction in dispatch and again in combine (2 * 0.9 d); C
    pipelined chunks take max(e + i, max(e, i) (1 + 1/C)) for both phases together."""
    topo = Topology(("dc",), (2,))
    rate = 1e8 / 8
    net = Network(topo, (rate,), (0.0,))
    d = 1e6
    w = Workload(d, 1e4, 1e-3, experts=4, layers=1, expert_load=(0.45, 0.45, 0.05, 0.05), a2a_chunks=chunks)
    terms = CostTerms(backward=False, latency=False, grad_sync=False, overlap=False)
    pred = predict(Domains(topo, (1,)), w, net, terms)
    assert pred.a2a_phase_s == pytest.approx(max(d, 0.9 * d * (1 + 1 / chunks)) / 2 / rate, rel=1e-12)
    if chunks == 1:
        assert pred.a2a_phase_s == pytest.approx(0.9 * d / rate, rel=1e-12)


def test_every_chunk_pays_the_cost_of_the_experts_held():
    """A pipelined exchange runs every expert once per chunk: the held-weights cost (weight reads and
    weight gradients) is charged C times where the rails are chunked, once elsewhere."""
    topo = Topology(("dc", "gpu"), (2, 2))
    net = Network(topo, (1e8 / 8, 1e9 / 8), (0.0, 0.0))
    terms = CostTerms(latency=False, grad_sync=False)

    def compute(sizes, chunks):
        w = Workload(1e5, 1e6, 1e-3, expert_s=1e-3, experts=8, layers=1, expert_weight_s_per_byte=1e-9,
                     a2a_chunks=chunks)
        return predict(Domains(topo, sizes), w, net, terms).compute_s

    assert compute((1, 1), 4) - compute((1, 1), 1) == pytest.approx(1e-9 * 1e6 * 3, rel=1e-9)
    assert compute((1, 2), 4) - compute((1, 2), 1) == pytest.approx(2 * 1e-9 * 1e6 * 3, rel=1e-9)
    assert compute((2, 1), 4) == compute((2, 1), 1)  # rails inside a DC are not chunked
