"""What every strategy family provides, and the registry that maps a name to its family."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from hybridep.topology import Domains, Topology

if TYPE_CHECKING:
    from torch import nn

    from hybridep.config import Config
    from hybridep.costmodel import Workload
    from hybridep.migration.sr import SRSettings
    from hybridep.parallel.comm import Communicator
    from hybridep.schedule import Schedule


SHORTCUT = "+shortcut"
"""The suffix of any family's name for the same strategy on shortcut-connected MoE blocks (ScMoE):
``ep+shortcut``, ``hybridep(dc=1,gpu=2)+shortcut``, ``hierarchical+shortcut``. Every spec has a
``shortcut`` field; its name ends with this suffix when it is set."""


class StrategyError(ValueError):
    """A strategy name that no family accepts, or one that does not fit the topology; the message
    names the name, what is wrong and what is allowed."""


@runtime_checkable
class StrategySpec(Protocol):
    """A family's parameters. Frozen; ``str(spec)`` is the one name of the strategy."""

    family: str
    is_ep: bool
    """Plain expert parallelism (the baseline every report compares with)."""
    compressed: bool
    """Lossy (compressed transfers): not checked for exactness, not the planner's uncompressed pick."""

    def __str__(self) -> str: ...

    def domains(self) -> Domains:
        """The partition of the ranks into expert domains and rails that this strategy runs on."""
        ...

    def workload(self, cfg: Config, flops: float | None = None) -> Workload:
        """The cost model's workload of ``cfg`` under this strategy."""
        ...

    def schedule(self, w: Workload) -> Schedule:
        """One training iteration under workload ``w``, for the cost model and the simulator."""
        ...

    def runtime_kind(self) -> str:
        """The dispatcher the runtime applies for it."""
        ...

    def apply(self, model: nn.Module, comm: Communicator, sr: SRSettings | None, a2a_chunks: int) -> list:
        """Put this strategy's dispatcher on every MoE layer of ``model``; returns the dispatchers."""
        ...

    def to_dict(self) -> dict:
        """The parameters as JSON (the family and its name included)."""
        ...


class Request(Protocol):
    """A partly given strategy (``simulate.strategies``): what is fixed, what a planner chooses."""

    text: str
    template: StrategySpec
    """The strategy with every parameter given but the partition."""
    planner: bool
    """The planner's choice of partition."""

    def candidates(self) -> list[tuple[int, ...]]:
        """The partitions that fit what was given."""
        ...

    def with_sizes(self, sizes: tuple[int, ...]) -> StrategySpec:
        """The strategy on one of :meth:`candidates`."""
        ...


class _Family(Protocol):
    """A strategy family module's entry points (see :data:`FAMILIES`)."""

    def accepts(self, name: str) -> bool: ...

    def parse(self, name: str, topology: Topology) -> StrategySpec: ...

    def parse_request(self, text: str, topology: Topology) -> Request: ...


def _families() -> dict[str, _Family]:
    from hybridep.strategies import hierarchical, hybridep, ted

    return {"hierarchical": hierarchical, "ted": ted, "hybridep": hybridep}  # the first that accepts a name parses it


FAMILIES: tuple[str, ...] = ("hierarchical", "ted", "hybridep")
"""The registered families, by name (one line per family in :func:`_families`)."""


def _family_of(name: str) -> _Family:
    text = name.replace(" ", "")
    for family in _families().values():
        if family.accepts(text):
            return family
    raise StrategyError(f"strategy {name!r}: no family accepts this name; known forms: ep, "
                        "hybridep(LEVEL=SIZE,...), hybridep+srRATIO[+topkgrads](LEVEL=SIZE,...), hierarchical, "
                        "hierarchical(dedup=LEVEL+...), HYBRIDEP-NAME+hier, ted(tp=N[,dtd]), any of them +shortcut")


def _split_shortcut(name: str) -> tuple[str, bool]:
    """(the name without the :data:`SHORTCUT` suffix, whether it had it)."""
    text = name.replace(" ", "")
    return (text.removesuffix(SHORTCUT), True) if text.endswith(SHORTCUT) else (text, False)


def parse(name: str, topology: Topology) -> StrategySpec:
    """The spec named ``name`` (``str(spec)`` of some spec) on ``topology``."""
    text, shortcut = _split_shortcut(name)
    spec = _family_of(text).parse(text, topology)
    return dataclasses.replace(spec, shortcut=True) if shortcut else spec


@dataclass(frozen=True)
class _ShortcutRequest:
    """A request whose specs run shortcut-connected blocks."""

    inner: Request

    @property
    def text(self) -> str:
        return self.inner.text + SHORTCUT

    @property
    def planner(self) -> bool:
        return self.inner.planner

    @property
    def template(self) -> StrategySpec:
        return dataclasses.replace(self.inner.template, shortcut=True)

    def candidates(self) -> list[tuple[int, ...]]:
        return self.inner.candidates()

    def with_sizes(self, sizes: tuple[int, ...]) -> StrategySpec:
        return dataclasses.replace(self.inner.with_sizes(sizes), shortcut=True)


def parse_request(text: str, topology: Topology) -> Request:
    """A ``simulate.strategies`` entry: a full name, or the looser forms a family allows."""
    base, shortcut = _split_shortcut(text)
    request = _family_of(base).parse_request(base, topology)
    return _ShortcutRequest(request) if shortcut else request
