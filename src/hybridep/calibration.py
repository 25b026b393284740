"""Calibration: the measurements a bench takes on its ranks, and the model they calibrate.

The bench worker measures on the ranks (``bench_worker``: all-to-all and gather efficiency per
level, gather delay per stage, per-message overhead, optimizer seconds per byte, expert-weight
seconds per byte, SR codec seconds per expert, the cores the ranks share) and stores them as the
``calibration`` object of the bench JSON, beside the compute-only run's median. This module turns
them into the cost model's :class:`~hybridep.costmodel.Network`, compute rate and workload; the
bench's report and the simulator's ``--calibrate`` both read them from here (the simulator never
imports the bench).
"""

from __future__ import annotations

import dataclasses

from hybridep.config import Config
from hybridep.costmodel import Network, Workload, all_experts_fixed_s, evaluate, workload_from_config
from hybridep.strategies import HybridEPSpec

COMPUTE_ONLY = "compute-only"
"""Name of the bench's reference run: every rank computes the whole model, no communication."""
PEERS = ("deepspeed",)
"""The peer systems a bench can run beside ours (``bench.peers``); not modelled."""

LEGACY_KEYS = {"optimizer_s_per_byte": "optimizer_byte_s", "expert_weight_s_per_byte": "expert_weight_byte_s"}
"""Earlier names of calibration keys, still read from stored bench JSON."""


class CalibrationError(RuntimeError):
    """The measurements cannot calibrate the model; the message says why."""


def measured(calibration: dict | None, key: str):
    """``calibration[key]`` (under its earlier name in stored results too), or None."""
    cal = calibration or {}
    value = cal.get(key)
    if value is None and key in LEGACY_KEYS:
        value = cal.get(LEGACY_KEYS[key])
    return value


def calibrated_model(cfg: Config, results: dict, rates_bps: list[float],
                     calibration: dict | None = None) -> tuple[Network, float] | None:
    """The cost model's network and compute rate calibrated by microbenchmarks only (the bench's
    ``calibration``) -- compute by the compute-only run less what holding every expert costs its
    ranks (their optimizer step over all experts and the per-expert cost of the expert computation,
    both measured), each level's links by its probed rate times the measured all-to-all efficiency
    (the expert gather's measured efficiency relative to it, and its measured delay per stage
    while every rank computes), the measured per-message overhead and rendezvous cost, latency zero (what the testbed
    has; the configured latencies apply to the real WAN)."""
    if COMPUTE_ONLY not in results:
        return None
    cal = calibration or {}
    efficiency = cal.get("efficiency_by_level") or [1.0] * len(rates_bps)
    gather_efficiency = cal.get("gather_efficiency_by_level")
    # the testbed cannot emulate latency (no netem): the model of *this* run uses none
    net0 = Network.from_config(cfg)
    topo = net0.topology
    relative = None
    if gather_efficiency is not None:
        relative = tuple(g / e for g, e in zip(gather_efficiency, efficiency, strict=True))
    delay = cal.get("gather_delay_s_by_level")  # the gathers run while the ranks compute
    net = Network(topo, tuple(r / 8 * e for r, e in zip(rates_bps, efficiency, strict=True)),
                  (0.0,) * topo.num_levels, net0.dc_link_bytes_per_s, relative,
                  tuple(delay) if delay else None, message_s=cal.get("message_s") or 0.0,
                  rendezvous_s=cal.get("rendezvous_s") or 0.0)
    # the FLOP-proportional compute only (the fixed-cost terms are charged separately below), the
    # experts' backward as measured
    w = workload_from_config(calibrated_config(cfg, cal), flops=1.0)
    fixed = all_experts_fixed_s(w, topo.world_size)
    w = dataclasses.replace(w, optimizer_s_per_byte=0.0, expert_weight_s_per_byte=0.0, codec_expert_s=0.0)
    flops = evaluate(HybridEPSpec.ep(topo).schedule(w), net, cfg.terms).compute_s
    compute = results[COMPUTE_ONLY]["median_iter_s"] - fixed
    if compute <= 0:
        raise CalibrationError(f"the compute-only run ({results[COMPUTE_ONLY]['median_iter_s']:.3f} s) is not "
                               f"longer than its measured optimizer step and held-expert cost ({fixed:.3f} s)")
    return net, flops / compute


MEASURED_COMPUTE = ("codec_expert_s", "optimizer_s_per_byte", "expert_weight_s_per_byte",
                    "expert_weight_forward_share", "expert_backward_factor", "processors")
"""The ``compute`` keys a bench measures on its ranks (``processors``: the cores they shared)."""


def calibrated_config(cfg: Config, calibration: dict | None) -> Config:
    """``cfg`` with every ``compute`` key it leaves unset taken from the bench's ``calibration``
    where measured (a measured 0 kept; the processors only when fewer than the ranks): the
    configuration the bench's compute calibration, its predictions and its calibrated planner
    price."""
    cal, world = calibration or {}, cfg.topology.world_size
    found = {key: measured(cal, key) for key in MEASURED_COMPUTE if getattr(cfg.compute, key) is None}
    found = {key: v for key, v in found.items() if v is not None and not (key == "processors" and v >= world)}
    return cfg.model_copy(update={"compute": cfg.compute.model_copy(update=found)}) if found else cfg


def measured_workload(cfg: Config, flops: float, spec: HybridEPSpec, result: dict,
                      calibration: dict | None = None) -> Workload:
    """The workload of a measured run: dimensions from the configuration, routing as measured --
    each MoE layer's expert-load histogram (``expert_tokens``) when the run recorded one -- and the
    bench's ``calibration`` (:func:`calibrated_config`); compression and chunks as ``spec`` ran them."""
    w = spec.workload(calibrated_config(cfg, calibration), flops)
    w = dataclasses.replace(w, expert_recompute=spec.compressed and cfg.bench.sr_decode == "expert")
    tokens = result.get("expert_tokens")
    if not tokens or any(sum(row) <= 0 for row in tokens):
        return w
    loads = tuple(tuple(x / sum(row) for x in row) for row in tokens)
    return dataclasses.replace(w, layer_loads=loads, experts=len(loads[0]))


