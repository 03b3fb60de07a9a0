#!/usr/bin/python3
"""gen_bench_model.py — writes the benchmark's model directory: a Hugging Face-style
DeepSeek-V3 directory (config.json with the DeepseekV3 keys, model.safetensors under the
Hugging Face tensor names) with the per-layer shapes of Moonlight / DeepSeek-V2-Lite and
deterministic random weights, reduced in depth and vocabulary to fit a small machine.

    gen_bench_model.py OUT_DIR [--dtype f32|bf16] [--layers 2] [--experts 64]
                       [--intermediate 5632] [--vocab 32000] [--seed 1]

Shapes (Moonlight's layer, DeepSeek-V2-Lite's attention): hidden 2048, 16 heads,
q_lora_rank null (a plain q_proj), kv_lora_rank 512, qk_nope 128, qk_rope 64, v_head 128;
layer 0 dense (SwiGLU of --intermediate), the others MoE: 64 routed experts of 1408,
top-6, 2 shared, Moonlight's routing (sigmoid, noaux_tc with one group, normalised
weights times 2.446); rope_theta 50000, no YaRN. Default depth 2 (one dense layer, one
MoE layer): 0.76 G parameters, 3.1 GB in fp32 and 1.5 GB in bf16; every MoE layer adds
0.57 G (2.3 GB fp32, 1.1 GB bf16).

Weights: element i of a tensor is drawn from N(0, 1) by a generator seeded with (seed,
index of the tensor in the table), then scaled: matrices by 1/sqrt(in) (o_proj and
down_proj by 0.5/sqrt(in), so the residual stream grows slowly), the embedding by 1,
norm weights are 1 + 0.05 N, the correction bias 0.02 N. The bf16 file holds the fp32
file's values rounded to nearest even, so both dtypes are the same model. The gate's
1/sqrt(D) rows give sigmoid scores spread over (0, 1): routing is not degenerate.

Written streaming (the header first, then each tensor as it is drawn, in chunks): the
memory stays at a few tens of MB whatever the model's size.
"""
import argparse
import json
import os
import struct
import sys

import numpy as np


def config(layers, experts, intermediate, vocab):
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu",
        "bos_token_id": 0, "eos_token_id": 1, "initializer_range": 0.02, "use_cache": True,
        "torch_dtype": "bfloat16", "aux_loss_alpha": 0.001, "seq_aux": True, "ep_size": 1,
        "hidden_size": 2048, "intermediate_size": intermediate, "moe_intermediate_size": 1408,
        "num_hidden_layers": layers, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": None,
        "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "n_routed_experts": experts, "n_shared_experts": 2, "num_experts_per_tok": 6,
        "n_group": 1, "topk_group": 1, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "norm_topk_prob": True, "routed_scaling_factor": 2.446,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 50000.0,
        "rope_scaling": None, "tie_word_embeddings": False, "vocab_size": vocab,
        "num_nextn_predict_layers": 0,
    }


def tensor_table(c):
    """[(name, shape)] in the order of include/dsmoe/model.h (q_lora_rank null, noaux_tc)."""
    D, H = c["hidden_size"], c["num_attention_heads"]
    n, r, v, kv = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    E, F, I = c["n_routed_experts"], c["moe_intermediate_size"], c["intermediate_size"]
    Fs = c["n_shared_experts"] * F
    t = [("model.embed_tokens.weight", (c["vocab_size"], D))]
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        t += [(p + "input_layernorm.weight", (D,)),
              (p + "self_attn.q_proj.weight", (H * (n + r), D)),
              (p + "self_attn.kv_a_proj_with_mqa.weight", (kv + r, D)),
              (p + "self_attn.kv_a_layernorm.weight", (kv,)),
              (p + "self_attn.kv_b_proj.weight", (H * (n + v), kv)),
              (p + "self_attn.o_proj.weight", (D, H * v)),
              (p + "post_attention_layernorm.weight", (D,))]
        if l < c["first_k_dense_replace"]:
            t += [(p + "mlp.gate_proj.weight", (I, D)), (p + "mlp.up_proj.weight", (I, D)),
                  (p + "mlp.down_proj.weight", (D, I))]
        else:
            t += [(p + "mlp.gate.weight", (E, D)), (p + "mlp.gate.e_score_correction_bias", (E,))]
            for e in range(E):
                t += [(p + f"mlp.experts.{e}.gate_proj.weight", (F, D)),
                      (p + f"mlp.experts.{e}.up_proj.weight", (F, D)),
                      (p + f"mlp.experts.{e}.down_proj.weight", (D, F))]
            t += [(p + "mlp.shared_experts.gate_proj.weight", (Fs, D)),
                  (p + "mlp.shared_experts.up_proj.weight", (Fs, D)),
                  (p + "mlp.shared_experts.down_proj.weight", (D, Fs))]
    t += [("model.norm.weight", (D,)), ("lm_head.weight", (c["vocab_size"], D))]
    return t


def affine(name, shape):
    """(scale, offset) applied to N(0, 1) draws for this tensor."""
    if name.endswith("e_score_correction_bias"):
        return 0.02, 0.0
    if len(shape) == 1:
        return 0.05, 1.0
    if "embed_tokens" in name:
        return 1.0, 0.0
    s = 1.0 / np.sqrt(shape[1])
    if "o_proj" in name or "down_proj" in name:
        s *= 0.5
    return s, 0.0


def to_bf16(x):
    """fp32 -> bf16 words (uint16), round to nearest even (the values are finite)."""
    u = x.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


CHUNK = 1 << 22  # elements drawn at a time (16 MB of fp32)


def write(out_dir, c, dtype, seed):
    table = tensor_table(c)
    esz = 4 if dtype == "f32" else 2
    header = {"__metadata__": {"format": "pt", "generator": "dsmoe bench/gen_bench_model.py"}}
    off = 0
    for name, shape in table:
        nb = int(np.prod(shape)) * esz
        header[name] = {"dtype": "F32" if dtype == "f32" else "BF16", "shape": list(shape),
                        "data_offsets": [off, off + nb]}
        off += nb
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    path = os.path.join(out_dir, "model.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for i, (name, shape) in enumerate(table):
            rng = np.random.default_rng([seed, i])
            scale, shift = affine(name, shape)
            left = int(np.prod(shape))
            while left > 0:
                k = min(left, CHUNK)
                x = rng.standard_normal(k, dtype=np.float32)
                x *= np.float32(scale)
                x += np.float32(shift)
                f.write((x.astype("<f4") if dtype == "f32" else to_bf16(x).astype("<u2")).tobytes())
                left -= k
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(dict(c, torch_dtype="float32" if dtype == "f32" else "bfloat16"), f, indent=2)
    return off, sum(int(np.prod(s)) for _, s in table)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", help="directory to write (created; must not hold a model)")
    ap.add_argument("--dtype", choices=("f32", "bf16"), default="bf16")
    ap.add_argument("--layers", type=int, default=2, help="num_hidden_layers (layer 0 dense)")
    ap.add_argument("--experts", type=int, default=64, help="n_routed_experts (>= 6)")
    ap.add_argument("--intermediate", type=int, default=5632, help="the dense layer's inner size")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    if a.layers < 1 or a.experts < 6 or a.intermediate < 1 or a.vocab < 2:
        ap.error("need --layers >= 1, --experts >= 6, --intermediate >= 1, --vocab >= 2")
    os.makedirs(a.out_dir, exist_ok=True)
    if os.path.exists(os.path.join(a.out_dir, "model.safetensors")):
        sys.exit("gen_bench_model: %s already holds model.safetensors" % a.out_dir)
    c = config(a.layers, a.experts, a.intermediate, a.vocab)
    nbytes, nparams = write(a.out_dir, c, a.dtype, a.seed)
    print("gen_bench_model: %s: %d layers, %.3f G parameters, %s, %.2f GB" % (
        a.out_dir, a.layers, nparams * 1e-9, a.dtype, nbytes * 1e-9), file=sys.stderr)


if __name__ == "__main__":
    main()
