"""Train your own MoE model with a hybridep plan.

    hybridep plan --out plan.json --set topology.levels.0.count=1        # 1 DC x 2 ranks
    torchrun --nproc-per-node 2 examples/train_moe.py --plan plan.json --steps 20
"""

import argparse

import torch
from torch import nn

import hybridep
from hybridep.moe import MoE


class TinyMoEModel(nn.Module):
    """A user's model: any nn.Module holding hybridep.moe.MoE layers (all experts, as in one process)."""

    def __init__(self, hidden: int = 32, experts: int = 8):
        super().__init__()
        self.inp = nn.Linear(16, hidden)
        self.moe = MoE(hidden, ffn=64, experts=experts, top_k=2)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.moe(torch.relu(self.inp(x))))


def main() -> None:
    args = argparse.ArgumentParser()
    args.add_argument("--plan", required=True)
    args.add_argument("--steps", type=int, default=20)
    opts = args.parse_args()
    rank, _ = hybridep.init_distributed()
    torch.manual_seed(0)  # every rank starts from the same model
    model = TinyMoEModel()
    par = hybridep.parallelize(model, hybridep.load_plan(opts.plan))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(rank)
    for step in range(opts.steps):
        x = torch.randn(64, 16, generator=data)
        loss = nn.functional.mse_loss(par.module(x), x.sum(1, keepdim=True).tanh()) + 0.01 * model.moe.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        par.prefetch()
        if rank == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    hybridep.shutdown()


if __name__ == "__main__":
    main()
