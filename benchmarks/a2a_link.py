"""Cross-DC link utilisation of one all-to-all on the testbed: gloo's all_to_all_single vs our
concurrent point-to-point schedule (cross-DC transfers first). Needs root (builds the testbed).

    python benchmarks/a2a_link.py [--mib 8] [--rate 100Mbit/s] [--reps 3] [--json PATH]

Each of 4 ranks (2 DCs x 2) sends MIB MiB split evenly over all ranks; the busiest DC uplink
carries 2 ranks x 2 peers x MIB/4 MiB. Utilisation = those bytes / (rate x measured time).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def worker(mib: float, reps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from hybridep.parallel.comm import Communicator
    from hybridep.topology import Topology

    dist.init_process_group("gloo")
    topo = Topology(("dc", "gpu"), (2, 2))
    result = {}
    for impl in ("collective", "p2p"):
        comm = Communicator(topo, 300, a2a_impl=impl)
        comm.create_groups([[0, 1, 2, 3]])
        rows = int(mib * 2**20 / 4 / 256)
        inp = torch.randn(rows - rows % 4, 256)
        outp = torch.empty_like(inp)
        split = [inp.shape[0] // 4] * 4
        times = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            comm.all_to_all(outp, inp, split, split, [0, 1, 2, 3])
            dist.barrier()
            times.append(time.perf_counter() - t0)
        result[impl] = {"seconds": sorted(times)[len(times) // 2], "bytes_per_rank": inp.numel() * 4}
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=float, default=8.0)
    ap.add_argument("--rate", default="100Mbit/s")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--worker", nargs=3)
    args = ap.parse_args()
    if args.worker:
        worker(float(args.worker[0]), int(args.worker[1]), args.worker[2])
        return
    from hybridep.testbed import netns
    from hybridep.testbed.launcher import launch
    from hybridep.topology import Topology
    from hybridep.units import parse_bandwidth

    rate = parse_bandwidth(args.rate)
    topo = Topology(("dc", "gpu"), (2, 2))
    netns.up(topo, (rate, 1e9))
    try:
        tmp = Path(tempfile.mkdtemp(prefix="hybridep-a2a-"))
        launch([sys.executable, __file__, "--worker", str(args.mib), str(args.reps), str(tmp / "r.json")], 4,
               tmp / "logs", True, 600)
        res = json.loads((tmp / "r.json").read_text())
    finally:
        netns.down()
    out = {"rate_bps": rate, "mib_per_rank": args.mib}
    for impl, r in res.items():
        uplink_bytes = 2 * 2 * r["bytes_per_rank"] / 4
        ideal = uplink_bytes / (rate / 8)
        out[impl] = {"seconds": r["seconds"], "ideal_seconds": ideal, "utilisation": ideal / r["seconds"]}
        print(f"{impl:>10}: {r['seconds']:.3f} s for {uplink_bytes / 1e6:.2f} MB per uplink "
              f"(ideal {ideal:.3f} s) -> utilisation {ideal / r['seconds']:.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
