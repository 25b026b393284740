"""The training loop of one rank under one strategy, with per-iteration timing and traffic.

Strategies: ``ep`` / ``hybridep`` (ours, from per-level domain sizes), ``deepspeed`` (the peer:
``deepspeed.moe.layer.MoE``, expert-parallel over all ranks, dropless), ``local`` (no
communication at all: the compute-only reference that every rank runs on its own batch).
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from hybridep.lm.data import batch, load_corpus
from hybridep.lm.model import LMConfig, MoELM
from hybridep.migration.sr import SRSettings
from hybridep.parallel.comm import Communicator, union_seconds
from hybridep.parallel.strategy import data_parallel, expert_param_names, moe_layers, parallelize, prefetch_all
from hybridep.parallel.ted import parallelize_ted, replica_ranks
from hybridep.strategies.dense_sync import parse_dense_sync
from hybridep.topology import Domains


@dataclass
class RunSpec:
    strategy: str
    domain_sizes: tuple[int, ...] = ()
    steps: int = 20
    warmup: int = 3
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0
    prefetch: bool = True
    sr_ratio: float | None = None
    sr_basis: str = "delta"
    sr_values: str = "float16"
    sr_decode: str = "layer"
    sr_grads: str = "dense"
    a2a_chunks: int = 1
    dedup: tuple[int, ...] | None = None
    """The hierarchical token exchange deduplicating at these levels (None: the one-stage exchange)."""
    shortcut: bool = False
    """Shortcut-connected MoE blocks (the model's ``shortcut``; already so when the model is)."""
    tp: int = 1
    """``ted``: ranks per tensor-parallel group (its ranks train on the same batch: the ``tp``
    batches its ranks have under the other strategies, :func:`group_batch`)."""
    dtd: bool = True
    """``ted``: duplicate-token dropping."""
    cac: bool = False
    """``ted``: communication-aware activation checkpointing of the MoE blocks."""
    trace: bool = False
    """Record every rank's timeline of the timed steps (:attr:`RunResult.trace`)."""
    dense_sync: str = "ring"
    """How DDP synchronises the dense gradients (:mod:`hybridep.strategies.dense_sync`)."""
    on_nonfinite: str = "stop"
    """A non-finite loss or gradient: ``stop`` the run with :class:`NonFiniteError`, or ``skip`` the
    step on every rank (no optimizer step) and count it (:attr:`RunResult.skipped_steps`)."""

    @property
    def sr(self) -> SRSettings | None:
        """The compression settings of this run (None: uncompressed)."""
        if not self.sr_ratio:
            return None
        return SRSettings(self.sr_ratio, self.sr_basis, self.sr_values, self.sr_decode, self.sr_grads)


@dataclass
class RunResult:
    iter_s: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    comm_s: dict[str, float] = field(default_factory=dict)
    """Seconds per timed iteration spent in each collective family (rank mean)."""
    a2a_s_by_rank: list[float] = field(default_factory=list)
    """Seconds per timed iteration each rank spent in the token exchange (issuing, transferring or
    waiting: ``a2a`` and ``meta``): its exposed exchange. The rank that waits least is the one the
    others wait for; its figure is network time, theirs adds the wait for it."""
    payload_bytes_by_level: dict[str, float] = field(default_factory=dict)
    """Payload bytes per timed iteration, all ranks together, by topology level."""
    uplink_bytes: float | None = None
    """Bytes per timed iteration through the top-level uplinks (testbed counters), if shaped."""
    outer_busy_s: float | None = None
    """Seconds per timed iteration during which at least one rank was in an operation whose group
    spans the outermost level (the union over ranks of those calls' intervals; meaningful where the
    ranks share a host clock, as on the testbed)."""
    a2a_pair_bytes: list[list[float]] | None = None
    """All-to-all payload bytes per timed iteration from rank i (row) to rank j (column)."""
    expert_tokens: list[list[float]] | None = None
    """Token copies routed to each expert (column) of each MoE layer (row) per timed iteration,
    all ranks together: the measured routing histogram."""
    optimizer_s: float = 0.0
    dense_bytes_by_level: dict[str, float] = field(default_factory=dict)
    """Bytes per timed iteration of the dense gradients' synchronisation (all ranks), per level."""
    skipped_steps: list[int] = field(default_factory=list)
    """Steps whose optimizer step was skipped for a non-finite loss or gradient (``on_nonfinite: skip``)."""
    """Median seconds of this rank's optimizer step over the timed iterations."""
    optimizer_param_bytes: int = 0
    """Bytes of the parameters this rank's optimizer updates."""
    trace: list[list[tuple[str, str, float, float]]] | None = None
    """With ``RunSpec.trace``: every rank's (track, name, start, end) spans of the timed steps, in
    seconds of the host's monotonic clock (shared by the ranks on the testbed): the forward pass,
    backward pass and optimizer step (track ``compute``) and every communicator call."""

    def summary(self) -> dict:
        it = sorted(self.iter_s)
        q = statistics.quantiles(it, n=10) if len(it) >= 2 else [it[0]] * 9
        return {"median_iter_s": statistics.median(it), "p10_iter_s": q[0], "p90_iter_s": q[-1],
                "iter_s": self.iter_s, "losses": self.losses, "final_loss": self.losses[-1],
                "comm_s": self.comm_s, "a2a_s_by_rank": self.a2a_s_by_rank,
                "payload_bytes_by_level": self.payload_bytes_by_level,
                "uplink_bytes": self.uplink_bytes, "outer_busy_s": self.outer_busy_s,
                "a2a_pair_bytes": self.a2a_pair_bytes, "expert_tokens": self.expert_tokens,
                "optimizer_s": self.optimizer_s, "optimizer_param_bytes": self.optimizer_param_bytes,
                "skipped_steps": self.skipped_steps, "dense_bytes_by_level": self.dense_bytes_by_level,
                **({"trace": self.trace} if self.trace is not None else {})}


class DeepSpeedMoE(nn.Module):
    """The peer's MoE layer with our interface: ``forward(x) -> y`` and ``aux_loss``."""

    def __init__(self, cfg: LMConfig, ep_size: int):
        super().__init__()
        from deepspeed.moe.layer import MoE as DSMoE

        expert = nn.Sequential(nn.Linear(cfg.hidden, cfg.ffn, bias=False), nn.GELU(),
                               nn.Linear(cfg.ffn, cfg.hidden, bias=False))
        self.layer = DSMoE(hidden_size=cfg.hidden, expert=expert, num_experts=cfg.experts, ep_size=ep_size,
                           k=cfg.top_k, drop_tokens=False, use_rts=False)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, self.aux_loss, _ = self.layer(x)
        return y


def group_batch(corpus: torch.Tensor, spec: RunSpec, seq_len: int, step: int, rank: int) -> tuple[torch.Tensor, ...]:
    """This rank's batch at ``step``: its own, or under TED (``spec.tp`` > 1) its TP group's -- the
    batches the group's ``tp`` ranks have under every other strategy, concatenated -- so every
    strategy trains on the same global batch."""
    first = rank // spec.tp * spec.tp
    parts = [batch(corpus, spec.batch_size, seq_len, spec.seed, step, r) for r in range(first, first + spec.tp)]
    return tuple(torch.cat(t) for t in zip(*parts, strict=True))


def build(cfg: LMConfig, spec: RunSpec, comm: Communicator | None) -> tuple[nn.Module, nn.Module, list]:
    """The model for a strategy: (module to call, raw model, per-layer styles for prefetch)."""
    torch.manual_seed(spec.seed)
    if spec.shortcut:
        cfg = dataclasses.replace(cfg, shortcut=True)
    if spec.strategy == "local" or comm is None:
        model = MoELM(cfg)
        return model, model, []
    if spec.strategy == "deepspeed":
        import deepspeed.comm as dscomm

        dscomm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)
        model = MoELM(cfg, lambda c: DeepSpeedMoE(c, comm.world_size))
        for b in model.moe_blocks:
            b.moe.layer.set_deepspeed_parallelism()
        from torch.nn.parallel import DistributedDataParallel

        ignore = [n for n, _ in model.named_parameters() if "deepspeed_experts" in n]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
        return DistributedDataParallel(model), model, []
    model = MoELM(cfg)
    if spec.strategy == "ted":  # TP groups; expert domains of EP positions when domain_sizes says so
        styles = parallelize_ted(model, comm, spec.tp, spec.dtd, cac=spec.cac, domain_sizes=spec.domain_sizes or None,
                                 chunks=spec.a2a_chunks)
        replicas = replica_ranks(comm, spec.tp)
        return data_parallel(model, comm, parse_dense_sync(spec.dense_sync), replicas=replicas), model, styles
    styles = parallelize(model, comm, Domains(comm.topology, spec.domain_sizes), spec.sr, spec.a2a_chunks,
                         spec.dedup)
    return data_parallel(model, comm, parse_dense_sync(spec.dense_sync)), model, styles


def _local(p: torch.Tensor) -> torch.Tensor:
    """A parameter as this rank holds it (a tensor-parallel DTensor's local shard)."""
    from torch.distributed.tensor import DTensor

    return p.to_local() if isinstance(p, DTensor) else p


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient; the message names the rank, the step and where it appeared."""


def nonfinite_where(loss: torch.Tensor, model: nn.Module) -> str | None:
    """Where this rank's step went non-finite: ``loss``, ``expert gradients`` (the first such
    parameter named) or ``dense gradients``; None when all is finite. Reads values once per
    parameter (as Megatron-Core's check_for_nan_in_loss_and_grad)."""
    if not torch.isfinite(loss).all():
        return "loss"
    experts = set(expert_param_names(model))
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return f"{'expert' if name in experts else 'dense'} gradients ({name})"
    return None


def check_finite(loss: torch.Tensor, model: nn.Module, mode: str, rank: int, step: int,
                 distributed: bool) -> bool:
    """True when this step must be skipped (``mode`` ``skip``, any rank non-finite: the ranks agree
    by an all-reduce of one flag); raises :class:`NonFiniteError` under ``stop``."""
    where = nonfinite_where(loss, model)
    if mode == "stop":
        if where is not None:
            raise NonFiniteError(f"rank {rank}, step {step}: non-finite {where} (on_nonfinite: stop; "
                                 "'skip' skips such steps instead)")
        return False
    flag = torch.tensor([0.0 if where is None else 1.0])
    if distributed:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def run(cfg: LMConfig, spec: RunSpec, comm: Communicator | None, uplink_counter=None) -> RunResult:
    """Train ``spec.steps`` steps; time the ones after ``spec.warmup``."""
    corpus = load_corpus()
    rank = comm.rank if comm else 0
    module, model, styles = build(cfg, spec, comm)
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    result = RunResult()
    distributed = comm is not None and spec.strategy != "local"
    # the compute-only reference under a launcher: all ranks step in lockstep (a barrier per step),
    # so its iteration is the slowest rank's compute, as in every synchronous strategy
    lockstep = spec.strategy == "local" and dist.is_available() and dist.is_initialized()
    before = None
    stamps, opt_s = [], []
    for step in range(spec.steps):
        if lockstep:
            dist.barrier()
        if step == spec.warmup:
            # one barrier before the timed steps; after it, iteration i's time runs from its start to
            # the start of iteration i+1, so transfers left in flight (prefetch) are not hidden
            if distributed:
                dist.barrier()
            if comm:
                comm.quiesce()  # the prefetched gathers of this step are counted before the window
                comm.traffic.reset()
                comm.traffic.record_outer_intervals = True  # for the cross-DC busy time
                comm.traffic.record_spans = spec.trace
            for layer in moe_layers(model):
                layer.reset_routing_stats()
            if uplink_counter is not None:
                before = uplink_counter()
        if step >= spec.warmup:
            stamps.append(time.perf_counter())
        x, y = group_batch(corpus, spec, cfg.seq_len, step, rank)
        opt.zero_grad(set_to_none=True)
        t_fwd = time.perf_counter()
        loss = module(x, y)
        t_bwd = time.perf_counter()
        loss.backward()
        t_opt = time.perf_counter()
        if check_finite(loss, model, spec.on_nonfinite, rank, step, distributed):
            result.skipped_steps.append(step)
            opt.zero_grad(set_to_none=True)
        opt.step()
        if step >= spec.warmup:
            opt_s.append(time.perf_counter() - t_opt)
            if comm is not None:
                for name, a, b in (("forward", t_fwd, t_bwd), ("backward", t_bwd, t_opt),
                                   ("optimizer", t_opt, t_opt + opt_s[-1])):
                    comm.note_span(name, a, b, track="compute")
        if styles and spec.prefetch and step < spec.steps - 1:
            prefetch_all(styles, model)
        result.losses.append(loss.item())
    if lockstep:
        dist.barrier()
    stamps.append(time.perf_counter())
    result.iter_s = [b - a for a, b in itertools.pairwise(stamps)]
    result.optimizer_s = statistics.median(opt_s) if opt_s else 0.0
    result.optimizer_param_bytes = sum(_local(p).numel() * p.element_size() for p in model.parameters())
    timed = max(1, spec.steps - spec.warmup)
    if distributed:
        dist.barrier()
    if uplink_counter is not None and before is not None:
        result.uplink_bytes = (uplink_counter() - before) / timed
    if spec.trace and comm is not None:
        comm.traffic.record_spans = False
        result.trace = [None] * comm.world_size
        dist.all_gather_object(result.trace, comm.traffic.spans)
    if comm is not None and spec.strategy not in ("local", "deepspeed"):  # our strategies count their bytes
        tr = comm.traffic
        secs = torch.tensor([tr.seconds_by_op.get(k, 0.0) for k in ("a2a", "meta", "ag", "rs")], dtype=torch.float64)
        levels = list(comm.topology.names)
        by_level = tr.bytes_by_level(["a2a", "ag", "rs", "tp"])  # the TP groups' collectives too (ted)
        b = torch.tensor([float(by_level.get(lv, 0)) for lv in levels], dtype=torch.float64)
        dense = tr.bytes_by_level(["dense"])
        d = torch.tensor([float(dense.get(lv, 0)) for lv in levels], dtype=torch.float64)
        dist.all_reduce(d)
        result.dense_bytes_by_level = {lv: float(v) / timed for lv, v in zip(levels, d, strict=True)}
        to_peer = tr.bytes_by_peer(["a2a"])
        row = torch.tensor([float(to_peer.get(p, 0)) for p in range(comm.world_size)], dtype=torch.float64)
        pairs = [torch.empty_like(row) for _ in range(comm.world_size)]
        dist.all_gather(pairs, row)
        mine = secs[:2].sum().reshape(1) / timed
        per_rank = [torch.empty_like(mine) for _ in range(comm.world_size)]
        dist.all_gather(per_rank, mine)
        result.a2a_s_by_rank = [float(x) for x in per_rank]
        dist.all_reduce(secs)
        dist.all_reduce(b)
        result.a2a_pair_bytes = [(p / timed).tolist() for p in pairs]
        spans: list = [None] * comm.world_size  # the ranks share one host clock on the testbed
        dist.all_gather_object(spans, tr.outer_intervals)
        result.outer_busy_s = union_seconds([iv for s in spans for iv in s]) / timed
        routed = torch.stack([layer.routed_tokens for layer in moe_layers(model)]).to(torch.float64)
        dist.all_reduce(routed)
        result.expert_tokens = (routed / timed).tolist()
        secs /= comm.world_size * timed
        result.comm_s = {"a2a": float(secs[0] + secs[1]), "ag": float(secs[2]), "rs": float(secs[3])}
        result.payload_bytes_by_level = {lv: float(v) / timed for lv, v in zip(levels, b, strict=True)}
    return result
