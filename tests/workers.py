"""Rank bodies for the multi-process tests (module level, so that spawned processes can import them)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import time

import torch
import torch.distributed as dist

from hybridep.config import CostTerms
from hybridep.costmodel import Network, Workload
from hybridep.migration.sr import SRSettings, encoded_bytes, value_bytes
from hybridep.moe.stack import MoEStack
from hybridep.parallel.comm import Communicator
from hybridep.parallel.strategy import data_parallel, expert_param_names, parallelize, prefetch_all
from hybridep.strategies.hybridep import predict, simulate
from hybridep.topology import Domains, Topology


def adam_steps(rank, world, names, counts, sizes, steps, seed):
    """Train the same model for ``steps`` Adam steps distributed and single-process; max rel. diff."""
    topo = Topology(names, counts)
    comm = Communicator(topo, 60.0)
    experts = 2 * world
    torch.manual_seed(seed)
    model = MoEStack(2, 20, 24, experts, 2, "swiglu")
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    styles = parallelize(model, comm, Domains(topo, sizes))
    ddp = data_parallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        xs = [torch.randn(int(n), 20, generator=g) for n in torch.randint(0, 16, (world,), generator=g)]
        ref_opt.zero_grad()
        losses = [(ref(x).square().mean() if len(x) else ref(x).sum()) + 0.01 * ref.aux_loss() for x in xs]
        (sum(losses) / world).backward()
        ref_opt.step()
        opt.zero_grad()
        prefetch_all(styles, model)
        if sizes != tuple(1 for _ in sizes):  # the chain: only layer 0's gather is in flight ...
            assert [s._pending is not None for s in styles] == [True] + [False] * (len(styles) - 1)
        x = xs[rank]
        y = ddp(x)
        assert all(s._pending is None for s in styles)  # ... and each layer issued the next one's
        ((y.square().mean() if len(x) else y.sum()) + 0.01 * model.aux_loss()).backward()
        opt.step()
    n = experts // world
    worst = 0.0
    ref_params = dict(ref.named_parameters())
    expert_names = set(expert_param_names(model))
    for name, p in model.named_parameters():
        r = ref_params[name].detach()
        if name in expert_names:
            r = r[rank * n:(rank + 1) * n]
        worst = max(worst, ((p.detach() - r).abs().max() / r.abs().max()).item())
    return worst


def traffic(rank, world, names, counts, sizes, tokens, hidden, ffn, top_k, seed, chunks=1, sr_ratio=None):
    """One forward+backward with identical tokens on every rank; counted vs predicted bytes per level.
    ``sr_ratio``: experts gathered and gradients returned compressed (shared basis, top-k gradients)."""
    topo = Topology(names, counts)
    comm = Communicator(topo, 60.0)
    experts = 2 * world
    torch.manual_seed(seed)
    model = MoEStack(1, hidden, ffn, experts, top_k, "gelu").double()
    sr = SRSettings(sr_ratio, "shared", grads="topk") if sr_ratio else None
    parallelize(model, comm, Domains(topo, sizes), sr, a2a_chunks=chunks)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    comm.traffic.reset()
    comm.traffic.record_outer_intervals = True
    start = time.perf_counter()
    model(x).sum().backward()
    window = (start, time.perf_counter())
    routing = model.blocks[0].moe.router(model.blocks[0].dense(x).tanh() + x)
    hist = torch.bincount(routing.expert_idx.reshape(-1), minlength=experts).double()
    counted = {}
    for (op, level), b in comm.traffic.bytes_by_op_level.items():
        counted[f"{op}/{level}"] = b
    gathered = [None] * world
    dist.all_gather_object(gathered, counted)
    total = {}
    for d in gathered:
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
    w = Workload(dispatch_bytes=tokens * top_k * hidden * 8, expert_bytes=(experts // world) * 2 * hidden * ffn * 8,
                 pre_expert_s=0.0, experts=experts, expert_load=tuple((hist / hist.sum()).tolist()), a2a_chunks=chunks)
    if sr is not None:
        sent = encoded_bytes(sr_ratio, 2 * hidden * ffn, 8, experts // world, value_bytes(sr.values, 8))
        w = dataclasses.replace(w, gather_bytes=sent, grad_bytes=sent)
    net = Network(topo, (1.0,) * len(counts), (0.0,) * len(counts))
    pred = predict(Domains(topo, sizes), w, net, CostTerms(latency=False, grad_sync=False))
    simulated = [simulate(Domains(topo, sizes), w, net, CostTerms(grad_sync=False), fold).bytes_by_level
                 for fold in (True, False)]
    spans = comm.traffic.outer_intervals
    assert all(window[0] <= a <= b <= window[1] for a, b in spans)
    crossing = sum(b for (op, level), b in comm.traffic.bytes_by_op_level.items() if level == names[0])
    assert (len(spans) > 0) == (crossing > 0), (spans, crossing)
    return total, pred.bytes_by_level, simulated


def chunked_without_grad(rank, world, chunks, seed):
    """The pipelined exchange under ``torch.no_grad`` (evaluation) gives the training-mode output
    and records no graph; a training-mode pass then runs backward. Returns the max abs difference."""
    topo = Topology(("gpu",), (world,))
    comm = Communicator(topo, 60.0)
    torch.manual_seed(seed)
    model = MoEStack(2, 12, 16, 2 * world, 2, "gelu").double()
    parallelize(model, comm, Domains(topo, (1,)), a2a_chunks=chunks)
    x = torch.randn(9 + rank, 12, generator=torch.Generator().manual_seed(seed + rank), dtype=torch.float64)
    with torch.no_grad():
        y_eval = model(x)
    assert not y_eval.requires_grad
    y = model(x)
    y.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    return (y.detach() - y_eval).abs().max().item()


def raise_on_rank_one(rank, world, stall: bool, timeout_s: float):
    topo = Topology(("gpu",), (world,))
    comm = Communicator(topo, timeout_s)
    comm.create_groups([list(range(world))])
    if rank == 1:
        if stall:
            time.sleep(timeout_s * 6)
        raise RuntimeError("injected failure on rank 1")
    t = torch.ones(world, 3)
    out = torch.empty_like(t)
    start = time.monotonic()
    try:
        comm.all_to_all(out, t, [1] * world, [1] * world, list(range(world)), "a2a")
    except Exception as err:
        raise RuntimeError(f"after {time.monotonic() - start:.1f}s: {err}") from err
    return "no error"


def background_chains(rank, world, stall: bool, timeout_s: float):
    """Three gathers submitted as background chains come back in order, each with every rank's
    shard; with rank 1 stalled, the others' wait becomes a named error within the timeout."""
    topo = Topology(("gpu",), (world,))
    comm = Communicator(topo, timeout_s)
    ranks = list(range(world))
    comm.create_groups([ranks])
    if stall and rank == 1:
        time.sleep(timeout_s * 6)
        raise RuntimeError("rank 1 stalled")

    def gather(k: int) -> torch.Tensor:
        out = torch.empty(world * 2)
        comm.all_gather(out, torch.full((2,), float(10 * k + rank)), ranks, "ag")
        return out
    futures = [comm.in_background(functools.partial(gather, k)) for k in range(3)]
    start = time.monotonic()
    try:
        got = [comm.result(f, "ag", ranks).tolist() for f in futures]
    except Exception as err:
        raise RuntimeError(f"after {time.monotonic() - start:.1f}s: {err}") from err
    return got, dict(comm.traffic.seconds_by_op), comm.traffic.bytes_by_level(["ag"])


def _decode_one_at_a_time(comm, dom, experts, x):
    """Shared basis at CR 50, decoding the layer at once vs one expert at a time: equal outputs and
    gradients; with ``expert`` no decoded expert survives the forward pass, and each is decoded
    again (recomputed) in backward."""
    import weakref

    runs = {}
    for mode in ("layer", "expert"):
        torch.manual_seed(1)
        m = MoEStack(2, 64, 128, experts, 2, "gelu").double()
        styles = parallelize(m, comm, dom, SRSettings(50.0, "shared", decode=mode))
        decoded = []
        for st in styles:
            def spy(*args, real=st.gatherer.decode_row, decoded=decoded):
                t = real(*args)
                decoded.append(weakref.ref(t))
                return t
            st.gatherer.decode_row = spy
        prefetch_all(styles, m)
        y = m(x)
        alive, forward = sum(r() is not None for r in decoded), len(decoded)
        y.square().sum().backward()
        runs[mode] = (y.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None],
                      alive, forward, len(decoded))
    (y0, g0, *_), (y1, g1, alive, forward, total) = runs["layer"], runs["expert"]
    same = torch.allclose(y0, y1, rtol=0, atol=1e-12) and len(g0) == len(g1) and all(
        torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(g0, g1, strict=True))
    return {"same": same, "alive_after_forward": alive, "decoded_forward": forward, "decoded_total": total}


def _compressed_gradients(comm, dom, experts, xs):
    """Gradients returned as top-k with error feedback (``grads="topk"``) against dense ones, after the
    same (shared-basis, CR 50) forward pass: CR 1 is bit-identical to dense; at CR 50 the stage over
    the DC level sends >= 20x fewer bytes, and what an owner did not receive sits in the senders'
    error-feedback memories, entry by entry. Stages inside a DC stay dense."""
    rank, world = comm.rank, comm.world_size
    runs = {}
    for ratio, grads in ((1.0, "dense"), (1.0, "topk"), (50.0, "dense"), (50.0, "topk")):
        torch.manual_seed(1)
        m = MoEStack(1, 64, 128, experts, 2, "gelu").double()
        styles = parallelize(m, comm, dom, SRSettings(ratio, "shared", grads=grads))
        comm.traffic.reset()
        prefetch_all(styles, m)
        m(xs[rank]).square().sum().backward()
        e = m.blocks[0].moe.experts
        flat = torch.cat([getattr(e, n).grad.reshape(e.w1.shape[0], -1) for n in e.weight_names], dim=1)
        rs = {lv: b for (op, lv), b in comm.traffic.bytes_by_op_level.items() if op == "rs"}
        runs[(ratio, grads)] = (flat * world, rs, styles[0].gatherer)  # unscaled owner gradient [n, p]
    out = {"cr1_identical": torch.equal(runs[(1.0, "dense")][0], runs[(1.0, "topk")][0])}
    dense, dense_rs, _ = runs[(50.0, "dense")]
    got, topk_rs, gatherer = runs[(50.0, "topk")]
    # the outer stage's memory, moved to the owners it belongs to (memory[i] is stage member i's)
    missing = torch.zeros(world, *dense.shape, dtype=dense.dtype)
    if 0 in gatherer.feedback:
        for i, owner in enumerate(gatherer.groups[0]):
            missing[owner] = gatherer.feedback[0].memory[i]
    dist.all_reduce(missing)
    out["compressed"] = list(gatherer.feedback)
    out["per_owner_err"] = float((got + missing[rank] - dense).abs().max() / dense.abs().max())
    out["equal_to_dense"] = torch.equal(got, dense)
    out["rs_bytes"] = [dense_rs, topk_rs]
    out["owner_grad"] = bool(got.abs().sum() > 0)
    return out


def sr_checks(rank, world, sizes):
    """SR compression: CR=1 is bit-identical to no compression; CR=50 shrinks the gather and still
    returns gradients to owners that computed no token themselves."""
    topo = Topology(("dc", "gpu"), (2, world // 2))
    comm = Communicator(topo, 60.0)
    dom = Domains(topo, sizes)
    experts = 2 * world
    out = {}

    def build(ratio):
        torch.manual_seed(1)
        m = MoEStack(1, 64, 128, experts, 2, "gelu").double()
        styles = parallelize(m, comm, dom, SRSettings(ratio, "shared") if ratio else None)
        return m, styles

    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(0 if r == 0 else 30, 64, generator=g, dtype=torch.float64) for r in range(world)]
    results = {}
    for ratio in (None, 1.0, 50.0):
        m, styles = build(ratio)
        comm.traffic.reset()
        prefetch_all(styles, m)
        y = m(xs[rank])
        y.square().sum().backward()
        grads = [p.grad.clone() if p.grad is not None else None for p in m.parameters()]
        ag = sum(b for (op, _), b in comm.traffic.bytes_by_op_level.items() if op == "ag")
        w1 = m.blocks[0].moe.experts.w1
        before = w1.detach().clone()
        torch.optim.SGD(m.parameters(), lr=0.1).step()
        results[ratio] = (y.detach(), grads, ag, w1.grad is not None and bool(w1.grad.abs().sum() > 0),
                          not torch.equal(before, w1.detach()))
    y0, g0, ag0, _, _ = results[None]
    y1, g1, _, _, _ = results[1.0]
    out["cr1_identical"] = torch.equal(y0, y1) and all(
        (a is None and b is None) or torch.equal(a, b) for a, b in zip(g0, g1, strict=True))
    out["ag_bytes_none"], out["ag_bytes_cr50"] = ag0, results[50.0][2]
    out["owner_grad_cr50"], out["owner_changed_cr50"] = results[50.0][3], results[50.0][4]
    out["finite_cr50"] = bool(torch.isfinite(results[50.0][0]).all())
    # delta basis: the first gather is dense, later ones send top-k of (expert - synchronised copy);
    # with unchanged experts the copies stay exact, so the outputs equal the uncompressed ones
    torch.manual_seed(1)
    m = MoEStack(1, 64, 128, experts, 2, "gelu").double()
    styles = parallelize(m, comm, dom, SRSettings(50.0, "delta"))
    ys, ags = [], []
    for _ in range(2):
        comm.traffic.reset()
        prefetch_all(styles, m)
        ys.append(m(xs[rank]).detach())
        ags.append(sum(b for (op, _), b in comm.traffic.bytes_by_op_level.items() if op == "ag"))
    out["delta_exact"] = all(torch.allclose(y, y0, rtol=0, atol=1e-12) for y in ys)
    out["delta_bytes"] = ags
    out["per_expert"] = _decode_one_at_a_time(comm, dom, experts, xs[rank])
    out["grads"] = _compressed_gradients(comm, dom, experts, xs)
    tensors = torch.tensor([float(out["ag_bytes_none"]), float(out["ag_bytes_cr50"])])
    dist.all_reduce(tensors)
    out["ag_total"] = tensors.tolist()
    return out


def link_calibration(rank, world):
    """The bench's link calibration on loopback (2 DCs x 2 ranks), with the busy gather; the
    rendezvous and overlap probes on a small expert model."""
    from hybridep.bench_worker import (
        calibrate_links,
        measure_message_s,
        measure_overlap_efficiency,
        measure_rendezvous_s,
    )
    from hybridep.lm.model import LMConfig

    comm = Communicator(Topology(("dc", "gpu"), (2, 2)), 60.0)
    out = calibrate_links(comm, [1e8, 1e9], mib=0.25, reps=2, shard_bytes=8192)
    out["message_s"] = measure_message_s(comm, reps=3)
    out["rendezvous_s"] = measure_rendezvous_s(comm, calls=4, reps=3)
    lm = LMConfig(vocab=64, hidden=32, ffn=64, experts=8, top_k=2, layers=1, seq_len=16)
    out.update(measure_overlap_efficiency(comm, lm, 256, reps=3))
    return out


def nan_rows(rank, world, names, counts, sizes, dtype_name, chunks):
    """One NaN element in one token of rank 0: which output rows of every rank come out non-finite
    (forward only), as ([rank's non-finite row indices] per rank)."""
    topo = Topology(names, counts)
    comm = Communicator(topo, 60.0)
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(5)
    model = MoEStack(2, 16, 24, 2 * world, 2).to(dtype)
    parallelize(model, comm, Domains(topo, sizes), a2a_chunks=chunks)
    g = torch.Generator().manual_seed(7 + rank)
    x = torch.randn(12, 16, generator=g).to(dtype)
    if rank == 0:
        x[3, 5] = float("nan")
    with torch.no_grad():
        y = model(x)
    bad = (~torch.isfinite(y)).any(dim=1).nonzero().flatten().tolist()
    out = [None] * world
    dist.all_gather_object(out, bad)
    return out


def nonfinite_step(rank, world, mode, bad_rank, bad_step):
    """Three SGD steps of a small EP stack; rank ``bad_rank`` feeds a NaN at step ``bad_step``.
    Returns the steps this rank skipped (``on_nonfinite: skip``); raises under ``stop``."""
    from hybridep.lm.train import RunSpec, check_finite

    topo = Topology(("gpu",), (world,))
    comm = Communicator(topo, 60.0)
    torch.manual_seed(0)
    model = MoEStack(1, 8, 16, 2 * world, 2)
    parallelize(model, comm, Domains(topo, (1,)))
    ddp = data_parallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    spec = RunSpec("ep", on_nonfinite=mode)
    skipped = []
    for step in range(3):
        x = torch.randn(6, 8)
        if rank == bad_rank and step == bad_step:
            x[0, 0] = float("nan")
        opt.zero_grad()
        loss = ddp(x).square().mean()
        loss.backward()
        if check_finite(loss, model, spec.on_nonfinite, rank, step, True):
            skipped.append(step)
            opt.zero_grad(set_to_none=True)
        opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters())
    return skipped


def mixtral_under_strategy(rank, world, names, counts, sizes):
    """A transformers Mixtral block converted by the adapter and run under the partition ``sizes``
    against the block itself on every rank's tokens: the largest relative error of outputs, input
    gradients, router and expert gradients."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from hybridep.adapters.mixtral import convert

    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=2 * world, num_experts_per_tok=2,
                        router_jitter_noise=0.0)
    block = MixtralSparseMoeBlock(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    xs = [torch.randn(1, 5 + r, 16, generator=torch.Generator().manual_seed(r)) for r in range(world)]
    ref_x = [x.clone().requires_grad_() for x in xs]
    ref_y = [block(x) for x in ref_x]
    (sum(y.square().sum() for y in ref_y) / world).backward()

    topo = Topology(names, counts)
    comm = Communicator(topo, 60.0)
    moe = convert(block)
    model = torch.nn.Sequential(moe)
    parallelize(model, comm, Domains(topo, sizes))
    ddp = data_parallel(model)
    x = xs[rank].clone().requires_grad_()
    y = ddp(x)
    y.square().sum().backward()

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    n = 2
    down = block.experts.down_proj.grad[rank * n:(rank + 1) * n].transpose(1, 2)
    gate_up = block.experts.gate_up_proj.grad[rank * n:(rank + 1) * n]
    errs = [rel(y.detach(), ref_y[rank].detach()), rel(x.grad / world, ref_x[rank].grad),
            rel(moe.router.gate.weight.grad, block.gate.weight.grad), rel(moe.experts.w2.grad, down),
            rel(moe.experts.w1.grad, gate_up[:, :24].transpose(1, 2)),
            rel(moe.experts.w3.grad, gate_up[:, 24:].transpose(1, 2))]
    return max(errs)


def killed_while_checkpointing(rank, world, config, plan_document, out_dir):
    """Train 2 steps with a checkpoint at each; during step 2's checkpoint rank 1 is killed (SIGKILL)
    right after writing its part, before the checkpoint is complete."""
    import os
    import signal

    import torch.distributed.checkpoint as dcp

    from hybridep import checkpoint, trainer

    save = dcp.save

    def save_then_die(state, checkpoint_id):
        save(state, checkpoint_id=checkpoint_id)
        if rank == 1 and checkpoint_id.endswith("step_00000002.partial"):
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.dcp.save = save_then_die
    return trainer.train(rank, world, config, plan_document, out_dir)


def dense_sync_modes(rank, world, names, counts):
    """The dense gradients of a small model with a MoE layer after one backward, under ``ring`` and
    ``hierarchical`` dense sync (one bucket per parameter: uneven sizes; rank 1 has no tokens):
    (largest relative difference, the hierarchical run's counted dense bytes per level)."""
    from hybridep.moe import MoE
    from hybridep.strategies.dense_sync import DenseSync

    topo = Topology(names, counts)
    comm = Communicator(topo, 60.0)
    grads, counted = {}, {}
    for mode in ("ring", "hierarchical"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(7, 13), MoE(13, 11, 2 * world, 2), torch.nn.Linear(13, 5)).double()
        parallelize(model, comm, Domains(topo, tuple(1 for _ in counts)))
        comm.traffic.reset()
        ddp = data_parallel(model, comm, DenseSync(mode), bucket_cap_mb=1e-6)
        rows = 0 if rank == 1 else 3 + rank
        x = torch.randn(rows, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
        y = ddp(x)
        (y.square().sum() + 0.01 * model[1].aux_loss).backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if "experts" not in n}
        counted[mode] = comm.traffic.bytes_by_level(["dense"])
    worst = max(float((grads["hierarchical"][n] - g).abs().max() / g.abs().max().clamp_min(1e-300))
                for n, g in grads["ring"].items())
    return worst, counted["hierarchical"]


def dense_sync_bytes(rank, world, names, counts, mode, steps):
    """The dense-sync bytes the communicator counts in the last of ``steps`` iterations of a small
    language model under DDP with dense-sync ``mode`` (several buckets): (bytes per level this rank
    counted, the model's dense gradient shapes, the summed dense gradient of the last step's first
    parameter, for a check that the mode ran)."""
    from hybridep.lm.model import LMConfig, MoELM
    from hybridep.strategies.dense_sync import parse_dense_sync

    topo = Topology(names, counts)
    comm = Communicator(topo, 60.0)
    torch.manual_seed(0)
    lm = LMConfig(seq_len=8, hidden=16, heads=2, layers=2, ffn=24, experts=world, top_k=2, dense_blocks=1)
    model = MoELM(lm).double()
    parallelize(model, comm, Domains(topo, tuple(1 for _ in counts)))
    ddp = data_parallel(model, comm, parse_dense_sync(mode), bucket_cap_mb=0.01)
    g = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        comm.traffic.reset()
        idx = torch.randint(0, 256, (2, 8), generator=g)
        ddp(idx, torch.roll(idx, -1, 1)).backward()
    experts = set(expert_param_names(model))
    shapes = [tuple(p.shape) for n, p in model.named_parameters() if n not in experts]
    return comm.traffic.bytes_by_level(["dense"]), shapes


def hierarchical_bytes(rank, world, names, counts, sizes, dedup, top_k, tokens, chunks=1):
    """One forward of an MoE layer under the hierarchical exchange (domain ``sizes``, ``dedup``
    levels, the stages pipelined in ``chunks``): (all-to-all bytes this rank counted per level, the
    crossings of each level its own tokens make -- counted here from the routing, independently of
    the runtime --, hidden, k)."""
    import numpy as np

    from hybridep.moe import MoE

    topo = Topology(names, counts)
    comm = Communicator(topo, 60.0)
    dom = Domains(topo, sizes)
    experts, hidden = 4 * world, 12
    torch.manual_seed(0)
    layer = MoE(hidden, 8, experts, top_k).double()
    parallelize(layer, comm, dom, a2a_chunks=chunks, dedup=dedup)
    x = torch.randn(tokens, hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    comm.traffic.reset()
    with torch.no_grad():
        routing = layer.router(x)
        layer(x)
    counted = comm.traffic.bytes_by_level(["a2a"])
    owner = np.asarray(routing.expert_idx) // (experts // world)
    dom_ids = np.stack(np.unravel_index(owner, counts), axis=-1) // np.asarray(sizes)  # [T, k, L]
    mine = np.asarray(topo.coords(rank)) // np.asarray(sizes)
    crossings, deduplicating = {}, True
    for lv in dom.rail_levels():
        deduplicating &= lv in dedup
        far = dom_ids[:, :, lv] != mine[lv]
        if deduplicating:
            n = sum(len({tuple(p) for p in dom_ids[t, far[t], : lv + 1]}) for t in range(tokens))
        else:
            n = int(far.sum())
        crossings[names[lv]] = n
    return counted, crossings, hidden, top_k


def shortcut_timeline(rank, world):
    """One forward and backward of a shortcut-connected LM under EP; this rank's timeline: the
    communicator's calls and the block's attention and dense FFN, forward and backward
    (name, start, end)."""
    from hybridep.lm.model import LMConfig, MoELM

    comm = Communicator(Topology(("dc",), (world,)), 60.0)
    torch.manual_seed(0)
    model = MoELM(LMConfig(seq_len=16, hidden=16, heads=2, layers=1, ffn=24, experts=2 * world, dense_blocks=1,
                           shortcut=True)).double()
    parallelize(model, comm, Domains(comm.topology, (1,)))
    block = model.moe_blocks[0]
    events = []

    def note(name):
        def hook(*_):
            events.append((name, time.perf_counter()))
        return hook

    for part in ("attn", "dense"):
        module = getattr(block, part)
        module.register_forward_pre_hook(note(f"{part} start"))
        module.register_forward_hook(note(f"{part} end"))
        module.register_full_backward_pre_hook(note(f"{part} bwd start"))
        module.register_full_backward_hook(note(f"{part} bwd end"))
    comm.traffic.record_spans = True
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randint(0, 256, (2, 16), generator=g), torch.randint(0, 256, (2, 16), generator=g)
    model(x, y).backward()
    spans = [(name, a, b) for track, name, a, b in comm.traffic.spans if track == "comm"]
    return spans, events, dict(comm.traffic.calls_by_op)


def ted_bytes(rank, world):
    """``_ted_bytes`` with and without DTD, and with DTD pipelined in 3 chunks, on one communicator
    (one launch)."""
    comm = Communicator(Topology(("dc", "gpu"), (2, 2)), 60.0)
    return [_ted_bytes(comm, rank, dtd, chunks) for dtd, chunks in ((True, 1), (False, 1), (True, 3))]


def _ted_bytes(comm, rank, dtd, chunks=1):
    """One forward and backward of a one-layer stack under TED (tp 2) on 2 DCs x 2; this rank's
    counted all-to-all payload bytes over the DC level, and the copies it routed to experts whose EP
    position lies in the other DC, times the bytes of one row."""
    from hybridep.parallel.ted import parallelize_ted

    comm.traffic.reset()
    torch.manual_seed(0)
    model = MoEStack(1, 16, 8, 4, 2).double()
    parallelize_ted(model, comm, 2, dtd, chunks=chunks)
    g = torch.Generator().manual_seed(rank // 2)  # the TP group's tokens
    x = torch.randn(13, 16, generator=g, dtype=torch.float64, requires_grad=True)
    model(x).square().sum().backward()
    layer = model.blocks[0].moe
    owner_dc = torch.arange(4) // 2  # EP position p (experts 2p, 2p+1) sits in DC p
    routed = layer.routed_tokens
    crossing = int(routed[owner_dc != rank // 2].sum())
    return comm.traffic.bytes_by_level(["a2a"]).get("dc", 0), crossing * 16 * 8


def ted_domain_traffic(rank, world):
    """One forward and backward of a one-layer stack under TED (tp 2, DTD) on 2 DCs x 2 with both EP
    positions in one expert domain: this rank's counted bytes per (operation, level) and the bytes
    of its expert shards."""
    from hybridep.parallel.ted import parallelize_ted

    comm = Communicator(Topology(("dc", "gpu"), (2, 2)), 60.0)
    torch.manual_seed(0)
    model = MoEStack(1, 16, 8, 4, 2).double()
    parallelize_ted(model, comm, 2, True, domain_sizes=(2, 1))
    x = torch.randn(13, 16, generator=torch.Generator().manual_seed(rank // 2), dtype=torch.float64)
    model(x.requires_grad_()).square().sum().backward()
    comm.quiesce()
    shard = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "experts" in n)
    by = {f"{op}/{lv}": b for (op, lv), b in comm.traffic.bytes_by_op_level.items()}
    return by, shard


def ted_lm_errors(rank, world, modes):
    """Per mode (dtd, cac, checkpoint): ``_ted_lm_errors`` on one communicator (one launch)."""
    comm = Communicator(Topology(("dc", "gpu"), (2, 2)), 60.0)
    return [_ted_lm_errors(comm, rank, *mode) for mode in modes]


def _ted_lm_errors(comm, rank, dtd, cac, checkpoint, domain_sizes=None):
    """One forward and backward of the language model (attention and dense FFNs tensor-parallel with
    parallelize_module, experts TED-sharded; ``checkpoint``: MoE blocks recomputed in backward,
    ``cac``: their collectives replayed; ``domain_sizes``: expert domains of the EP positions)
    against the single-process reference in float64: the loss, the largest relative error of any
    parameter gradient (a TP shard as its whole DTensor, an expert shard against the matching slice)
    and the all-to-all calls this rank made."""
    from torch.distributed.tensor import DTensor

    from hybridep.lm.model import LMConfig, MoELM
    from hybridep.parallel.ted import parallelize_ted, replica_ranks

    torch.manual_seed(0)
    cfg = LMConfig(seq_len=8, hidden=16, heads=4, layers=2, ffn=12, experts=4, dense_blocks=1, expert_kind="swiglu")
    model = MoELM(cfg).double()
    ref = copy.deepcopy(model)
    data = [(torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(g)),) * 2 for g in range(2)]
    (sum(ref(x, y) for x, y in data) / 2).backward()  # the replicas' mean
    parallelize_ted(model, comm, 2, dtd, cac=cac, checkpoint=checkpoint, domain_sizes=domain_sizes)
    ddp = data_parallel(model, comm, replicas=replica_ranks(comm, 2))
    x, y = data[rank // 2]  # the TP group's batch
    comm.traffic.reset()
    loss = ddp(x, y)
    loss.backward()
    comm.quiesce()  # the domain's reduce-scatters have landed
    calls = comm.traffic.calls_by_op.get("a2a", 0)
    ref_params, experts = dict(ref.named_parameters()), set(expert_param_names(model))
    worst = 0.0
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        r = ref_params[name].grad
        if name in experts:
            position, j = divmod(rank, 2)
            axis = 1 if name.endswith("w2") else 2
            r = r[2 * position: 2 * position + 2]
            r = r.narrow(axis, j * r.shape[axis] // 2, r.shape[axis] // 2)
        worst = max(worst, float((grad - r).abs().max() / r.abs().max()))
    return float(loss), float(ref(x, y)), worst, calls
