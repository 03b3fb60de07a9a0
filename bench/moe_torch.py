#!/usr/bin/python3
"""moe_torch.py — the DeepSeek-V3 MoE layer in PyTorch (fp32, CPU, --threads, default 1), written
the way Hugging Face's DeepseekV3MoE writes it: the fp32 router (sigmoid, bias, group
top-2-sum, top-k, normalise, scale), then a loop over the experts — find the tokens
routed to the expert, gather them, run the SwiGLU MLP, scale by the routing weight and
index_add_ into the output — plus the shared expert on every token. Prints one JSON
line per measurement, for bench/bench_moe.sh.

  moe_torch.py --shape moonlight --tokens 1,32,512 [--backward 512] [--repeat 5] [--threads 1]

--threads N runs torch on N threads (torch.set_num_threads, OMP_NUM_THREADS and
OPENBLAS_NUM_THREADS all N), as bench_moe runs dsmoe; the default is one.

Timing: every repetition uses different tokens (so different experts); the best
(shortest) repetition is reported after one warm-up, as bench_moe does.
"""
import argparse
import json
import os
import sys
import time


from pin_threads import THREADS  # noqa: E402  (first: pins the thread pools)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(THREADS)

# D, F, E, K, G, TG, N_s, scale (sigmoid scores, bias, normalised weights)
SHAPES = {
    "moonlight": (2048, 1408, 64, 6, 1, 1, 2, 2.446),
    "v3-quarter": (1792, 512, 256, 8, 8, 4, 1, 2.5),
}


class MoE:
    def __init__(self, D, Fe, E, K, G, TG, Ns, scale, grad):
        g = torch.Generator().manual_seed(0)

        def lin(o, i):
            b = 1.0 / i ** 0.5
            w = (torch.rand(o, i, generator=g) * 2 - 1) * b
            return w.requires_grad_(grad)

        self.E, self.K, self.G, self.TG, self.scale = E, K, G, TG, scale
        self.gate = lin(E, D)
        self.bias = torch.zeros(E)
        self.experts = [(lin(Fe, D), lin(Fe, D), lin(D, Fe)) for _ in range(E)]
        self.shared = (lin(Ns * Fe, D), lin(Ns * Fe, D), lin(D, Ns * Fe)) if Ns else None

    def params(self):
        ps = [self.gate] + [w for ex in self.experts for w in ex]
        return ps + (list(self.shared) if self.shared else [])

    @staticmethod
    def mlp(ws, x):
        gp, up, dn = ws
        return F.linear(F.silu(F.linear(x, gp)) * F.linear(x, up), dn)

    def route(self, x):
        """DeepseekV3TopkRouter + get_topk_indices, fp32."""
        logits = F.linear(x.float(), self.gate.float())
        scores = logits.sigmoid()
        choice = scores + self.bias
        T = x.shape[0]
        if self.G > 1:
            gs = choice.view(T, self.G, -1).topk(2, dim=-1)[0].sum(dim=-1)
            gidx = gs.topk(self.TG, dim=-1, sorted=False)[1]
            gmask = torch.zeros_like(gs).scatter_(1, gidx, 1)
            smask = gmask.unsqueeze(-1).expand(T, self.G, self.E // self.G).reshape(T, -1)
            choice = choice.masked_fill(~smask.bool(), 0.0)
        idx = torch.topk(choice, k=self.K, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, w * self.scale

    def forward(self, x):
        idx, w = self.route(x)
        out = torch.zeros_like(x)
        mask = F.one_hot(idx, num_classes=self.E).permute(2, 0, 1)
        for e in range(self.E):
            tok, kk = torch.where(mask[e])
            if tok.numel() > 0:
                y = self.mlp(self.experts[e], x[tok]) * w[tok, kk].unsqueeze(-1)
                out.index_add_(0, tok, y)
        if self.shared:
            out = out + self.mlp(self.shared, x)
        return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="moonlight", choices=sorted(SHAPES))
    ap.add_argument("--tokens", default="1,32,512")
    ap.add_argument("--backward", type=int, default=512, help="T of the backward (0: none)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="threads of every pool (read before the import of torch)")
    args = ap.parse_args()
    print(json.dumps({"impl": "torch_threads", "threads": THREADS,
                      "torch_threads": torch.get_num_threads(),
                      **{v: os.environ[v] for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                    "MKL_NUM_THREADS")}}), flush=True)
    D, Fe, E, K, G, TG, Ns, scale = SHAPES[args.shape]
    gen = torch.Generator().manual_seed(1)
    m = MoE(D, Fe, E, K, G, TG, Ns, scale, grad=args.backward > 0)
    for T in [int(t) for t in args.tokens.split(",") if t]:
        reps = args.repeat if T > 32 else max(2 * args.repeat, 50 if T <= 8 else 10)
        xs = [torch.randn(T, D, generator=gen) for _ in range(reps + 1)]
        times = []
        with torch.no_grad():
            for i, x in enumerate(xs):
                t0 = time.perf_counter()
                m.forward(x)
                if i:
                    times.append(time.perf_counter() - t0)
        print(json.dumps({"impl": "torch", "shape": args.shape, "pass": "forward", "T": T,
                          "seconds": min(times), "reps": len(times),
                          "threads": args.threads}), flush=True)
    if args.backward > 0:
        T = args.backward
        times = []
        for i in range(min(args.repeat, 3) + 1):
            x = torch.randn(T, D, generator=gen, requires_grad=True)
            dy = torch.randn(T, D, generator=gen)
            for p in m.params():          # optimizer.zero_grad(): keep the buffers
                if p.grad is not None:
                    p.grad.zero_()
            y = m.forward(x)
            t0 = time.perf_counter()
            y.backward(dy)
            if i:
                times.append(time.perf_counter() - t0)
        print(json.dumps({"impl": "torch", "shape": args.shape, "pass": "backward", "T": T,
                          "seconds": min(times), "reps": len(times),
                          "threads": args.threads}), flush=True)


if __name__ == "__main__":
    main()
