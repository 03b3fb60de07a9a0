#!/usr/bin/python3
"""gen_model_golden.py — writes the tiny model directories under tests/golden/model/.

Usage (Debian's interpreter, which has numpy and torch):
    /usr/bin/python3 tests/ref/gen_model_golden.py [--out DIR]

Each case is a Hugging Face-style model directory <case>/ holding
    config.json                       the DeepseekV3 (or V2) keys
    model.safetensors                 or model-0000k-of-0000n.safetensors shards and
    model.safetensors.index.json      their weight_map
and the expected results of the independent fp64 reference (model_ref.py), computed on
the stored parameter values (widened exactly from F32 / BF16 / F16, or F8_E4M3 times the
block scale):
    tokens.npy   (T,) int32           the prompt
    logits.npy   (T, V) float64       logits at every position
    hidden.npy   (L+1, T, D) float64  the residual stream after the embedding and each layer
    attn0.npy    (T, D) float64       layer 0's attention output on its normalised input
    inv_freq.npy (r/2,) float64       RoPE frequencies (YaRN-interpolated when configured)
    mtp_logits.npy (Dm, T - Dm, V) float64  cases with stored MTP depths: depth k's logits
                                      (model_ref.forward_mtp) at positions 0 .. T - Dm - 1
fp8 cases also hold dequant.<tensor>.npy (float32): fp32(fp8 value) * fp32 scale, which
is exactly what an fp32 product gives, for the block-scale test.
Refusal fixtures (no results): fp8_noscale/ (a _scale_inv missing), fp8_badscale/ (a
_scale_inv of the wrong shape).

The cases (MANIFEST lists them, in order): v3_yarn_q, v2_glg_sharded, moonlight_freq,
fp8_blocks, v2lite_greedy, v3_dense_moe (drawn, T 9..16), then the twins, which hold
another case's weights laid out otherwise and have byte-identical tokens, logits and
hidden files: v2_glg_single (v2_glg_sharded's shards in one file), v3_yarn_q_nomtp
(v3_yarn_q without its stored MTP layer, num_nextn_predict_layers 0), fp8_blocks_f32
(fp8_blocks dequantized to F32, exactly: the block scales carry 16 significant bits, so
fp8 * scale fits fp32; no quantization_config), then v3_mtp2 (two MTP depths, BF16,
max_position_embeddings 256 for the MTP and speculative-decoding tests of
test_model_mtp.c, which check its logits too: it is not in the MANIFEST).

Routing decisions are kept away from ties: every routed token's decision margin (relative
gap at the group and expert boundaries, dsmoe_ref.selection_margin; the MTP depths' MoE
blocks included) must be >= 1e-4 or the
case is redrawn with the next seed, so fp32 and fp64 pick the same experts. On every case
the naive and absorbed attention forms agree, and decoding token by token from a cache of
latents and rope keys (model_ref.forward_decode) gives the full forward's logits, and so
does a second formulation in torch laid out as the official inference code
(model_torch.py: complex RoPE, einsum MLA naive and absorbed with caches fed whole, token by
token and in prompt chunks, the official gate), all to 1e-10 of the logits' scale; RoPE
frequencies agree to 1e-15. Deterministic: two runs write the same bytes.
"""

import argparse
import json
import math
import os
import shutil
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dsmoe_ref as R  # noqa: E402
import model_ref as M  # noqa: E402
import model_torch as MT  # noqa: E402

MARGIN = 1e-4


# ------------------------------------------------------------- safetensors --

def write_safetensors(path, tensors, metadata=None):
    """tensors: list of (name, dtype string, shape, bytes). Header padded to 8 bytes."""
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    off = 0
    for name, dt, shape, b in tensors:
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for _, _, _, b in tensors:
            f.write(b)
    return off


# ------------------------------------------------------------------- cases --

def base_config(**kw):
    c = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu",
        "bos_token_id": 0, "eos_token_id": 1, "initializer_range": 0.02, "use_cache": True,
        "torch_dtype": "float32", "aux_loss_alpha": 0.001, "seq_aux": True, "ep_size": 1,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "rope_scaling": None, "tie_word_embeddings": False, "moe_layer_freq": 1,
        "num_nextn_predict_layers": 0,
    }
    c.update(kw)
    return c


CASES = [
    # V3-like: q_lora_rank, YaRN, sigmoid / noaux_tc with groups, an MTP layer stored.
    dict(name="v3_yarn_q", storage="F32", shards=1, T=9, seed=11, config=base_config(
        hidden_size=23, intermediate_size=19, moe_intermediate_size=9, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=3, num_key_value_heads=3, q_lora_rank=13,
        kv_lora_rank=11, qk_nope_head_dim=5, qk_rope_head_dim=6, v_head_dim=7, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2, scoring_func="sigmoid",
        topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5, vocab_size=41,
        num_nextn_predict_layers=1,
        rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 4, "mscale": 1.0,
                      "mscale_all_dim": 1.0, "original_max_position_embeddings": 16,
                      "type": "yarn"})),
    # V2-like: plain q_proj, YaRN with mscale 0.707, softmax / group_limited_greedy,
    # unnormalised weights, BF16 in three shards.
    dict(name="v2_glg_sharded", storage="BF16", shards=3, T=10, seed=23, config=base_config(
        architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2",
        hidden_size=21, intermediate_size=17, moe_intermediate_size=5, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=None,
        kv_lora_rank=9, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=5, n_routed_experts=6,
        n_shared_experts=2, num_experts_per_tok=2, n_group=3, topk_group=2, scoring_func="softmax",
        topk_method="group_limited_greedy", norm_topk_prob=False, routed_scaling_factor=1.5,
        vocab_size=33,
        rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 8, "mscale": 0.707,
                      "mscale_all_dim": 0.707, "original_max_position_embeddings": 32,
                      "rope_type": "yarn"})),
    # Moonlight-like: no YaRN, theta 50000, one group, moe_layer_freq 2 (layers 2 MoE, 1
    # and 3 dense), no shared experts, tied embeddings, F16.
    dict(name="moonlight_freq", storage="F16", shards=1, T=11, seed=37, config=base_config(
        hidden_size=19, intermediate_size=15, moe_intermediate_size=6, num_hidden_layers=4,
        first_k_dense_replace=1, moe_layer_freq=2, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=None, kv_lora_rank=7, qk_nope_head_dim=3, qk_rope_head_dim=2, v_head_dim=3,
        n_routed_experts=5, n_shared_experts=None, num_experts_per_tok=2, n_group=1, topk_group=1,
        scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
        routed_scaling_factor=2.446, rms_norm_eps=1e-5, rope_theta=50000.0, vocab_size=29,
        tie_word_embeddings=True)),
    # DeepSeek-V3's fp8 storage: projections F8_E4M3 with 128x128 block scales (the dense
    # FFN of 130 has partial edge blocks), embedding, norms, gate and head BF16.
    dict(name="fp8_blocks", storage="F8", shards=1, T=9, seed=53, config=base_config(
        hidden_size=20, intermediate_size=130, moe_intermediate_size=6, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=12,
        kv_lora_rank=10, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, n_routed_experts=4,
        n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, scoring_func="sigmoid",
        topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5, vocab_size=31,
        quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                             "weight_block_size": [128, 128]})),
    # V2-Lite-like: plain q_proj, no YaRN, softmax / greedy (no groups), unnormalised
    # weights, two dense layers then three MoE layers, two shared experts, BF16.
    dict(name="v2lite_greedy", storage="BF16", shards=1, T=12, seed=71, config=base_config(
        architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2",
        hidden_size=27, intermediate_size=21, moe_intermediate_size=7, num_hidden_layers=5,
        first_k_dense_replace=2, num_attention_heads=3, num_key_value_heads=3, q_lora_rank=None,
        kv_lora_rank=9, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5, n_routed_experts=8,
        n_shared_experts=2, num_experts_per_tok=3, n_group=1, topk_group=1, scoring_func="softmax",
        topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0, vocab_size=37)),
    # V3-like, small: q_lora_rank, YaRN (rope_type spelling, factor 4, theta 500 and L0 200
    # so that the second pair's ramp is 1/2 and it turns visibly over 16 positions),
    # sigmoid / noaux_tc with 2 groups,
    # 2 dense then 2 MoE layers, n_shared_experts 0, five heads, tied embeddings, F16.
    dict(name="v3_dense_moe", storage="F16", shards=1, T=16, seed=89, config=base_config(
        hidden_size=17, intermediate_size=13, moe_intermediate_size=5, num_hidden_layers=4,
        first_k_dense_replace=2, num_attention_heads=5, num_key_value_heads=5, q_lora_rank=7,
        kv_lora_rank=5, qk_nope_head_dim=3, qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=6,
        n_shared_experts=0, num_experts_per_tok=2, n_group=2, topk_group=1, scoring_func="sigmoid",
        topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=1.8, vocab_size=53,
        tie_word_embeddings=True, rope_theta=500.0, max_position_embeddings=512,
        rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 4.0, "mscale": 1.0,
                      "mscale_all_dim": 1.0, "original_max_position_embeddings": 200,
                      "rope_type": "yarn"})),
    # Twins: another case's weights laid out differently; their logits must be the same
    # bytes. The same shards in one file; v3_yarn_q without its MTP layer; fp8_blocks
    # dequantized to F32 (exact: the block scales carry 16 significant bits, so
    # fp8 * scale fits fp32) under a config without quantization_config.
    dict(name="v2_glg_single", twin="v2_glg_sharded", shards=1),
    dict(name="v3_yarn_q_nomtp", twin="v3_yarn_q", drop_mtp=True),
    dict(name="fp8_blocks_f32", twin="fp8_blocks", dequant=True),
    # Two MTP depths (layers 2 and 3, both MoE), plain q_proj, no YaRN, BF16, room for
    # 256 positions.
    dict(name="v3_mtp2", mtp_only=True, storage="BF16", shards=1, T=12, seed=101, config=base_config(
        hidden_size=24, intermediate_size=20, moe_intermediate_size=8, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=None,
        kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, n_routed_experts=6,
        n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, scoring_func="sigmoid",
        topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5, vocab_size=47,
        num_nextn_predict_layers=2, max_position_embeddings=256)),
]


def is_fp8_weight(name, shape):
    """DeepSeek-V3 stores the attention and FFN projections in fp8; the embedding,
    norms, router gate and head stay BF16."""
    if len(shape) != 2 or "embed_tokens" in name or "lm_head" in name or "mlp.gate.weight" in name:
        return False
    if "shared_head" in name or "eh_proj" in name:
        return False
    return True


def make_weights(cfg, table, rng):
    W = {}
    for name, shape in table:
        if name.endswith("e_score_correction_bias"):
            W[name] = rng.uniform(-0.05, 0.05, size=shape)
        elif len(shape) == 1:
            W[name] = 1.0 + 0.1 * rng.normal(size=shape)
        elif "embed_tokens" in name:
            W[name] = rng.normal(size=shape)
        else:
            gain = 2.0 if name.endswith("mlp.gate.weight") else 1.0
            b = gain / math.sqrt(shape[1])
            W[name] = rng.uniform(-b, b, size=shape)
    return W


def store(case, cfg, table, W, rng):
    """Rounds W to its storage; returns (stored tensors list, exact fp64 values)."""
    out, exact = [], {}
    for name, shape in table:
        x = np.asarray(W[name], dtype=np.float64)
        st = case["storage"]
        if st == "F8" and is_fp8_weight(name, shape):
            br, bc = cfg.block
            nb = (-(-shape[0] // br), -(-shape[1] // bc))
            # Codes with |value| in [2^-4, 2^3] (no NaN codes), block scales ~ b / 8.
            e = rng.integers(3, 11, size=shape)
            m = rng.integers(0, 8, size=shape)
            sgn = rng.integers(0, 2, size=shape)
            codes = ((sgn << 7) | (e << 3) | m).astype(np.uint8)
            b = 1.0 / math.sqrt(shape[1])
            scale = rng.uniform(0.05, 0.15, size=nb).astype(np.float32) * np.float32(b)
            fr, ex = np.frexp(scale.astype(np.float64))          # 16 significant bits
            scale = np.ldexp(np.round(fr * 2.0 ** 16) / 2.0 ** 16, ex).astype(np.float32)
            deq = M.fp8_dequant(codes, scale, cfg.block)
            exact[name] = deq
            out.append((name, "F8_E4M3", shape, codes.tobytes()))
            out.append((name + "_scale_inv", "F32", nb, scale.astype("<f4").tobytes()))
            continue
        if st in ("BF16", "F8"):
            v = R.bf16(x.astype(np.float32))
            out.append((name, "BF16", shape, R.bf16_words(v).astype("<u2").tobytes()))
            exact[name] = v.astype(np.float64)
        elif st == "F16":
            v = x.astype(np.float16)
            out.append((name, "F16", shape, v.astype("<f2").tobytes()))
            exact[name] = v.astype(np.float64)
        else:
            v = x.astype(np.float32)
            out.append((name, "F32", shape, v.astype("<f4").tobytes()))
            exact[name] = v.astype(np.float64)
    return out, exact


def write_dir(path, case, tensors):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(case["config"], f, indent=2, sort_keys=True)
        f.write("\n")
    n = case["shards"]
    if n == 1:
        write_safetensors(os.path.join(path, "model.safetensors"), tensors, {"format": "pt"})
        return
    # Shards by position in the table (so a layer may straddle two files).
    per = -(-len(tensors) // n)
    wm, total = {}, 0
    for k in range(n):
        fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        part = tensors[k * per:(k + 1) * per]
        total += write_safetensors(os.path.join(path, fname), part, {"format": "pt"})
        for t in part:
            wm[t[0]] = fname
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(wm.items()))},
                  f, indent=2)
        f.write("\n")


def draw(case):
    """Draws the weights and tokens of a case until routing keeps its margins; returns
    (cfg, tensors as stored, their exact fp64 values, tokens, margins)."""
    cfg = M.Config(case["config"])
    table = M.tensor_table(cfg, cfg.mtp)
    for attempt in range(50):
        rng = np.random.default_rng(case["seed"] + 1000 * attempt)
        W = make_weights(cfg, table, rng)
        tensors, exact = store(case, cfg, table, W, rng)
        tokens = rng.integers(0, cfg.V, size=case["T"]).astype(np.int32)
        margins = []
        M.forward(cfg, exact, tokens, margins=margins)
        if cfg.mtp:
            M.forward_mtp(cfg, exact, tokens, margins=margins)
        if not margins or min(margins) >= MARGIN:
            return cfg, tensors, exact, tokens, margins
    raise RuntimeError(f"{case['name']}: no draw with routing margins >= {MARGIN}")


def make_twin(case, base):
    """The case's files from its base case's weights: (case with config, tensors)."""
    bcase, bcfg, btensors, exact = base["case"], base["cfg"], base["tensors"], base["exact"]
    tw = dict(bcase, name=case["name"], shards=case.get("shards", bcase["shards"]),
              config=json.loads(json.dumps(bcase["config"])))
    tensors = btensors
    if case.get("drop_mtp"):
        assert bcfg.mtp > 0
        tw["config"]["num_nextn_predict_layers"] = 0
        mtp = tuple(f"model.layers.{l}." for l in range(bcfg.L, bcfg.L + bcfg.mtp))
        tensors = [t for t in btensors if not t[0].startswith(mtp)]
        assert len(tensors) < len(btensors)
    if case.get("dequant"):
        del tw["config"]["quantization_config"]
        tw["storage"] = "F32"
        tensors = []
        for name, shape in M.tensor_table(bcfg, bcfg.mtp):
            v32 = exact[name].astype(np.float32)
            assert np.array_equal(v32.astype(np.float64), exact[name]), name   # exact in fp32
            tensors.append((name, "F32", shape, v32.astype("<f4").tobytes()))
    return tw, tensors


def gen_case(case, root, done):
    twin_of = case.get("twin")
    if twin_of:
        base = done[twin_of]
        case, tensors = make_twin(case, base)
        cfg, exact, tokens, margins = M.Config(case["config"]), base["exact"], base["tokens"], base["margins"]
    else:
        cfg, tensors, exact, tokens, margins = draw(case)
    mtp = cfg.mtp
    trace = {}
    logits = M.forward(cfg, exact, tokens, trace=trace)
    absorbed = M.forward(cfg, exact, tokens, absorbed=True)
    scale = max(1.0, np.max(np.abs(logits)))
    err = np.max(np.abs(absorbed - logits)) / scale
    assert err < 1e-10, (case["name"], "naive against absorbed", err)
    # Token by token with the cache of latents and rope keys: the full forward's logits.
    decoded = M.forward_decode(cfg, exact, tokens)
    derr = np.max(np.abs(decoded - logits)) / scale
    assert derr < 1e-10, (case["name"], "decode against full forward", derr)
    # The second formulation (torch, the official code's layout): RoPE frequencies, and the
    # logits with both attention forms, whole and fed in chunks through the caches.
    T = len(tokens)
    assert np.max(np.abs(MT.inv_freq(cfg) - M.rope_inv_freq(cfg))) <= 1e-15, case["name"]
    terr = 0.0
    for impl, chunks in (("naive", None), ("absorb", None), ("absorb", [1] * T),
                         ("naive", [5] + [1] * (T - 5)), ("absorb", [4, 3] + [1] * (T - 7))):
        e = np.max(np.abs(MT.logits(cfg, exact, tokens, impl, chunks) - logits)) / scale
        assert e < 1e-10, (case["name"], "torch formulation", impl, chunks, e)
        terr = max(terr, e)
    path = os.path.join(root, case["name"])
    shutil.rmtree(path, ignore_errors=True)
    write_dir(path, case, tensors)
    np.save(os.path.join(path, "tokens.npy"), tokens)
    np.save(os.path.join(path, "logits.npy"), logits)
    np.save(os.path.join(path, "hidden.npy"), trace["hidden"])
    np.save(os.path.join(path, "attn0.npy"), trace["attn0"])
    np.save(os.path.join(path, "inv_freq.npy"), M.rope_inv_freq(cfg))
    if mtp:
        ml = M.forward_mtp(cfg, exact, tokens)
        np.save(os.path.join(path, "mtp_logits.npy"), np.stack([x[:T - mtp] for x in ml]))
    if case["storage"] == "F8":
        for name in ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight",
                     "model.layers.1.self_attn.kv_b_proj.weight"):
            codes = next(np.frombuffer(t[3], dtype=np.uint8).reshape(t[2]) for t in tensors
                         if t[0] == name)
            scale = next(np.frombuffer(t[3], dtype="<f4").reshape(t[2]) for t in tensors
                         if t[0] == name + "_scale_inv")
            br, bc = cfg.block
            s = np.repeat(np.repeat(scale, br, 0), bc, 1)[:codes.shape[0], :codes.shape[1]]
            deq32 = M.fp8_e4m3_decode(codes).astype(np.float32) * s.astype(np.float32)
            np.save(os.path.join(path, f"dequant.{name}.npy"), deq32.astype(np.float32))
        gen_fp8_refusals(case, root, tensors)
    done[case["name"]] = dict(case=case, cfg=cfg, tensors=tensors, exact=exact, tokens=tokens,
                              margins=margins, logits=logits)
    if twin_of:
        # The same weights laid out otherwise: the same logits, to the bit.
        assert np.array_equal(logits, done[twin_of]["logits"]), case["name"]
    margin = min(margins) if margins else math.inf
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    print(f"{case['name']}: T={len(tokens)} V={cfg.V} layers={cfg.L} mtp={mtp} "
          f"min margin {margin:.3g}, |logits| max {np.max(np.abs(logits)):.3g}, "
          f"naive-absorbed {err:.2g}, decode-full {derr:.2g}, torch {terr:.2g}, {size} bytes")


def gen_fp8_refusals(case, root, tensors):
    victim = "model.layers.0.self_attn.q_b_proj.weight_scale_inv"
    # A scale tensor missing.
    path = os.path.join(root, "fp8_noscale")
    shutil.rmtree(path, ignore_errors=True)
    write_dir(path, case, [t for t in tensors if t[0] != victim])
    # A scale tensor of the wrong shape (one block column too many).
    path = os.path.join(root, "fp8_badscale")
    shutil.rmtree(path, ignore_errors=True)
    bad = []
    for t in tensors:
        if t[0] == victim:
            shape = (t[2][0], t[2][1] + 1)
            t = (t[0], "F32", shape, np.ones(shape, dtype="<f4").tobytes())
        bad.append(t)
    write_dir(path, case, bad)


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "golden", "model"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    done = {}
    for case in CASES:
        gen_case(case, a.out, done)
    with open(os.path.join(a.out, "MANIFEST"), "w") as f:
        for case in CASES:
            if not case.get("mtp_only"):
                f.write(case["name"] + "\n")


if __name__ == "__main__":
    main()
