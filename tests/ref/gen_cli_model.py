#!/usr/bin/python3
"""gen_cli_model.py — writes the tiny byte-vocabulary model that the CLI tests and the
README run `dsmoe info / eval / generate` on: tests/golden/model_cli/bytes_tiny/.

Usage (Debian's interpreter, which has numpy):
    /usr/bin/python3 tests/ref/gen_cli_model.py [--out DIR]

The model: dsmoe's byte vocabulary (config.json "dsmoe_vocab": "bytes"; ids 0..255 the
bytes, 256 BOS, 257 EOS, 258 and 259 spare), D 32, two layers (a dense SwiGLU layer, then
a MoE layer of 4 routed experts in 2 groups, top-2, one shared expert, sigmoid/noaux_tc),
MLA with q_lora_rank, F32 weights, 64 positions. Its weights are random (as in
gen_model_golden.make_weights) except that the head row of every byte b >= 1 is the
embedding of b - 1, and EOS's row is the embedding of 'z', with the layers' output
projections scaled down: the model mostly predicts the next byte value ("abc" ->
"defg...z", then EOS), so generated text is readable and losses differ clearly between
text it predicts and text it does not.

Expected results of the independent fp64 reference (model_ref.py) on the stored values:
    tokens.npy        (13,) int32        a token sequence (BOS, bytes, specials)
    logits.npy        (13, 260) float64  its logits at every position
    tokens_batch.npy  (2, 9) int32       two sequences, each from position 0
    logits_batch.npy  (2, 9, 260) float64
    text.txt                             a short text file (ASCII, 150 bytes)
    expected.txt      lines "key value": loss_<C> (mean next-byte cross-entropy in nats
                      over text.txt, BOS first, windows of at most C positions, for C =
                      64 (the default, max_position_embeddings) and 16), bits_<C>,
                      ppl_<C>, greedy_prompt, greedy_ids (the greedy continuation of
                      BOS + greedy_prompt, up to 40 tokens or EOS, EOS included)
    greedy.txt        the bytes of that continuation (what `generate` prints)
Every routing decision is kept away from ties (margin >= 1e-4) and every greedy choice
has a gap of at least 1e-3 between its two best logits, or the weights are redrawn with
the next seed, so fp32 makes the same choices as fp64. Deterministic.
"""

import argparse
import json
import math
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_model_golden as G  # noqa: E402
import model_ref as M  # noqa: E402

V, BOS, EOS = 260, 256, 257
MARGIN = 1e-4
GREEDY_GAP = 1e-3
TEXT = (b"abcdefghijklmnopqrstuvwxyz abcdefghij\n"
        b"The quick brown fox jumps over the lazy dog; 0123456789.\n"
        b"stuvwxyz klmnop {[(<>)]} ~!@#$%^&*_+=|?,./ done abcdef.\n")
PROMPT = b"abc"
GREEDY_MAX = 40
CONTEXTS = (64, 16)

CONFIG = G.base_config(
    hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
    first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16,
    kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
    n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, scoring_func="sigmoid",
    topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.0, vocab_size=V,
    max_position_embeddings=64, bos_token_id=BOS, eos_token_id=EOS, dsmoe_vocab="bytes")


def make(cfg, table, seed):
    rng = np.random.default_rng(seed)
    W = G.make_weights(cfg, table, rng)
    E = W["model.embed_tokens.weight"]
    head = rng.normal(size=(V, cfg.D)) * 0.3
    for b in range(1, 256):
        head[b] = E[b - 1] / math.sqrt(cfg.D)
    head[EOS] = E[ord("z")] / math.sqrt(cfg.D)
    head[ord("{")] = rng.normal(size=cfg.D) * 0.3  # after 'z' comes EOS, not '{'
    W["lm_head.weight"] = head
    for name in W:
        if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
            W[name] = W[name] * 0.25
    case = dict(storage="F32")
    tensors, exact = G.store(case, cfg, table, W, rng)
    return rng, tensors, exact


def text_loss(cfg, W, text, C, margins):
    """Mean cross-entropy (nats) of every byte of text, BOS first, in windows of at
    most C positions: window i runs tokens [iC, iC + C) and predicts [iC + 1, iC + C]."""
    toks = np.array([BOS] + list(text), dtype=np.int64)
    total, n = 0.0, 0
    for s in range(0, len(toks) - 1, C):
        inp = toks[s:s + C]
        tgt = toks[s + 1:s + C + 1]
        lg = M.forward(cfg, W, inp[:len(tgt)], margins=margins)
        m = lg.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(lg - m).sum(axis=1)))
        total += float(np.sum(lse - lg[np.arange(len(tgt)), tgt]))
        n += len(tgt)
    assert n == len(text)
    return total / n


def greedy(cfg, W, prompt, margins, gaps):
    toks = [BOS] + list(prompt)
    out = []
    for _ in range(GREEDY_MAX):
        lg = M.forward(cfg, W, np.array(toks), margins=margins)[-1]
        srt = np.sort(lg)
        gaps.append(srt[-1] - srt[-2])
        t = int(np.argmax(lg))
        out.append(t)
        toks.append(t)
        if t == EOS or len(toks) >= cfg.raw["max_position_embeddings"]:
            break
    return out


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "golden", "model_cli", "bytes_tiny"))
    a = ap.parse_args()
    cfg = M.Config(CONFIG)
    table = M.tensor_table(cfg)
    for attempt in range(50):
        seed = 2024 + 1000 * attempt
        rng, tensors, W = make(cfg, table, seed)
        tokens = np.array([BOS, 72, 101, 108, 108, 111, 44, 32, 258, 122, 0, 255, EOS], dtype=np.int32)
        batch = rng.integers(0, V, size=(2, 9)).astype(np.int32)
        batch[:, 0] = BOS
        margins, gaps = [], []
        logits = M.forward(cfg, W, tokens, margins=margins)
        lb = np.stack([M.forward(cfg, W, b, margins=margins) for b in batch])
        losses = {C: text_loss(cfg, W, TEXT, C, margins) for C in CONTEXTS}
        cont = greedy(cfg, W, PROMPT, margins, gaps)
        if min(margins) >= MARGIN and min(gaps) >= GREEDY_GAP:
            break
    else:
        raise RuntimeError("no draw with routing margins and greedy gaps large enough")
    absorbed = M.forward(cfg, W, tokens, absorbed=True)
    assert np.max(np.abs(absorbed - logits)) < 1e-10 * max(1.0, np.max(np.abs(logits)))

    path = os.path.abspath(a.out)
    shutil.rmtree(path, ignore_errors=True)
    G.write_dir(path, dict(config=CONFIG, shards=1), tensors)
    np.save(os.path.join(path, "tokens.npy"), tokens)
    np.save(os.path.join(path, "logits.npy"), logits)
    np.save(os.path.join(path, "tokens_batch.npy"), batch)
    np.save(os.path.join(path, "logits_batch.npy"), lb)
    with open(os.path.join(path, "text.txt"), "wb") as f:
        f.write(TEXT)
    with open(os.path.join(path, "greedy.txt"), "wb") as f:
        f.write(bytes(t for t in cont if t < 256))
    with open(os.path.join(path, "expected.txt"), "w") as f:
        for C in CONTEXTS:
            f.write(f"loss_{C} {losses[C]:.10f}\n")
            f.write(f"bits_{C} {losses[C] / math.log(2):.10f}\n")
            f.write(f"ppl_{C} {math.exp(losses[C]):.10f}\n")
        f.write(f"greedy_prompt {PROMPT.decode()}\n")
        f.write("greedy_ids " + " ".join(str(t) for t in cont) + "\n")
    print(f"bytes_tiny: seed {seed}, min routing margin {min(margins):.3g}, min greedy gap "
          f"{min(gaps):.3g}, loss {losses[64]:.4f} / {losses[16]:.4f} nats, greedy "
          f"{bytes(t for t in cont if t < 256)!r} ({len(cont)} tokens)")


if __name__ == "__main__":
    main()
