import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hybridep.topology import Domains, Topology, divisors


def brute_pairs(dom: Domains):
    g = dom.topology.world_size
    kinds = {"ag": set(), "a2a": set()}
    for a, b in itertools.product(range(g), repeat=2):
        k = dom.pair_kind(a, b)
        if k:
            kinds[k].add((a, b))
    return kinds


@pytest.mark.parametrize("size,a2a,ag", [(1, 56, 0), (2, 24, 8), (4, 8, 24), (8, 0, 56)])
def test_table_vii_one_level_8(size, a2a, ag):
    dom = Domains(Topology(("gpu",), (8,)), (size,))
    kinds = brute_pairs(dom)
    assert (len(kinds["a2a"]), len(kinds["ag"])) == (a2a, ag)
    assert (dom.a2a_pairs(), dom.ag_pairs()) == (a2a, ag)


def test_table_vii_32_workers_size_4():
    dom = Domains(Topology(("gpu",), (32,)), (4,))
    kinds = brute_pairs(dom)
    assert (len(kinds["a2a"]), len(kinds["ag"])) == (224, 96) == (dom.a2a_pairs(), dom.ag_pairs())


def test_eq13_coordinates():
    t = Topology(("dc", "node", "gpu"), (3, 2, 4))
    assert t.coords(0) == (0, 0, 0)
    assert t.coords(5) == (0, 1, 1)
    assert t.coords(23) == (2, 1, 3)
    assert all(t.rank(t.coords(r)) == r for r in range(t.world_size))
    assert t.level_of_pair(0, 4) == 1 and t.level_of_pair(0, 23) == 0 and t.level_of_pair(4, 5) == 2


def test_paper_example_4dc_x_4gpu():
    dom = Domains(Topology(("dc", "gpu"), (4, 4)), (2, 4))
    assert dom.domain_size == 8 and dom.rail_size == 2
    assert dom.domain_groups()[0] == list(range(8))
    assert dom.rail_groups()[0] == [0, 8]


def _groups_to_pairs(groups):
    return {(a, b) for g in groups for a in g for b in g if a != b}


@st.composite
def partitions(draw):
    levels = draw(st.integers(1, 3))
    counts = tuple(draw(st.sampled_from([1, 2, 3, 4, 6])) for _ in range(levels))
    sizes = tuple(draw(st.sampled_from(divisors(c))) for c in counts)
    return Domains(Topology(tuple(f"l{i}" for i in range(levels)), counts), sizes)


@given(partitions())
def test_groups_match_brute_force_pair_rule(dom):
    kinds = brute_pairs(dom)
    assert _groups_to_pairs(dom.domain_groups()) == kinds["ag"]
    assert _groups_to_pairs(dom.rail_groups()) == kinds["a2a"]
    g = dom.topology.world_size
    for groups in (dom.domain_groups(), dom.rail_groups()):
        assert sorted(r for grp in groups for r in grp) == list(range(g))
    assert len(kinds["a2a"]) == dom.a2a_pairs() and len(kinds["ag"]) == dom.ag_pairs()
    # Per-level peer counts agree with the brute force.
    for kind in ("ag", "a2a"):
        by_level = [0] * dom.topology.num_levels
        for a, b in kinds[kind]:
            if a == 0:
                by_level[dom.topology.level_of_pair(a, b)] += 1
        assert by_level == dom.peers_by_level(kind)


@given(partitions())
def test_every_token_reaches_every_owner_in_one_hop(dom):
    """For each (source r, owner o) exactly one rank q is in r's rail and o's domain."""
    g = dom.topology.world_size
    rails = {r: set(grp) for grp in dom.rail_groups() for r in grp}
    doms = {r: set(grp) for grp in dom.domain_groups() for r in grp}
    for r in range(g):
        for o in range(g):
            assert len(rails[r] & doms[o]) == 1


def test_indices_match_group_lists():
    dom = Domains(Topology(("dc", "gpu"), (4, 6)), (2, 3))
    for r in range(dom.topology.world_size):
        assert r in dom.domain_groups()[dom.domain_index(r)]
        assert r in dom.rail_groups()[dom.offset_index(r)]
        assert dom.rail_groups()[dom.offset_index(r)].index(r) == dom.domain_index(r)


def test_bad_domain_size_error():
    with pytest.raises(ValueError, match="must divide"):
        Domains(Topology(("gpu",), (8,)), (3,))


def test_feasible_count():
    t = Topology(("dc", "node", "gpu"), (1000, 2, 4))
    assert len(t.feasible_domain_sizes()) == len(divisors(1000)) * 2 * 3 == math.prod([16, 2, 3])


def test_the_pipelined_exchange_applies_only_to_rails_that_cross_the_outer_level():
    topo = Topology(("dc", "gpu"), (2, 2))
    chunks = {sizes: Domains(topo, sizes).exchange_chunks(4) for sizes in topo.feasible_domain_sizes()}
    assert chunks == {(1, 1): 4, (1, 2): 4, (2, 1): 1, (2, 2): 1}
    assert Domains(topo, (1, 1)).exchange_chunks(1) == 1
