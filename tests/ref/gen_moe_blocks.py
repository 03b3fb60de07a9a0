#!/usr/bin/python3
"""gen_moe_blocks.py — golden cases of the MoE layer at T > 512 tokens, written by the
independent fp64 reference (moe_ref.py: NumPy forward, torch float64 autograd), so that
every blocked loop of the layer runs over several blocks against it: the routed experts'
row blocks of DSMOE_MOE_ROW_BLOCK = 256 (an expert with more than 512 rows, others with
fewer than 8, 8..16, 16..64 and 64..256, so that each kernel set takes both its
weight-streaming product and SGEMM), the shared expert's token blocks, the backward's
row-block phase and its token blocks of dx, the router's projection blocks of 512 tokens
and its fused blocks of 8 tokens (taken two at a time), and capacity drops.

Usage (Debian's interpreter, which has numpy and torch):
    /usr/bin/python3 tests/ref/gen_moe_blocks.py [--out DIR]

The files stay small because the inputs are not stored: x, dy and dlogits_extra are drawn
by splitmix64 (dsmoe_rng_seed / dsmoe_rng_next of include/dsmoe/core.h), which the C test
replays bit for bit:
    stream(kind, attempt, t) = dsmoe_rng_seed(seed · 2^40 + kind · 2^32 + attempt · 2^24 + t)
    u = (float)((next >> 40) · 2^-24) · 2 - 1                    exact in fp32, in [-1, 1)
    x[t][d]     = u of stream(0, x_attempt[t], t), d = 0..D-1
    dy[t][d]    = u of stream(1, 0, t)
    extra[t][e] = 0.25 · u of stream(2, 0, t)                   (dlogits_extra)
A token whose routing decision margin is below 1e-4 (relative) is redrawn with the next
attempt (x_attempt, I32 (T), is stored), so that fp32 and fp64 choose the same experts.

Each case <name>.safetensors holds the layer (model.layers.1.mlp.*, F32 or BF16) and
    x_attempt (T) I32                                          input (see above)
    y (T, D), weights (T, K), dx (T, D), grad.<tensor> F32     expected (fp64, rounded)
    indices (T, K), counts (E), kept (E) I32                   expected routing
    dx_noextra (T, D), grad_noextra.gate.weight F32            the same without extra
                                                               (where "noextra" = 1)
with __metadata__ as in moe_ref.py plus input_seed, train, weight_dtype, noextra.
MANIFEST.blocks lists the cases. Deterministic.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dsmoe_ref as R  # noqa: E402
import moe_ref as M  # noqa: E402

M64 = (1 << 64) - 1


# ------------------------------------------------------------ splitmix64 --

class Rng:
    """dsmoe_rng (splitmix64), seeded as dsmoe_rng_seed."""

    def __init__(self, seed):
        self.state = (seed * 0x2545F4914F6CDD1D + 7) & M64

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & M64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    def uniform_f32(self, n):
        return np.array([np.float32((self.next() >> 40) * 2.0 ** -24) * np.float32(2) -
                         np.float32(1) for _ in range(n)], dtype=np.float32)


def stream(seed, kind, attempt, t):
    assert 0 <= t < (1 << 24) and 0 <= attempt < 256 and 0 <= kind < 256
    return Rng((seed << 40) + (kind << 32) + (attempt << 24) + t)


def selfcheck_rng():
    # dsmoe_rng_seed(1) then dsmoe_rng_next, computed by hand from core.c's definition
    r = Rng(1)
    s = (1 * 0x2545F4914F6CDD1D + 7 + 0x9E3779B97F4A7C15) & M64
    z = ((s ^ (s >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    assert r.next() == z ^ (z >> 31)
    u = stream(3, 0, 0, 5).uniform_f32(1000)
    assert u.min() >= -1 and u.max() < 1 and abs(float(u.mean())) < 0.1


# ------------------------------------------------------------------- cases --

def case(name, D, F, n_shared, router, T, seed, bias, capacity_factor=0.0, train=True,
         weight_dtype="F32", noextra=False, description=""):
    c = M.MoECase(name, D, F, n_shared, router, T, capacity_factor=capacity_factor,
                  bias=bias, description=description)
    c.seed = seed
    c.train = train
    c.weight_dtype = weight_dtype
    c.noextra = noextra
    return c


RC = M.RC

CASES = [
    # 1400 assignments over 8 experts; the bias makes them uneven: expert 0 takes more
    # than 512 rows (3 row blocks), the others spread over every product path.
    case("blocks_t700_shared", 19, 11, 1,
         RC(8, 1, 1, 2, score="sigmoid", normalize=True, scale=2.5, use_bias=True),
         T=700, seed=11, noextra=True,
         bias=[0.5, 0.33, 0.24, 0.16, 0.07, 0.0, -0.06, -0.26],
         description="T=700, shared expert, routing skewed by the bias: row blocks, "
                     "token blocks, both product paths, with and without dlogits_extra"),
    # the fused group selection (2 groups of 16, top-2 sum, K = 2·TG: pairs of tokens),
    # the router's projection blocks of 512 tokens, and capacity drops: the capacity
    # ceil(4.5·1030·2/32) = 290 leaves the busiest expert 2 row blocks (256 + 34)
    case("blocks_t1030_cap", 13, 5, 0,
         RC(32, 2, 1, 2, score="sigmoid", group_score="topsum", group_topm=2,
            normalize=True, scale=1.5, use_bias=True),
         T=1030, seed=12, capacity_factor=4.5,
         bias=[0.6, 0.25, 0.18, 0.12, 0.08, 0.05, 0.02, 0.0,
               -0.02, -0.04, -0.06, -0.08, -0.1, -0.12, -0.14, -0.3,
               0.3, 0.1, 0.0, -0.05, -0.1, -0.15, -0.2, -0.25,
               -0.3, -0.35, -0.4, -0.45, -0.5, -0.55, -0.6, -0.7],
         description="T=1030, E=32 in 2 groups (fused selection), capacity 4.5: drops "
                     "and a 2-block expert, the router's 512-token projection blocks"),
    # bf16 weights (inference): the same values widened; SGEMM path widens 256 rows at a time
    case("blocks_t600_bf16", 23, 9, 2,
         RC(12, 4, 2, 3, score="sigmoid", group_score="topsum", group_topm=2,
            normalize=True, scale=2.5, use_bias=True),
         T=600, seed=13, train=False, weight_dtype="BF16",
         bias=[0.7, 0.3, 0.1, 0.2, 0.0, -0.1, 0.0, -0.12, -0.2, 0.1, -0.05, -0.4],
         description="T=600, bf16 weights, two shared experts, groups: forward only"),
]


def bf16_round(a):
    """fp32 -> bf16 (round to nearest even) -> fp32."""
    return R.bf16(a)


def make_inputs(c, p):
    cfg = c.router
    E = cfg.experts
    att = np.zeros(c.T, dtype=np.int32)
    x = np.zeros((c.T, c.D), dtype=np.float32)
    for t in range(c.T):
        x[t] = stream(c.seed, 0, 0, t).uniform_f32(c.D)
    bias = p.get("gate.e_score_correction_bias")
    bias = bias.astype(np.float64) if bias is not None else None
    Wg = p["gate.weight"].astype(np.float64)
    for t in range(c.T):
        while True:
            r = R.route_token_fp64(x[t].astype(np.float64) @ Wg.T, bias, cfg)
            if r.margin >= M.MARGIN:
                break
            att[t] += 1
            x[t] = stream(c.seed, 0, int(att[t]), t).uniform_f32(c.D)
    dy = np.stack([stream(c.seed, 1, 0, t).uniform_f32(c.D) for t in range(c.T)])
    extra = np.stack([stream(c.seed, 2, 0, t).uniform_f32(E) * np.float32(0.25)
                      for t in range(c.T)]).astype(np.float32)
    return x, att, dy, extra


def make_case(c):
    cfg = c.router
    cfg.validate()
    rng = np.random.default_rng(M.seed_of(c.name))
    p = M.make_params(c, rng)
    if c.weight_dtype == "BF16":
        p = {k: (bf16_round(v) if k != "gate.e_score_correction_bias" else v)
             for k, v in p.items()}
    x, att, dy, extra = make_inputs(c, p)
    y, idx, w, logits, keep = M.forward64(c, p, x)
    E, K = cfg.experts, cfg.top_k
    counts = np.bincount(idx.ravel(), minlength=E).astype(np.int32)
    kept = np.zeros(E, dtype=np.int32)
    for e, k_ in zip(idx.ravel(), keep.ravel()):
        kept[e] += int(k_)
    tensors = {}
    for k, v in p.items():
        if c.weight_dtype == "BF16" and k != "gate.e_score_correction_bias":
            tensors[M.PREFIX + k] = R.bf16_words(v)  # uint16 words
        else:
            tensors[M.PREFIX + k] = v
    f32 = np.float32
    tensors.update({"x_attempt": att, "y": y.astype(f32), "indices": idx,
                    "weights": w.astype(f32), "counts": counts, "kept": kept})
    if c.train:
        yt, dx, g = M.grads_torch(c, p, x, idx, keep, dy, extra)
        assert np.max(np.abs(yt - y)) <= 1e-12 * max(1.0, np.max(np.abs(y))), c.name
        tensors["dx"] = dx.astype(f32)
        for k, v in g.items():
            tensors["grad." + k] = v.astype(f32)
        if c.noextra:
            _, dx0, g0 = M.grads_torch(c, p, x, idx, keep, dy, np.zeros_like(extra))
            for k, v in g0.items():
                if k != "gate.weight":  # only the gate and dx see the extra gradient
                    assert np.allclose(v, g[k], rtol=1e-12, atol=1e-15), (c.name, k)
            tensors["dx_noextra"] = dx0.astype(f32)
            tensors["grad_noextra.gate.weight"] = g0["gate.weight"].astype(f32)
    meta = {
        "D": c.D, "F": c.F, "E": E, "K": K, "G": cfg.groups,
        "TG": cfg.topk_groups, "score": cfg.score, "group_score": cfg.group_score,
        "group_topm": cfg.group_topm, "mask": cfg.mask, "normalize": int(cfg.normalize),
        "norm_eps": repr(cfg.norm_eps), "scale": repr(cfg.scale),
        "use_bias": int(cfg.use_bias), "n_shared": c.n_shared,
        "capacity_factor": repr(c.capacity_factor), "T": c.T,
        "prefix": M.PREFIX, "description": c.description,
        "dropped": int((~keep).sum()), "input_seed": c.seed, "train": int(c.train),
        "weight_dtype": c.weight_dtype, "noextra": int(c.noextra),
        "redrawn": int((att > 0).sum()),
    }
    return tensors, meta, counts, kept


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "golden", "moe"))
    ap.add_argument("--only", default=None, help="one case name (for tuning)")
    args = ap.parse_args()
    selfcheck_rng()
    os.makedirs(args.out, exist_ok=True)
    names = []
    for c in CASES:
        if args.only and c.name != args.only:
            continue
        tensors, meta, counts, kept = make_case(c)
        # the row counts this case exists for
        B = 256
        k = sorted(kept.tolist())
        assert max(k) > 2 * B or c.capacity_factor > 0, (c.name, k)
        assert max(k) > B and any(0 < v <= 8 for v in k), (c.name, k)
        assert any(16 < v <= 64 for v in k) and any(64 < v <= B for v in k), (c.name, k)
        if c.capacity_factor > 0:
            assert meta["dropped"] > 0, c.name
        M.write_safetensors(os.path.join(args.out, c.name + ".safetensors"), tensors, meta)
        names.append(c.name)
        print(f"{c.name}: T={c.T} D={c.D} F={c.F} E={c.router.experts} K={c.router.top_k} "
              f"rows per expert {kept.tolist()} (assigned {counts.tolist()}) "
              f"dropped={meta['dropped']} redrawn={meta['redrawn']}")
    if not args.only:
        with open(os.path.join(args.out, "MANIFEST.blocks"), "w") as f:
            f.write("\n".join(names) + "\n")


if __name__ == "__main__":
    main()
