"""Fuzz the command line: random YAML documents and --set values give exit 0 or exit 2 with a message
that names the key -- never a traceback, never a hang (each case runs under an alarm)."""

import copy
import re
import signal

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridep.cli import main
from hybridep.config import default_config_text

VALID = yaml.safe_load(default_config_text())
VALID["compute"]["flops"] = "20GFLOP/s"  # never the probe: the fuzz is about the configuration

KEYS = [  # every leaf key of the configuration (dotted, as --set takes them), and some that are not
    "cost_model", "topology.levels.0.name", "topology.levels.0.count", "topology.levels.0.bandwidth",
    "topology.levels.0.latency", "topology.levels.1.count", "topology.levels.1.bandwidth", "topology.levels.1.latency",
    "topology.message_overhead", "topology.dc_bandwidth", "moe.hidden", "moe.ffn", "moe.experts", "moe.top_k",
    "moe.layers", "moe.blocks_before_moe", "moe.tokens_per_gpu", "moe.seq_len", "moe.micro_batches", "moe.dtype",
    "moe.expert_kind", "moe.capacity_factor", "moe.sr_ratio", "moe.sr_values", "moe.sr_grads", "moe.a2a_chunks",
    "moe.expert_load", "moe.expert_zipf", "compute.flops", "compute.codec_expert_s", "compute.optimizer_s_per_byte",
    "compute.expert_weight_s_per_byte", "cost_terms.backward", "cost_terms.overlap", "bench.steps", "bench.warmup",
    "bench.lr", "bench.seed", "bench.peers", "bench.sr_ratios", "bench.sr_grads", "bench.timeout_s",
    "bench.on_nonfinite", "simulate.fold", "simulate.strategies", "workload", "moe", "nonsense.key", "moe.nope",
    "topology.levels.7.count", "topology.levels.x", "", ".", "moe..hidden",
]
SCALARS = st.one_of(
    st.sampled_from(["1e10", "300e12", "3.0e14", "1.0e-300", "1e308", "-1", "0", "0.000000001", "true", "false",
                     "off", "on", "yes", "null", "~", "[]", "{}", "[1, 2", "nan", ".inf", "-.inf", "1e30",
                     "100Mbit/s", "1Tbit/s", "5us", "1e3ms", "4096", "4.096e3", "2.5", "8", "2", "1",
                     "[deepspeed, deepspeed]", "[ep, planner]", "hybridep+sr0(dc=2,gpu=2)", "float16", "swiglu",
                     "\u00e9\u00e8", "'x' * 3", "!!python/object:os.system", "&a [*a]", "1000000", "1e9"]),
    st.integers(-10**20, 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=12),
)


class HangError(Exception):
    pass


def _alarm(signum, frame):
    raise HangError


def _run(argv: list[str], capsys) -> tuple[int, str]:
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(20)
    try:
        code = main(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, capsys.readouterr().out


def _check(code: int, out: str) -> None:
    assert code in (0, 2), out[-2000:]
    assert "Traceback" not in out
    if code == 2:  # one line per problem: "KEY: got VALUE -- ALLOWED"
        assert re.search(r"^\s+\S.*: got .* -- .+", out, re.M), out[-2000:]


@settings(max_examples=350, deadline=None, suppress_health_check=list(HealthCheck))
@given(sets=st.lists(st.tuples(st.sampled_from(KEYS), SCALARS), min_size=1, max_size=3))
def test_random_set_values_exit_0_or_2_naming_the_key(sets, capsys):
    code, out = _run(["plan", "--top", "1"] + [x for k, v in sets for x in ("--set", f"{k}={v}")], capsys)
    _check(code, out)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(edits=st.lists(st.tuples(st.sampled_from(KEYS), SCALARS), min_size=1, max_size=3), dup=st.booleans(),
       data=st.data())
def test_random_yaml_documents_exit_0_or_2_naming_the_key(edits, dup, data, tmp_path_factory, capsys):
    doc = copy.deepcopy(VALID)
    for key, text in edits:
        node, parts = doc, key.split(".")
        try:
            for p in parts[:-1]:
                node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
            value = yaml.safe_load(text) if text else text
        except Exception:  # not a place in the document, or not YAML: leave it
            continue
        if isinstance(node, dict) and parts[-1]:
            node[parts[-1]] = value
    text = yaml.safe_dump(doc, allow_unicode=True)
    if dup:  # a key given twice
        text += "cost_model: " + data.draw(st.sampled_from(["full", "paper", "bogus"])) + "\n"
    path = tmp_path_factory.mktemp("fuzz") / "cfg.yaml"
    path.write_bytes(text.encode("utf-8", errors="surrogatepass") if data.draw(st.booleans())
                     else text.encode("latin-1", errors="replace"))
    code, out = _run(["plan", "--top", "1", "--config", str(path)], capsys)
    _check(code, out)

