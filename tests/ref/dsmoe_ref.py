"""dsmoe_ref.py — independent fp64 NumPy reference of the dsmoe router.

Written from the routing specification (SPEC-routing §2–§5), not from the C code:

    s_i  = sigmoid(u_i)  or  s = softmax(u)                  affinities
    c_i  = s_i + b_i                                        selection score (bias optional)
    group score = max_{i in g} c_i  or  sum of the m largest c_i in g      (if G > 1)
    keep the TG best groups; experts of dropped groups are
        'exclude': never chosen (the official code's -inf fill), or
        'zero'   : given c = 0.0 (Hugging Face's fill)
    idx  = the K best experts, ordered by descending c
    w_k  = s_{idx_k}                                        raw affinity, never the bias
    w_k /= (sum_j w_j + eps)    if normalize; a denominator exactly 0 gives 1/K each
    w_k *= scale

Selection at both stages is an explicit stable sort on (value descending, index
ascending): among equal values the lower group id, then the lower expert id, wins.
This is dsmoe's documented rule; torch.topk does NOT follow it (SPEC §5), so no torch
call is used for selection here.

fp32 underflow (SPEC §4): an fp32 sigmoid returns exactly 0 once exp(-u) overflows,
i.e. for u < -88.72283935546875; the reference models that (and only that) so that
the all-underflow fallback (uniform weights) is reproducible. Tests keep other
logits well inside the normal fp32 range of s.

Two precisions:
  * route_fp64()  — everything in float64 (the "fp32" precision of dsmoe is compared
    against it with tolerances);
  * route_bf16()  — bit-exact emulation of the official bf16 inference path (SPEC §3):
    logits rounded to bf16; s = bf16(fp32(sigmoid)); c = fp32(s) + fp32(b) in fp32;
    group scores and selection in fp32; sum = bf16(fp32 sequential sum of the selected
    s in selection order); q = bf16(fp32(s) / fp32(sum)); w = bf16(fp32(q * fp32(scale))).
    The scale stays fp32: torch's CUDA kernels (the official deployment) and current
    CPU kernels multiply a bf16 tensor by a Python float in fp32 ("opmath"). torch 1.13
    on CPU rounded the scalar to bf16 first; `torch113_cpu_scale=True` reproduces that
    for the cross-check (it matters only for scales that are not bf16 numbers, e.g.
    Moonlight's 2.446, which 1.13 applies as 2.4375).
    Without normalisation: w = bf16(fp32(s * fp32(scale))).
    Softmax: p = fp32 softmax of the bf16 logits, w = bf16(fp32(p * fp32(scale)))
    (the official code scales the fp32 probabilities, then casts). With normalize on
    (not an official combination) the same bf16 steps as sigmoid are applied to p.

The backward gives dL/dlogits from dL/dweights through the scale, the normalisation
and the sigmoid or softmax; the bias has no gradient and unselected experts get none
through the weights (for softmax every logit gets one through the Jacobian).

Run `python3 dsmoe_ref.py` for the built-in self-checks.
"""

import math
from dataclasses import dataclass, field, replace

import numpy as np

# exp(-u) overflows fp32 above 88.72283935546875, so an fp32 sigmoid is exactly 0 below.
SIGMOID_ZERO_BELOW = -88.72283935546875


# ------------------------------------------------------------------ config --

@dataclass
class RouterConfig:
    experts: int
    groups: int = 1
    topk_groups: int = 1
    top_k: int = 1
    score: str = "sigmoid"          # sigmoid | softmax
    group_score: str = "topsum"     # max | topsum
    group_topm: int = 2
    mask: str = "exclude"           # exclude | zero
    normalize: bool = True
    norm_eps: float = 0.0
    scale: float = 1.0
    use_bias: bool = False
    precision: str = "fp32"         # fp32 | bf16
    extra: dict = field(default_factory=dict)

    def validate(self):
        E, G, TG, K = self.experts, self.groups, self.topk_groups, self.top_k
        assert E >= 1 and G >= 1 and E % G == 0, "experts % groups"
        assert 1 <= TG <= G, "topk_groups"
        assert 1 <= K <= TG * (E // G), "top_k"
        assert self.score in ("sigmoid", "softmax")
        assert self.group_score in ("max", "topsum")
        assert self.group_score == "max" or 1 <= self.group_topm <= E // G, "group_topm"
        assert self.mask in ("exclude", "zero")
        assert self.precision in ("fp32", "bf16")
        assert f32(self.scale) > 0 and math.isfinite(f32(self.scale))
        assert f32(self.norm_eps) >= 0

    # The values the C library really uses are fp32.
    @property
    def scale32(self):
        return float(np.float32(self.scale))

    @property
    def eps32(self):
        return float(np.float32(self.norm_eps))


# Preset shapes (SPEC §1 and the table in include/dsmoe/router.h).
PRESETS = {
    "deepseek-v3": RouterConfig(256, 8, 4, 8, "sigmoid", "topsum", 2, "exclude", True, 0.0, 2.5, True),
    "deepseek-v2": RouterConfig(160, 8, 3, 6, "softmax", "max", 2, "exclude", False, 0.0, 16.0, False),
    "moonlight": RouterConfig(64, 1, 1, 6, "sigmoid", "topsum", 2, "exclude", True, 0.0, 2.446, True),
    "mixtral": RouterConfig(8, 1, 1, 2, "softmax", "max", 2, "exclude", True, 0.0, 1.0, False),
    "qwen-moe": RouterConfig(64, 1, 1, 8, "softmax", "max", 2, "exclude", True, 0.0, 1.0, False),
    "deepseek-v3-hf": RouterConfig(256, 8, 4, 8, "sigmoid", "topsum", 2, "zero", True, 1e-20, 2.5, True),
}


def preset(name, **changes):
    return replace(PRESETS[name], extra={}, **changes)


# ------------------------------------------------------------- fp helpers --

def f32(x):
    return np.float32(x)


def bf16(x):
    """Rounds float32 values to the nearest bf16 (ties to even); returns float32."""
    a = np.asarray(x, dtype=np.float32)
    flat = np.ascontiguousarray(a.reshape(-1))
    u = flat.view(np.uint32).astype(np.uint64)
    sh = np.uint64(16)
    r = ((u + np.uint64(0x7FFF) + ((u >> sh) & np.uint64(1))) >> sh).astype(np.uint32)
    out = (r << np.uint32(16)).view(np.float32)
    out = np.where(np.isnan(flat), np.float32(np.nan), out).astype(np.float32)
    return out.reshape(a.shape) if a.shape else np.float32(out[0])


def bf16_words(x):
    """bf16 bit patterns (uint16) of float32 values that are already bf16."""
    a = np.ascontiguousarray(x, dtype=np.float32)
    u = a.view(np.uint32)
    assert ((u & 0xFFFF) == 0).all(), "not bf16 values"
    return (u >> 16).astype(np.uint16)


def words_to_f32(w):
    return (np.asarray(w, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def sigmoid64(u):
    u = np.asarray(u, dtype=np.float64)
    with np.errstate(over="ignore"):
        s = 1.0 / (1.0 + np.exp(-u))
    return np.where(u < SIGMOID_ZERO_BELOW, 0.0, s)


def softmax64(u):
    u = np.asarray(u, dtype=np.float64)
    e = np.exp(u - u.max())
    return e / math.fsum(e)


def bf16_midpoint_distance(v):
    """Distance (in fp32 ulps of v) from v to the nearest point where bf16 rounding
    switches (a bf16 midpoint). Used to keep test data away from those points."""
    v = np.abs(np.asarray(v, dtype=np.float64))
    out = np.full(v.shape, np.inf)
    nz = v > 0
    e = np.floor(np.log2(v[nz]))
    spacing = 2.0 ** (e - 7)              # bf16 spacing in [2^e, 2^(e+1))
    ulp32 = 2.0 ** (e - 23)
    k = np.floor(v[nz] / spacing - 0.5)
    mids = (k + 0.5) * spacing
    d = np.minimum(np.abs(v[nz] - mids), np.abs(v[nz] - mids - spacing))
    out[nz] = d / ulp32
    return out


# --------------------------------------------------------------- selection --

def desc_order(values, ids=None):
    """Explicit stable sort: value descending, then index ascending."""
    if ids is None:
        ids = range(len(values))
    return sorted(ids, key=lambda i: (-float(values[i]), i))


@dataclass
class Selection:
    indices: list        # the K chosen experts, in order
    groups: list         # kept groups (sorted ids); all groups when G == 1
    sel_values: list     # selection value of every candidate in candidate order
    group_order: list    # groups by descending group score
    group_scores: list
    cand_order: list     # candidates by descending (masked) selection value
    cand_values: dict    # expert -> masked selection value


def group_scores_of(c, cfg, dtype):
    E, G = cfg.experts, cfg.groups
    n = E // G
    out = []
    for g in range(G):
        vals = [c[i] for i in range(g * n, (g + 1) * n)]
        if cfg.group_score == "max":
            out.append(max(vals))
        else:
            top = sorted(vals, key=lambda v: -float(v))[: cfg.group_topm]
            acc = dtype(0)
            for v in top:                 # largest first, sequential
                acc = dtype(acc + v)
            out.append(acc)
    return out


def select(c, cfg, dtype=np.float64):
    """Group-limited top-K on selection scores c (E) with dsmoe's tie rule."""
    E, G, TG, K = cfg.experts, cfg.groups, cfg.topk_groups, cfg.top_k
    c = [dtype(v) for v in c]
    n = E // G
    if G > 1:
        gs = group_scores_of(c, cfg, dtype)
        gorder = desc_order(gs)
        kept = sorted(gorder[:TG])
    else:
        gs, gorder, kept = [max(c)], [0], [0]
    keep = np.zeros(E, dtype=bool)
    for g in kept:
        keep[g * n:(g + 1) * n] = True
    if cfg.mask == "exclude":
        cand = {i: c[i] for i in range(E) if keep[i]}
    else:
        cand = {i: (c[i] if keep[i] else dtype(0.0)) for i in range(E)}
    corder = desc_order(cand, ids=list(cand.keys()))
    return Selection(corder[:K], kept, None, gorder, gs, corder, cand)


def selection_margin(sel, cfg):
    """Smallest relative gap that decides the outcome: group boundary (TG-th vs next),
    expert boundary (K-th vs next) and the order of the K chosen. Pairs of exactly
    masked 0.0 values (mask = zero) are exact in any precision and are skipped."""
    gaps = []
    # With a bias, c = s + b carries absolute errors of the order of ulp(|b|), so
    # gaps are measured relative to at least 1e-2; without one, purely relative.
    floor = 1e-2 if cfg.use_bias else 1e-300

    def rel(a, b):
        a, b = float(a), float(b)
        return abs(a - b) / max(abs(a), abs(b), floor)

    G, TG, K = cfg.groups, cfg.topk_groups, cfg.top_k
    if G > 1 and TG < G:
        a = sel.group_scores[sel.group_order[TG - 1]]
        b = sel.group_scores[sel.group_order[TG]]
        gaps.append(rel(a, b))
    order = sel.cand_order
    n_check = min(K + 1, len(order))
    ngroup = cfg.experts // cfg.groups
    for j in range(n_check - 1):
        i1, i2 = order[j], order[j + 1]
        if cfg.mask == "zero":
            m1 = (i1 // ngroup) not in sel.groups
            m2 = (i2 // ngroup) not in sel.groups
            if m1 and m2:
                continue
        gaps.append(rel(sel.cand_values[i1], sel.cand_values[i2]))
    return min(gaps) if gaps else math.inf


# ----------------------------------------------------------------- forward --

@dataclass
class TokenResult:
    indices: np.ndarray   # (K,) int
    weights: np.ndarray   # (K,) float64 (exact fp32 values in bf16 mode)
    scores: np.ndarray    # (E,) float64 affinities
    sel: Selection
    margin: float


def scores_fp64(u, cfg):
    return sigmoid64(u) if cfg.score == "sigmoid" else softmax64(u)


def weights_fp64(s_sel, cfg):
    K = len(s_sel)
    s_sel = np.asarray(s_sel, dtype=np.float64)
    if cfg.normalize:
        den = math.fsum(s_sel) + cfg.eps32
        q = np.full(K, 1.0 / K) if den == 0.0 else s_sel / den
    else:
        q = s_sel
    return q * cfg.scale32


def route_token_fp64(u, bias, cfg):
    s = scores_fp64(u, cfg)
    c = s + np.asarray(bias, dtype=np.float64) if cfg.use_bias else s
    sel = select(c, cfg, np.float64)
    idx = np.array(sel.indices, dtype=np.int64)
    w = weights_fp64(s[idx], cfg)
    return TokenResult(idx, w, s, sel, selection_margin(sel, cfg))


def sigmoid_bf16(ub):
    """bf16 sigmoid as torch computes it: fp32 sigmoid of the bf16 input, rounded."""
    return bf16(sigmoid64(ub).astype(np.float32))


def route_token_bf16(u, bias, cfg, torch113_cpu_scale=False):
    ub = bf16(np.asarray(u, dtype=np.float32))
    if cfg.score == "sigmoid":
        s = sigmoid_bf16(ub)                                  # bf16 values in fp32
    else:
        s = softmax64(ub).astype(np.float32)                  # fp32 probabilities
    c = (s + np.asarray(bias, dtype=np.float32)).astype(np.float32) if cfg.use_bias else s
    sel = select(c, cfg, np.float32)
    idx = np.array(sel.indices, dtype=np.int64)
    K = len(idx)
    scale_b = bf16(f32(cfg.scale)) if torch113_cpu_scale else f32(cfg.scale)
    s_sel = s[idx]
    if cfg.normalize:
        acc = f32(0.0)
        for v in s_sel:                                      # selection order
            acc = f32(acc + v)
        ssum = bf16(acc)
        den = f32(ssum + f32(cfg.norm_eps))
        if den == 0:
            q = np.full(K, bf16(f32(1.0) / f32(K)), dtype=np.float32)
        else:
            q = bf16((s_sel / den).astype(np.float32))
        w = bf16((q * scale_b).astype(np.float32))
    elif cfg.score == "sigmoid":
        w = bf16((s_sel * scale_b).astype(np.float32))
    else:
        w = bf16((s_sel * f32(cfg.scale)).astype(np.float32))
    return TokenResult(idx, w.astype(np.float64), s.astype(np.float64), sel,
                       selection_margin(sel, cfg))


def route_token(u, bias, cfg):
    if cfg.precision == "bf16":
        return route_token_bf16(u, bias, cfg)
    return route_token_fp64(u, bias, cfg)


def route(logits, bias, cfg):
    """Routes T tokens: returns indices (T,K) int32, weights (T,K) f64, scores (T,E) f64."""
    cfg.validate()
    logits = np.asarray(logits)
    T = logits.shape[0]
    idx = np.zeros((T, cfg.top_k), dtype=np.int32)
    w = np.zeros((T, cfg.top_k), dtype=np.float64)
    s = np.zeros((T, cfg.experts), dtype=np.float64)
    for t in range(T):
        r = route_token(logits[t], bias, cfg)
        idx[t], w[t], s[t] = r.indices, r.weights, r.scores
    return idx, w, s


# ---------------------------------------------------------------- backward --

def backward_token(s, idx, dw, cfg):
    """dL/du (E) for one token from dL/dw (K), affinities s (E) and the choice idx."""
    s = np.asarray(s, dtype=np.float64)
    idx = np.asarray(idx, dtype=np.int64)
    dw = np.asarray(dw, dtype=np.float64)
    E = s.shape[0]
    s_sel = s[idx]
    scale = cfg.scale32
    if cfg.normalize:
        den = math.fsum(s_sel) + cfg.eps32
        if den == 0.0:
            g_sel = np.zeros_like(dw)                # uniform fallback: constant
        else:
            g_sel = scale * (dw / den - float(np.dot(dw, s_sel)) / (den * den))
    else:
        g_sel = scale * dw
    g = np.zeros(E)
    g[idx] = g_sel
    if cfg.score == "sigmoid":
        return g * s * (1.0 - s)
    return s * (g - float(np.dot(g, s)))


def backward(scores, indices, dweights, cfg):
    T = scores.shape[0]
    out = np.zeros(scores.shape, dtype=np.float64)
    for t in range(T):
        out[t] = backward_token(scores[t], indices[t], dweights[t], cfg)
    return out


# ------------------------------------------------------------- self-checks --

def _selfcheck():
    # SPEC §5 boundary tie: [.9,.5,.5,.5,.1,.5,.2,.3], k = 2 -> {0, 1} under dsmoe's rule.
    cfg = RouterConfig(8, 1, 1, 2, use_bias=False)
    sel = select([.9, .5, .5, .5, .1, .5, .2, .3], cfg)
    assert sel.indices == [0, 1], sel.indices
    # All-equal V3 token: groups {0..3}, experts 0..7.
    v3 = preset("deepseek-v3")
    r = route_token_fp64(np.zeros(256), np.zeros(256), v3)
    assert r.sel.groups == [0, 1, 2, 3] and list(r.indices) == list(range(8))
    assert np.allclose(r.weights, 2.5 / 8)
    # Negative selection scores: exclude never picks a dropped group; zero does.
    c = np.array([-1.0, -1.0, -1.9, -1.9, -0.5, -1.8, -1.95, -1.95])
    cfg = RouterConfig(8, 2, 1, 2, group_score="topsum")
    assert select(c, cfg).indices == [0, 1]
    assert select(c, replace(cfg, mask="zero")).indices == [4, 5]
    # Underflow: every selected s == 0 -> uniform scale/K, zero gradient.
    r = route_token_fp64(np.full(16, -100.0), None, RouterConfig(16, 4, 2, 4, scale=2.5))
    assert np.all(r.weights == 2.5 / 4)
    assert not backward_token(r.scores, r.indices, np.ones(4), RouterConfig(16, 4, 2, 4)).any()
    # Gradient by central differences (fp64).
    rng = np.random.default_rng(0)
    for cfg in (RouterConfig(12, 3, 2, 3, norm_eps=0.05, scale=1.7),
                RouterConfig(12, 3, 2, 3, normalize=False),
                RouterConfig(12, 3, 2, 3, score="softmax", group_score="max"),
                RouterConfig(12, 3, 2, 3, score="softmax", normalize=False, scale=3.0)):
        u = rng.normal(size=12)
        dw = rng.normal(size=3)
        r = route_token_fp64(u, None, cfg)
        g = backward_token(r.scores, r.indices, dw, cfg)
        for i in range(12):
            h = 1e-6
            up, dn = u.copy(), u.copy()
            up[i] += h
            dn[i] -= h
            ru, rd = route_token_fp64(up, None, cfg), route_token_fp64(dn, None, cfg)
            assert list(ru.indices) == list(rd.indices) == list(r.indices)
            fd = (np.dot(dw, ru.weights) - np.dot(dw, rd.weights)) / (2 * h)
            assert abs(fd - g[i]) <= 1e-7 + 1e-6 * abs(g[i]), (cfg, i, fd, g[i])
    # bf16 helpers.
    assert bf16(np.float32(1.00390625)) == 1.0          # tie -> even
    assert bf16(np.float32(1.01171875)) == np.float32(1.015625)
    print("dsmoe_ref self-checks passed")


if __name__ == "__main__":
    _selfcheck()
