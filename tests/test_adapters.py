"""The Mixtral adapter: a transformers MixtralSparseMoeBlock as a hybridep MoE, under every strategy."""

import pytest
import torch
import transformers  # the 'adapters' extra, which scripts/setup.sh installs
import workers

from hybridep.launch import run_local

assert transformers.__version__


def test_a_converted_mixtral_block_matches_transformers_and_converts_back():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from hybridep.adapters.mixtral import convert, to_mixtral

    torch.manual_seed(1)
    cfg = MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                        router_jitter_noise=0.0)
    block = MixtralSparseMoeBlock(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    moe = convert(block)
    x = torch.randn(3, 7, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = block(x), moe(x2)
    assert torch.allclose(y2, y, rtol=1e-6, atol=1e-6 * float(y.detach().abs().max()))
    y.square().sum().backward()
    y2.square().sum().backward()
    assert torch.allclose(x2.grad, x.grad, rtol=1e-6, atol=1e-6 * float(x.grad.abs().max()))
    back = to_mixtral(moe, MixtralSparseMoeBlock(cfg))
    assert torch.equal(back(x), y)


@pytest.mark.parametrize("sizes", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_a_converted_mixtral_block_under_every_strategy_matches_transformers(sizes):
    """transformers computes its router softmax in float32, so the comparison is at 1e-6."""
    worst = run_local(workers.mixtral_under_strategy, 4, (("dc", "gpu"), (2, 2), sizes), timeout_s=240)
    assert max(worst) <= 1e-6, worst
