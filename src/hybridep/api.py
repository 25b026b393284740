"""The public API: plan, apply the plan to your model, train it with your own loop.

::

    import hybridep
    rank, world = hybridep.init_distributed()             # under torchrun (or any launcher)
    plan = hybridep.load_plan("plan.json")                  # or hybridep.plan(config)
    par = hybridep.parallelize(model, plan)                 # every hybridep.moe.MoE in the model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for x, y in data:
        loss = loss_fn(par.module(x), y)
        loss.backward()
        opt.step(); opt.zero_grad()
        par.prefetch()                                      # next step's expert gathers, now

The model stays parallelism-agnostic: it holds :class:`hybridep.moe.MoE` layers (all experts, as a
single process would); :func:`parallelize` shards their experts over the ranks and swaps their
dispatchers for the plan's strategy, as torchtitan applies a ``ParallelStyle``, and wraps the rest in
DDP. Without a strategy the same model is the single-process reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from hybridep.config import Config, load_config
from hybridep.migration.sr import SRSettings
from hybridep.parallel.comm import Communicator
from hybridep.parallel.strategy import ExpertParallelStyle, data_parallel, expert_param_names, prefetch_all
from hybridep.parallel.ted import replica_ranks
from hybridep.planfile import Plan, load_plan, make_plan, resolved_dense_sync
from hybridep.strategies import TedSpec
from hybridep.strategies.dense_sync import parse_dense_sync

__all__ = ["Parallelized", "init_distributed", "load_plan", "parallelize", "plan", "shutdown"]


def plan(config: Config | str | Path | None = None, overrides: tuple[str, ...] = ()) -> Plan:
    """The cost model's plan for ``config`` (a :class:`~hybridep.config.Config`, a YAML path, or None
    for the embedded default, with ``--set``-style ``overrides``). ``plan.save(path)`` writes it."""
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    return make_plan(cfg)


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> tuple[int, int]:
    """Join the job torchrun (or any launcher setting RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
    started: NCCL with one GPU per local rank when CUDA is there, else gloo on the CPU. Returns
    (rank, world size); a no-op when already initialised."""
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"not inside a launched job: {', '.join(missing)} not set (start with torchrun)")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    if dist.get_backend() == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def shutdown(code: int = 0) -> None:
    """Leave the job: wait for every rank, tear the process groups down and end this process with
    ``code``, its output flushed, skipping the interpreter's teardown (where threads left by gloo and
    the communicator can abort a finished rank)."""
    from hybridep.launch import leave

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    leave(code)


@dataclass
class Parallelized:
    """What a training loop needs of a model the plan was applied to."""

    module: nn.Module
    """The model to call: DDP over the dense parameters (the expert parameters are the strategy's)."""
    model: nn.Module
    """The model itself, its experts sharded (each rank keeps the experts it owns)."""
    comm: Communicator
    """The communicator every strategy call goes through (its ``traffic`` counts bytes per level)."""
    plan: Plan
    styles: list[ExpertParallelStyle] = field(default_factory=list)

    @property
    def expert_names(self) -> list[str]:
        """Names of the expert parameters (owned per rank: rank r holds experts r*n .. r*n+n-1)."""
        return expert_param_names(self.model)

    def expert_parameters(self) -> list[nn.Parameter]:
        names = set(self.expert_names)
        return [p for n, p in self.model.named_parameters() if n in names]

    def dense_parameters(self) -> list[nn.Parameter]:
        names = set(self.expert_names)
        return [p for n, p in self.model.named_parameters() if n not in names]

    def prefetch(self) -> None:
        """Issue the next step's expert gathers as a chain (call right after the optimizer step)."""
        if self.plan.spec.prefetch is not False:
            prefetch_all(self.styles, self.model)


def parallelize(model: nn.Module, plan: Plan, timeout_s: float = 600.0, config: Config | None = None) -> Parallelized:
    """Apply ``plan`` to every :class:`hybridep.moe.MoE` of ``model`` (in place) and wrap the rest in
    DDP. The job's world size must be the plan's; ``timeout_s`` bounds every collective (a stalled
    rank is named); ``config`` gives the compression settings of a compressed plan (default: the plan's)."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call hybridep.init_distributed() first")
    spec = plan.spec
    if dist.get_world_size() != spec.topology.world_size:
        raise ValueError(f"the plan is for {spec.topology.world_size} ranks, the job has {dist.get_world_size()}")
    cfg = config or plan.config()
    comm = Communicator(spec.topology, timeout_s)
    sr = None
    if spec.compressed:
        b = cfg.bench
        sr = SRSettings(spec.sr_ratio, b.sr_basis, cfg.moe.sr_values if cfg.moe else "float16", b.sr_decode,
                        spec.sr_grads)
    styles = spec.apply(model, comm, sr, cfg.moe.a2a_chunks if cfg.moe else 1)
    # under ted a TP group's ranks hold the same tokens: feed them the same batch; DDP over the replicas
    replicas = replica_ranks(comm, spec.tp) if isinstance(spec, TedSpec) else None
    ddp = data_parallel(model, comm, parse_dense_sync(resolved_dense_sync(cfg, plan.document)), replicas=replicas)
    return Parallelized(ddp, model, comm, plan, styles)
