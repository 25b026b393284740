"""Dense-gradient synchronisation modes (``dense_sync``)."""

import math

import pytest
import workers

from hybridep.config import ConfigError, load_config
from hybridep.launch import run_local
from hybridep.topology import Topology


@pytest.mark.parametrize("names,counts", [(("dc", "gpu"), (2, 2)), (("dc", "node", "gpu"), (2, 2, 2))])
def test_hierarchical_sync_gives_the_rings_gradients(names, counts):
    """Reduce-scatter in each DC, all-reduce across DCs, all-gather in each DC: the same dense gradients
    as DDP's ring (float64, 1e-10), one bucket per parameter (uneven sizes), a rank without tokens; its
    bytes go through the communicator, across the DC level too."""
    out = run_local(workers.dense_sync_modes, math.prod(counts), (names, counts), timeout_s=240)
    for worst, counted in out:
        assert worst <= 1e-10
        assert counted.get("dc", 0) > 0


@pytest.mark.parametrize("value,says", [("bogus", "allowed: ring, hierarchical"), ("powersgd(rank=0)", "rank >= 1"),
                                        ("true", "a name")])
def test_bad_dense_sync_names_the_key(value, says):
    with pytest.raises(ConfigError, match="dense_sync") as err:
        load_config(None, [f"dense_sync={value}"])
    assert says in str(err.value)


@pytest.mark.parametrize("names,counts,mode,steps", [
    (("dc", "gpu"), (2, 2), "ring", 1),
    (("dc", "gpu"), (2, 2), "hierarchical", 1),
    (("dc", "node", "gpu"), (2, 2, 2), "hierarchical", 1),
    (("dc", "gpu"), (3, 1), "hierarchical", 1),
    (("dc", "gpu"), (2, 2), "powersgd(rank=2,start=2)", 3),
    (("dc", "gpu"), (2, 2), "powersgd(rank=2,start=2)", 1),
])
def test_counted_dense_bytes_equal_the_schedules(names, counts, mode, steps):
    """The dense-sync bytes the runtime counts per level (all ranks, one iteration, DDP's buckets)
    equal the schedule's that the cost model and the simulator price -- for PowerSGD the factors
    PyTorch reports sending after ``start`` steps (a plain all-reduce before). Hierarchical shards
    are padded to a multiple of the DC's ranks: at most that many elements per bucket more."""
    from hybridep.costmodel import Workload
    from hybridep.strategies import dense_sync

    world = math.prod(counts)
    out = run_local(workers.dense_sync_bytes, world, (names, counts, mode, steps), timeout_s=240)
    shapes = out[0][1]
    elements = sum(math.prod(s) for s in shapes)
    priced = mode if not mode.startswith("powersgd") or steps > 2 else "ring"
    w = Workload(dispatch_bytes=0, expert_bytes=0, pre_expert_s=0, dense_grad_bytes=8.0 * elements,
                 dense_sync=priced, dense_shapes=tuple(shapes))
    sync = dense_sync.schedule(Topology(names, counts), w)
    for lv, name in enumerate(names):
        counted = sum(o[0].get(name, 0) for o in out)
        expected = sum(st.total_fraction[lv] for st in sync.stages) * w.dense_grad_bytes
        buckets = len(shapes)  # at most one bucket per parameter
        slack = 8 * world * buckets * (counts[1] if mode == "hierarchical" else 1)
        assert abs(counted - expected) <= slack, (name, counted, expected)
        if lv == 0:
            assert counted > 0


def _cfg(*over):
    return load_config(None, ["topology.levels.0.count=2", "topology.levels.1.count=2", "compute.flops=1e11", *over])


@pytest.mark.parametrize("mode", ["ring", "hierarchical", "powersgd(rank=4,start=2)"])
def test_model_and_simulator_price_the_same_dense_bytes(mode):
    """The cost model's and the simulator's dense-sync bytes per level are the schedule's; the
    hierarchical mode puts 1/(2 (N-1)/N) of the ring's bytes on the DC level (N = 4 ranks: 2/3)."""
    from hybridep.costmodel import Network, evaluate
    from hybridep.sim.iteration import run_schedule
    from hybridep.strategies import HybridEPSpec

    cfg = _cfg(f"dense_sync={mode}")
    spec = HybridEPSpec.ep(cfg.topology.as_topology())
    w = spec.workload(cfg)
    s = spec.schedule(w)
    net = Network.from_config(cfg)
    model = evaluate(s, net, cfg.terms).bytes_by_level
    sim = run_schedule(s, net, cfg.terms).bytes_by_level
    for lv, name in enumerate(cfg.topology.as_topology().names):
        expected = sum(st.total_fraction[lv] for st in s.grad_sync.stages) * w.dense_grad_bytes
        assert model[name]["dense"] == pytest.approx(expected)
        assert sim[name].get("allreduce", 0.0) == pytest.approx(expected, rel=1e-6)
    dc_fraction = sum(st.total_fraction[0] for st in s.grad_sync.stages) / 2  # per DC port
    if mode == "ring":
        assert dc_fraction == pytest.approx(2 * 3 / 4)
    elif mode == "hierarchical":
        assert dc_fraction == pytest.approx(1.0)
    else:
        assert dc_fraction < 0.5 * 2 * 3 / 4


def test_auto_chooses_among_the_exact_modes_and_lossy_ones_only_when_allowed():
    """``dense_sync: auto``: the planner picks the fastest allowed mode (on a slow WAN with a dense
    model, hierarchical over ring); PowerSGD only when ``planner.allow`` lists it, and the plan file
    records the choice."""
    from hybridep.planfile import plan_document
    from hybridep.planner import plan

    slow = ["topology.levels.0.bandwidth=100Mbit/s", "topology.levels.0.latency=1ms", "moe.blocks_before_moe=2",
            "moe.hidden=256"]
    exact = plan(_cfg(*slow))
    assert {c.dense_sync for c in exact.candidates} == {"ring", "hierarchical"}
    assert exact.choice.dense_sync == "hierarchical"
    lossy = plan(_cfg(*slow, "planner.allow=[powersgd(rank=4)]"))
    assert {c.dense_sync for c in lossy.candidates} == {"ring", "hierarchical", "powersgd(rank=4,start=10)"}
    assert lossy.choice.dense_sync == "powersgd(rank=4,start=10)"
    assert lossy.choice.prediction.iteration_s < exact.choice.prediction.iteration_s
    assert plan_document(_cfg(*slow), exact)["dense_sync"] == "hierarchical"
    fixed = plan(_cfg(*slow, "dense_sync=ring"))
    assert {c.dense_sync for c in fixed.candidates} == {"ring"}


@pytest.mark.parametrize("value", ["[bogus]", "[powersgd(rank=0)]", "[auto]"])
def test_bad_planner_allow_names_the_key(value):
    with pytest.raises(ConfigError, match=r"planner\.allow") as err:
        load_config(None, [f"planner.allow={value}"])
    assert "allowed" in str(err.value) or "rank >= 1" in str(err.value)


@pytest.mark.parametrize("command,key", [("train", "dense_sync"), ("bench", "planner.allow.0")])
def test_powersgd_rank_above_the_smallest_matrix_is_refused_before_any_rank_starts(command, key, capsys):
    """The bench's language model's smallest dense matrix is the router (8 experts x hidden 64): rank 999
    is refused with exit 2 naming the key."""
    from hybridep.cli import main

    value = "powersgd(rank=999)"
    sets = [f"dense_sync={value}"] if key == "dense_sync" else [f"planner.allow=['{value}']"]
    args = [command, *[x for s in sets for x in ("--set", s)]]
    if command == "bench":
        args += ["--testbed", "off"]
    assert main(args) == 2
    out = capsys.readouterr().out
    assert key in out and "smallest dense gradient matrix" in out and "allowed: 1..8" in out
