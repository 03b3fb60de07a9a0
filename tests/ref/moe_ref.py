#!/usr/bin/python3
"""moe_ref.py — independent fp64 reference of the DeepSeekMoE layer; writes the golden
cases under tests/golden/moe/.

Usage (Debian's interpreter, which has numpy and torch):
    /usr/bin/python3 tests/ref/moe_ref.py [--out DIR] [--check]

Written from SPEC-routing §2 step 9 and the DeepSeek-V3 report (eq. 12), not from the
C code:

    u      = x · Wgᵀ                                   gate logits (E)
    idx, w = route(u, b)                               dsmoe_ref.route_token_fp64 (fp64)
    E_e(x) = W2_e · (silu(W1g_e · x) ⊙ (W1u_e · x))    SwiGLU expert, silu(g) = g·σ(g)
    y      = Σ_k w_k · E_{idx_k}(x) + S(x)             S: the shared SwiGLU (N_s·F wide)

Capacity (dsmoe's documented drop policy, for studies): with a factor c > 0 each
expert keeps the first C = ceil(c·T·K/E) assignments in (token, k) order; a dropped
assignment adds nothing and its weight is not renormalised.

The forward is NumPy in float64 on the fp32 parameter values. The gradients come from
torch autograd in float64 (a second, independent formulation): the loss is
    L = Σ y ⊙ dy + Σ u ⊙ R
where R (T, E) plays the role of a balance loss's extra gradient on the logits; the
forward of the autograd graph is checked against the NumPy one.

Each case is one safetensors file <case>.safetensors holding
    model.layers.1.mlp.*    the layer in Hugging Face DeepseekV3 names, F32
    x (T, D) F32, dy (T, D) F32, dlogits_extra (T, E) F32      inputs
    y (T, D) F64, indices (T, K) I32, weights (T, K) F64,
    logits (T, E) F64, dx (T, D) F64, grad.<tensor name> F64   expected results
and __metadata__ with the config as strings: D F E K G TG score group_score group_topm
mask normalize norm_eps scale use_bias n_shared capacity_factor T (plus a description).
MANIFEST lists the case names. Tokens whose routing decision margin is below 1e-4
(relative) are redrawn, so fp32 and fp64 choose the same experts. Deterministic.
"""

import argparse
import json
import math
import os
import struct
import sys
import zlib
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dsmoe_ref as R  # noqa: E402

PREFIX = "model.layers.1.mlp."
MARGIN = 1e-4


@dataclass
class MoECase:
    name: str
    D: int
    F: int
    n_shared: int
    router: R.RouterConfig
    T: int
    capacity_factor: float = 0.0
    bias_scale: float = 0.05
    gate_gain: float = 2.0
    skew: list = field(default_factory=list)   # extra logit offset per expert (via x·Wg)
    bias: list = field(default_factory=list)   # fixed bias instead of a random one
    description: str = ""


def silu(g):
    return g / (1.0 + np.exp(-g))


# ------------------------------------------------------------------ params --

def tensor_names(case):
    E = case.router.experts
    names = ["gate.weight"]
    if case.router.use_bias:
        names.append("gate.e_score_correction_bias")
    for e in range(E):
        for p in ("gate_proj", "up_proj", "down_proj"):
            names.append(f"experts.{e}.{p}.weight")
    if case.n_shared:
        for p in ("gate_proj", "up_proj", "down_proj"):
            names.append(f"shared_experts.{p}.weight")
    return names


def make_params(case, rng):
    D, F, E, Fs = case.D, case.F, case.router.experts, case.n_shared * case.F

    def lin(o, i, gain=1.0):
        b = gain / math.sqrt(i)
        return rng.uniform(-b, b, size=(o, i)).astype(np.float32)

    p = {"gate.weight": lin(E, D, case.gate_gain)}
    if case.router.use_bias:
        b = rng.uniform(-1, 1, size=E) * case.bias_scale
        p["gate.e_score_correction_bias"] = np.array(case.bias if case.bias else b,
                                                     dtype=np.float32)
    for e in range(E):
        p[f"experts.{e}.gate_proj.weight"] = lin(F, D)
        p[f"experts.{e}.up_proj.weight"] = lin(F, D)
        p[f"experts.{e}.down_proj.weight"] = lin(D, F)
    if Fs:
        p["shared_experts.gate_proj.weight"] = lin(Fs, D)
        p["shared_experts.up_proj.weight"] = lin(Fs, D)
        p["shared_experts.down_proj.weight"] = lin(D, Fs)
    return p


# ----------------------------------------------------------------- forward --

def expert64(p, pre, x):
    g = x @ p[pre + "gate_proj.weight"].astype(np.float64).T
    u = x @ p[pre + "up_proj.weight"].astype(np.float64).T
    return (silu(g) * u) @ p[pre + "down_proj.weight"].astype(np.float64).T


def keep_mask(indices, E, capacity_factor):
    T, K = indices.shape
    keep = np.ones((T, K), dtype=bool)
    if capacity_factor > 0:
        cap = max(1, math.ceil(float(np.float32(capacity_factor)) * T * K / E))
        used = np.zeros(E, dtype=np.int64)
        for t in range(T):
            for k in range(K):
                e = indices[t, k]
                if used[e] < cap:
                    used[e] += 1
                else:
                    keep[t, k] = False
    return keep


def route_all(case, p, x):
    cfg = case.router
    logits = x.astype(np.float64) @ p["gate.weight"].astype(np.float64).T
    bias = p.get("gate.e_score_correction_bias")
    bias = bias.astype(np.float64) if bias is not None else None
    res = [R.route_token_fp64(logits[t], bias, cfg) for t in range(x.shape[0])]
    return logits, res


def forward64(case, p, x):
    """y (T, D), indices (T, K), weights (T, K), logits (T, E), keep (T, K)."""
    cfg = case.router
    x64 = x.astype(np.float64)
    logits, res = route_all(case, p, x)
    idx = np.array([r.indices for r in res], dtype=np.int32).reshape(-1, cfg.top_k)
    w = np.array([r.weights for r in res]).reshape(-1, cfg.top_k)
    keep = keep_mask(idx, cfg.experts, case.capacity_factor)
    y = np.zeros_like(x64)
    for t in range(x.shape[0]):
        for k in range(cfg.top_k):
            if keep[t, k]:
                y[t] += w[t, k] * expert64(p, f"experts.{idx[t, k]}.", x64[t:t + 1])[0]
    if case.n_shared:
        y += expert64(p, "shared_experts.", x64)
    return y, idx, w, logits, keep


# ---------------------------------------------------------------- backward --

def grads_torch(case, p, x, idx, keep, dy, extra):
    """Gradients of L = Σ y·dy + Σ u·extra by torch autograd in float64."""
    import torch
    cfg = case.router
    tp = {k: torch.tensor(v.astype(np.float64), requires_grad=(k != "gate.e_score_correction_bias"))
          for k, v in p.items()}
    tx = torch.tensor(x.astype(np.float64), requires_grad=True)
    u = tx @ tp["gate.weight"].T
    s = torch.sigmoid(u) if cfg.score == "sigmoid" else torch.softmax(u, dim=-1)
    ti = torch.tensor(idx.astype(np.int64))
    ws = torch.gather(s, 1, ti)
    if cfg.normalize:
        den = ws.sum(dim=-1, keepdim=True) + cfg.eps32
        ws = ws / den
    ws = ws * cfg.scale32
    ws = ws * torch.tensor(keep.astype(np.float64))
    y = torch.zeros_like(tx)

    def expert(pre, xx):
        g = xx @ tp[pre + "gate_proj.weight"].T
        uu = xx @ tp[pre + "up_proj.weight"].T
        return (torch.nn.functional.silu(g) * uu) @ tp[pre + "down_proj.weight"].T

    T, K = idx.shape
    rows = []
    for t in range(T):
        acc = torch.zeros(case.D, dtype=torch.float64)
        for k in range(K):
            if keep[t, k]:
                acc = acc + ws[t, k] * expert(f"experts.{idx[t, k]}.", tx[t])
        rows.append(acc)
    y = torch.stack(rows)
    if case.n_shared:
        y = y + expert("shared_experts.", tx)
    loss = (y * torch.tensor(dy.astype(np.float64))).sum() + \
        (u * torch.tensor(extra.astype(np.float64))).sum()
    loss.backward()
    g = {k: (v.grad.numpy() if v.grad is not None else np.zeros(v.shape))
         for k, v in tp.items() if v.requires_grad}
    return y.detach().numpy(), tx.grad.numpy(), g


# ------------------------------------------------------------- safetensors --

def write_safetensors(path, tensors, metadata):
    """Minimal safetensors writer (8-byte header length, JSON header, data); uint16 arrays
    are BF16 words."""
    codes = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64",
             np.dtype(np.int32): "I32", np.dtype(np.uint16): "BF16"}
    header = {"__metadata__": {k: str(v) for k, v in metadata.items()}}
    blobs, off = [], 0
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        b = a.astype(a.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": codes[a.dtype], "shape": list(a.shape),
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


# ------------------------------------------------------------------- cases --

def RC(E, G, TG, K, **kw):
    return R.RouterConfig(E, G, TG, K, **kw)


CASES = [
    MoECase("v3_groups", 20, 8, 1,
            RC(16, 4, 2, 4, score="sigmoid", group_score="topsum", group_topm=2,
               normalize=True, scale=2.5, use_bias=True), T=13,
            description="DeepSeek-V3 routing in miniature: 4 groups keep 2, top-2-sum, bias"),
    MoECase("moonlight", 24, 12, 2,
            RC(8, 1, 1, 3, score="sigmoid", normalize=True, scale=2.446, use_bias=True),
            T=9, description="Moonlight-like: one group, two shared experts"),
    MoECase("v2_softmax", 20, 10, 2,
            RC(12, 4, 2, 3, score="softmax", group_score="max", normalize=False, scale=16.0),
            T=7, description="DeepSeek-V2-like: softmax, group max, no normalisation, "
                             "scale 16, decode path (T <= 8)"),
    MoECase("odd_t1", 31, 7, 0,
            RC(6, 2, 1, 2, score="sigmoid", group_score="topsum", group_topm=2,
               normalize=True, scale=1.0, use_bias=True), T=1,
            description="odd sizes, one token, no shared expert"),
    MoECase("hf_zero_mask", 17, 5, 1,
            RC(8, 2, 1, 3, score="sigmoid", group_score="topsum", group_topm=2,
               mask="zero", normalize=True, norm_eps=1e-20, scale=2.5, use_bias=True),
            T=11, bias=[0.5, -0.9, -1.2, -1.5, 0.4, -1.0, -1.3, -1.4],
            description="Hugging Face 0.0 group mask with strongly negative biases"),
    MoECase("capacity", 16, 8, 1,
            RC(4, 1, 1, 2, score="sigmoid", normalize=True, scale=1.0, use_bias=True),
            T=12, capacity_factor=0.75, skew=[1.5, 1.0, 0.0, -1.0],
            description="capacity factor 0.75 with a skewed gate: later assignments dropped"),
    MoECase("decode_t8", 24, 12, 1,
            RC(8, 2, 2, 2, score="sigmoid", group_score="topsum", group_topm=2,
               normalize=True, scale=2.5, use_bias=True), T=8,
            description="eight tokens on the matrix-vector path"),
]


def seed_of(name):
    return zlib.crc32(("moe:" + name).encode()) & 0x7FFFFFFF


def make_case(case):
    cfg = case.router
    cfg.validate()
    rng = np.random.default_rng(seed_of(case.name))
    p = make_params(case, rng)
    x = rng.normal(size=(case.T, case.D)).astype(np.float32)
    if case.skew:
        # add a component along each expert's gate row so its logits shift by skew[e]
        Wg = p["gate.weight"].astype(np.float64)
        sh = np.linalg.lstsq(Wg, np.array(case.skew, dtype=np.float64), rcond=None)[0]
        x = (x + sh.astype(np.float32)).astype(np.float32)
    # redraw tokens whose decision margin is too small for fp32 vs fp64
    for _ in range(200):
        _, res = route_all(case, p, x)
        bad = [t for t, r in enumerate(res) if r.margin < MARGIN]
        if not bad:
            break
        for t in bad:
            x[t] = (x[t] + rng.normal(size=case.D) * 0.3).astype(np.float32)
    else:
        raise RuntimeError(f"{case.name}: could not avoid near-ties")
    y, idx, w, logits, keep = forward64(case, p, x)
    dy = rng.normal(size=(case.T, case.D)).astype(np.float32)
    extra = (rng.normal(size=(case.T, cfg.experts)) * 0.1).astype(np.float32)
    yt, dx, g = grads_torch(case, p, x, idx, keep, dy, extra)
    err = np.max(np.abs(yt - y)) if y.size else 0.0
    assert err <= 1e-12 * max(1.0, np.max(np.abs(y))), (case.name, err)
    if case.capacity_factor > 0:
        assert not keep.all(), f"{case.name}: nothing dropped"
    tensors = {PREFIX + k: v for k, v in p.items()}
    tensors.update({"x": x, "dy": dy, "dlogits_extra": extra, "y": y, "indices": idx,
                    "weights": w, "logits": logits, "dx": dx})
    for k, v in g.items():
        tensors["grad." + k] = v
    meta = {
        "D": case.D, "F": case.F, "E": cfg.experts, "K": cfg.top_k, "G": cfg.groups,
        "TG": cfg.topk_groups, "score": cfg.score, "group_score": cfg.group_score,
        "group_topm": cfg.group_topm, "mask": cfg.mask, "normalize": int(cfg.normalize),
        "norm_eps": repr(cfg.norm_eps), "scale": repr(cfg.scale),
        "use_bias": int(cfg.use_bias), "n_shared": case.n_shared,
        "capacity_factor": repr(case.capacity_factor), "T": case.T,
        "prefix": PREFIX, "description": case.description,
        "dropped": int((~keep).sum()),
    }
    if cfg.mask == "zero":
        _, res = route_all(case, p, x)
        n = cfg.experts // cfg.groups
        meta["masked_chosen"] = sum(1 for r in res for i in r.indices if i // n not in r.sel.groups)
        assert meta["masked_chosen"] > 0, f"{case.name}: the 0.0 mask never matters"
    return tensors, meta


def _selfcheck():
    """Finite differences of the NumPy forward against the torch gradients."""
    case = MoECase("fd", 6, 4, 1, RC(4, 2, 1, 2, use_bias=True, scale=1.5), T=3)
    rng = np.random.default_rng(1)
    p = make_params(case, rng)
    x = rng.normal(size=(3, 6)).astype(np.float32)
    y, idx, w, logits, keep = forward64(case, p, x)
    dy = rng.normal(size=y.shape)
    extra = rng.normal(size=(3, 4))
    _, dx, g = grads_torch(case, p, x, idx, keep, dy, extra)

    def loss(pp, xx):
        yy, ii, _, uu, _ = forward64(case, pp, xx)
        assert (ii == idx).all()
        return float((yy * dy).sum() + (uu * extra).sum())

    h = 1e-6
    x64 = x.astype(np.float64)
    for t in range(3):
        for d in range(6):
            a, b = x64.copy(), x64.copy()
            a[t, d] += h
            b[t, d] -= h
            fd = (loss(p, a) - loss(p, b)) / (2 * h)
            assert abs(fd - dx[t, d]) < 1e-6, (t, d, fd, dx[t, d])
    for name in ("gate.weight", "experts.1.up_proj.weight", "shared_experts.down_proj.weight"):
        arr = p[name].astype(np.float64)
        for j in range(min(arr.size, 8)):
            a, b = dict(p), dict(p)
            aa, bb = arr.copy(), arr.copy()
            aa.flat[j] += h
            bb.flat[j] -= h
            a[name], b[name] = aa, bb
            fd = (loss(a, x64) - loss(b, x64)) / (2 * h)
            assert abs(fd - g[name].flat[j]) < 1e-6, (name, j, fd, g[name].flat[j])
    print("moe_ref self-checks passed")


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "golden", "moe"))
    ap.add_argument("--check", action="store_true", help="only run the self-checks")
    args = ap.parse_args()
    _selfcheck()
    if args.check:
        return
    os.makedirs(args.out, exist_ok=True)
    names = []
    for case in CASES:
        tensors, meta = make_case(case)
        write_safetensors(os.path.join(args.out, case.name + ".safetensors"), tensors, meta)
        names.append(case.name)
        print(f"{case.name}: T={case.T} D={case.D} F={case.F} E={case.router.experts} "
              f"K={case.router.top_k} dropped={meta['dropped']} "
              f"masked_chosen={meta.get('masked_chosen', '-')}")
    with open(os.path.join(args.out, "MANIFEST"), "w") as f:
        f.write("\n".join(names) + "\n")
    write_cli_files(args.out)


def write_cli_files(out):
    """Inputs for tests/cli_layer.sh: the hidden states and expected experts of the
    v3_groups case as .npy, and two broken layer files (odd_t1's tensors with one
    tensor transposed, or stored as I32)."""
    case = next(c for c in CASES if c.name == "v3_groups")
    tensors, _ = make_case(case)
    np.save(os.path.join(out, "cli_x.npy"), tensors["x"])
    np.save(os.path.join(out, "cli_indices.npy"), tensors["indices"])
    small = next(c for c in CASES if c.name == "odd_t1")
    tensors, meta = make_case(small)
    layer = {k: v for k, v in tensors.items() if k.startswith(PREFIX)}
    bad = dict(layer)
    name = PREFIX + "experts.1.down_proj.weight"
    bad[name] = np.ascontiguousarray(layer[name].T)
    write_safetensors(os.path.join(out, "cli_bad_shape.safetensors"), bad, {"case": "odd_t1"})
    bad = dict(layer)
    name = PREFIX + "experts.2.up_proj.weight"
    bad[name] = layer[name].astype(np.int32)
    write_safetensors(os.path.join(out, "cli_bad_dtype.safetensors"), bad, {"case": "odd_t1"})


if __name__ == "__main__":
    main()
