"""Placement-agnostic checkpoints with ``torch.distributed.checkpoint`` (DCP).

Every expert parameter and its Adam moments are saved as a DTensor sharded on the expert axis over
the world (``Shard(0)``: rank r's rows are experts r*n .. r*n+n-1), so DCP stores each expert under
its global id and reshards on load: a run saved under one plan or world size resumes under another.
Dense parameters, the optimizer's step counters, the training step and rank 0's RNG state are
saved once (replicated). Layout of a checkpoint folder::

    DIR/step_00000010/      .metadata, __R_0.distcp (one file per rank), meta.json
    DIR/step_00000010.partial/   a checkpoint being written (never read)

A checkpoint is written to ``.partial`` and renamed when every rank has written its part, so a
kill during a write leaves the previous checkpoint the latest complete one. The newest ``keep``
are kept.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from hybridep.api import Parallelized

STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for; the message says what was found."""


def _mesh():
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device, (dist.get_world_size(),))


def _state(par: Parallelized, opt: torch.optim.Optimizer, step: int) -> dict:
    """The state to save or to load into: expert tensors as DTensors over the world, the rest plain."""
    mesh = _mesh()
    experts = set(par.expert_names)

    def placed(name: str, t: torch.Tensor):
        return DTensor.from_local(t, mesh, [Shard(0)], run_check=False) if name in experts else t

    model = {n: placed(n, t) for n, t in par.model.state_dict(keep_vars=False).items()}
    optim = {}
    names = {id(p): n for n, p in par.model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            state = opt.state[p]
            if not state:  # before the first step: the moments Adam will create, zero
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            for key, value in state.items():
                optim[f"{name}.{key}"] = placed(name, value) if value.dim() > 0 else value
    return {"model": model, "optim": optim, "train": {"step": torch.tensor(step), "rng": torch.get_rng_state()}}


def save(directory: str | Path, step: int, par: Parallelized, opt: torch.optim.Optimizer, keep: int = 3,
         meta: dict | None = None) -> Path:
    """Write the checkpoint of ``step`` under ``directory`` (every rank calls it); return its folder."""
    directory = Path(directory)
    final = directory / f"step_{step:08d}"
    partial = directory / f"step_{step:08d}.partial"
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    dcp.save(_state(par, opt, step), checkpoint_id=str(partial))
    if dist.get_rank() == 0:
        (partial / "meta.json").write_text(json.dumps({
            "step": step, "strategy": str(par.plan.spec), "world_size": dist.get_world_size(),
            "experts": {n: list(shape) for n, shape in _global_shapes(par).items()}, **(meta or {})}, indent=1))
    dist.barrier()  # every rank's part is on disk before the checkpoint becomes complete
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in complete(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _global_shapes(par: Parallelized) -> dict[str, torch.Size]:
    world = dist.get_world_size()
    params = dict(par.model.named_parameters())
    return {n: torch.Size([params[n].shape[0] * world, *params[n].shape[1:]]) for n in par.expert_names}


def complete(directory: str | Path) -> list[Path]:
    """The complete checkpoints under ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and STEP_DIR.match(p.name)
                  and (p / ".metadata").is_file())


def latest(path: str | Path) -> Path:
    """The checkpoint to resume from: ``path`` itself if it is one, else the newest complete one
    under ``path`` or ``path/checkpoints``."""
    path = Path(path)
    if STEP_DIR.match(path.name) and (path / ".metadata").is_file():
        return path
    for where in (path, path / "checkpoints"):
        found = complete(where)
        if found:
            return found[-1]
    raise CheckpointError(f"no complete checkpoint in {path} (nor in {path / 'checkpoints'}); a folder "
                          "named step_NNNNNNNN with a .metadata file is one")


def load(path: str | Path, par: Parallelized, opt: torch.optim.Optimizer) -> int:
    """Load the checkpoint at ``path`` (see :func:`latest`) into the model and optimizer, placed as
    this run's plan places them; return the step to continue from."""
    folder = latest(path)
    state = _state(par, opt, 0)
    dcp.load(state, checkpoint_id=str(folder))
    own = par.model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, value in state["model"].items():
            own[name].copy_(value.to_local() if isinstance(value, DTensor) else value)
        names = {id(p): n for n, p in par.model.named_parameters()}
        for group in opt.param_groups:
            for p in group["params"]:
                for key, value in opt.state[p].items():
                    loaded = state["optim"][f"{names[id(p)]}.{key}"]
                    value.copy_(loaded.to_local() if isinstance(loaded, DTensor) else loaded)
    torch.set_rng_state(state["train"]["rng"])
    return int(state["train"]["step"])


def inspect(path: str | Path) -> dict:
    """What a checkpoint holds (no process group needed): its step, strategy, world size, tensors."""
    folder = latest(path)
    meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else {}
    reader = dcp.FileSystemReader(str(folder))
    md = reader.read_metadata()
    tensors = {k: list(v.size) for k, v in md.state_dict_metadata.items() if hasattr(v, "size")}
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    return {"checkpoint": str(folder), "bytes": size, **meta, "tensors": tensors}
