"""Compute probe: measure the achieved FLOP/s of this device with a short matmul, cached on disk.

The cache is a small JSON file keyed by torch version, device and thread count, in
``~/.cache/hybridep/compute_probe.json`` (or a path given by the caller).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

DEFAULT_CACHE = Path.home() / ".cache" / "hybridep" / "compute_probe.json"


def measure_flops(size: int = 512, repeats: int = 5, device: str = "cpu") -> float:
    """Best-of-``repeats`` float32 matmul throughput (FLOP/s) of a size x size product."""
    import torch

    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` after one untimed warm-up call (seconds)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2]


def measure_expert_weight_cost(hidden: int, ffn: int, kind: str, tokens: int, few: int = 2, many: int = 8,
                               repeats: int = 5,
                               sync: Callable[[], object] | None = None) -> tuple[float, float, float]:
    """(seconds per byte of expert weights held, per forward + backward of one MoE layer's expert
    computation, beyond its FLOPs; the share of it in the forward; the backward's time in multiples
    of the forward's with ``few`` experts -- 2 in FLOPs). The same ``tokens`` spread over
    ``many`` instead of ``few`` experts (same FLOPs, more and smaller matmuls, more weight
    gradients): the slope of the median times over the extra experts' bytes (0 if not positive),
    and the same slope of the forward alone (no autograd graph) over it, clipped to [0, 1] (1/3 when
    the slope is 0). Forward + backward and forward of both cases are timed in turn, ``repeats``
    rounds after one warm-up, and each figure is the median over the rounds of its difference within
    a round, so that whatever else runs on the cores meanwhile slows both cases alike. ``sync``:
    called before every timed call (the bench's ranks: a barrier, so that every rank times the same
    case at once, as the ranks compute in training). Over three EP-wins bench runs the slope ranged
    2.49-2.67e-9 s/B so (each rank's cases in its own turn: 1.68-2.71e-9; the cases timed one after
    the other: 0 in one run of three); on this CPU host the forward share is 0-0.22: the cost is
    mostly the backward's weight gradients."""
    import torch

    from hybridep.moe.experts import GroupedExperts

    def case(n: int):
        ex = GroupedExperts(n, hidden, ffn, kind)
        x = torch.randn(tokens, hidden, requires_grad=True)
        counts = [tokens // n + (1 if i < tokens % n else 0) for i in range(n)]
        nbytes = sum(p.numel() * p.element_size() for p in ex.parameters())

        def forward() -> None:
            with torch.no_grad():
                ex.compute(ex.weights(), x, counts).sum()

        return (lambda: ex.compute(ex.weights(), x, counts).square().sum().backward()), forward, nbytes

    (both_few, fwd_few, b_few), (both_many, fwd_many, b_many) = case(few), case(many)
    runs = (both_few, both_many, fwd_few, fwd_many)

    def seconds(fn) -> float:
        if sync is not None:
            sync()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    for fn in runs:
        fn()
    rounds = [[seconds(fn) for fn in runs] for _ in range(repeats)]
    held = b_many - b_few
    backward_factor = statistics.median(max(r[0] - r[2], 0.0) / r[2] for r in rounds)
    total = statistics.median(r[1] - r[0] for r in rounds) / held
    if total <= 0:
        return 0.0, 1.0 / 3.0, backward_factor
    forward = statistics.median(r[3] - r[2] for r in rounds) / held
    return total, min(1.0, max(0.0, forward / total)), backward_factor


def probe_flops(cache: Path | None = DEFAULT_CACHE, device: str = "cpu") -> float:
    """Return the cached measurement for this machine, measuring (and caching) it if absent."""
    import torch

    key = f"torch={torch.__version__};device={device};threads={torch.get_num_threads()}"
    data: dict = {}
    if cache is not None and cache.exists():
        try:
            data = json.loads(cache.read_text())
        except (OSError, ValueError):
            data = {}
        if isinstance(data, dict) and isinstance(data.get(key), float):
            return data[key]
    flops = measure_flops(device=device)
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            data = data if isinstance(data, dict) else {}
            data[key] = flops
            cache.write_text(json.dumps(data, indent=2))
        except OSError:
            pass
    return flops
