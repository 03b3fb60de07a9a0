#!/usr/bin/python3
"""train_torch.py — the PyTorch CPU twin of dsmoe's training step, for bench/bench_train.sh:
the same DeepSeek-V3-style model (a Hugging Face config.json, as bench_train --config-out
writes it), the same batch, the same token ids, the same thread count, trained the same
number of steps with loss + backward + AdamW, written as one would write it in plain
PyTorch (autograd, nn.Module, torch.optim.AdamW, clip_grad_norm_):

  - MLA, naive form: q_proj (or q_a_proj, its norm, q_b_proj), kv_a_proj_with_mqa, the
    latent's RMSNorm, kv_b_proj, RoPE on adjacent pairs of q_pe and the shared k_pe, causal
    softmax attention per head (explicit matmuls: this torch has no fused attention), o_proj;
  - first_k_dense_replace dense SwiGLU layers, then MoE layers: sigmoid scores, the
    correction bias (a buffer) for the selection only, group-limited top-k (groups ranked by
    the sum of their two best), the selected scores normalised, routed experts run on the
    rows that chose them (index_add), shared experts on every row;
  - DeepSeek-V3's sequence-wise balance loss with alpha (as dsmoe's --alpha);
  - num_nextn_predict_layers MTP depths: RMSNorm of the next token's embedding and of the
    previous state, concatenated, eh_proj, one MoE block, shared_head.norm, the shared head;
    loss = ce + 0.3 * mean(mtp) + balance;
  - AdamW lr 3e-3, betas (0.9, 0.95), weight decay 0.1 on matrices, clip 1.0.

Prints one JSON line per run: tokens/s (best of --repeat timings of --steps steps after
--warmup steps), the first and last loss.
"""
import pin_threads  # noqa: F401  (pins every pool to --threads before torch is imported)
from pin_threads import THREADS

import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_num_threads(THREADS)


def bench_tokens(n, V, seed):
    """bench_train.c's token ids: a 64-bit LCG, id = (x >> 33) % V."""
    x, out, m = seed, [], (1 << 64) - 1
    for _ in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) & m
        out.append((x >> 33) % V)
    return out


class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(n)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def linear(i, o, std):
    m = nn.Linear(i, o, bias=False)
    nn.init.normal_(m.weight, std=std)
    return m


def rope(x, cos, sin):
    """Rotates adjacent pairs of the last dimension: x (B, T, ..., r), cos / sin (T, r/2)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    shape = (1, cos.size(0)) + (1,) * (x.dim() - 3) + (cos.size(1),)
    c, s = cos.view(shape), sin.view(shape)
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)


class MLA(nn.Module):
    def __init__(self, c, std):
        super().__init__()
        D, H = c["hidden_size"], c["num_attention_heads"]
        self.H, self.n, self.r, self.v = H, c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
        self.kc, self.q = c["kv_lora_rank"], c.get("q_lora_rank") or 0
        eps = c["rms_norm_eps"]
        if self.q:
            self.q_a_proj, self.q_a_layernorm = linear(D, self.q, std), RMSNorm(self.q, eps)
            self.q_b_proj = linear(self.q, H * (self.n + self.r), std)
        else:
            self.q_proj = linear(D, H * (self.n + self.r), std)
        self.kv_a_proj_with_mqa = linear(D, self.kc + self.r, std)
        self.kv_a_layernorm = RMSNorm(self.kc, eps)
        self.kv_b_proj = linear(self.kc, H * (self.n + self.v), std)
        self.o_proj = linear(H * self.v, D, std)
        self.scale = (self.n + self.r) ** -0.5

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        H, n, r, v = self.H, self.n, self.r, self.v
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q else self.q_proj(x)
        q = q.view(B, T, H, n + r)
        q_nope, q_pe = torch.split(q, [n, r], dim=-1)
        kv = self.kv_a_proj_with_mqa(x)
        lat, k_pe = torch.split(kv, [self.kc, r], dim=-1)
        kvb = self.kv_b_proj(self.kv_a_layernorm(lat)).view(B, T, H, n + v)
        k_nope, val = torch.split(kvb, [n, v], dim=-1)
        q_pe = rope(q_pe, cos, sin)
        k_pe = rope(k_pe, cos, sin)  # (B, T, r), shared by the heads
        qh = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2)  # (B, H, T, n + r)
        kh = torch.cat((k_nope, k_pe.unsqueeze(2).expand(B, T, H, r)), dim=-1).transpose(1, 2)
        s = torch.matmul(qh, kh.transpose(-1, -2)) * self.scale + mask
        p = torch.softmax(s, dim=-1)
        o = torch.matmul(p, val.transpose(1, 2))  # (B, H, T, v)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * v))


class MLP(nn.Module):
    def __init__(self, D, I, std):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = linear(D, I, std), linear(D, I, std), linear(I, D, std)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    def __init__(self, c, std, alpha):
        super().__init__()
        D, F_ = c["hidden_size"], c["moe_intermediate_size"]
        self.E, self.K = c["n_routed_experts"], c["num_experts_per_tok"]
        self.G, self.TG = c["n_group"], c["topk_group"]
        self.norm, self.scale, self.alpha = c["norm_topk_prob"], c["routed_scaling_factor"], alpha
        self.gate = linear(D, self.E, std)
        self.register_buffer("e_score_correction_bias", torch.zeros(self.E))
        self.experts = nn.ModuleList([MLP(D, F_, std) for _ in range(self.E)])
        ns = c["n_shared_experts"] or 0
        self.shared_experts = MLP(D, F_ * ns, std) if ns else None

    def forward(self, x):
        B, T, D = x.shape
        xf = x.reshape(-1, D)
        scores = torch.sigmoid(self.gate(xf))  # (N, E)
        with torch.no_grad():
            c = scores + self.e_score_correction_bias
            if self.G > 1:
                g = c.view(-1, self.G, self.E // self.G).topk(2, dim=-1)[0].sum(-1)
                keep = g.topk(self.TG, dim=-1)[1]
                mask = torch.ones_like(g, dtype=torch.bool).scatter_(1, keep, False)
                c = c.view(-1, self.G, self.E // self.G).masked_fill(mask.unsqueeze(-1), float("-inf")).flatten(1)
            idx = c.topk(self.K, dim=-1)[1]  # (N, K)
        w = scores.gather(1, idx)
        if self.norm:
            w = w / w.sum(-1, keepdim=True)
        w = w * self.scale
        y = torch.zeros_like(xf)
        flat = idx.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.E).tolist()
        tok = order // self.K
        wf = w.flatten()[order]
        s = 0
        for e in range(self.E):
            if counts[e] == 0:
                continue
            t = tok[s:s + counts[e]]
            y = y.index_add(0, t, self.experts[e](xf[t]) * wf[s:s + counts[e], None])
            s += counts[e]
        if self.shared_experts is not None:
            y = y + self.shared_experts(xf)
        bal = x.new_zeros(())
        if self.alpha > 0:  # DeepSeek-V3's sequence-wise loss, one sequence = a batch row
            sn = (scores / scores.sum(-1, keepdim=True)).view(B, T, self.E)
            f = torch.zeros(B, self.E).scatter_add_(1, idx.view(B, T * self.K),
                                                    torch.ones(B, T * self.K)) * (self.E / (self.K * T))
            bal = self.alpha * (f * sn.mean(1)).sum(-1).mean()
        return y.view(B, T, D), bal


class Block(nn.Module):
    def __init__(self, c, layer, std, alpha):
        super().__init__()
        eps = c["rms_norm_eps"]
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(c["hidden_size"], eps), RMSNorm(c["hidden_size"], eps)
        self.self_attn = MLA(c, std)
        self.moe = layer >= c["first_k_dense_replace"]
        self.mlp = MoE(c, std, alpha) if self.moe else MLP(c["hidden_size"], c["intermediate_size"], std)

    def forward(self, h, cos, sin, mask):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask)
        if self.moe:
            y, bal = self.mlp(self.post_attention_layernorm(h))
        else:
            y, bal = self.mlp(self.post_attention_layernorm(h)), h.new_zeros(())
        return h + y, bal


class Depth(nn.Module):
    def __init__(self, c, layer, std, alpha):
        super().__init__()
        D, eps = c["hidden_size"], c["rms_norm_eps"]
        self.enorm, self.hnorm, self.shared_head_norm = RMSNorm(D, eps), RMSNorm(D, eps), RMSNorm(D, eps)
        self.eh_proj = linear(2 * D, D, std)
        self.block = Block(c, layer, std, alpha)


class Model(nn.Module):
    def __init__(self, c, T, std=0.02, alpha=1e-4, mtp_lambda=0.3):
        super().__init__()
        D, V, L = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
        self.embed_tokens = nn.Embedding(V, D)
        nn.init.normal_(self.embed_tokens.weight, std=std)
        self.layers = nn.ModuleList([Block(c, l, std, alpha) for l in range(L)])
        self.norm = RMSNorm(D, c["rms_norm_eps"])
        self.lm_head = linear(D, V, std)
        self.depths = nn.ModuleList([Depth(c, L + d, std, alpha) for d in range(c.get("num_nextn_predict_layers", 0))])
        self.mtp_lambda, self.V = mtp_lambda, V
        r = c["qk_rope_head_dim"]
        inv = 1.0 / (c.get("rope_theta", 10000.0) ** (torch.arange(0, r, 2, dtype=torch.float64) / r))
        ang = torch.outer(torch.arange(T, dtype=torch.float64), inv)
        self.register_buffer("cos", ang.cos().float())
        self.register_buffer("sin", ang.sin().float())
        self.register_buffer("mask", torch.full((T, T), float("-inf")).triu_(1))

    def forward(self, tokens):
        inp, tgt = tokens[:, :-1], tokens[:, 1:]
        B, T = inp.shape
        h = self.embed_tokens(inp)
        bal = h.new_zeros(())
        for layer in self.layers:
            h, b = layer(h, self.cos, self.sin, self.mask)
            bal = bal + b
        x = self.norm(h)
        ce = F.cross_entropy(self.lm_head(x).view(-1, self.V), tgt.reshape(-1))
        mtp = h.new_zeros(())
        prev = x
        for d, dp in enumerate(self.depths):
            k = d + 1
            # token i + k (the last one repeated past the end), target i + k + 1 (ignored past it)
            idx = torch.clamp(torch.arange(T) + k, max=T)
            e = self.embed_tokens(tokens[:, idx])
            tg = torch.full((B, T), -100, dtype=torch.long)
            valid = T - k
            if valid > 0:
                tg[:, :valid] = tokens[:, k + 1:k + 1 + valid]
            hh = dp.eh_proj(torch.cat((dp.enorm(e), dp.hnorm(prev)), dim=-1))
            hh, b = dp.block(hh, self.cos, self.sin, self.mask)
            bal = bal + b
            mtp = mtp + F.cross_entropy(self.lm_head(dp.shared_head_norm(hh)).view(-1, self.V), tg.reshape(-1))
            prev = hh
        if len(self.depths):
            mtp = mtp / len(self.depths)
        return ce + self.mtp_lambda * mtp + bal


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="config.json (bench_train --config-out)")
    ap.add_argument("--threads", type=int, default=1, help="threads of every pool (read before torch)")
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=1e-4)
    ap.add_argument("--preset", default="?")
    a = ap.parse_args()
    with open(a.config) as f:
        c = json.load(f)
    torch.manual_seed(1)
    model = Model(c, a.seq, alpha=a.alpha)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    other = [p for n, p in model.named_parameters() if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    tokens = torch.tensor(bench_tokens(a.batch * (a.seq + 1), c["vocab_size"], 7), dtype=torch.long).view(a.batch, a.seq + 1)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss)

    first = None
    for _ in range(a.warmup):
        v = step()
        first = v if first is None else first
    times, cpus, last = [], [], None
    for _ in range(a.repeat):
        t, c0 = time.perf_counter(), time.process_time()
        for _ in range(a.steps):
            last = step()
            first = last if first is None else first
        times.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c0)
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"impl": "torch", "test": "train", "preset": a.preset, "threads": THREADS,
                      "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
                      "batch": a.batch, "seq": a.seq, "steps": a.steps, "seconds": min(times),
                      "seconds_all": times, "tokens_per_s": a.batch * a.seq * a.steps / min(times),
                      "cpu_seconds": min(cpus), "cpu_tokens_per_s": a.batch * a.seq * a.steps / min(cpus),
                      "params": params, "first_loss": first, "last_loss": last}), flush=True)


if __name__ == "__main__":
    main()
