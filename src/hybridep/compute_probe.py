"""Compute probe: measure the achieved FLOP/s of this device with a short matmul, cached on disk.

The cache is a small JSON file keyed by torch version, device and thread count, in
``~/.cache/hybridep/compute_probe.json`` (or a path given by the caller).
"""

from __future__ import annotations

import json
import time
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


def measure_expert_weight_s_per_byte(hidden: int, ffn: int, kind: str, tokens: int, few: int = 2, many: int = 8,
                                 repeats: int = 5) -> float:
    """Seconds per byte of expert weights held, per forward + backward of one MoE layer's expert
    computation, beyond its FLOPs: the same ``tokens`` spread over ``many`` instead of ``few``
    experts (same FLOPs, more and smaller matmuls, more weight gradients); the slope of the median
    times over the extra experts' bytes (0 if not positive)."""
    import torch

    from hybridep.moe.experts import GroupedExperts

    def median_s(n: int) -> tuple[float, int]:
        ex = GroupedExperts(n, hidden, ffn, kind)
        x = torch.randn(tokens, hidden, requires_grad=True)
        counts = [tokens // n + (1 if i < tokens % n else 0) for i in range(n)]
        seconds = median_seconds(lambda: ex.compute(ex.weights(), x, counts).square().sum().backward(), repeats)
        return seconds, sum(p.numel() * p.element_size() for p in ex.parameters())

    (t_few, b_few), (t_many, b_many) = median_s(few), median_s(many)
    return max(0.0, (t_many - t_few) / (b_many - b_few))


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
