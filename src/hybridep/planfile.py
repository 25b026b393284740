"""The plan file: the contract between ``hybridep plan`` and every command that runs a strategy.

``hybridep plan --out plan.json`` writes the chosen strategy (its name and parameters), the topology
and model it was planned for and the predicted breakdown; ``bench``, ``verify`` and ``simulate``
take ``--plan plan.json`` and run exactly that strategy. A plan made for another topology (level
names, counts, hence world size) is refused with a :class:`~hybridep.config.ConfigError` naming
``--plan``. Schema: ``docs/cli.md``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from hybridep import __version__
from hybridep.config import Config, ConfigError, config_from_dict, config_to_dict
from hybridep.strategies import StrategyError, StrategySpec, parse
from hybridep.topology import Topology

FORMAT = "hybridep-plan"
VERSION = 1
MAX_PLAN_BYTES = 16 << 20
"""A plan file larger than this is refused before it is parsed (a plan is a few kB)."""


def plan_document(cfg: Config, result) -> dict:
    """The plan file's content for a planner result (:class:`~hybridep.planner.PlanResult`)."""
    choice = result.choice
    return {
        "format": FORMAT, "version": VERSION, "hybridep_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "strategy": str(choice.spec), "spec": choice.spec.to_dict(), "dense_sync": choice.dense_sync,
        "topology": {"levels": [{"name": lv.name, "count": lv.count, "bandwidth_bps": lv.bandwidth_bps,
                                 "latency_s": lv.latency_s} for lv in cfg.topology.levels],
                     "world_size": cfg.topology.world_size},
        "predicted": choice.to_dict(),
        "ep_predicted_iteration_s": result.ep.prediction.iteration_s,
        "speedup_over_ep": result.speedup_over_ep,
        "config": config_to_dict(cfg),
    }


def write_plan(path: str | Path, document: dict) -> None:
    """Write a plan document (see :func:`plan_document`) as JSON."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(document, indent=2))


def read_plan(path: str | Path) -> dict:
    """A plan file's document, or a ConfigError naming ``--plan`` and what is wrong with it."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_PLAN_BYTES:
            raise ConfigError([("--plan", str(path), f"a plan file of at most {MAX_PLAN_BYTES} bytes")])
        doc = json.loads(p.read_bytes().decode("utf-8"))
    except OSError as err:
        raise ConfigError([("--plan", str(path), f"a readable plan file: {err.strerror}")]) from None
    except (UnicodeDecodeError, ValueError) as err:
        raise ConfigError([("--plan", str(path), f"a JSON plan written by hybridep plan --out: {err}")]) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConfigError([("--plan", str(path), f"a plan written by hybridep plan --out (format {FORMAT!r})")])
    if doc.get("version") != VERSION:
        raise ConfigError([("--plan", str(path), f"plan format version {VERSION}, got {doc.get('version')!r}")])
    return doc


def planned_spec(path: str | Path, topology: Topology) -> StrategySpec:
    """The strategy of the plan file at ``path``, checked against the topology it is to run on."""
    doc = read_plan(path)
    try:
        levels = doc["topology"]["levels"]
        names = tuple(str(lv["name"]) for lv in levels)
        counts = tuple(int(lv["count"]) for lv in levels)
        name = doc["strategy"]
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError([("--plan", str(path), f"a complete plan file (missing or bad {err})")]) from None
    if (names, counts) != (topology.names, topology.counts):
        planned = " x ".join(f"{c} {n}" for n, c in zip(names, counts, strict=True))
        here = " x ".join(f"{c} {n}" for n, c in zip(topology.names, topology.counts, strict=True))
        raise ConfigError([("--plan", str(path), f"a plan for this topology ({here}, world size "
                            f"{topology.world_size}); it was made for {planned} (world size {math.prod(counts)})")])
    try:
        return parse(name, topology)
    except StrategyError as err:
        raise ConfigError([("--plan", str(path), str(err))]) from None



@dataclass(frozen=True)
class Plan:
    """A plan in memory: the strategy to run and the plan file's document (topology, model,
    predicted breakdown). ``hybridep.plan(config)`` makes one, :meth:`save` writes the plan file,
    :func:`load_plan` reads it back."""

    spec: StrategySpec
    document: dict

    @property
    def topology(self) -> Topology:
        return self.spec.topology

    def save(self, path: str | Path) -> None:
        write_plan(path, self.document)

    def config(self) -> Config:
        """The configuration the plan was made for."""
        return config_from_dict(self.document["config"])

    @property
    def dense_sync(self) -> str:
        """The dense-sync mode the plan chose (``ring`` in plan files from before the choice)."""
        return str(self.document.get("dense_sync", "ring"))


def resolved_dense_sync(cfg: Config, document: dict | None) -> str:
    """``cfg.dense_sync``, or for ``auto`` the plan's choice (``ring`` without a plan that records one)."""
    if cfg.dense_sync != "auto":
        return cfg.dense_sync
    return str((document or {}).get("dense_sync", "ring"))


def make_plan(cfg: Config, flops: float | None = None) -> Plan:
    """Plan ``cfg`` with the cost model: the fastest strategy and its plan document."""
    from hybridep.planner import plan as run_planner

    result = run_planner(cfg, flops)
    return Plan(result.choice.spec, plan_document(cfg, result))


def load_plan(path: str | Path, topology: Topology | None = None) -> Plan:
    """The plan file at ``path`` (checked against ``topology`` when given; see :func:`planned_spec`)."""
    doc = read_plan(path)
    try:
        levels = doc["topology"]["levels"]
        own = Topology(tuple(str(lv["name"]) for lv in levels), tuple(int(lv["count"]) for lv in levels))
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError([("--plan", str(path), f"a complete plan file (missing or bad {err})")]) from None
    return Plan(planned_spec(path, topology or own), doc)
