"""Planning time at scale: 1000 DCs x 2 nodes x 4 GPUs (3 levels). Prints figures, optional JSON.

    python benchmarks/plan_scale.py [--dcs 1000] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import time

from hybridep.config import config_from_dict
from hybridep.planner import plan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dcs", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    world = args.dcs * 8
    cfg = config_from_dict({
        "topology": {"levels": [
            {"name": "dc", "count": args.dcs, "bandwidth": "10Gbit/s", "latency": "20ms"},
            {"name": "node", "count": 2, "bandwidth": "100Gbit/s", "latency": "10us"},
            {"name": "gpu", "count": 4, "bandwidth": "800Gbit/s", "latency": "5us"}]},
        "moe": {"hidden": 1024, "ffn": 4096, "experts": world, "top_k": 2, "layers": 12,
                "tokens_per_gpu": 8192, "dtype": "bfloat16"},
        "compute": {"flops": "300TFLOP/s"},
    })
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        result = plan(cfg)
        times.append(time.perf_counter() - t0)
    out = {"dcs": args.dcs, "world_size": world, "candidates": len(result.candidates),
           "plan_s_best": min(times), "plan_s_all": times,
           "choice": result.to_dict()["choice"], "speedup_over_ep": result.speedup_over_ep}
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
