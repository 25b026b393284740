"""Adapters between other libraries' MoE layers and :class:`hybridep.moe.MoE`."""
