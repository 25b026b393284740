"""Parallelism-agnostic MoE model code: router, experts, permute/unpermute, the MoE layer."""

from hybridep.moe.experts import GroupedExperts
from hybridep.moe.layer import LocalDispatcher, MoE, permute, unpermute
from hybridep.moe.router import Routing, TopKRouter

__all__ = ["GroupedExperts", "LocalDispatcher", "MoE", "Routing", "TopKRouter", "permute", "unpermute"]
