"""Trains a two-layer MoE network in PyTorch with dsmoe's routing and DeepSeek-V3's
auxiliary-loss-free balancing, and prints the loss and each layer's MaxVio (how far
the busiest expert is above the mean load) falling as the bias controller works.

    PYTHONPATH=build/python python3 python/examples/train_moe_torch.py [--steps 200]

The swap into an existing model is the three dsmoe lines marked below: the layers
(dsmoe.torch.MoE, Hugging Face DeepseekV3MoE's parameter names), and the balancer
attached to the optimizer.
"""
import argparse

import torch
from torch import nn

import dsmoe.torch as dt


class Net(nn.Module):
    def __init__(self, d, f, experts, top_k):
        super().__init__()
        self.inp = nn.Linear(16, d)
        route = dict(n_experts=experts, top_k=top_k, groups=4, topk_groups=2,
                     group_score="top2sum", threads=1)
        self.moe1 = dt.MoE(d, f, n_shared=1, seed=1, **route)  # dsmoe (1)
        self.moe2 = dt.MoE(d, f, n_shared=1, seed=2, **route)  # dsmoe (2)
        self.out = nn.Linear(d, 4)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.moe1(h)
        h = h + self.moe2(h)
        return self.out(h)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--gamma", type=float, default=0.002, help="bias update rate")
    ap.add_argument("--every", type=int, default=20, help="print every N steps")
    a = ap.parse_args()
    torch.manual_seed(0)
    net = Net(d=32, f=16, experts=16, top_k=4)
    # a skewed start: the gates prefer a few experts, as trained routers drift to
    with torch.no_grad():
        for m in (net.moe1, net.moe2):
            m.gate.weight.add_(torch.linspace(0.0, 0.4, 16)[:, None])
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    balancer = dt.LossFreeBalancer(net, gamma=a.gamma).attach(opt)  # dsmoe (3)
    teacher = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))
    print("step   loss      MaxVio layer 1  MaxVio layer 2")
    first = None
    for step in range(1, a.steps + 1):
        x = torch.randn(a.batch, 16)
        with torch.no_grad():
            y = teacher(x)
        loss = nn.functional.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()  # the balancer's step runs after it: new e_score_correction_bias
        mv = balancer.maxvio()
        first = first or mv
        if step == 1 or step % a.every == 0:
            print("%4d   %.5f   %14.3f  %14.3f" % (step, loss.item(), mv[0], mv[1]))
    print("MaxVio: layer 1 %.3f -> %.3f, layer 2 %.3f -> %.3f" % (first[0], mv[0], first[1], mv[1]))


if __name__ == "__main__":
    main()
