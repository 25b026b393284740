"""A small decoder-only byte-level language model (nanoGPT-sized): ``layers`` MoE blocks, each after
``dense_blocks`` dense ones (0: an MoE FFN in every block; 1: in every other block, as in GShard).

With ``shortcut`` (ScMoE) an MoE block keeps a dense FFN on its main path and adds an MoE branch
that reads the block's input -- the previous block's output -- so that the branch's exchange runs
while the block's attention and dense FFN compute. For block input ``x``::

    a = x + Attn(LN1(x))
    y = a + FFN(LN2(a)) + MoE(LN3(x))

(the standard MoE block: ``a = x + Attn(LN1(x)); y = a + MoE(LN2(a))``).

The model is parallelism-agnostic: apply a strategy to its ``MoE`` layers from a plan. The MoE
layer is pluggable (``moe_factory``) so that a peer's MoE layer can be measured in the same model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

from hybridep.moe.experts import WEIGHT_NAMES
from hybridep.moe.layer import MoE, begin


@dataclass(frozen=True)
class LMConfig:
    vocab: int = 256
    seq_len: int = 128
    hidden: int = 128
    heads: int = 4
    layers: int = 2
    ffn: int = 256
    experts: int = 8
    top_k: int = 2
    expert_kind: str = "gelu"
    aux_loss_coef: float = 0.01
    dense_blocks: int = 0
    """Dense blocks (attention + an FFN of ``ffn`` units) before each MoE block."""
    shortcut: bool = False
    """Shortcut-connected MoE blocks (see the module docstring); needs ``dense_blocks`` >= 1, so that
    every MoE block has a block before it."""

    def __post_init__(self) -> None:
        if self.shortcut and self.dense_blocks < 1:
            raise ValueError("shortcut: an MoE block's branch reads the previous block's output, and with "
                             f"dense_blocks={self.dense_blocks} the first MoE block has none; allowed: "
                             "dense_blocks >= 1 with shortcut")


def dense_shapes(cfg: LMConfig) -> list[tuple[int, ...]]:
    """Shapes of the model's dense (data-parallel, non-expert) parameters, in the order of
    ``named_parameters``: positions, embedding, per block two LayerNorms, attention, then the router
    (MoE block), the dense FFN (dense block, or shortcut MoE block) and the MoE branch's LayerNorm
    (shortcut), and the final LayerNorm."""
    h, f = cfg.hidden, cfg.ffn
    ffn = {"w1": (f, h), "w2": (h, f), "w3": (f, h)}  # linear layers' weights: [out, in]
    out: list[tuple[int, ...]] = [(cfg.seq_len, h), (cfg.vocab, h)]
    for i in range(cfg.layers * (cfg.dense_blocks + 1)):
        out += [(h,), (h,), (h,), (h,), (3 * h, h), (h, h)]
        is_moe = (i + 1) % (cfg.dense_blocks + 1) == 0
        out += [(cfg.experts, h)] if is_moe else []
        out += [ffn[n] for n in WEIGHT_NAMES[cfg.expert_kind]] if not is_moe or cfg.shortcut else []
        out += [(h,), (h,)] if is_moe and cfg.shortcut else []
    return [*out, (h,), (h,)]


class Attention(nn.Module):
    """Causal self-attention. ``qkv``'s output features are head-major (per head: its q, k, v), so a
    contiguous split of them -- tensor parallelism's column split -- holds whole heads; the forward
    takes the heads it finds (all, or a tensor-parallel rank's share)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.head_dim = cfg.hidden // cfg.heads
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden, bias=False)
        self.out = nn.Linear(cfg.hidden, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, -1, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        y = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, -1))


class DenseFFN(nn.Module):
    """The FFN of a dense block: the experts' kind and size, one copy, data-parallel like attention
    (``w1``, ``w3``: hidden -> ffn; ``w2``: ffn -> hidden; linear layers, so that tensor
    parallelism can split them column- and row-wise)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.kind = cfg.expert_kind
        dims = {"w1": (cfg.hidden, cfg.ffn), "w2": (cfg.ffn, cfg.hidden), "w3": (cfg.hidden, cfg.ffn)}
        for name in WEIGHT_NAMES[self.kind]:
            layer = nn.Linear(*dims[name], bias=False)
            nn.init.normal_(layer.weight, std=1.0 / math.sqrt(layer.in_features))
            setattr(self, name, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w1(x)
        h = functional.silu(h) * self.w3(x) if self.kind == "swiglu" else functional.gelu(h)
        return self.w2(h)


class Block(nn.Module):
    """Attention, then an FFN: ``moe`` (an MoE layer) or, when None, a dense one (``dense``); with
    ``shortcut`` both, the MoE layer on a branch from the block's input (see the module docstring)."""

    def __init__(self, cfg: LMConfig, moe: nn.Module | None, shortcut: bool = False):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.hidden), nn.LayerNorm(cfg.hidden)
        self.attn = Attention(cfg)
        self.moe = moe
        self.dense = DenseFFN(cfg) if moe is None or shortcut else None
        self.ln_moe = nn.LayerNorm(cfg.hidden) if moe is not None and shortcut else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ln_moe is not None:
            return self._shortcut(x)
        x = x + self.attn(self.ln1(x))
        return x + (self.moe if self.moe is not None else self.dense)(self.ln2(x))

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """The MoE branch's dispatch goes out first, the attention computes while it travels, the
        combine travels while the dense FFN computes."""
        branch = begin(self.moe, self.ln_moe(x))
        a = x + self.attn(self.ln1(x))
        branch.experts()
        f = self.dense(self.ln2(a))
        return a + f + branch.result()


def default_moe(cfg: LMConfig) -> nn.Module:
    return MoE(cfg.hidden, cfg.ffn, cfg.experts, cfg.top_k, cfg.expert_kind)


class MoELM(nn.Module):
    def __init__(self, cfg: LMConfig, moe_factory: Callable[[LMConfig], nn.Module] = default_moe):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden)
        self.pos = nn.Parameter(torch.zeros(cfg.seq_len, cfg.hidden))
        self.blocks = nn.ModuleList(
            Block(cfg, moe_factory(cfg) if (i + 1) % (cfg.dense_blocks + 1) == 0 else None, cfg.shortcut)
            for i in range(cfg.layers * (cfg.dense_blocks + 1)))
        self.ln_f = nn.LayerNorm(cfg.hidden)
        nn.init.normal_(self.embed.weight, std=0.02)

    @property
    def moe_blocks(self) -> list[Block]:
        return [b for b in self.blocks if b.moe is not None]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-byte cross-entropy plus the weighted MoE balance losses."""
        x = self.embed(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.embed.weight.t()
        loss = functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        aux = sum(b.moe.aux_loss for b in self.moe_blocks if getattr(b.moe, "aux_loss", None) is not None)
        return loss + self.cfg.aux_loss_coef * aux
