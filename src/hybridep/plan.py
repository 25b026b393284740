"""The Plan: a small serialisable value that everything downstream of the planner consumes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hybridep.topology import Domains, Topology

TOPK_GRADS = "+topkgrads"
"""Name suffix of compressed runs whose gradients return as top-k with error feedback."""


def strategy_name(topology: Topology, sizes: tuple[int, ...], sr_ratio: float | None = None,
                  sr_grads: str = "dense") -> str:
    """``ep`` (all sizes 1, uncompressed), ``hybridep(dc=2,gpu=1)``, ``hybridep+sr50(dc=2,gpu=2)`` or,
    with compressed gradients, ``hybridep+sr50+topkgrads(dc=2,gpu=2)``."""
    if all(s == 1 for s in sizes) and not sr_ratio:
        return "ep"
    base = "hybridep"
    if sr_ratio:
        base += f"+sr{sr_ratio:g}" + (TOPK_GRADS if sr_grads == "topk" else "")
    return base + "(" + ",".join(f"{n}={s}" for n, s in zip(topology.names, sizes, strict=True)) + ")"


def parse_name(name: str) -> tuple[tuple[int, ...] | None, float | None, str]:
    """Domain sizes, SR ratio and gradient return (``dense``/``topk``) of one of our strategy names
    (None, None, "dense" for others)."""
    if name == "ep":
        return (), None, "dense"
    if not name.startswith("hybridep") or "(" not in name:
        return None, None, "dense"
    head, args = name[:-1].split("(", 1)
    grads = "topk" if head.endswith(TOPK_GRADS) else "dense"
    head = head.removesuffix(TOPK_GRADS)
    ratio = float(head.split("+sr")[1]) if "+sr" in head else None
    return tuple(int(kv.split("=")[1]) for kv in args.split(",")), ratio, grads


@dataclass(frozen=True)
class Plan:
    """Which strategy to run and with which per-level expert-domain sizes.

    ``strategy`` is ``"ep"`` (all sizes 1) or ``"hybridep"``.
    """

    strategy: str
    level_names: tuple[str, ...]
    level_counts: tuple[int, ...]
    domain_sizes: tuple[int, ...]
    predicted_iteration_s: float | None = None

    @property
    def topology(self) -> Topology:
        return Topology(self.level_names, self.level_counts)

    @property
    def domains(self) -> Domains:
        return Domains(self.topology, self.domain_sizes)

    @classmethod
    def for_sizes(cls, topology: Topology, sizes: tuple[int, ...],
                  predicted_iteration_s: float | None = None) -> Plan:
        strategy = "ep" if all(s == 1 for s in sizes) else "hybridep"
        return cls(strategy, topology.names, topology.counts, tuple(sizes), predicted_iteration_s)

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "levels": [{"name": n, "count": c} for n, c in zip(self.level_names, self.level_counts,
                                                                strict=True)],
            "domain_sizes": dict(zip(self.level_names, self.domain_sizes, strict=True)),
            "predicted_iteration_s": self.predicted_iteration_s,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        names = tuple(x["name"] for x in d["levels"])
        return cls(d["strategy"], names, tuple(int(x["count"]) for x in d["levels"]),
                   tuple(int(d["domain_sizes"][n]) for n in names), d.get("predicted_iteration_s"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_dict(json.loads(Path(path).read_text()))
