"""The bench's language model has the block layout the cost model prices (``moe.blocks_before_moe``)."""

import pytest
import torch

from hybridep.bench import lm_config
from hybridep.config import load_config
from hybridep.costmodel import workload_from_config
from hybridep.lm.model import MoELM
from hybridep.moe.layer import MoE
from hybridep.parallel.strategy import expert_param_names


@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
def test_dense_blocks_before_each_moe_block_are_data_parallel_and_priced_by_the_cost_model(kind):
    over = ["moe.hidden=32", "moe.ffn=48", "moe.layers=3", f"moe.expert_kind={kind}", "moe.tokens_per_gpu=256",
            "moe.seq_len=64"]
    counts = {}
    for b in (0, 1, 2):
        cfg = load_config(None, [*over, f"moe.blocks_before_moe={b}"])
        lm, _ = lm_config(cfg)
        model = MoELM(lm)
        kinds = ["moe" if blk.moe is not None else "dense" for blk in model.blocks]
        assert kinds == (["dense"] * b + ["moe"]) * 3
        assert sum(isinstance(m, MoE) for m in model.modules()) == 3
        experts = set(expert_param_names(model))
        dense = sum(p.numel() for n, p in model.named_parameters() if n not in experts)
        counts[b] = (dense, workload_from_config(cfg).dense_grad_bytes / 4)  # float32 gradients
        loss = model(torch.randint(0, 256, (2, 64)), torch.randint(0, 256, (2, 64)))
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
    mats = 3 if kind == "swiglu" else 2
    per_block = 4 * 32 * 32 + mats * 32 * 48  # attention + the dense FFN, as the cost model counts them
    for b in (1, 2):
        model_added = counts[b][0] - counts[0][0]
        priced_added = counts[b][1] - counts[0][1]
        assert priced_added == 3 * b * per_block
        assert model_added == priced_added + 3 * b * 4 * 32  # and the block's two LayerNorms
