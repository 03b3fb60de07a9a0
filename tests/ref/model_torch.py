#!/usr/bin/python3
"""model_torch.py — a second formulation of the DeepSeek-V3 forward pass, in torch float64,
laid out as the official DeepSeek-V3 inference code (inference/model.py) lays it out, to
cross-check model_ref.py (NumPy) where a misreading of the spec would otherwise pass both:

- RoPE as complex multiplication: adjacent pairs viewed as complex numbers
  (view_as_complex) times freqs_cis = polar(1, pos * f); the YaRN frequencies through the
  official find_correction_range / linear_ramp_factor, applied when the configured
  maximum length (max_position_embeddings) exceeds original_max_position_embeddings;
- MLA with start_pos and caches, either "naive" (caches of full keys and values per head)
  or "absorb" (caches of the normalised latent and the rope key only), scores by einsum,
  the mask as an additive -inf matrix;
- the gate: scores, + bias for the choice only, group scores (max, or the sum of the top
  2 with a bias), masked_fill of the groups outside the top topk_group, topk, weights
  gathered from the unbiased scores, normalised (norm_topk_prob), times the route scale
  (as an fp32 number).

Generation runs prompt chunks then single tokens through the same caches, as the
official generate() does. Nothing here is shared with model_ref.py but the weights dict
(name -> fp64 array) and the Config fields. Needs Debian's python3-torch.
"""

import math

import numpy as np
import torch

F64 = torch.float64


def precompute_freqs_cis(cfg, seqlen):
    dim, base = cfg.r, float(cfg.theta)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=F64) / dim))
    y = cfg.yarn
    if y and cfg.raw.get("max_position_embeddings", 0) > y["L0"]:
        def find_correction_dim(num_rotations):
            return dim * math.log(y["L0"] / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(find_correction_dim(y["beta_fast"])), 0)
        high = min(math.ceil(find_correction_dim(y["beta_slow"])), dim - 1)
        if low == high:
            high += 0.001
        smooth = 1 - torch.clamp((torch.arange(dim // 2, dtype=F64) - low) / (high - low), 0, 1)
        freqs = freqs / y["factor"] * (1 - smooth) + freqs * smooth
    t = torch.arange(seqlen, dtype=F64)
    ang = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(ang), ang), freqs


def apply_rotary_emb(x, freqs_cis):
    """x (b, s, h, r); freqs_cis (s, r/2) complex."""
    xc = torch.view_as_complex(x.clone(memory_format=torch.contiguous_format).view(*x.shape[:-1], -1, 2))
    fc = freqs_cis.view(1, xc.size(1), 1, xc.size(-1))
    return torch.view_as_real(xc * fc).flatten(3)


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


class Model:
    def __init__(self, cfg, W, max_len):
        self.cfg = cfg
        self.W = {k: torch.tensor(np.asarray(v, dtype=np.float64)) for k, v in W.items()}
        self.freqs_cis, self.freqs = precompute_freqs_cis(cfg, max_len)
        c = cfg
        self.softmax_scale = (c.n + c.r) ** -0.5
        if c.yarn and c.raw.get("max_position_embeddings", 0) > c.yarn["L0"]:
            m = 0.1 * c.yarn["mscale_all_dim"] * math.log(c.yarn["factor"]) + 1.0
            self.softmax_scale *= m * m
        self.max_len = max_len
        self.reset()

    def reset(self):
        c, T = self.cfg, self.max_len
        self.k_cache = [torch.zeros(1, T, c.H, c.n + c.r, dtype=F64) for _ in range(c.L)]
        self.v_cache = [torch.zeros(1, T, c.H, c.v, dtype=F64) for _ in range(c.L)]
        self.kv_cache = [torch.zeros(1, T, c.c, dtype=F64) for _ in range(c.L)]
        self.pe_cache = [torch.zeros(1, T, c.r, dtype=F64) for _ in range(c.L)]

    def w(self, name):
        return self.W[name]

    def mla(self, l, x, start_pos, freqs_cis, mask, attn_impl):
        c, p = self.cfg, f"model.layers.{l}.self_attn."
        bsz, seqlen, _ = x.shape
        end_pos = start_pos + seqlen
        if c.q:
            q = rms(x @ self.w(p + "q_a_proj.weight").T, self.w(p + "q_a_layernorm.weight"), c.eps)
            q = q @ self.w(p + "q_b_proj.weight").T
        else:
            q = x @ self.w(p + "q_proj.weight").T
        q = q.view(bsz, seqlen, c.H, c.n + c.r)
        q_nope, q_pe = torch.split(q, [c.n, c.r], dim=-1)
        q_pe = apply_rotary_emb(q_pe, freqs_cis)
        kv = x @ self.w(p + "kv_a_proj_with_mqa.weight").T
        kv, k_pe = torch.split(kv, [c.c, c.r], dim=-1)
        k_pe = apply_rotary_emb(k_pe.unsqueeze(2), freqs_cis)
        kv_norm = self.w(p + "kv_a_layernorm.weight")
        wkv_b = self.w(p + "kv_b_proj.weight")
        if attn_impl == "naive":
            q = torch.cat([q_nope, q_pe], dim=-1)
            kvb = (rms(kv, kv_norm, c.eps) @ wkv_b.T).view(bsz, seqlen, c.H, c.n + c.v)
            k_nope, v = torch.split(kvb, [c.n, c.v], dim=-1)
            k = torch.cat([k_nope, k_pe.expand(-1, -1, c.H, -1)], dim=-1)
            self.k_cache[l][:bsz, start_pos:end_pos] = k
            self.v_cache[l][:bsz, start_pos:end_pos] = v
            scores = torch.einsum("bshd,bthd->bsht", q, self.k_cache[l][:bsz, :end_pos]) * self.softmax_scale
        else:
            wkv_b = wkv_b.view(c.H, -1, c.c)
            q_nope = torch.einsum("bshd,hdc->bshc", q_nope, wkv_b[:, :c.n])
            self.kv_cache[l][:bsz, start_pos:end_pos] = rms(kv, kv_norm, c.eps)
            self.pe_cache[l][:bsz, start_pos:end_pos] = k_pe.squeeze(2)
            scores = (torch.einsum("bshc,btc->bsht", q_nope, self.kv_cache[l][:bsz, :end_pos]) +
                      torch.einsum("bshr,btr->bsht", q_pe, self.pe_cache[l][:bsz, :end_pos]))
            scores = scores * self.softmax_scale
        if mask is not None:
            scores = scores + mask.unsqueeze(1)
        scores = scores.softmax(dim=-1)
        if attn_impl == "naive":
            o = torch.einsum("bsht,bthd->bshd", scores, self.v_cache[l][:bsz, :end_pos])
        else:
            o = torch.einsum("bsht,btc->bshc", scores, self.kv_cache[l][:bsz, :end_pos])
            o = torch.einsum("bshc,hdc->bshd", o, wkv_b[:, -c.v:])
        return o.flatten(2) @ self.w(p + "o_proj.weight").T

    def ffn(self, p, x):
        return (torch.nn.functional.silu(x @ self.w(p + "gate_proj.weight").T) *
                (x @ self.w(p + "up_proj.weight").T)) @ self.w(p + "down_proj.weight").T

    def gate(self, p, x):
        c = self.cfg
        scores = x @ self.w(p + "gate.weight").T
        scores = scores.softmax(dim=-1) if c.scoring == "softmax" else scores.sigmoid()
        original = scores
        bias = self.W.get(p + "gate.e_score_correction_bias") if c.method == "noaux_tc" else None
        if bias is not None:
            scores = scores + bias
        groups = 1 if c.method == "greedy" else c.G
        if groups > 1:
            scores = scores.view(x.size(0), groups, -1)
            if bias is None:
                group_scores = scores.amax(dim=-1)
            else:
                group_scores = scores.topk(2, dim=-1)[0].sum(dim=-1)
            idx = group_scores.topk(c.TG, dim=-1)[1]
            mask = torch.ones(x.size(0), groups, dtype=torch.bool).scatter_(1, idx, False)
            scores = scores.masked_fill(mask.unsqueeze(-1), float("-inf")).flatten(1)
        indices = torch.topk(scores, c.K, dim=-1)[1]
        weights = original.gather(1, indices)
        if c.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        # The route scale as an fp32 number (how the official code's fp32 opmath applies
        # it, and how dsmoe holds it; Moonlight's 2.446 is not exact in fp32).
        return weights * float(np.float32(c.scale)), indices

    def moe(self, p, x):
        shape = x.shape
        x = x.view(-1, shape[-1])
        weights, indices = self.gate(p, x)
        y = torch.zeros_like(x)
        for e in range(self.cfg.E):
            rows, top = torch.where(indices == e)
            if len(rows):
                y[rows] += self.ffn(p + f"experts.{e}.", x[rows]) * weights[rows, top, None]
        if self.cfg.Ns:
            y = y + self.ffn(p + "shared_experts.", x)
        return y.view(shape)

    def forward(self, tokens, start_pos, attn_impl):
        """Logits (b, s, V) of every position of tokens (b, s) placed at start_pos."""
        c = self.cfg
        seqlen = tokens.size(1)
        h = self.w("model.embed_tokens.weight")[tokens]
        freqs_cis = self.freqs_cis[start_pos:start_pos + seqlen]
        mask = None
        if seqlen > 1:
            qpos = torch.arange(start_pos, start_pos + seqlen)[:, None]
            kpos = torch.arange(start_pos + seqlen)[None, :]
            mask = torch.zeros(seqlen, start_pos + seqlen, dtype=F64).masked_fill(kpos > qpos, float("-inf"))
        for l in range(c.L):
            p = f"model.layers.{l}."
            h = h + self.mla(l, rms(h, self.w(p + "input_layernorm.weight"), c.eps), start_pos, freqs_cis,
                             mask, attn_impl)
            x = rms(h, self.w(p + "post_attention_layernorm.weight"), c.eps)
            h = h + (self.moe(p + "mlp.", x) if c.is_moe(l) else self.ffn(p + "mlp.", x))
        head = self.w("model.embed_tokens.weight" if c.tie else "lm_head.weight")
        return rms(h, self.w("model.norm.weight"), c.eps) @ head.T


def logits(cfg, W, tokens, attn_impl="naive", chunks=None):
    """Logits (T, V) as numpy fp64, the tokens fed in chunks of the given sizes (default:
    all at once) through the caches."""
    tokens = torch.tensor(np.asarray(tokens, dtype=np.int64))[None]
    T = tokens.size(1)
    chunks = chunks or [T]
    assert sum(chunks) == T
    m = Model(cfg, W, T)
    out, pos = [], 0
    with torch.no_grad():
        for n in chunks:
            out.append(m.forward(tokens[:, pos:pos + n], pos, attn_impl)[0])
            pos += n
    return torch.cat(out).numpy()


def inv_freq(cfg):
    return precompute_freqs_cis(cfg, 1)[1].numpy()
