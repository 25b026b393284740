"""Parsing of quantities with units. The only place where units are interpreted.

Every parser returns a plain float in SI base units:

* :func:`parse_bandwidth` -> bits per second (``_bps``)
* :func:`parse_time`      -> seconds (``_s``)
* :func:`parse_bytes`     -> bytes (``_bytes``)
* :func:`parse_flops`     -> floating-point operations per second (``_flops``)

Decimal prefixes are powers of 1000 (``MB`` = 1e6 bytes, ``Gbit`` = 1e9 bits); binary prefixes
(``KiB``, ``MiB``, ``GiB``) are powers of 1024. A bare number is taken in the base unit. Any
malformed input raises :class:`UnitError` (a ``ValueError``) that says what is accepted.
"""

from __future__ import annotations

import math
import re

_PREFIX = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
           "Ki": 1024.0, "Mi": 1024.0**2, "Gi": 1024.0**3, "Ti": 1024.0**4}
_TIME = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9, "min": 60.0}
_NUM = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"


class UnitError(ValueError):
    """A quantity could not be parsed; the message says which forms are accepted."""


def _number(value: object, what: str, allowed: str) -> float | None:
    """Return ``value`` as a float if it is a plain number, None if it is a string."""
    if isinstance(value, bool):
        raise UnitError(f"expected {what}, got a boolean; allowed: {allowed}")
    if isinstance(value, int | float):
        try:
            x = float(value)
        except OverflowError:
            raise UnitError(f"{what} {value!r} is too large; allowed: {allowed}") from None
        if not math.isfinite(x):
            raise UnitError(f"expected a finite {what}, got {value!r}; allowed: {allowed}")
        return x
    if isinstance(value, str):
        return None
    raise UnitError(f"expected {what}, got {type(value).__name__}; allowed: {allowed}")


def _bare(value: object) -> float | None:
    """A string that is a plain number (``'1e10'``, ``'3.0e14'``): the number in the base unit."""
    parts = _split(str(value))
    return parts[0] if parts is not None and parts[1] == "" else None


def _split(text: str) -> tuple[float, str] | None:
    m = re.fullmatch(_NUM + r"\s*(.*)", text.strip())
    if not m:
        return None
    num = float(m.group(1))
    if not math.isfinite(num):
        return None
    return num, m.group(2).strip()


BANDWIDTH_FORMS = ("a number in bits/s, or a string like '100Mbit/s', '10Gbps', '1.5GB/s', "
                   "'128MB/ms', '800MiB/s'")


def parse_bandwidth(value: object) -> float:
    """Parse a data rate; returns bits per second."""
    x = _number(value, "a data rate", BANDWIDTH_FORMS)
    if x is not None:
        return x
    if (x := _bare(value)) is not None:
        return x
    parts = _split(str(value))
    if parts is not None:
        num, unit = parts
        m = re.fullmatch(r"(Ki|Mi|Gi|Ti|[kKMGTP]?)(bit|b|B|bps)(?:/(s|ms|us))?", unit)
        if m:
            prefix, base, per = m.group(1), m.group(2), m.group(3)
            if base == "bps" and per is None:
                per = "s"
            if per is not None:
                bits = 8.0 if base == "B" else 1.0
                return num * _PREFIX[prefix] * bits / _TIME[per]
    raise UnitError(f"cannot parse data rate {value!r}; allowed: {BANDWIDTH_FORMS}")


TIME_FORMS = "a number in seconds, or a string like '20ms', '5us', '0.1s', '30ns'"


def parse_time(value: object) -> float:
    """Parse a duration; returns seconds."""
    x = _number(value, "a duration", TIME_FORMS)
    if x is not None:
        return x
    if (x := _bare(value)) is not None:
        return x
    parts = _split(str(value))
    if parts is not None and parts[1] in _TIME:
        return parts[0] * _TIME[parts[1]]
    raise UnitError(f"cannot parse duration {value!r}; allowed: {TIME_FORMS}")


BYTES_FORMS = "a number of bytes, or a string like '8MB', '4.7MB', '2MiB', '512KiB', '1GB'"


def parse_bytes(value: object) -> float:
    """Parse a size; returns bytes."""
    x = _number(value, "a size", BYTES_FORMS)
    if x is not None:
        return x
    if (x := _bare(value)) is not None:
        return x
    parts = _split(str(value))
    if parts is not None:
        m = re.fullmatch(r"(Ki|Mi|Gi|Ti|[kKMGTP]?)B", parts[1])
        if m:
            return parts[0] * _PREFIX[m.group(1)]
    raise UnitError(f"cannot parse size {value!r}; allowed: {BYTES_FORMS}")


FLOPS_FORMS = "a number in FLOP/s, or a string like '50GFLOP/s', '312TFLOPS', '1.2TFLOP/s'"


def parse_flops(value: object) -> float:
    """Parse a compute throughput; returns FLOP/s."""
    x = _number(value, "a compute rate", FLOPS_FORMS)
    if x is not None:
        return x
    if (x := _bare(value)) is not None:
        return x
    parts = _split(str(value))
    if parts is not None:
        m = re.fullmatch(r"([kKMGTP]?)(?:FLOP/s|FLOPS|flop/s|flops)", parts[1])
        if m:
            return parts[0] * _PREFIX[m.group(1)]
    raise UnitError(f"cannot parse compute rate {value!r}; allowed: {FLOPS_FORMS}")


def fmt_bytes(n: float) -> str:
    """Human-readable bytes (decimal prefixes)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_time(s: float) -> str:
    """Human-readable seconds."""
    if s >= 1.0:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} us"


def fmt_bandwidth(bps: float) -> str:
    """Human-readable bits per second."""
    for unit, scale in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.3g} {unit}"
    return f"{bps:.3g} bit/s"
