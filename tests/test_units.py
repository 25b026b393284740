import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hybridep.units import UnitError, parse_bandwidth, parse_bytes, parse_flops, parse_time


@pytest.mark.parametrize("text,bps", [
    ("100Mbit/s", 100e6), ("10Gbit/s", 10e9), ("1.5GB/s", 12e9), ("128MB/ms", 128e6 * 8 * 1e3),
    ("10Gbps", 10e9), ("800MiB/s", 800 * 1024**2 * 8), (1e9, 1e9), (5, 5.0), ("2.5e3kbit/s", 2.5e6),
])
def test_bandwidth(text, bps):
    assert parse_bandwidth(text) == pytest.approx(bps)


@pytest.mark.parametrize("text,s", [("20ms", 0.02), ("5us", 5e-6), ("0.1s", 0.1), ("30ns", 3e-8), (2, 2.0)])
def test_time(text, s):
    assert parse_time(text) == pytest.approx(s)


@pytest.mark.parametrize("text,b", [("8MB", 8e6), ("4.7MB", 4.7e6), ("2MiB", 2 * 1024**2), ("512KiB", 524288),
                                    (100, 100.0)])
def test_bytes(text, b):
    assert parse_bytes(text) == pytest.approx(b)


def test_flops():
    assert parse_flops("312TFLOPS") == pytest.approx(312e12)
    assert parse_flops("50GFLOP/s") == pytest.approx(50e9)


@pytest.mark.parametrize("bad", ["fast", "10 Gbit", "Gbit/s", "10Gbit/h", True, None, [1], float("nan"),
                                 float("inf"), 10**400, "1e999Gbit/s"])
def test_bad_bandwidth_says_what_is_allowed(bad):
    with pytest.raises(UnitError, match="allowed"):
        parse_bandwidth(bad)


@given(st.one_of(st.text(max_size=20), st.floats(), st.integers(), st.none(), st.booleans()))
def test_parsers_raise_only_unit_error(value):
    for parser in (parse_bandwidth, parse_time, parse_bytes, parse_flops):
        try:
            x = parser(value)
        except UnitError:
            continue
        assert math.isfinite(x)
