"""hybridep: Mixture-of-Experts training across datacenters (HybridEP).

Public API (see :mod:`hybridep.api`): :func:`plan` / :func:`load_plan` (the plan file),
:func:`init_distributed` (under torchrun), :func:`parallelize` (apply a plan to every
``hybridep.moe.MoE`` of a model), :func:`shutdown`; :class:`hybridep.moe.MoE` (the
parallelism-agnostic layer).

Layout, in the direction data flows: config -> topology -> strategies (typed specs, one grammar of
names, each family's iteration schedule) -> costmodel -> planner -> plan file -> runtime (moe,
parallel) -> training / benchmark -> cli; the simulator, the calibration and the testbed beside them.
"""

__version__ = "0.1.0"

# after __version__: the plan file module (planfile.py) reads it
from hybridep.api import Parallelized, init_distributed, load_plan, parallelize, plan, shutdown

__all__ = ["Parallelized", "__version__", "init_distributed", "load_plan", "parallelize", "plan", "shutdown"]
