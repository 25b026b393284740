"""The planner: evaluate the cost model for every feasible partition and pick the fastest.

Candidates are all combinations of per-level domain sizes (divisors of each level's count), each
with the one-stage exchange and -- where it deduplicates (the rails cross a level above the
innermost) and the model's dimensions are known -- the hierarchical one (``+hier``), each with
every dense-sync mode the configuration allows (``dense_sync: auto``: ``ring``,
``hierarchical`` and the lossy modes ``planner.allow`` lists; else the configured one). Plain EP
(all sizes 1) is always among them, so the choice is never predicted slower than EP. TED with
duplicate-token dropping (``ted(tp=N,dtd,...)``) is weighed at every TP group size the innermost
level and the model divide by and every partition of its EP positions (at the same global batch:
a TP group trains on its ranks' batches together). Every candidate with gathers is also weighed
with them prefetched the other way than ``bench.prefetch`` where that can be faster (unprefetched:
each layer's gather when its experts are needed). With ``planner.allow: [shortcut]`` every
candidate is also weighed on shortcut-connected MoE blocks (a different model, so only when
allowed). Ties (within 1e-9 relative) go to no tensor parallelism, then to the smaller expert
domain (less memory, closer to EP), then to the earlier dense-sync mode
(``ring`` first), then to the one-stage exchange, then to the standard blocks.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

from hybridep.config import SHORTCUT_CHOICE, SR_CHOICE, Config, CostTerms
from hybridep.costmodel import (
    Network,
    Prediction,
    Workload,
    evaluate,
    paper_closed_form_p,
    workload_from_config,
)
from hybridep.strategies import HierarchicalSpec, HybridEPSpec, StrategyError, TedSpec
from hybridep.strategies.dense_sync import candidates
from hybridep.strategies.hybridep import predict
from hybridep.strategies.ted import check_config
from hybridep.topology import Domains, Topology, divisors, position_topology


@dataclass
class Candidate:
    domains: Domains
    prediction: Prediction
    dense_sync: str = "ring"
    hier: bool = False
    """The hierarchical token exchange (family ``hierarchical``) on this partition."""
    shortcut: bool = False
    """The model's MoE blocks are shortcut-connected (``moe.shortcut``)."""
    sr_ratio: float | None = None
    """SR-compressed gathers at this ratio (``planner.allow: [sr]``); None: uncompressed."""
    a2a_chunks: int | None = None
    """Chunks of the pipelined exchange (``planner.a2a_chunks``); None: as configured."""
    tp: int = 1
    """TED (``ted(tp=N,dtd)``) with TP groups of this many ranks, ``domains`` then partitioning the
    EP positions; 1: not TED."""
    prefetch: bool | None = None
    """The gathers prefetched (True) or gathered when needed (False); None: as configured
    (``bench.prefetch``)."""

    @property
    def spec(self) -> HybridEPSpec:
        """The strategy this candidate is."""
        topo, sizes = self.domains.topology, self.domains.sizes
        if self.tp > 1:
            return TedSpec(topo, sizes, a2a_chunks=self.a2a_chunks, tp=self.tp, dtd=True, shortcut=self.shortcut)
        if self.hier:
            return HierarchicalSpec(topo, sizes, a2a_chunks=self.a2a_chunks, prefetch=self.prefetch,
                                    shortcut=self.shortcut)
        return HybridEPSpec(topo, sizes, self.sr_ratio, "dense", self.a2a_chunks, self.prefetch, self.shortcut)

    def shares(self) -> tuple[Domains, Domains, int]:
        """(the partition whose rails exchange tokens, the partition of expert holders, how many
        holders' partitions there are): this candidate's domains, its domains, 1 -- for TED the
        ranks' partition of its rails (:meth:`~hybridep.strategies.ted.TedSpec.exchange_domains`),
        its domains over the EP positions, and ``tp`` (one per TP index, each gathering its shards)."""
        if self.tp == 1:
            return self.domains, self.domains, 1
        topo = self.domains.topology
        return self.spec.exchange_domains(), Domains(position_topology(topo, self.tp), self.domains.sizes), self.tp

    def to_dict(self) -> dict:
        names = self.domains.topology.names
        pred = self.prediction
        rails, holders, copies = self.shares()
        return {
            "strategy": str(self.spec),
            "family": self.spec.family,
            "dense_sync": self.dense_sync,
            "domain_sizes": dict(zip(names, self.domains.sizes, strict=True)),
            "tp": self.tp,
            "p": holders.p,
            "p_volume": holders.p_volume,
            "predicted_iteration_s": pred.iteration_s,
            "breakdown_s": {
                "compute": pred.compute_s, "a2a": pred.a2a_s, "ag": pred.ag_s, "rs": pred.rs_s,
                "grad_sync": pred.grad_sync_s, "exposed_ag": pred.exposed_ag_s,
                "exposed_rs": pred.exposed_rs_s, "exposed_grad_sync": pred.exposed_grad_sync_s,
            },
            "a2a_pairs": rails.a2a_pairs(),
            "ag_pairs": copies * holders.ag_pairs(),
            "bytes_by_level": pred.bytes_by_level,
        }


@dataclass
class PlanResult:
    candidates: list[Candidate]
    choice: Candidate
    ep: Candidate
    closed_form: dict

    @property
    def speedup_over_ep(self) -> float:
        ep, choice = self.ep.prediction.iteration_s, self.choice.prediction.iteration_s
        if choice <= 0:  # nothing to do at all (no bytes, no compute): as fast as EP
            return 1.0 if ep <= 0 else math.inf
        return ep / choice

    def best_by_family(self) -> dict[str, Candidate]:
        """The fastest candidate of each strategy family (``hybridep``, ``hierarchical``, ``ted``)."""
        return {family: top[0] for family, top in self.top_by_family(1).items()}

    def top_by_family(self, n: int) -> dict[str, list[Candidate]]:
        """The ``n`` fastest distinct strategies of each family (each under its fastest dense-sync
        mode), fastest first."""
        out: dict[str, list[Candidate]] = {}
        for c in sorted(self.candidates, key=lambda c: c.prediction.iteration_s):
            family = out.setdefault(c.spec.family, [])
            if len(family) < n and all(c.spec != o.spec for o in family):
                family.append(c)
        return out

    def to_dict(self) -> dict:
        names = self.choice.domains.topology.names
        return {
            "best_by_family": {f: {"strategy": str(c.spec), "dense_sync": c.dense_sync,
                                   "predicted_iteration_s": c.prediction.iteration_s}
                               for f, c in self.best_by_family().items()},
            "choice": {
                "strategy": str(self.choice.spec),
                "dense_sync": self.choice.dense_sync,
                "domain_sizes": dict(zip(names, self.choice.domains.sizes, strict=True)),
                "p": self.choice.shares()[1].p,
                "predicted_iteration_s": self.choice.prediction.iteration_s,
            },
            "ep_predicted_iteration_s": self.ep.prediction.iteration_s,
            "speedup_over_ep": self.speedup_over_ep,
            "closed_form": self.closed_form,
            "candidates": [c.to_dict() for c in self.candidates],
        }


def closed_form(topology: Topology, w: Workload, net: Network) -> dict:
    """The paper's closed-form p*, on the flattened topology (G = world size, B = slowest port).

    Exact for one level. The snapped domain size is the better of the two feasible one-level
    domain sizes that bracket p*: the paper's Lat_all(p) is convex, so that is the discrete optimum.
    """
    g = topology.world_size
    b = min(net.port_bytes_per_s)
    p_vol = paper_closed_form_p(w.dispatch_bytes, w.expert_bytes, w.pre_expert_s, g, b)
    size = g - p_vol * (g - 1)
    out = {"p_volume": p_vol, "p": 1.0 - size / g, "domain_size": size, "exact": topology.num_levels == 1}
    if topology.num_levels == 1:
        feas = divisors(g)
        lower = max(s for s in feas if s <= size + 1e-9)
        upper = min(s for s in feas if s >= size - 1e-9)
        flat = Topology(topology.names, (g,))
        best = min((lower, upper), key=lambda s: (paper_latency(w, g, b, s), s))
        out["snapped_domain_size"] = best
        out["snapped_p"] = Domains(flat, (best,)).p
    return out


def paper_latency(w: Workload, g: int, bytes_per_s: float, size: int) -> float:
    """The paper's forward Lat_all for one level of g devices and domain size ``size`` (seconds).

    Lat_all = max(Lat_PE, V_AG / B) + 2 * V_A2A / B with V_AG = P_E (S - 1), V_A2A = D/R (R - 1).
    An independent restatement of section 3, used to check the general model.
    """
    r = g // size
    v_ag = w.expert_bytes * (size - 1)
    v_a2a = w.dispatch_bytes / r * (r - 1)
    return max(w.pre_expert_s, v_ag / bytes_per_s) + 2 * v_a2a / bytes_per_s


def dense_sync_modes(cfg: Config) -> list[str]:
    """The dense-sync modes the planner chooses among (see the module docstring)."""
    if cfg.dense_sync != "auto":
        return [cfg.dense_sync]
    topo = cfg.topology.as_topology()
    flat = topo.counts[0] in (1, topo.world_size)  # one DC, or one rank per DC: hierarchical is the ring
    sync_modes = [a for a in cfg.planner.allow if a not in (SHORTCUT_CHOICE, SR_CHOICE)]  # the rest: model choices
    return [str(m) for m in candidates(sync_modes)
            if not (flat and m.mode == "hierarchical") and not (cfg.workload is not None and m.mode == "powersgd")]


def plan(cfg: Config, flops: float | None = None, net: Network | None = None) -> PlanResult:
    """Evaluate every feasible partition of ``cfg``'s topology under every allowed dense-sync mode
    -- on standard and, where ``planner.allow`` lists ``shortcut``, on shortcut-connected MoE
    blocks -- and choose the fastest (EP on the configured blocks is the baseline). ``net``: the
    network to price on (default: the configuration's; a bench's calibrated one)."""
    net, modes = net or Network.from_config(cfg), dense_sync_modes(cfg)
    result = plan_workload(net, workload_from_config(cfg, flops), cfg.terms, modes)
    best_s = min(c.prediction.iteration_s for c in result.candidates)
    cands = list(result.candidates) + _ted_candidates(cfg, flops, net, modes, best_s)
    for w, fields, hier in _variants(cfg, flops):
        more = plan_workload(net, w, cfg.terms, modes, hier).candidates
        if fields.get("sr_ratio") is not None:  # compression acts on gathers: domains only
            more = [c for c in more if c.domains.domain_size > 1]
        if fields.get("a2a_chunks") is not None:  # chunks act on rails across the outermost level only
            more = [c for c in more if c.domains.exchange_chunks(fields["a2a_chunks"]) > 1]
        cands += [dataclasses.replace(c, **fields) for c in more]
    cands += _prefetch_twins(cfg, flops, net, cands)
    if len(cands) == len(result.candidates):
        return result
    return PlanResult(cands, _choose(cands, modes), result.ep, result.closed_form)


def _ted_candidates(cfg: Config, flops: float | None, net: Network, modes: list[str],
                    best_s: float = math.inf) -> list[Candidate]:
    """TED with duplicate-token dropping (exact; without DTD it only sends more) for every TP group
    size the innermost level and the model's dimensions allow, at every partition of the EP
    positions into expert domains, every dense-sync mode, block form (shortcut where allowed) and
    ``planner.a2a_chunks`` count (where the rails cross the outermost level); none without model
    dimensions. Pruned: a chunk count is scored only where the unchunked candidate, less all its
    exchange seconds and exposed gathers and reduce-scatters (the most pipelining can hide), could
    still beat ``best_s`` (seconds; the fastest candidate so far)."""
    if cfg.moe is None:
        return []
    topo, out, workloads = net.topology, [], {}
    forms = [cfg.moe.shortcut] + ([True] if SHORTCUT_CHOICE in cfg.planner.allow and not cfg.moe.shortcut else [])
    chunk_counts = [c for c in cfg.planner.a2a_chunks or [] if c != cfg.moe.a2a_chunks]

    def candidate(spec: TedSpec, mode: str) -> Candidate:
        """One TED spec priced under dense-sync ``mode`` (its workload depends on tp, blocks, chunks only)."""
        key = (spec.tp, spec.shortcut, spec.a2a_chunks)
        if key not in workloads:
            workloads[key] = spec.workload(cfg, flops)
        w = dataclasses.replace(workloads[key], dense_sync=mode)
        return Candidate(Domains(topo, spec.domain_sizes), evaluate(spec.schedule(w), net, cfg.terms), mode,
                         shortcut=spec.shortcut, a2a_chunks=spec.a2a_chunks, tp=spec.tp)

    for tp in divisors(topo.counts[-1])[1:]:
        try:
            check_config(cfg, tp)
        except StrategyError:
            continue
        for sizes, shortcut, mode in itertools.product(position_topology(topo, tp).feasible_domain_sizes(), forms,
                                                       modes):
            base = candidate(TedSpec(topo, sizes, tp=tp, shortcut=shortcut), mode)
            out.append(base)
            best_s = min(best_s, base.prediction.iteration_s)
            pr = base.prediction
            if pr.iteration_s - pr.a2a_s - max(0.0, pr.exposed_ag_s) - pr.exposed_rs_s >= best_s:
                continue
            for chunks in chunk_counts:
                spec = TedSpec(topo, sizes, a2a_chunks=chunks, tp=tp, shortcut=shortcut)
                if spec.exchange_domains().exchange_chunks(chunks) > 1:  # else: the same strategy
                    out.append(candidate(spec, mode))
    return out


def _prefetch_twins(cfg: Config, flops: float | None, net: Network, cands: list[Candidate]) -> list[Candidate]:
    """Each candidate with gathers (TED's as configured) with its gathers prefetched the other way
    than ``bench.prefetch`` (exact: no permission needed) -- scored only where it can win: the
    unprefetched forward is the prefetched one's steps plus every gather whole, so it is faster
    only where the prefetched forward exposes more than all its gathers' seconds (its all-to-alls
    slowed by the gathers sharing their ports). With ``bench.prefetch`` false every candidate with
    gathers gets its prefetched twin."""
    other, out = not cfg.bench.prefetch, []
    for c in cands:
        pr = c.prediction
        if c.tp > 1 or c.domains.domain_size == 1 or c.prefetch is not None:
            continue
        if cfg.bench.prefetch and pr.exposed_ag_s <= pr.ag_s * (1 + 1e-9):
            continue  # dominated: the unprefetched twin is never faster
        twin = dataclasses.replace(c, prefetch=other)
        w = dataclasses.replace(twin.spec.workload(cfg, flops), dense_sync=c.dense_sync)
        out.append(dataclasses.replace(twin, prediction=evaluate(twin.spec.schedule(w), net, cfg.terms)))
    return out


def _variants(cfg: Config, flops: float | None) -> list[tuple[Workload, dict, bool]]:
    """The workloads the planner weighs beside the configured one, with the candidate fields they
    set and whether the hierarchical exchange is weighed on them: every ``planner.a2a_chunks``
    count; shortcut blocks (``allow: [shortcut]``); each ``planner.sr_ratios`` (``allow: [sr]``)."""
    p, m = cfg.planner, cfg.moe
    out = []
    configured = m.a2a_chunks if m is not None else 1
    for c in p.a2a_chunks or []:  # the one-stage exchange's pipeline and the hierarchical stages' (MoNTA)
        if c == configured:  # the configured count is the base candidates' already
            continue
        out.append((dataclasses.replace(workload_from_config(cfg, flops), a2a_chunks=c), {"a2a_chunks": c}, True))
    if SHORTCUT_CHOICE in p.allow and m is not None and not m.shortcut:
        out.append((workload_from_config(cfg, flops, shortcut=True), {"shortcut": True}, True))
    if SR_CHOICE in p.allow:
        out += [(workload_from_config(cfg, flops, sr_ratio=r), {"sr_ratio": r}, False) for r in p.sr_ratios]
    return out


def _exchanges(dom: Domains, w: Workload, hier: bool) -> list[bool]:
    """The exchanges a partition is a candidate with: one-stage, and hierarchical where it deduplicates."""
    if not hier or w.top_k < 1:
        return [False]
    dedup = HierarchicalSpec(dom.topology, dom.sizes).dedup_levels
    return [False, True] if set(dedup) & set(dom.rail_levels()) else [False]


def _predict(dom: Domains, w: Workload, net: Network, terms: CostTerms, hier: bool) -> Prediction:
    if not hier:
        return predict(dom, w, net, terms)
    spec = HierarchicalSpec(dom.topology, dom.sizes)
    return dataclasses.replace(evaluate(spec.schedule(w), net, terms), domain_sizes=dom.sizes)


def plan_workload(net: Network, w: Workload, terms: CostTerms, modes: list[str] | None = None,
                  hier: bool = True) -> PlanResult:
    """Planner core on an explicit network and workload (``modes``: dense-sync modes, default the
    workload's; ``hier``: the hierarchical exchange among the candidates)."""
    topo = net.topology
    cands = []
    shortcut = w.shortcut_s != (0.0, 0.0)
    for mode in modes or [w.dense_sync]:
        wm = dataclasses.replace(w, dense_sync=mode)
        for sizes in topo.feasible_domain_sizes():
            dom = Domains(topo, sizes)
            cands += [Candidate(dom, _predict(dom, wm, net, terms, h), mode, h, shortcut)
                      for h in _exchanges(dom, wm, hier)]
    choice = _choose(cands, modes or [w.dense_sync])
    ep = next(c for c in cands if all(s == 1 for s in c.domains.sizes) and c.dense_sync == choice.dense_sync
              and not c.hier)
    return PlanResult(cands, choice, ep, closed_form(topo, w, net))


def _choose(cands: list[Candidate], modes: list[str]) -> Candidate:
    """The fastest candidate; ties (within 1e-9 relative) to the smaller expert domain, the earlier
    dense-sync mode, the one-stage exchange, the standard blocks, no compression, the configured
    chunks and prefetch."""
    order = {m: i for i, m in enumerate(modes)}
    best_t = min(c.prediction.iteration_s for c in cands)
    tied = [c for c in cands if c.prediction.iteration_s <= best_t * (1 + 1e-9)]
    return min(tied, key=lambda c: (c.tp, c.domains.domain_size, c.domains.sizes, order[c.dense_sync], c.hier,
                                    c.shortcut, c.sr_ratio is not None, c.a2a_chunks is not None,
                                    c.prefetch is not None))
