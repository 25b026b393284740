"""A Hugging Face transformers ``MixtralSparseMoeBlock`` as a :class:`hybridep.moe.MoE` and back.

Mixtral's expert e computes ``down_e(silu(gate_e x) * up_e x)`` with ``gate_up_proj[e]`` =
[gate_e; up_e] ([2 I, H]) and ``down_proj[e]`` ([H, I]); its router is a linear gate, a float32
softmax, the top-k renormalised. That is :class:`~hybridep.moe.MoE` with ``kind="swiglu"`` and
``w1[e] = gate_e^T``, ``w3[e] = up_e^T``, ``w2[e] = down_e^T``. transformers is needed only to call
:func:`to_mixtral` on a block you pass in; this module does not import it.
"""

from __future__ import annotations

import torch
from torch import nn

from hybridep.moe import MoE


def convert(block: nn.Module) -> MoE:
    """A :class:`MoE` computing what ``block`` (a ``MixtralSparseMoeBlock``) computes, with its weights
    copied (same dtype and device); the router's jitter noise, if any, is not carried over."""
    experts = block.experts
    act = type(getattr(experts, "act_fn", nn.SiLU())).__name__
    if "silu" not in act.lower():
        raise ValueError(f"Mixtral experts with activation {act}: only SiLU (swiglu) "
                         "maps onto hybridep's experts")
    e, two_i, h = experts.gate_up_proj.shape
    moe = MoE(h, two_i // 2, e, block.top_k, kind="swiglu", normalize_top_k=True)
    moe = moe.to(dtype=experts.gate_up_proj.dtype, device=experts.gate_up_proj.device)
    load(moe, block)
    return moe


@torch.no_grad()
def load(moe: MoE, block: nn.Module) -> None:
    """Copy ``block``'s weights into ``moe`` (shapes must agree)."""
    gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
    i = gate_up.shape[1] // 2
    moe.router.gate.weight.copy_(block.gate.weight)
    moe.experts.w1.copy_(gate_up[:, :i, :].transpose(1, 2))
    moe.experts.w3.copy_(gate_up[:, i:, :].transpose(1, 2))
    moe.experts.w2.copy_(down.transpose(1, 2))


@torch.no_grad()
def to_mixtral(moe: MoE, block: nn.Module) -> nn.Module:
    """Copy ``moe``'s weights (all experts: a single-process module, or gathered ones) back into
    ``block``, a ``MixtralSparseMoeBlock`` of the same dimensions; return ``block``."""
    block.gate.weight.copy_(moe.router.gate.weight)
    block.experts.gate_up_proj.copy_(torch.cat([moe.experts.w1, moe.experts.w3], dim=2).transpose(1, 2))
    block.experts.down_proj.copy_(moe.experts.w2.transpose(1, 2))
    return block
