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
    for b in (0, 1, 2):
        model_dense, priced = counts[b]
        assert priced == model_dense  # every dense parameter: embeddings, norms, attention, FFN, router
    assert counts[2][0] > counts[1][0] > counts[0][0]


@pytest.mark.parametrize("kind,b", [("gelu", 0), ("swiglu", 2)])
def test_dense_shapes_are_the_models_dense_parameters(kind, b):
    """The shapes the cost model prices the dense sync with (PowerSGD compresses them one by one)
    are the model's non-expert parameters, in order."""
    from hybridep.lm.model import LMConfig, dense_shapes

    lm = LMConfig(seq_len=16, hidden=8, heads=2, layers=2, ffn=12, experts=4, expert_kind=kind, dense_blocks=b)
    with torch.device("meta"):
        model = MoELM(lm)
    experts = set(expert_param_names(model))
    assert dense_shapes(lm) == [tuple(p.shape) for n, p in model.named_parameters() if n not in experts]
