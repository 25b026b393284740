"""Strategy families: one module per family, one grammar for names.

A strategy is a frozen *spec* (the family's parameters). ``str(spec)`` is its name and
:func:`parse` turns a name back into the spec: every command, JSON file and plot uses this pair,
and no other code builds or parses strategy names. :func:`parse_request` reads the looser form a
user may write in ``simulate.strategies`` (``planner``, ``hybridep(p=0.5)``, levels left open),
which a planner then resolves to a spec.

Families today: :mod:`hybridep.strategies.hybridep` (HybridEP expert domains; plain EP is its
all-ones case), :mod:`hybridep.strategies.hierarchical` (the token exchange in stages per level
with deduplication, alone or inside HybridEP's rails) and :mod:`hybridep.strategies.ted` (tensor x
expert x data parallelism with duplicate-token dropping). A new family is one module here plus its
line in :data:`FAMILIES`.
"""

from __future__ import annotations

from hybridep.strategies.base import FAMILIES, Request, StrategyError, StrategySpec, parse, parse_request
from hybridep.strategies.hierarchical import HierarchicalSpec
from hybridep.strategies.hybridep import HybridEPSpec
from hybridep.strategies.ted import TedSpec

__all__ = ["FAMILIES", "HierarchicalSpec", "HybridEPSpec", "Request", "StrategyError", "StrategySpec", "TedSpec",
           "parse", "parse_request"]
