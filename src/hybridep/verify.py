"""``hybridep verify``: every strategy and domain size against the single-process reference.

Each rank builds the same random model (same seed) and every rank's inputs. The reference is the
same model without a strategy, run in this process on each rank's tokens in turn, with the
training loss defined as the mean of the ranks' losses. The distributed run applies the strategy,
wraps the model in DDP, and runs forward + backward on the rank's own tokens. Compared per case:
outputs, input gradients, every parameter gradient (expert gradients against the owner's slice).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from hybridep.moe.stack import MoEStack
from hybridep.parallel.comm import Communicator
from hybridep.parallel.strategy import data_parallel, expert_param_names, parallelize, prefetch_all
from hybridep.parallel.ted import parallelize_ted, replica_ranks
from hybridep.topology import Domains, Topology, position_topology

TOLERANCE = {"float64": 1e-10, "float32": 1e-5}
AUX_COEF = 0.01


@dataclass
class Scenario:
    """One random MoE problem: dimensions, routing regime, token counts per rank."""

    top_k: int
    hidden: int
    ffn: int
    kind: str
    tokens: list[int]
    capacity_factor: float | None = None
    skew: bool = False
    layers: int = 2
    seed: int = 0


@dataclass
class Case:
    strategy: str
    domain_sizes: tuple[int, ...]
    dtype: str
    scenario: Scenario
    prefetch: bool = False
    a2a_chunks: int = 1
    dedup: tuple[int, ...] | None = None
    """The hierarchical exchange deduplicating at these levels (None: the one-stage exchange)."""
    shortcut: bool = False
    """Shortcut-connected blocks (the exchange overlapping the block's dense layer)."""
    tp: int = 1
    """TED (:mod:`hybridep.parallel.ted`) over TP groups of this many ranks (1: not TED)."""
    dtd: bool = True
    """TED's duplicate-token dropping."""
    cac: bool = False
    """TED's communication-aware activation checkpointing (the MoE blocks recomputed in backward)."""
    results: dict = field(default_factory=dict)


def scenarios(world: int, experts: int, seed: int) -> list[Scenario]:
    """Seeded sweep over the regimes that break other systems: top-k 1/2/4, uneven and zero token
    counts, experts with no tokens, all tokens on one expert, odd hidden sizes, capacity factors."""
    g = torch.Generator().manual_seed(seed)

    def counts(lo: int, hi: int, zero_rank: int | None = None) -> list[int]:
        c = torch.randint(lo, hi + 1, (world,), generator=g).tolist()
        if zero_rank is not None:
            c[zero_rank % world] = 0
        return c

    out = [
        Scenario(1, 24, 40, "gelu", counts(5, 30), seed=seed),
        Scenario(2, 37, 20, "swiglu", counts(0, 25, zero_rank=1), capacity_factor=1.0, seed=seed + 1),
        Scenario(min(4, experts), 50, 33, "gelu", counts(3, 20), skew=True, seed=seed + 2),
        Scenario(1, 18, 12, "swiglu", counts(0, 12, zero_rank=0), capacity_factor=1.25, skew=True,
                 seed=seed + 3),
    ]
    return out


def _skew_router(model: MoEStack) -> None:
    """Route every token of a block to the same expert(s): graded gate rows along one direction."""
    for b in model.blocks:
        w = b.moe.router.gate.weight
        e = w.shape[0]
        with torch.no_grad():
            w.copy_(torch.arange(e, 0, -1, dtype=w.dtype)[:, None] * 0.5 * torch.ones_like(w[0]))


def _compare(a: torch.Tensor | None, b: torch.Tensor | None) -> tuple[float, float]:
    if a is None and b is None:
        return 0.0, 0.0
    if a is None:
        a = torch.zeros_like(b)
    if b is None:
        b = torch.zeros_like(a)
    diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    scale = b.double().abs().max().item() if b.numel() else 0.0
    return diff, diff / scale if scale > 0 else diff


def run_case(comm: Communicator, topology: Topology, case: Case, experts: int) -> dict:
    """Run one case on this rank; returns this rank's max errors and finiteness."""
    sc = case.scenario
    dtype = getattr(torch, case.dtype)
    rank, world = comm.rank, comm.world_size
    # NCCL needs the tensors on this rank's GPU; gloo runs on the CPU
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    torch.manual_seed(sc.seed)
    model = MoEStack(sc.layers, sc.hidden, sc.ffn, experts, sc.top_k, sc.kind, sc.capacity_factor,
                     case.shortcut).to(dtype)
    if sc.skew:
        _skew_router(model)
    model = model.to(device)
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(sc.seed + 1000)
    replicas = world // case.tp  # the ranks of a TP group share their tokens
    tokens = sc.tokens[:replicas]
    xs = [torch.randn(n, sc.hidden, generator=g, dtype=torch.float64).to(dtype).to(device) for n in tokens]
    cs = [torch.randn(n, sc.hidden, generator=g, dtype=torch.float64).to(dtype).to(device) for n in tokens]

    # reference: one process, each rank's tokens in turn, loss = mean over ranks
    ref_x = [x.clone().requires_grad_() for x in xs]
    ref_y = []
    total = 0.0
    for x, c in zip(ref_x, cs, strict=True):
        y = ref(x)
        ref_y.append(y.detach())
        total = total + ((y * c).sum() + AUX_COEF * ref.aux_loss()) / replicas
    total.backward()

    # distributed
    if case.tp > 1:
        styles = parallelize_ted(model, comm, case.tp, case.dtd, cac=case.cac, domain_sizes=case.domain_sizes,
                                 chunks=case.a2a_chunks)
        ddp = data_parallel(model, comm, replicas=replica_ranks(comm, case.tp))
        if case.prefetch:
            prefetch_all(styles, model)
    else:
        domains = Domains(topology, case.domain_sizes)
        styles = parallelize(model, comm, domains, a2a_chunks=case.a2a_chunks, dedup=case.dedup)
        ddp = data_parallel(model)
        if case.prefetch:
            prefetch_all(styles, model)
    mine = rank // case.tp
    x = xs[mine].clone().requires_grad_()
    y = ddp(x)
    loss = (y * cs[mine]).sum() + AUX_COEF * model.aux_loss()
    loss.backward()

    errs = [_compare(y.detach(), ref_y[mine]), _compare(x.grad / replicas if x.grad is not None else None,
                                                         ref_x[mine].grad)]
    expert_names = set(expert_param_names(model))
    ref_params = dict(ref.named_parameters())
    finite = bool(torch.isfinite(y).all()) and bool(torch.isfinite(loss))
    for name, p in model.named_parameters():
        r = ref_params[name].grad
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad  # a TP shard: whole
        if name in expert_names and r is not None:
            r = _expert_slice(r, name, rank, experts // replicas, case.tp)
        errs.append(_compare(grad, r))
        finite &= p.grad is None or bool(torch.isfinite(p.grad).all())
    stats = torch.tensor([max(e[0] for e in errs), max(e[1] for e in errs), 0.0 if finite else 1.0],
                         dtype=torch.float64, device=device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    tol = TOLERANCE[case.dtype]
    return {"strategy": case.strategy, "domain_sizes": dict(zip(topology.names, case.domain_sizes, strict=True)),
            "dtype": case.dtype, "prefetch": case.prefetch, "a2a_chunks": case.a2a_chunks,
            "dedup": None if case.dedup is None else [topology.names[lv] for lv in case.dedup],
            "shortcut": case.shortcut, "tp": case.tp, "dtd": case.dtd, "cac": case.cac, "scenario": asdict(sc),
            "max_abs_err": stats[0].item(), "max_rel_err": stats[1].item(),
            "finite": stats[2].item() == 0.0,
            "passed": stats[2].item() == 0.0 and stats[1].item() <= tol}


def _expert_slice(grad: torch.Tensor, name: str, rank: int, n: int, tp: int) -> torch.Tensor:
    """The part of a reference expert gradient [E, ...] that ``rank`` holds: its EP position's ``n``
    experts and (TED) its TP shard of their FFN dimension."""
    position, j = divmod(rank, tp)
    rows = grad[position * n: (position + 1) * n]
    if tp == 1:
        return rows
    axis = 1 if name.endswith("w2") else 2
    width = rows.shape[axis] // tp
    return rows.narrow(axis, j * width, width)


def default_topology(world: int) -> Topology:
    """2 DCs x (world/2) devices for even worlds >= 4, else one level."""
    if world >= 4 and world % 2 == 0:
        return Topology(("dc", "gpu"), (2, world // 2))
    return Topology(("gpu",), (world,))


STRATEGIES = ("ep", "hybridep", "hierarchical", "hybridep+hier", "ted")
"""``verify --strategies``: EP; HybridEP at every other partition; the hierarchical exchange on EP's
partition (deduplicating at every level but the innermost, and at none) and on every other one."""


def _partitions(topology: Topology, strategy: str, tp: int = 2) -> list[tuple[int, ...]]:
    ones = tuple(1 for _ in topology.counts)
    if strategy in ("ep", "hierarchical"):
        return [ones]
    if strategy == "ted":  # TP groups of tp: every partition of the EP positions
        return position_topology(topology, tp).feasible_domain_sizes() if topology.counts[-1] % tp == 0 else []
    if strategy in ("hybridep", "hybridep+hier"):
        return [s for s in topology.feasible_domain_sizes() if any(x > 1 for x in s)]
    raise ValueError(f"strategies: unknown strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")


def make_cases(topology: Topology, strategies: list[str], dtypes: list[str], experts: int, seed: int,
               only: list[tuple[int, ...]] | None = None, shortcut: bool = False, tp: int = 2) -> list[Case]:
    """Every scenario for every partition of the given families (:data:`STRATEGIES`), or only the
    partitions in ``only`` (a plan's). Scenarios 2 and 3 run shortcut-connected blocks (every
    scenario with ``shortcut``: a configuration's ``moe.shortcut``); ``tp``: TED's TP group size."""
    cases = []
    outer = tuple(range(topology.num_levels - 1))  # the hierarchical default: all but the innermost
    for strategy in strategies:
        partitions = _partitions(topology, strategy, tp)
        if only is not None:
            partitions = [s for s in partitions if tuple(s) in {tuple(o) for o in only}]
        hier = strategy in ("hierarchical", "hybridep+hier")
        for sizes in partitions:
            for dtype in dtypes:
                for i, sc in enumerate(scenarios(topology.world_size, experts, seed)):
                    short = shortcut or i >= 2
                    if strategy == "ted":  # TP groups of tp (inside the innermost level), DTD on and off;
                        # hidden and FFN rounded up to what tp shards divide
                        even = dataclasses.replace(sc, hidden=sc.hidden + -sc.hidden % tp, ffn=sc.ffn + -sc.ffn % tp)
                        # the scenarios without CAC pipeline the exchange in 3 and 2 chunks
                        cases += [Case(strategy, sizes, dtype, even, tp=tp, dtd=dtd, shortcut=short, cac=i % 2 == 1,
                                       prefetch=any(x > 1 for x in sizes) and i % 2 == 0,
                                       a2a_chunks=(3, 1, 2, 1)[i % 4]) for dtd in (True, False)]
                        continue
                    if hier:  # odd scenarios deduplicate at every level (the innermost too); the
                        # first and the last pipeline the stages in chunks
                        dedup = outer if i % 2 == 0 else tuple(range(topology.num_levels))
                        cases.append(Case(strategy, sizes, dtype, sc, prefetch=i % 2 == 1, dedup=dedup,
                                          shortcut=short, a2a_chunks=(3, 1, 1, 2)[i % 4]))
                        continue
                    # every other scenario pipelines its exchange in 3 chunks
                    cases.append(Case(strategy, sizes, dtype, sc, prefetch=(strategy == "hybridep" and i % 2 == 1),
                                      a2a_chunks=3 if i % 2 == 0 else 1, shortcut=short))
    return cases


def verify_worker(rank: int, world: int, names: tuple[str, ...], counts: tuple[int, ...], strategies: list[str],
                  dtypes: list[str], seed: int, timeout_s: float,
                  partitions: list[tuple[int, ...]] | None = None, shortcut: bool = False, tp: int = 2) -> list[dict]:
    """Body of one rank (local spawn or torchrun): every case, results identical on all ranks;
    ``partitions``: only these domain sizes (a plan's); ``shortcut``: every case shortcut-connected;
    ``tp``: TED's TP group size (a plan's)."""
    topology = Topology(names, counts)
    comm = Communicator(topology, timeout_s)
    experts = world * max(2, -(-4 // world))  # at least 4 experts, so that top-k 4 is covered
    cases = make_cases(topology, strategies, dtypes, experts, seed, partitions, shortcut, tp)
    return [run_case(comm, topology, c, experts) for c in cases]


def summarize(results: list[dict]) -> dict:
    return {"cases": results, "all_passed": all(r["passed"] for r in results) and bool(results)}
