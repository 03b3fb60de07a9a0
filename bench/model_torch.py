#!/usr/bin/python3
"""model_torch.py — the benchmark model run by PyTorch on the CPU, written with the
structure of the official DeepSeek-V3 inference code (inference/model.py): ModelArgs,
precompute_freqs_cis / apply_rotary_emb (complex rotation of adjacent pairs, YaRN when
configured), RMSNorm, MLA with the absorbed path (attn_impl "absorb": kv_b_proj's key half
folded into the query, its value half applied after the softmax, a cache holding only the
normalised latent and the rotated rope key), Gate (scores, correction bias, group stage,
top-k, normalise, route scale), Expert / MLP, MoE (a loop over the experts that received
tokens, plus the shared experts), Block and Transformer (logits of the last position).
The weights come from a Hugging Face model directory (model.safetensors, parsed with
NumPy: Debian's torch lacks the safetensors package) under the names the official
convert.py maps them to.

    model_torch.py --model DIR [--threads 1] [--prompt 256] [--decode-prompt 64]
                   [--decode 32] [--repeat 3] [--check DSMOE_LOGITS.npy]

Runs in the stored dtype (F32 files in fp32; BF16 files in bf16 as the official code
does: activations bf16, softmax in fp32); the router's product is done in fp32 (as
Hugging Face's DeepseekV3TopkRouter does) so that both implementations route alike.
Prints JSON lines: the threads, then "prompt" (one forward of --prompt tokens from an
empty cache, best of --repeat) and "decode" (--decode tokens one at a time after a
--decode-prompt prompt, best of --repeat), each with tokens/s.

--check FILE compares the logits of every position of the check tokens (bench_tokens
below, as many as FILE has rows) with FILE, dsmoe's logits of the same tokens: prints
the largest difference relative to the largest logit and whether the arg-max agrees.
"""
import argparse
import json
import math
import os
import struct
import sys
import time

from pin_threads import THREADS  # noqa: E402  (first: pins the thread pools)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(THREADS)


def bench_tokens(n, vocab, seed=42):
    """The benchmark's token ids: a 64-bit LCG, id = (x >> 33) % vocab (bench_model.c
    draws the same)."""
    x, out = seed, []
    for _ in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
        out.append((x >> 33) % vocab)
    return out


# ------------------------------------------------------------------ loading --

def read_safetensors(path):
    """{name: torch tensor} read out of the file (F32, BF16 and F16) straight into the
    tensors' memory (no second copy)."""
    kinds = {"F32": (torch.float32, torch.float32), "BF16": (torch.int16, torch.bfloat16),
             "F16": (torch.float16, torch.float16)}
    out = {}
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        for name, t in sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                              key=lambda kv: kv[1]["data_offsets"][0]):
            if t["dtype"] not in kinds:
                sys.exit("model_torch: %s: dtype %s not supported here" % (name, t["dtype"]))
            a, b = t["data_offsets"]
            load, view = kinds[t["dtype"]]
            x = torch.empty(t["shape"], dtype=load)
            f.seek(8 + n + a)
            if f.readinto(memoryview(x.numpy()).cast("B")) != b - a:
                sys.exit("model_torch: %s: file too short" % name)
            out[name] = x.view(view)
    return out


class ModelArgs:
    """The official ModelArgs, filled from a Hugging Face config.json."""

    def __init__(self, c, max_seq_len):
        self.max_batch_size = 1
        self.max_seq_len = max_seq_len
        self.vocab_size = c["vocab_size"]
        self.dim = c["hidden_size"]
        self.inter_dim = c["intermediate_size"]
        self.moe_inter_dim = c["moe_intermediate_size"]
        self.n_layers = c["num_hidden_layers"]
        self.n_dense_layers = c.get("first_k_dense_replace", 0)
        self.n_heads = c["num_attention_heads"]
        self.n_routed_experts = c["n_routed_experts"]
        self.n_shared_experts = c["n_shared_experts"] or 0
        self.n_activated_experts = c["num_experts_per_tok"]
        greedy = c["topk_method"] == "greedy"
        self.n_expert_groups = 1 if greedy else c["n_group"]
        self.n_limited_groups = 1 if greedy else c["topk_group"]
        self.score_func = c["scoring_func"]
        self.use_bias = c["topk_method"] == "noaux_tc"
        self.norm_topk = bool(c["norm_topk_prob"])
        self.route_scale = c["routed_scaling_factor"]
        self.q_lora_rank = c["q_lora_rank"] or 0
        self.kv_lora_rank = c["kv_lora_rank"]
        self.qk_nope_head_dim = c["qk_nope_head_dim"]
        self.qk_rope_head_dim = c["qk_rope_head_dim"]
        self.v_head_dim = c["v_head_dim"]
        self.rope_theta = c.get("rope_theta", 10000.0)
        self.eps = c.get("rms_norm_eps", 1e-6)
        rs = c.get("rope_scaling")
        self.yarn = bool(rs)
        if rs:
            self.original_seq_len = rs["original_max_position_embeddings"]
            self.rope_factor = rs["factor"]
            self.beta_fast = rs.get("beta_fast", 32)
            self.beta_slow = rs.get("beta_slow", 1)
            self.mscale = rs.get("mscale_all_dim", 0.0)


# ------------------------------------------------------------------- blocks --

def precompute_freqs_cis(args):
    dim, base = args.qk_rope_head_dim, args.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if args.yarn:  # applied whenever configured (Hugging Face's rule, see docs/model.md)
        def corr(rot):
            return dim * math.log(args.original_seq_len / (rot * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(corr(args.beta_fast)), 0)
        high = min(math.ceil(corr(args.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        smooth = 1 - ramp
        freqs = freqs / args.rope_factor * (1 - smooth) + freqs * smooth
    t = torch.arange(args.max_seq_len, dtype=torch.float32)
    freqs = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(freqs), freqs)


def apply_rotary_emb(x, freqs_cis):
    dtype = x.dtype
    x = torch.view_as_complex(x.float().clone(memory_format=torch.contiguous_format).view(*x.shape[:-1], -1, 2))
    freqs_cis = freqs_cis.view(1, x.size(1), 1, x.size(-1))
    return torch.view_as_real(x * freqs_cis).flatten(3).to(dtype)


class RMSNorm:
    def __init__(self, weight, eps):
        self.weight, self.eps = weight, eps

    def __call__(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class MLA:
    def __init__(self, args, W, p, dtype):
        self.n_heads = args.n_heads
        self.q_lora_rank, self.kv_lora_rank = args.q_lora_rank, args.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = args.qk_nope_head_dim, args.qk_rope_head_dim
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.v_head_dim = args.v_head_dim
        if self.q_lora_rank == 0:
            self.wq = W[p + "q_proj.weight"]
        else:
            self.wq_a = W[p + "q_a_proj.weight"]
            self.q_norm = RMSNorm(W[p + "q_a_layernorm.weight"], args.eps)
            self.wq_b = W[p + "q_b_proj.weight"]
        self.wkv_a = W[p + "kv_a_proj_with_mqa.weight"]
        self.kv_norm = RMSNorm(W[p + "kv_a_layernorm.weight"], args.eps)
        self.wkv_b = W[p + "kv_b_proj.weight"]
        self.wo = W[p + "o_proj.weight"]
        self.softmax_scale = self.qk_head_dim ** -0.5
        if args.yarn:
            mscale = 0.1 * args.mscale * math.log(args.rope_factor) + 1.0
            self.softmax_scale = self.softmax_scale * mscale * mscale
        self.kv_cache = torch.zeros(args.max_batch_size, args.max_seq_len, self.kv_lora_rank, dtype=dtype)
        self.pe_cache = torch.zeros(args.max_batch_size, args.max_seq_len, self.qk_rope_head_dim, dtype=dtype)

    def __call__(self, x, start_pos, freqs_cis, mask):
        bsz, seqlen, _ = x.size()
        end_pos = start_pos + seqlen
        if self.q_lora_rank == 0:
            q = F.linear(x, self.wq)
        else:
            q = F.linear(self.q_norm(F.linear(x, self.wq_a)), self.wq_b)
        q = q.view(bsz, seqlen, self.n_heads, self.qk_head_dim)
        q_nope, q_pe = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rotary_emb(q_pe, freqs_cis)
        kv = F.linear(x, self.wkv_a)
        kv, k_pe = torch.split(kv, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_pe = apply_rotary_emb(k_pe.unsqueeze(2), freqs_cis)
        wkv_b = self.wkv_b.view(self.n_heads, -1, self.kv_lora_rank)
        q_nope = torch.einsum("bshd,hdc->bshc", q_nope, wkv_b[:, :self.qk_nope_head_dim])
        self.kv_cache[:bsz, start_pos:end_pos] = self.kv_norm(kv)
        self.pe_cache[:bsz, start_pos:end_pos] = k_pe.squeeze(2)
        scores = (torch.einsum("bshc,btc->bsht", q_nope, self.kv_cache[:bsz, :end_pos]) +
                  torch.einsum("bshr,btr->bsht", q_pe, self.pe_cache[:bsz, :end_pos])) * self.softmax_scale
        if mask is not None:
            scores += mask.unsqueeze(1)
        scores = scores.softmax(dim=-1, dtype=torch.float32).type_as(x)
        x = torch.einsum("bsht,btc->bshc", scores, self.kv_cache[:bsz, :end_pos])
        x = torch.einsum("bshc,hdc->bshd", x, wkv_b[:, -self.v_head_dim:])
        return F.linear(x.flatten(2), self.wo)


class MLP:
    """Dense FFN, shared experts and routed experts alike: w2(silu(w1 x) * w3 x)."""

    def __init__(self, W, p):
        self.w1, self.w2, self.w3 = W[p + "gate_proj.weight"], W[p + "down_proj.weight"], W[p + "up_proj.weight"]

    def __call__(self, x):
        return F.linear(F.silu(F.linear(x, self.w1)) * F.linear(x, self.w3), self.w2)


class Gate:
    def __init__(self, args, W, p):
        self.topk, self.n_groups, self.topk_groups = args.n_activated_experts, args.n_expert_groups, args.n_limited_groups
        self.score_func, self.route_scale, self.norm = args.score_func, args.route_scale, args.norm_topk
        self.weight = W[p + "gate.weight"].float()
        self.bias = W[p + "gate.e_score_correction_bias"].float() if args.use_bias else None

    def __call__(self, x):
        scores = F.linear(x.float(), self.weight)
        if self.score_func == "softmax":
            scores = scores.softmax(dim=-1, dtype=torch.float32)
        else:
            scores = scores.sigmoid()
        original_scores = scores
        if self.bias is not None:
            scores = scores + self.bias
        if self.n_groups > 1:
            scores = scores.view(x.size(0), self.n_groups, -1)
            if self.bias is None:
                group_scores = scores.amax(dim=-1)
            else:
                group_scores = scores.topk(2, dim=-1)[0].sum(dim=-1)
            indices = group_scores.topk(self.topk_groups, dim=-1)[1]
            mask = scores.new_ones(x.size(0), self.n_groups, dtype=torch.bool).scatter_(1, indices, False)
            scores = scores.masked_fill_(mask.unsqueeze(-1), float("-inf")).flatten(1)
        indices = torch.topk(scores, self.topk, dim=-1)[1]
        weights = original_scores.gather(1, indices)
        if self.norm:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights * self.route_scale
        return weights.type_as(x), indices


class MoE:
    def __init__(self, args, W, p):
        self.dim, self.n_routed_experts = args.dim, args.n_routed_experts
        self.gate = Gate(args, W, p)
        self.experts = [MLP(W, p + f"experts.{i}.") for i in range(self.n_routed_experts)]
        self.shared_experts = MLP(W, p + "shared_experts.") if args.n_shared_experts else None

    def __call__(self, x):
        shape = x.size()
        x = x.view(-1, self.dim)
        weights, indices = self.gate(x)
        y = torch.zeros_like(x)
        counts = torch.bincount(indices.flatten(), minlength=self.n_routed_experts).tolist()
        for i in range(self.n_routed_experts):
            if counts[i] == 0:
                continue
            idx, top = torch.where(indices == i)
            y[idx] += self.experts[i](x[idx]) * weights[idx, top, None]
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)


class Block:
    def __init__(self, layer_id, args, W, dtype):
        p = f"model.layers.{layer_id}."
        self.attn = MLA(args, W, p + "self_attn.", dtype)
        self.ffn = MLP(W, p + "mlp.") if layer_id < args.n_dense_layers else MoE(args, W, p + "mlp.")
        self.attn_norm = RMSNorm(W[p + "input_layernorm.weight"], args.eps)
        self.ffn_norm = RMSNorm(W[p + "post_attention_layernorm.weight"], args.eps)

    def __call__(self, x, start_pos, freqs_cis, mask):
        x = x + self.attn(self.attn_norm(x), start_pos, freqs_cis, mask)
        return x + self.ffn(self.ffn_norm(x))


class Transformer:
    def __init__(self, args, W, dtype):
        self.embed = W["model.embed_tokens.weight"]
        self.layers = [Block(i, args, W, dtype) for i in range(args.n_layers)]
        self.norm = RMSNorm(W["model.norm.weight"], args.eps)
        self.head = W["lm_head.weight"]
        self.freqs_cis = precompute_freqs_cis(args)

    @torch.inference_mode()
    def forward(self, tokens, start_pos=0, all_logits=False):
        seqlen = tokens.size(1)
        h = F.embedding(tokens, self.embed)
        freqs_cis = self.freqs_cis[start_pos:start_pos + seqlen]
        mask = None
        if seqlen > 1:
            mask = torch.full((seqlen, seqlen), float("-inf")).triu_(1)
        for layer in self.layers:
            h = layer(h, start_pos, freqs_cis, mask)
        h = self.norm(h)
        if not all_logits:
            h = h[:, -1]
        return F.linear(h, self.head).float()


# --------------------------------------------------------------------- main --

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=1, help="threads of every pool (read before torch)")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--decode-prompt", type=int, default=64)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--check", help="dsmoe's logits (T, V) float32 .npy of the first T bench tokens")
    a = ap.parse_args()
    with open(os.path.join(a.model, "config.json")) as f:
        cfg = json.load(f)
    t0 = time.perf_counter()
    W = read_safetensors(os.path.join(a.model, "model.safetensors"))
    dtype = W["model.layers.0.self_attn.kv_b_proj.weight"].dtype
    max_seq = max(a.prompt, a.decode_prompt + a.decode, 1)
    check = np.load(a.check) if a.check else None
    if check is not None:
        max_seq = max(max_seq, check.shape[0])
    model = Transformer(ModelArgs(cfg, max_seq), W, dtype)
    load_s = time.perf_counter() - t0
    V = cfg["vocab_size"]
    base = {"impl": "torch", "threads": THREADS, "torch_threads": torch.get_num_threads(),
            "dtype": "bf16" if dtype == torch.bfloat16 else "f32", "torch_version": torch.__version__}
    print(json.dumps(dict(base, test="setup", load_seconds=load_s,
                          **{v: os.environ[v] for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                        "MKL_NUM_THREADS")})), flush=True)
    if check is not None:
        T = check.shape[0]
        toks = torch.tensor([bench_tokens(T, V)], dtype=torch.long)
        lg = model.forward(toks, 0, all_logits=True)[0].double().numpy()
        ref = check.astype(np.float64)
        err = float(np.max(np.abs(lg - ref)) / np.max(np.abs(ref)))
        agree = float(np.mean(np.argmax(lg, axis=1) == np.argmax(ref, axis=1)))
        print(json.dumps(dict(base, test="check", T=T, max_rel_diff=err, argmax_agree=agree,
                              finite=bool(np.all(np.isfinite(lg))))), flush=True)
    if a.prompt > 0:
        toks = torch.tensor([bench_tokens(a.prompt, V, seed=7)], dtype=torch.long)
        times = []
        for r in range(a.repeat + 1):
            t = time.perf_counter()
            model.forward(toks, 0)
            if r:
                times.append(time.perf_counter() - t)
        print(json.dumps(dict(base, test="prompt", T=a.prompt, seconds=min(times),
                              tokens_per_s=a.prompt / min(times), reps=len(times))), flush=True)
    if a.decode > 0:
        toks = bench_tokens(a.decode_prompt + a.decode, V, seed=11)
        times = []
        for r in range(a.repeat):
            model.forward(torch.tensor([toks[:a.decode_prompt]], dtype=torch.long), 0)
            t = time.perf_counter()
            for i in range(a.decode_prompt, a.decode_prompt + a.decode):
                model.forward(torch.tensor([[toks[i]]], dtype=torch.long), i)
            times.append(time.perf_counter() - t)
        print(json.dumps(dict(base, test="decode", prompt=a.decode_prompt, T=a.decode, seconds=min(times),
                              tokens_per_s=a.decode / min(times), reps=len(times))), flush=True)


if __name__ == "__main__":
    main()
