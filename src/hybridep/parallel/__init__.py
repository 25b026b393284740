"""The runtime side of the strategies: the communicator, the autograd duals of its collectives,
the dispatchers applied to MoE layers."""

from hybridep.parallel.comm import CommunicationError, Communicator
from hybridep.parallel.strategy import ExpertParallelStyle, data_parallel, parallelize, prefetch_all

__all__ = ["CommunicationError", "Communicator", "ExpertParallelStyle", "data_parallel", "parallelize",
           "prefetch_all"]
