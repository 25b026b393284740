import copy

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridep.config import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_from_text,
    default_config_text,
    load_config,
)

VALID = yaml.safe_load(default_config_text())


def test_default_loads_with_si_units():
    cfg = load_config()
    assert cfg.topology.world_size == 4
    assert cfg.topology.levels[0].bandwidth_bps == pytest.approx(100e6)
    assert cfg.topology.levels[0].latency_s == pytest.approx(0.02)
    assert cfg.compute.flops == pytest.approx(20e9)


def test_overrides_apply_and_validate():
    cfg = load_config(None, ["moe.top_k=1", "topology.levels.0.bandwidth=1Gbit/s", "cost_model=paper"])
    assert cfg.moe.top_k == 1
    assert cfg.topology.levels[0].bandwidth_bps == pytest.approx(1e9)
    assert cfg.cost_model == "paper" and not cfg.terms.backward


def _err(data, **kw):
    with pytest.raises(ConfigError) as ei:
        config_from_dict(data)
    return str(ei.value)


def _with(path, value):
    d = copy.deepcopy(VALID)
    node = d
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return d


@pytest.mark.parametrize("path,value,key,allowed", [
    (("moe", "tokens"), 5, "moe.tokens", "unknown key"),
    (("topology", "levels", 0, "count"), -2, "topology.levels.0.count", "greater than or equal to 1"),
    (("topology", "levels", 0, "count"), 0, "topology.levels.0.count", "greater than or equal to 1"),
    (("topology", "levels", 0, "count"), 2.5, "topology.levels.0.count", "integer"),
    (("topology", "levels", 0, "bandwidth"), "fast", "topology.levels.0.bandwidth", "allowed"),
    (("topology", "levels", 0, "bandwidth"), "-5Gbit/s", "topology.levels.0.bandwidth", "allowed"),
    (("topology", "levels", 1, "latency"), "5 parsecs", "topology.levels.1.latency", "allowed"),
    (("moe", "experts"), 6, "moe.experts", "multiple of 4"),
    (("moe", "top_k"), 9, "moe.top_k", "1..8"),
    (("moe", "dtype"), "int8", "moe.dtype", "float64"),
    (("moe", "expert_load"), [1.0, 2.0], "moe.expert_load", "one entry per expert"),
    (("moe", "a2a_chunks"), 0, "moe.a2a_chunks", "greater than or equal to 1"),
    (("moe", "a2a_chunks"), 2.5, "moe.a2a_chunks", "integer"),
    (("cost_model"), "magic", "cost_model", "paper"),
    (("moe", "sr_grads"), "sparse", "moe.sr_grads", "topk"),
    (("topology", "message_overhead"), "-3us", "topology.message_overhead", "allowed"),
    (("bench", "sr_grads"), ["topk", "topk"], "bench.sr_grads", "each value once"),
    (("bench", "sr_ratios"), [50.0, 50.0], "bench.sr_ratios", "each value once"),
    (("compute", "processors"), 0, "compute.processors", "greater than or equal to 1"),
])
def test_errors_name_key_value_and_allowed(path, value, key, allowed):
    path = path if isinstance(path, tuple) else (path,)
    msg = _err(_with(path, value))
    assert key in msg and allowed in msg and repr(value)[:20] in msg


def test_chunked_exchange_refuses_experts_decoded_one_at_a_time():
    data = _with(("moe", "a2a_chunks"), 2)
    data["bench"] = {"sr_decode": "expert", "sr_basis": "shared"}
    msg = _err(data)
    assert "moe.a2a_chunks" in msg and "sr_decode 'layer'" in msg


def test_yaml_syntax_and_top_level_errors():
    with pytest.raises(ConfigError, match="not valid YAML"):
        config_from_text("topology: [")
    with pytest.raises(ConfigError, match="mapping"):
        config_from_text("- 1\n- 2")
    with pytest.raises(ConfigError, match="--config"):
        load_config("/nonexistent/file.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="exactly one"):
        config_from_dict({"topology": VALID["topology"]})


def _paths(d, prefix=()):
    out = [prefix] if prefix else []
    if isinstance(d, dict):
        for k, v in d.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out += _paths(v, (*prefix, i))
    return out


PATHS = _paths(VALID)
junk = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-10**30, max_value=10**30), st.floats(),
              st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(PATHS), junk), min_size=1, max_size=4))
def test_random_bad_inputs_raise_only_config_error(mutations):
    data = copy.deepcopy(VALID)
    for path, value in mutations:
        node = data
        try:
            for p in path[:-1]:
                node = node[p]
            node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    try:
        cfg = config_from_dict(data)
    except ConfigError as err:
        assert err.problems and all(isinstance(k, str) for k, _, _ in err.problems)
    else:
        assert cfg.topology.world_size >= 1


@settings(max_examples=200)
@given(st.text(max_size=200))
def test_random_yaml_text_raises_only_config_error(text):
    try:
        config_from_text(text)
    except ConfigError:
        pass


SCI_FIELDS = [  # (path in the YAML document, --set key, attribute path of the value, exponents in range)
    (("compute", "flops"), "compute.flops", ("compute", "flops"), (3, 15)),
    (("topology", "levels", 0, "bandwidth"), "topology.levels.0.bandwidth",
     ("topology", "levels", 0, "bandwidth_bps"), (0, 11)),
    (("topology", "levels", 1, "latency"), "topology.levels.1.latency",
     ("topology", "levels", 1, "latency_s"), (-9, -1)),
    (("bench", "lr"), "bench.lr", ("bench", "lr"), (-9, 0)),
]


def _get(obj, path):
    for p in path:
        obj = obj[p] if isinstance(p, int) else getattr(obj, p)
    return obj


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(SCI_FIELDS), mantissa=st.integers(1, 999), data=st.data(),
       style=st.sampled_from(["{m}e{e}", "{m}.0e{e}", "{m}E{e}", "{m}e+{e}"]), via_set=st.booleans())
def test_numbers_in_scientific_notation_are_numbers(field, mantissa, data, style, via_set):
    """Every numeric field reads 1e10, 300e12, 3.0e14 (YAML 1.1 would leave them strings), from the
    file and from --set; the value is the number written."""
    doc_path, key, attr, (lo, hi) = field
    exponent = data.draw(st.integers(lo, hi))
    if style == "{m}e+{e}" and exponent < 0:
        style = "{m}e{e}"
    text = style.format(m=mantissa, e=exponent)
    value = mantissa * 10.0**exponent
    if via_set:
        cfg = load_config(None, [f"{key}={text}"])
    else:
        d = copy.deepcopy(VALID)
        node = d
        for p in doc_path[:-1]:
            node = node[p]
        node[doc_path[-1]] = "@"
        cfg = config_from_text(yaml.safe_dump(d).replace("'@'", text))
    assert _get(cfg, attr) == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("text,expected", [("4.096e3", 4096), ("4096", 4096), ("1e2", 100)])
def test_integer_fields_take_integral_numbers_in_scientific_notation(text, expected):
    assert load_config(None, [f"moe.tokens_per_gpu={text}"]).moe.tokens_per_gpu == expected


@pytest.mark.parametrize("text", ["4.55e1", "true", "1e400"])
def test_integer_fields_refuse_fractions_booleans_and_overflow(text):
    with pytest.raises(ConfigError, match=r"moe\.layers"):
        load_config(None, [f"moe.layers={text}"])
