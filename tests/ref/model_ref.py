#!/usr/bin/python3
"""model_ref.py — independent fp64 NumPy reference of the DeepSeek-V3 forward pass.

Written from shared/SPEC-model.md (the stack, MLA, RoPE on adjacent pairs, YaRN) and
SPEC-routing.md (the MoE layer), not from the C code. Everything is float64 on the
stored parameter values (widened exactly from F32 / BF16 / F16, or F8_E4M3 times its
block scale). Notation: D hidden_size, H heads, n qk_nope_head_dim, r qk_rope_head_dim,
v v_head_dim, c kv_lora_rank, q q_lora_rank.

    h = embed_tokens[tokens]
    for l < L:  h += attn_l(input_layernorm_l(h));  h += ffn_l(post_attention_layernorm_l(h))
    logits = lm_head(norm(h))                       (lm_head = embed_tokens when tied)

RMSNorm(x) = x / sqrt(mean(x^2) + eps) * w.
Attention (naive): q = q_b(RMSNorm(q_a x)) or q_proj x, per head [nope n | rope r];
latent, k_pe = kv_a_proj_with_mqa x split (c | r); latent = kv_a_layernorm(latent);
RoPE on q_pe and k_pe (one k_pe head shared by all heads), adjacent pairs
(x[2i], x[2i+1]) rotated by pos * f_i, f_i = theta^(-2i/r); k_nope, value = kv_b(latent)
per head [n | v]; score = (q_nope.k_nope + q_pe.k_pe) * scale, causal, softmax over
keys; out = o_proj(concat_h sum_j p_j value_j). scale = (n+r)^-0.5, times mscale^2 with
YaRN, mscale = 0.1 * mscale_all_dim * ln(factor) + 1.
Absorbed form: q~ = q_nope W_k (c per head), score = q~.latent_j + q_pe.k_pe_j,
o = (sum_j p_j latent_j) W_v^T; equal to the naive form (checked in fp64).
YaRN: corr(b) = r ln(L0 / (2 pi b)) / (2 ln theta); low = max(floor(corr(beta_fast)), 0);
high = min(ceil(corr(beta_slow)), r - 1); high += 0.001 if equal;
ramp_i = clip((i - low) / (high - low), 0, 1); f_i' = f_i / s * ramp_i + f_i (1 - ramp_i).
FFN: dense SwiGLU down(silu(gate x) * up x) for layers < first_k_dense_replace or
l % moe_layer_freq != 0; else the MoE layer: router of dsmoe_ref (fp64) chosen from
scoring_func / topk_method, experts and the shared expert as in moe_ref.

Decoding (forward_decode): one token at a time, the cache holding per layer and token
only the normalised latent and the rotated k_pe (c + r values), absorbed attention.

Run `python3 model_ref.py` for the self-checks (naive == absorbed == decoding, RoPE relative-
position property, the YaRN ramp at its ends, fp8 decoding).
"""

import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dsmoe_ref as R  # noqa: E402


# ------------------------------------------------------------------ config --

class Config:
    """The keys of a Hugging Face config.json that change the math (defaults as in
    the C reader: only those on which DeepseekV2Config and DeepseekV3Config agree)."""

    def __init__(self, d):
        self.raw = dict(d)
        g = d.get
        self.D = d["hidden_size"]
        self.I = d["intermediate_size"]
        self.L = d["num_hidden_layers"]
        self.H = d["num_attention_heads"]
        self.q = d["q_lora_rank"] or 0
        self.c = d["kv_lora_rank"]
        self.n = d["qk_nope_head_dim"]
        self.r = d["qk_rope_head_dim"]
        self.v = d["v_head_dim"]
        self.V = d["vocab_size"]
        self.E = d["n_routed_experts"] or 0
        self.F = g("moe_intermediate_size", 0)
        self.Ns = g("n_shared_experts") or 0
        self.K = g("num_experts_per_tok", 0)
        self.first_dense = g("first_k_dense_replace", 0)
        self.freq = g("moe_layer_freq", 1)
        self.eps = g("rms_norm_eps", 1e-6)
        self.theta = g("rope_theta", 10000.0)
        self.tie = g("tie_word_embeddings", False)
        self.mtp = g("num_nextn_predict_layers", 0)
        self.method = g("topk_method")
        self.scoring = g("scoring_func")
        self.norm_topk = g("norm_topk_prob")
        self.scale = g("routed_scaling_factor")
        self.G = g("n_group", 1)
        self.TG = g("topk_group", 1)
        rs = g("rope_scaling")
        self.yarn = None
        if rs:
            t = rs.get("type", rs.get("rope_type"))
            assert t == "yarn", t
            self.yarn = dict(factor=rs["factor"], L0=rs["original_max_position_embeddings"],
                             beta_fast=rs.get("beta_fast", 32), beta_slow=rs.get("beta_slow", 1),
                             mscale_all_dim=rs.get("mscale_all_dim", 0.0))
        qc = g("quantization_config")
        self.block = tuple(qc["weight_block_size"]) if qc else None

    def is_moe(self, l):
        return self.E > 0 and l >= self.first_dense and l % self.freq == 0

    def router(self):
        greedy = self.method == "greedy"
        G = 1 if greedy else self.G
        return R.RouterConfig(
            experts=self.E, groups=G, topk_groups=1 if greedy else self.TG, top_k=self.K,
            score=self.scoring, group_score="topsum" if self.method == "noaux_tc" else "max",
            group_topm=min(2, self.E // G), mask="exclude", normalize=bool(self.norm_topk),
            norm_eps=0.0, scale=self.scale, use_bias=self.method == "noaux_tc")


# ------------------------------------------------------------ tensor table --

def tensor_table(cfg, mtp_depths=0):
    """[(name, shape)] in the order documented in include/dsmoe/model.h."""
    D, H, n, r, v, c, q = cfg.D, cfg.H, cfg.n, cfg.r, cfg.v, cfg.c, cfg.q
    out = [("model.embed_tokens.weight", (cfg.V, D))]

    def block(l):
        p = f"model.layers.{l}."
        t = [(p + "input_layernorm.weight", (D,))]
        if q:
            t += [(p + "self_attn.q_a_proj.weight", (q, D)), (p + "self_attn.q_a_layernorm.weight", (q,)),
                  (p + "self_attn.q_b_proj.weight", (H * (n + r), q))]
        else:
            t += [(p + "self_attn.q_proj.weight", (H * (n + r), D))]
        t += [(p + "self_attn.kv_a_proj_with_mqa.weight", (c + r, D)),
              (p + "self_attn.kv_a_layernorm.weight", (c,)),
              (p + "self_attn.kv_b_proj.weight", (H * (n + v), c)),
              (p + "self_attn.o_proj.weight", (D, H * v)),
              (p + "post_attention_layernorm.weight", (D,))]
        if not cfg.is_moe(l):
            t += [(p + "mlp.gate_proj.weight", (cfg.I, D)), (p + "mlp.up_proj.weight", (cfg.I, D)),
                  (p + "mlp.down_proj.weight", (D, cfg.I))]
        else:
            t += [(p + "mlp.gate.weight", (cfg.E, D))]
            if cfg.method == "noaux_tc":
                t += [(p + "mlp.gate.e_score_correction_bias", (cfg.E,))]
            for e in range(cfg.E):
                t += [(p + f"mlp.experts.{e}.gate_proj.weight", (cfg.F, D)),
                      (p + f"mlp.experts.{e}.up_proj.weight", (cfg.F, D)),
                      (p + f"mlp.experts.{e}.down_proj.weight", (D, cfg.F))]
            if cfg.Ns:
                Fs = cfg.Ns * cfg.F
                t += [(p + "mlp.shared_experts.gate_proj.weight", (Fs, D)),
                      (p + "mlp.shared_experts.up_proj.weight", (Fs, D)),
                      (p + "mlp.shared_experts.down_proj.weight", (D, Fs))]
        return t

    for l in range(cfg.L):
        out += block(l)
    out += [("model.norm.weight", (D,))]
    if not cfg.tie:
        out += [("lm_head.weight", (cfg.V, D))]
    for l in range(cfg.L, cfg.L + mtp_depths):
        p = f"model.layers.{l}."
        out += [(p + "embed_tokens.weight", (cfg.V, D)), (p + "enorm.weight", (D,)),
                (p + "hnorm.weight", (D,)), (p + "eh_proj.weight", (D, 2 * D)),
                (p + "shared_head.norm.weight", (D,)), (p + "shared_head.head.weight", (cfg.V, D))]
        out += block(l)
    return out


# ------------------------------------------------------------------- fp8 --

def fp8_e4m3_decode(b):
    """Values of F8_E4M3 ('fn': bias 7, no infinities, S.1111.111 = NaN) bytes, fp64."""
    b = np.asarray(b, dtype=np.uint8).astype(np.int64)
    s = np.where(b >> 7, -1.0, 1.0)
    e = (b >> 3) & 15
    m = b & 7
    val = np.where(e == 0, m / 8.0 * 2.0 ** -6, (1 + m / 8.0) * 2.0 ** (e - 7.0))
    val = np.where((e == 15) & (m == 7), np.nan, val)
    return s * val


def fp8_dequant(w_bytes, scale_inv, block):
    """w (rows, cols) F8 bytes times the scale of its (br, bc) block, fp64."""
    br, bc = block
    rows, cols = w_bytes.shape
    s = np.repeat(np.repeat(scale_inv.astype(np.float64), br, axis=0), bc, axis=1)[:rows, :cols]
    return fp8_e4m3_decode(w_bytes) * s


# --------------------------------------------------------------- blocks --

def rmsnorm(x, w, eps):
    x = np.asarray(x, dtype=np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def silu(g):
    return g / (1.0 + np.exp(-g))


def rope_inv_freq(cfg):
    """f_i (r/2), with YaRN's interpolation when configured."""
    r, theta = cfg.r, float(cfg.theta)
    i = np.arange(r // 2, dtype=np.float64)
    f = theta ** (-2.0 * i / r)
    if cfg.yarn:
        y = cfg.yarn

        def corr(b):
            return r * math.log(y["L0"] / (2 * math.pi * b)) / (2 * math.log(theta))

        low = max(math.floor(corr(y["beta_fast"])), 0)
        high = min(math.ceil(corr(y["beta_slow"])), r - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((i - low) / (high - low), 0.0, 1.0)
        f = f / y["factor"] * ramp + f * (1.0 - ramp)
    return f


def softmax_scale(cfg):
    s = (cfg.n + cfg.r) ** -0.5
    if cfg.yarn:
        m = 0.1 * cfg.yarn["mscale_all_dim"] * math.log(cfg.yarn["factor"]) + 1.0
        s *= m * m
    return s


def rope(x, pos, inv_freq):
    """Rotates adjacent pairs of x (..., T, [H,] r) by pos * f_i; pos (T)."""
    ang = np.outer(pos, inv_freq)                      # (T, r/2)
    cos, sin = np.cos(ang), np.sin(ang)
    if x.ndim == 3:                                    # (T, H, r)
        cos, sin = cos[:, None, :], sin[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def attention(cfg, W, p, x, absorbed=False):
    """MLA of layer prefix p on x (T, D) already normalised; returns (T, D)."""
    T = x.shape[0]
    H, n, r, v, c = cfg.H, cfg.n, cfg.r, cfg.v, cfg.c
    if cfg.q:
        qa = rmsnorm(x @ W[p + "self_attn.q_a_proj.weight"].T, W[p + "self_attn.q_a_layernorm.weight"], cfg.eps)
        qf = qa @ W[p + "self_attn.q_b_proj.weight"].T
    else:
        qf = x @ W[p + "self_attn.q_proj.weight"].T
    qf = qf.reshape(T, H, n + r)
    q_nope, q_pe = qf[..., :n], qf[..., n:]
    kv = x @ W[p + "self_attn.kv_a_proj_with_mqa.weight"].T
    latent = rmsnorm(kv[:, :c], W[p + "self_attn.kv_a_layernorm.weight"], cfg.eps)
    k_pe = kv[:, c:]
    pos = np.arange(T, dtype=np.float64)
    f = rope_inv_freq(cfg)
    q_pe = rope(q_pe, pos, f)
    k_pe = rope(k_pe, pos, f)
    wkv = W[p + "self_attn.kv_b_proj.weight"].reshape(H, n + v, c)
    scale = softmax_scale(cfg)
    mask = np.triu(np.ones((T, T), dtype=bool), 1)
    out = np.zeros((T, H, v))
    for h in range(H):
        Wk, Wv = wkv[h, :n], wkv[h, n:]               # (n, c), (v, c)
        if absorbed:
            qt = q_nope[:, h] @ Wk                     # (T, c)
            s = (qt @ latent.T + q_pe[:, h] @ k_pe.T) * scale
        else:
            k_nope = latent @ Wk.T                     # (T, n)
            s = (q_nope[:, h] @ k_nope.T + q_pe[:, h] @ k_pe.T) * scale
        s = np.where(mask, -np.inf, s)
        s = np.exp(s - s.max(axis=1, keepdims=True))
        pr = s / s.sum(axis=1, keepdims=True)
        if absorbed:
            out[:, h] = (pr @ latent) @ Wv.T
        else:
            out[:, h] = pr @ (latent @ Wv.T)
    return out.reshape(T, H * v) @ W[p + "self_attn.o_proj.weight"].T


def mlp(W, p, x):
    g = x @ W[p + "gate_proj.weight"].T
    u = x @ W[p + "up_proj.weight"].T
    return (silu(g) * u) @ W[p + "down_proj.weight"].T


def moe(cfg, W, p, x, margins=None):
    rc = cfg.router()
    logits = x @ W[p + "gate.weight"].T
    bias = W.get(p + "gate.e_score_correction_bias")
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        res = R.route_token_fp64(logits[t], bias, rc)
        if margins is not None:
            margins.append(res.margin)
        for k, e in enumerate(res.indices):
            y[t] += res.weights[k] * mlp(W, p + f"experts.{e}.", x[t:t + 1])[0]
    if cfg.Ns:
        y += mlp(W, p + "shared_experts.", x)
    return y


def forward(cfg, W, tokens, absorbed=False, margins=None, trace=None):
    """Logits (T, V) in fp64. W: name -> fp64 array. trace (a dict) receives the
    hidden state after the embedding and after each layer ('hidden', (L+1, T, D)) and
    layer 0's attention output on its normalised input ('attn0')."""
    h = W["model.embed_tokens.weight"][np.asarray(tokens)]
    hs = [h.copy()]
    for l in range(cfg.L):
        p = f"model.layers.{l}."
        a = attention(cfg, W, p, rmsnorm(h, W[p + "input_layernorm.weight"], cfg.eps), absorbed)
        if trace is not None and l == 0:
            trace["attn0"] = a
        h = h + a
        x = rmsnorm(h, W[p + "post_attention_layernorm.weight"], cfg.eps)
        h = h + (moe(cfg, W, p + "mlp.", x, margins) if cfg.is_moe(l) else mlp(W, p + "mlp.", x))
        hs.append(h.copy())
    if trace is not None:
        trace["hidden"] = np.stack(hs)
    head = W["model.embed_tokens.weight"] if cfg.tie else W["lm_head.weight"]
    return rmsnorm(h, W["model.norm.weight"], cfg.eps) @ head.T


def block(cfg, W, l, h, margins=None):
    """Layer l (a main layer or an MTP depth's block) on the stream h (T, D), positions 0 ..."""
    p = f"model.layers.{l}."
    h = h + attention(cfg, W, p, rmsnorm(h, W[p + "input_layernorm.weight"], cfg.eps))
    x = rmsnorm(h, W[p + "post_attention_layernorm.weight"], cfg.eps)
    return h + (moe(cfg, W, p + "mlp.", x, margins) if cfg.is_moe(l) else mlp(W, p + "mlp.", x))


def final_hidden(cfg, W, tokens):
    """The main model's final-norm output (T, D): the input of the head and of MTP depth 1."""
    trace = {}
    forward(cfg, W, tokens, trace=trace)
    return rmsnorm(trace["hidden"][-1], W["model.norm.weight"], cfg.eps)


def forward_mtp(cfg, W, tokens, depths=None, margins=None):
    """The MTP depths' logits in fp64 (DeepSeek-V3 section 2.2, the math of dsmoe's training
    model): depth k = 1 .. depths at positions i = 0 .. T - k - 1,
        h'_i = eh_proj [enorm(embed_k(t_{i+k})) ; hnorm(h^{k-1}_i)]   (embedding first)
        h^k = block_{L+k-1}(h')     (causal attention over the depth's own positions 0 ..)
        logits^k_i = shared_head.head(shared_head.norm(h^k_i))      predicting t_{i+k+1}
    with h^0 the main model's final-norm output and embed_k, the head the depth's own
    stored embed_tokens and shared_head.head. Returns [(T - k, V) for k = 1 .. depths]."""
    tokens = np.asarray(tokens)
    T = len(tokens)
    hp = final_hidden(cfg, W, tokens)
    out = []
    for k in range(1, (cfg.mtp if depths is None else depths) + 1):
        l = cfg.L + k - 1
        p = f"model.layers.{l}."
        n = T - k
        e = W[p + "embed_tokens.weight"][tokens[k:k + n]]
        cat = np.concatenate([rmsnorm(e, W[p + "enorm.weight"], cfg.eps),
                              rmsnorm(hp[:n], W[p + "hnorm.weight"], cfg.eps)], axis=1)
        h = block(cfg, W, l, cat @ W[p + "eh_proj.weight"].T, margins)
        out.append(rmsnorm(h, W[p + "shared_head.norm.weight"], cfg.eps) @ W[p + "shared_head.head.weight"].T)
        hp = h
    return out


# ------------------------------------------------------------- decoding --

def attention_step(cfg, W, p, x, pos, cache):
    """Absorbed MLA of one token x (D,) already normalised at position pos, against a
    cache holding per earlier token only the normalised latent (c) and the rotated rope
    key (r): appends this token's pair to cache ('latent', 'k_pe' lists) and returns (D,)."""
    H, n, r, v, c = cfg.H, cfg.n, cfg.r, cfg.v, cfg.c
    x = x[None]
    if cfg.q:
        qa = rmsnorm(x @ W[p + "self_attn.q_a_proj.weight"].T, W[p + "self_attn.q_a_layernorm.weight"],
                     cfg.eps)
        qf = qa @ W[p + "self_attn.q_b_proj.weight"].T
    else:
        qf = x @ W[p + "self_attn.q_proj.weight"].T
    qf = qf.reshape(1, H, n + r)
    f = rope_inv_freq(cfg)
    at = np.array([float(pos)])
    q_nope, q_pe = qf[0, :, :n], rope(qf[..., n:], at, f)[0]
    kv = x @ W[p + "self_attn.kv_a_proj_with_mqa.weight"].T
    cache["latent"].append(rmsnorm(kv[0, :c], W[p + "self_attn.kv_a_layernorm.weight"], cfg.eps))
    cache["k_pe"].append(rope(kv[:, c:], at, f)[0])
    lat, kpe = np.stack(cache["latent"]), np.stack(cache["k_pe"])    # (pos+1, c), (pos+1, r)
    wkv = W[p + "self_attn.kv_b_proj.weight"].reshape(H, n + v, c)
    scale = softmax_scale(cfg)
    out = np.zeros((H, v))
    for h in range(H):
        qt = wkv[h, :n].T @ q_nope[h]                  # (c,)
        s = (lat @ qt + kpe @ q_pe[h]) * scale
        s = np.exp(s - s.max())
        out[h] = wkv[h, n:] @ ((s / s.sum()) @ lat)
    return out.reshape(H * v) @ W[p + "self_attn.o_proj.weight"].T


def forward_decode(cfg, W, tokens):
    """Logits (T, V) computed one token at a time, each seeing the earlier tokens only
    through the per-layer cache of latents and rope keys (the absorbed form)."""
    caches = [dict(latent=[], k_pe=[]) for _ in range(cfg.L)]
    head = W["model.embed_tokens.weight"] if cfg.tie else W["lm_head.weight"]
    rows = []
    for pos, tok in enumerate(np.asarray(tokens)):
        h = W["model.embed_tokens.weight"][tok].copy()
        for l in range(cfg.L):
            p = f"model.layers.{l}."
            h = h + attention_step(cfg, W, p, rmsnorm(h, W[p + "input_layernorm.weight"], cfg.eps),
                                   pos, caches[l])
            x = rmsnorm(h, W[p + "post_attention_layernorm.weight"], cfg.eps)[None]
            h = h + (moe(cfg, W, p + "mlp.", x) if cfg.is_moe(l) else mlp(W, p + "mlp.", x))[0]
        rows.append(rmsnorm(h, W["model.norm.weight"], cfg.eps) @ head.T)
    return np.stack(rows)


# ------------------------------------------------------------- self-checks --

def _selfcheck():
    rng = np.random.default_rng(1)
    # fp8: a few known codes.
    d = fp8_e4m3_decode(np.array([0x00, 0x01, 0x08, 0x38, 0x7E, 0xFE, 0x7F, 0xFF, 0xB8]))
    assert d[0] == 0 and d[1] == 2.0 ** -9 and d[2] == 2.0 ** -6 and d[3] == 1.0
    assert d[4] == 448.0 and d[5] == -448.0 and np.isnan(d[6]) and np.isnan(d[7]) and d[8] == -1.0
    # RoPE: scores depend only on the position difference (q at i, k at j).
    f = rng.uniform(0.01, 1.0, size=3)
    qv, kv = rng.normal(size=6), rng.normal(size=6)
    def sc(i, j):
        return rope(qv[None], np.array([i]), f)[0] @ rope(kv[None], np.array([j]), f)[0]
    assert abs(sc(5, 2) - sc(13, 10)) < 1e-12 and abs(sc(5, 2) - sc(4, 2)) > 1e-6
    # Adjacent pairs, not halves: position 1 rotates (x0, x1) by f_0.
    x = np.array([[1.0, 0.0, 0.0, 0.0]])
    y = rope(x, np.array([1.0]), np.array([0.5, 0.1]))
    assert abs(y[0, 0] - math.cos(0.5)) < 1e-15 and abs(y[0, 1] - math.sin(0.5)) < 1e-15
    # YaRN: high-frequency dims untouched, low-frequency dims divided by the factor.
    cfg = Config(dict(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                      q_lora_rank=None, kv_lora_rank=4, qk_nope_head_dim=2, qk_rope_head_dim=64,
                      v_head_dim=2, vocab_size=5, n_routed_experts=None,
                      rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096,
                                        beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0)))
    f = rope_inv_freq(cfg)
    base = 10000.0 ** (-2.0 * np.arange(32) / 64)
    assert abs(f[0] - base[0]) < 1e-15 and abs(f[31] - base[31] / 40) < 1e-18
    assert abs(softmax_scale(cfg) - (66 ** -0.5) * (0.1 * math.log(40) + 1) ** 2) < 1e-15
    # Naive == absorbed on a random layer with and without q_lora_rank.
    for qr in (None, 5):
        cfg = Config(dict(hidden_size=11, intermediate_size=7, num_hidden_layers=1, num_attention_heads=3,
                          q_lora_rank=qr, kv_lora_rank=6, qk_nope_head_dim=4, qk_rope_head_dim=4,
                          v_head_dim=3, vocab_size=9, n_routed_experts=None))
        W = {k: rng.normal(size=s) * (0.3 if len(s) == 2 else 1.0) for k, s in tensor_table(cfg)}
        toks = rng.integers(0, 9, size=6)
        a = forward(cfg, W, toks)
        b = forward(cfg, W, toks, absorbed=True)
        assert np.max(np.abs(a - b)) < 1e-12 * max(1.0, np.max(np.abs(a))), np.max(np.abs(a - b))
        d = forward_decode(cfg, W, toks)
        assert np.max(np.abs(a - d)) < 1e-12 * max(1.0, np.max(np.abs(a))), np.max(np.abs(a - d))
        # Causality: changing the last token changes only the last row.
        t2 = toks.copy()
        t2[-1] = (t2[-1] + 1) % 9
        c2 = forward(cfg, W, t2)
        assert np.array_equal(a[:-1], c2[:-1]) and not np.allclose(a[-1], c2[-1])
    # MTP: a depth's logits at position i depend on tokens up to i + k only (causal),
    # and depth 2 stacks on depth 1 (depth 1's block changes both depths' logits, depth 2's
    # block only depth 2's).
    cfg = Config(dict(hidden_size=10, intermediate_size=7, num_hidden_layers=1, num_attention_heads=2,
                      q_lora_rank=None, kv_lora_rank=6, qk_nope_head_dim=4, qk_rope_head_dim=4,
                      v_head_dim=3, vocab_size=9, n_routed_experts=None, num_nextn_predict_layers=2))
    W = {k: rng.normal(size=s) * (0.3 if len(s) == 2 else 1.0) for k, s in tensor_table(cfg, 2)}
    toks = rng.integers(0, 9, size=7)
    a = forward_mtp(cfg, W, toks)
    assert [x.shape for x in a] == [(6, 9), (5, 9)]
    t2 = toks.copy()
    t2[-1] = (t2[-1] + 1) % 9
    b = forward_mtp(cfg, W, t2)
    assert np.array_equal(a[0][:-1], b[0][:-1]) and not np.allclose(a[0][-1], b[0][-1])
    assert np.array_equal(a[1][:-1], b[1][:-1]) and not np.allclose(a[1][-1], b[1][-1])
    for l, same0 in ((2, True), (1, False)):
        W2 = dict(W)
        W2[f"model.layers.{l}.mlp.down_proj.weight"] = W[f"model.layers.{l}.mlp.down_proj.weight"] * 1.5
        c = forward_mtp(cfg, W2, toks)
        assert np.array_equal(a[0], c[0]) == same0 and not np.allclose(a[1], c[1])
    print("model_ref self-checks passed")


if __name__ == "__main__":
    _selfcheck()
