"""Simulator cost at scale: one iteration of configs/sim_1000dc.yaml (8 GPUs per DC, 12 MoE layers)
for a growing number of DCs, EP and the planner's choice (plus an uneven-routing run).

    python benchmarks/sim_scale.py [--dcs 2,8,64,256,1000] [--zipf 1.0] [--message-overhead 5us] [--json PATH]

Prints wall-clock seconds per simulated iteration (best of --repeats), flow classes and events.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hybridep.config import load_config
from hybridep.costmodel import Network, workload_from_config
from hybridep.sim.study import fold_for, resolve
from hybridep.strategies.hybridep import simulate
from hybridep.topology import Domains

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "sim_1000dc.yaml"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dcs", default="2,8,64,256,1000")
    ap.add_argument("--zipf", type=float, default=1.0, help="Zipf skew of the extra uneven-routing run")
    ap.add_argument("--zipf-max-dcs", type=int, default=8,
                    help="uneven routing only up to this many DCs (its cost grows with ranks x phases)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--message-overhead", default="0",
                    help="topology.message_overhead (e.g. 5us): every rank's communication engine simulated too")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for dcs in (int(x) for x in args.dcs.split(",")):
        for zipf in (None, args.zipf) if dcs <= args.zipf_max_dcs else (None,):
            over = [f"topology.levels.0.count={dcs}", f"moe.experts={8 * dcs}",
                    f"topology.message_overhead={args.message_overhead}"]
            if zipf is not None:
                over.append(f"moe.expert_zipf={zipf}")
            cfg = load_config(CONFIG, over)
            net = Network.from_config(cfg)
            for spec in ("ep", "planner"):
                s = resolve(spec, cfg, net, None)
                w = workload_from_config(cfg)
                best, res = float("inf"), None
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    res = simulate(Domains(net.topology, s.sizes), w, net, cfg.terms, fold_for(cfg, w))
                    best = min(best, time.perf_counter() - t0)
                rows.append({"dcs": dcs, "ranks": 8 * dcs, "zipf": zipf, "message_overhead": args.message_overhead,
                             "strategy": s.name,
                             "iteration_s": res.iteration_s, "wall_s": best, "flow_classes": res.classes,
                             "events": res.events})
                print(f"{dcs:5d} DCs  zipf={zipf!s:4}  {s.name:24s} simulated {res.iteration_s:8.3f} s  "
                      f"wall {best:6.3f} s  classes {res.classes:8d}  events {res.events}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
