#!/usr/bin/python3
"""gen_router_golden.py — writes the router golden cases under tests/golden/router/.

Usage (Debian's interpreter, which has numpy and torch):
    /usr/bin/python3 tests/ref/gen_router_golden.py [--out DIR] [--skip-torch-check]

Each case is a folder <case>/ with
    config.txt        `key = value` lines: experts, groups, topk_groups, top_k,
                      score (sigmoid|softmax), group_score (max|topsum), group_topm,
                      mask (exclude|zero), normalize (0|1), norm_eps, scale, use_bias (0|1),
                      precision (fp32|bf16), input (logits|hidden), hidden_dim,
                      gate_dtype (f32|bf16); optional preset and description
    logits.npy        (T, E) <f4                       input = logits
    hidden.npy        (T, D) <f4                       input = hidden
    gate_weight.npy   (E, D) <f4, or <u2 bf16 words    input = hidden
    proj_logits.npy   (T, E) <f8 projected logits       input = hidden
    bias.npy          (E) <f4                          use_bias = 1
    indices.npy       (T, K) <i4 expected experts, descending selection score,
                      ties lower index first
    weights.npy       (T, K) <f8 expected weights (bf16 precision: the exact values)
    scores.npy        (T, E) <f8 affinities s
    dweights.npy      (T, K) <f4 upstream gradient
    dlogits.npy       (T, E) <f8 expected dL/dlogits, differentiated exactly (fp64) at
                      the fp32-rounded scores.npy and indices.npy, which is what a backward
                      call receives from an fp32 forward
and MANIFEST lists the case folders, one per line.

Random cases resample any token whose decision margin (group boundary, expert
boundary, order of the chosen experts) is below 1e-4 relative, so that fp32 versus
fp64 cannot flip a choice; bf16 cases instead keep every value away from bf16
rounding midpoints so the emulation is exact for any faithful fp32 sigmoid/softmax.
Hand-built edge cases keep their ties on purpose (SPEC §4–§5). Seeds are fixed and
the output is deterministic.

Before writing, the bf16 emulation is cross-checked against real torch bf16 ops
(the official Gate.forward sequence) on random tokens and on every bf16 logit.
"""

import argparse
import os
import shutil
import sys
import zlib
from dataclasses import replace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dsmoe_ref as R  # noqa: E402

RouterConfig = R.RouterConfig
MARGIN = 1e-4          # minimum relative decision gap for random fp32 cases
BF16_SIG_ULPS = 8      # sigmoid values kept this many fp32 ulps from bf16 midpoints
BF16_W_ULPS = 64       # softmax weights likewise (fp32 softmax is less exact)


def seed_of(name):
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


# --------------------------------------------------------- fp32 emulation --

def select_fp32_emulated(u, bias, cfg):
    """Selection with fp32 scores and fp32 selection arithmetic, to confirm that
    every fp32-precision case decides the same way as the fp64 reference."""
    s = R.scores_fp64(u, cfg).astype(np.float32)
    c = (s + np.asarray(bias, dtype=np.float32)).astype(np.float32) if cfg.use_bias else s
    return R.select(c, cfg, np.float32).indices


# ------------------------------------------------------------- case model --

class Case:
    def __init__(self, name, cfg, description, preset=None):
        self.name, self.cfg, self.description, self.preset = name, cfg, description, preset
        self.input = "logits"
        self.D = 0
        self.gate_dtype = "f32"
        self.logits = None        # (T, E) fp32 as given to the router (logits input)
        self.hidden = None        # (T, D) fp32
        self.gate = None          # (E, D) fp32 values (bf16-exact when gate_dtype = bf16)
        self.u64 = None           # (T, E) logits the reference routes on
        self.bias = None
        self.results = None
        self.expect = {}          # row -> expected indices (hand-built cases)
        self.expect_w = {}        # row -> expected weights (approximately)


def token_ok(r, u, cfg):
    """Accept a random token: decision margins and, for bf16, midpoint distances."""
    if cfg.precision == "fp32":
        return R.selection_margin(r.sel, cfg) >= MARGIN
    ub = R.bf16(np.asarray(u, dtype=np.float32))
    if cfg.score == "sigmoid":
        sig = R.sigmoid64(ub)
        live = ub >= R.SIGMOID_ZERO_BELOW
        return bool(np.all(R.bf16_midpoint_distance(sig[live]) > BF16_SIG_ULPS))
    # softmax in bf16 precision: fp32 probabilities, so fp32-level margins apply
    if R.selection_margin(r.sel, cfg) < MARGIN:
        return False
    p = R.softmax64(ub)
    return bool(np.all(R.bf16_midpoint_distance(p[r.indices] * cfg.scale32) > BF16_W_ULPS))


def make_random(case, T, rng, logit_fn, bias=None, also=()):
    """Samples T tokens with resampling; `also` lists extra configs that the same
    inputs must satisfy (shared inputs between cases)."""
    cfg = case.cfg
    E = cfg.experts
    case.bias = None if bias is None else np.asarray(bias, dtype=np.float32)
    rows = []
    for t in range(T):
        for attempt in range(5000):
            u = np.asarray(logit_fn(rng, t), dtype=np.float32)
            ok = True
            for c in (cfg,) + tuple(also):
                r = R.route_token(u.astype(np.float64), case.bias, c)
                if not token_ok(r, u, c):
                    ok = False
                    break
            if ok:
                break
        else:
            raise RuntimeError(f"{case.name}: could not sample token {t}")
        rows.append(u)
    case.logits = np.stack(rows).astype(np.float32).reshape(T, E)
    case.u64 = case.logits.astype(np.float64)


def make_hidden(case, T, D, rng, gate_dtype, bias=None, gain=1.0):
    cfg = case.cfg
    E = cfg.experts
    case.input, case.D, case.gate_dtype = "hidden", D, gate_dtype
    case.bias = None if bias is None else np.asarray(bias, dtype=np.float32)
    W = (rng.normal(size=(E, D)) * gain / np.sqrt(D)).astype(np.float32)
    if gate_dtype == "bf16":
        W = R.bf16(W)
    case.gate = W
    Wr = R.bf16(W) if cfg.precision == "bf16" else W
    rows, urows = [], []
    for t in range(T):
        for attempt in range(5000):
            x = rng.normal(size=D).astype(np.float32)
            xr = R.bf16(x) if cfg.precision == "bf16" else x
            prod = Wr.astype(np.float64) * xr.astype(np.float64)
            u = prod.sum(axis=1)
            r = R.route_token(u, case.bias, cfg)
            ok = token_ok(r, u, cfg)
            if ok and cfg.precision == "bf16":
                # the fp32 accumulation may move u by a few ulps of sum|x w|:
                # keep u far from bf16 rounding midpoints in that measure
                mag = np.abs(prod).sum(axis=1)
                d = R.bf16_midpoint_distance(u)
                ulp_u = np.where(u != 0, 2.0 ** (np.floor(np.log2(np.abs(u) + 1e-300)) - 23), 1.0)
                ok = bool(np.all(d * ulp_u > 1e-5 * mag))
            if ok:
                break
        else:
            raise RuntimeError(f"{case.name}: could not sample token {t}")
        rows.append(x)
        urows.append(u)
    case.hidden = np.stack(rows).astype(np.float32)
    case.u64 = np.stack(urows)


def make_fixed(case, logits, bias=None):
    case.logits = np.asarray(logits, dtype=np.float32)
    case.u64 = case.logits.astype(np.float64)
    case.bias = None if bias is None else np.asarray(bias, dtype=np.float32)


# ------------------------------------------------------------------ cases --

def logit(p):
    p = np.asarray(p, dtype=np.float64)
    return np.log(p / (1 - p))


def build_cases():
    cases = []

    def add(case):
        cases.append(case)
        return case

    def gauss(E, std=1.0, mean=0.0):
        return lambda rng, t: rng.normal(mean, std, size=E)

    # ---- every preset, random tokens --------------------------------------
    for name, T, std, bstd in (("deepseek-v3", 16, 1.5, 0.05), ("deepseek-v2", 16, 1.5, None),
                               ("moonlight", 16, 1.5, 0.05), ("mixtral", 32, 1.5, None),
                               ("qwen-moe", 16, 1.5, None), ("deepseek-v3-hf", 16, 1.5, 0.05)):
        cfg = R.preset(name)
        c = add(Case("preset_" + name.replace("-", "_"), cfg,
                     f"preset {name}, random logits N(0,{std})", preset=name))
        rng = np.random.default_rng(seed_of(c.name))
        bias = rng.normal(0, bstd, cfg.experts) if cfg.use_bias else None
        make_random(c, T, rng, gauss(cfg.experts, std), bias)

    # ---- odd sizes ----------------------------------------------------------
    cfg = RouterConfig(12, 3, 2, 3, "sigmoid", "topsum", 2, "exclude", True, 0.0, 1.5, True)
    c = add(Case("odd_e12_g3_tg2_k3", cfg, "E=12 G=3 TG=2 K=3, top-2 sum, bias"))
    rng = np.random.default_rng(seed_of(c.name))
    make_random(c, 24, rng, gauss(12, 1.2), rng.normal(0, 0.1, 12))

    cfg = RouterConfig(30, 5, 2, 4, "sigmoid", "topsum", 3, "exclude", True, 0.0, 2.0, True)
    c = add(Case("odd_e30_g5_tg2_k4_topm3", cfg, "E=30 G=5 TG=2 K=4, top-3 sum, bias"))
    rng = np.random.default_rng(seed_of(c.name))
    make_random(c, 24, rng, gauss(30, 1.2), rng.normal(0, 0.1, 30))

    cfg = RouterConfig(7, 1, 1, 7, "sigmoid", "topsum", 2, "exclude", True, 0.0, 1.0, True)
    c = add(Case("odd_e7_g1_k7", cfg, "E=7 G=1 K=7: every expert chosen, order matters"))
    rng = np.random.default_rng(seed_of(c.name))
    make_random(c, 16, rng, gauss(7, 1.5), rng.normal(0, 0.2, 7))

    cfg = R.preset("deepseek-v3")
    c = add(Case("t1_deepseek_v3", cfg, "deepseek-v3, a single token", preset="deepseek-v3"))
    rng = np.random.default_rng(seed_of(c.name))
    make_random(c, 1, rng, gauss(256, 1.5), rng.normal(0, 0.05, 256))

    cfg = RouterConfig(16, 4, 2, 4, "sigmoid", "topsum", 2, "exclude", False, 0.0, 1.0, True)
    c = add(Case("sigmoid_nonorm", cfg, "sigmoid without normalisation, E=16 G=4 TG=2 K=4"))
    rng = np.random.default_rng(seed_of(c.name))
    make_random(c, 16, rng, gauss(16, 1.5), rng.normal(0, 0.1, 16))

    cfg = RouterConfig(32, 4, 2, 4, "softmax", "topsum", 2, "exclude", True, 0.0, 1.0, True)
    c = add(Case("softmax_groups_bias", cfg, "softmax, top-2 sum groups, bias, normalize"))
    rng = np.random.default_rng(seed_of(c.name))
    make_random(c, 16, rng, gauss(32, 2.0), rng.normal(0, 0.01, 32))

    cfg = RouterConfig(64, 8, 3, 6, "sigmoid", "topsum", 2, "zero", True, 0.0, 2.5, True)
    c = add(Case("mask_zero_negbias", cfg,
                 "mask zero with negative biases: dropped-group experts (0.0) can win"))
    rng = np.random.default_rng(seed_of(c.name))
    make_random(c, 16, rng, gauss(64, 1.5), -rng.uniform(0.6, 1.4, 64))

    # norm_eps = 1e-20 (HF): visible once the selected affinities are tiny
    cfg = RouterConfig(32, 4, 2, 4, "sigmoid", "topsum", 2, "exclude", True, 1e-20, 2.5, False)
    c = add(Case("norm_eps_1e20", cfg, "HF epsilon 1e-20 with tokens of shrinking affinity"))
    rng = np.random.default_rng(seed_of(c.name))
    make_random(c, 12, rng, lambda rng, t: rng.normal(-18.0 - 2.5 * t, 1.5, 32))

    # ---- hidden-state input ---------------------------------------------------
    cfg = RouterConfig(64, 8, 3, 6, "sigmoid", "topsum", 2, "exclude", True, 0.0, 2.5, True)
    c = add(Case("hidden_d67_f32", cfg, "hidden input D=67, fp32 gate weight"))
    rng = np.random.default_rng(seed_of(c.name))
    make_hidden(c, 20, 67, rng, "f32", rng.normal(0, 0.05, 64), gain=1.5)

    cfg = RouterConfig(48, 4, 2, 5, "softmax", "max", 2, "exclude", True, 0.0, 1.0, False)
    c = add(Case("hidden_d67_bf16gate", cfg, "hidden input D=67, bf16 gate weight, softmax"))
    rng = np.random.default_rng(seed_of(c.name))
    make_hidden(c, 20, 67, rng, "bf16", None, gain=2.0)

    # ---- bf16 precision (official inference path) -----------------------------
    cfg = R.preset("deepseek-v3", precision="bf16")
    c = add(Case("bf16_deepseek_v3", cfg, "bf16 emulation, V3 shape, fp32 bias"))
    rng = np.random.default_rng(seed_of(c.name))
    make_random(c, 16, rng, gauss(256, 1.5), rng.normal(0, 0.05, 256))

    cfg = R.preset("moonlight", precision="bf16")
    c = add(Case("bf16_moonlight", cfg, "bf16 emulation, Moonlight (G=1, scale 2.446 is "
                 "applied as bf16(2.446) = 2.4375, as torch does)", preset="moonlight"))
    rng = np.random.default_rng(seed_of(c.name))
    make_random(c, 16, rng, gauss(64, 1.5), rng.normal(0, 0.05, 64))

    cfg = R.preset("deepseek-v2", precision="bf16")
    c = add(Case("bf16_deepseek_v2", cfg, "bf16 emulation, V2 shape (softmax, no normalisation)"))
    rng = np.random.default_rng(seed_of(c.name))
    make_random(c, 16, rng, gauss(160, 1.5))

    cfg = RouterConfig(32, 4, 2, 4, "sigmoid", "topsum", 2, "exclude", True, 0.0, 2.5, True,
                       precision="bf16")
    c = add(Case("bf16_hidden", cfg, "bf16 emulation from hidden states (D=67, bf16 gate)"))
    rng = np.random.default_rng(seed_of(c.name))
    make_hidden(c, 12, 67, rng, "bf16", rng.normal(0, 0.05, 32), gain=1.5)

    # ---- hand-built edge cases (ties kept on purpose) -------------------------
    cfg = R.preset("deepseek-v3")
    c = add(Case("tie_all_equal_v3", cfg,
                 "all-equal logits, zero bias: groups 0-3, experts 0-7 (lowest ids win)",
                 preset="deepseek-v3"))
    make_fixed(c, np.array([[v] * 256 for v in (0.0, 3.0, -2.0, 20.0)]), np.zeros(256))
    c.expect = {t: list(range(8)) for t in range(4)}
    c.expect_w = {t: [2.5 / 8] * 8 for t in range(4)}

    # ties among group scores (same top-2 values in different positions)
    cfg = RouterConfig(32, 4, 2, 4, "sigmoid", "topsum", 2, "exclude", True, 0.0, 2.5, True)
    c = add(Case("tie_groups", cfg, "exact ties between group scores and across groups"))
    L = np.full((3, 32), -1.0)
    L[0, [8 + 3, 16 + 0, 24 + 6]] = 2.0          # groups 1,2,3 tie; group 0 lower
    L[0, [8 + 5, 16 + 7, 24 + 1]] = 1.0
    L[0, [0, 1]] = [1.5, 0.5]
    L[1, [24 + 2, 24 + 6]] = 3.0                 # group 3 best; groups 0 and 2 tie
    L[1, [2, 5]] = [1.0, 0.25]
    L[1, [16 + 5, 16 + 2]] = [1.0, 0.25]
    L[2, [0, 9]] = 4.0                           # groups 0 and 1 tie; K boundary tie
    L[2, [1, 2, 3, 8, 10, 11]] = 0.5             # among 1,2,3,8,10,11
    make_fixed(c, L, np.zeros(32))
    c.expect = {0: [11, 16, 13, 23], 1: [26, 30, 2, 5], 2: [0, 9, 1, 2]}

    cfg = RouterConfig(8, 1, 1, 2, "sigmoid", "topsum", 2, "exclude", True, 0.0, 1.0, False)
    c = add(Case("boundary_tie", cfg,
                 "SPEC 5: [.9,.5,.5,.5,.1,.5,.2,.3] k=2 picks 0 then 1 (torch: 3)"))
    make_fixed(c, logit(np.array([[.9, .5, .5, .5, .1, .5, .2, .3],
                                  [.3, .5, .2, .5, .9, .5, .5, .1]])))
    c.expect = {0: [0, 1], 1: [4, 1]}

    cfg = RouterConfig(16, 8, 2, 2, "sigmoid", "max", 2, "exclude", True, 0.0, 1.0, False)
    c = add(Case("boundary_tie_groups", cfg, "the SPEC 5 boundary tie at the group stage (max)"))
    gmax = [.9, .5, .5, .5, .1, .5, .2, .3]
    row = np.full(16, logit(0.05))
    for g, v in enumerate(gmax):
        row[2 * g + (g % 2)] = logit(v)
    make_fixed(c, row[None, :])
    c.expect = {0: [0, 3]}

    logits_sat = np.full((6, 16), -80.0)
    logits_sat[0] = 80.0                                   # all saturate to 1
    logits_sat[2, [5, 9, 10, 14]] = 80.0                   # mixed
    logits_sat[3] = -85.0
    logits_sat[3, 0:4] = -80.0                             # tiny, one group best
    logits_sat[4] = -100.0                                 # underflow: s == 0
    logits_sat[5] = np.linspace(-80.0, -70.0, 16)          # tiny, distinct
    cfg = RouterConfig(16, 4, 2, 4, "sigmoid", "topsum", 2, "exclude", True, 0.0, 2.5, True)
    c = add(Case("saturated_off", cfg,
                 "±80 logits, official normalisation (eps 0): tiny scores give 2.5/K each"))
    make_fixed(c, logits_sat, np.zeros(16))
    sat_expect = {0: [0, 1, 2, 3], 1: [0, 1, 2, 3], 2: [5, 9, 10, 4], 3: [0, 1, 2, 3],
                  4: [0, 1, 2, 3], 5: [15, 14, 13, 12]}
    c.expect = sat_expect
    c.expect_w = {0: [0.625] * 4, 1: [0.625] * 4, 3: [0.625] * 4, 4: [0.625] * 4}
    c = add(Case("saturated_hf", replace(cfg, mask="zero", norm_eps=1e-20),
                 "±80 logits with HF's 0.0 mask and eps 1e-20: tiny scores give ~0"))
    make_fixed(c, logits_sat, np.zeros(16))
    c.expect = sat_expect
    c.expect_w = {0: [0.625] * 4, 1: [4.5e-15] * 4, 4: [0.0] * 4}

    cfg = RouterConfig(32, 4, 2, 4, "sigmoid", "topsum", 2, "exclude", True, 0.0, 2.5, True)
    c = add(Case("dominating_bias", cfg, "bias +5 on experts 3 and 29: always chosen, "
                 "weights still from the raw affinities"))
    rng = np.random.default_rng(seed_of(c.name))
    b = rng.normal(0, 0.01, 32)
    b[[3, 29]] = 5.0
    make_random(c, 12, rng, gauss(32, 1.5), b)
    c.expect_first2 = {3, 29}

    # negative selection scores: same inputs under both masks
    cfg_x = RouterConfig(16, 4, 2, 3, "sigmoid", "topsum", 2, "exclude", True, 0.0, 2.5, True)
    cfg_z = replace(cfg_x, mask="zero")
    cx = add(Case("negscore_exclude", cfg_x,
                  "all selection scores negative, mask exclude: a dropped group never wins"))
    cz = add(Case("negscore_zero", cfg_z,
                  "same inputs, mask zero: dropped-group experts (0.0) win, as in HF"))
    rng = np.random.default_rng(seed_of("negscore"))
    b = -2.0 + rng.uniform(-0.05, 0.05, 16)      # every c = s + b lies in (-2.05, -0.95)
    make_random(cx, 7, rng, gauss(16, 1.5), b, also=(cfg_z,))
    # hand-built first row: group 2 holds the best single expert (8) but is dropped
    # under the top-2 sum; exclude must not pick it, zero picks 8, 9, 10 (0.0 ties)
    fixed = np.full(16, -3.0)
    fixed[[0, 1]] = 2.0          # group 0: top-2 sum -2.24
    fixed[[4, 5]] = 1.0          # group 1: -2.54
    fixed[8] = 4.0               # group 2: -2.97, although c_8 = -1.02 beats c_4, c_5
    cx.logits = np.vstack([fixed[None, :], cx.logits]).astype(np.float32)
    cx.u64 = cx.logits.astype(np.float64)
    make_fixed(cz, cx.logits, cx.bias)
    cz.expect = {0: [8, 9, 10]}

    cfg = RouterConfig(32, 4, 2, 4, "sigmoid", "max", 2, "exclude", True, 0.0, 1.0, False)
    c = add(Case("nobias_groups_max", cfg, "no bias, G>1: groups ranked by max, not top-2 sum"))
    row = np.full(32, -4.0)
    row[2] = 4.0                                     # group 0: max .982, top-2 sum 1.0
    row[8:16] = 1.0                                  # group 1: max .731, top-2 sum 1.46
    row[16:24] = -3.0
    row[[17, 21]] = 2.0                              # group 2: max .881, top-2 sum 1.76
    row[24:32] = -1.0                                # group 3
    rng = np.random.default_rng(seed_of(c.name))
    make_random(c, 7, rng, gauss(32, 1.5))
    c.logits = np.vstack([row[None, :], c.logits]).astype(np.float32)
    c.u64 = c.logits.astype(np.float64)
    c.expect = {0: [2, 17, 21, 16]}

    cfg = RouterConfig(16, 1, 1, 4, "sigmoid", "topsum", 2, "exclude", True, 0.0, 1.0, True)
    c = add(Case("single_group", cfg, "G=1 with negative biases: nothing is masked"))
    rng = np.random.default_rng(seed_of(c.name))
    make_random(c, 8, rng, gauss(16, 1.5), -rng.uniform(0.0, 1.0, 16))

    cfg = RouterConfig(32, 4, 2, 4, "sigmoid", "topsum", 2, "exclude", True, 0.0, 2.5, True)
    c = add(Case("underflow", cfg, "logits <= -95: every s is 0 in fp32, selection by bias, "
                 "weights uniform scale/K (dsmoe's documented choice), zero gradient"))
    rng = np.random.default_rng(seed_of(c.name))
    b = rng.normal(0, 0.05, 32)
    L = np.full((3, 32), -100.0)
    L[1, ::2] = -120.0
    L[2] = -95.0
    make_fixed(c, L, b)
    c.expect_w = {t: [0.625] * 4 for t in range(3)}

    cfg = RouterConfig(256, 8, 4, 8, "sigmoid", "topsum", 2, "exclude", True, 0.0, 2.5, True,
                       precision="bf16")
    c = add(Case("bf16_ties_v3", cfg, "bf16: saturated and coarse affinities tie exactly; "
                 "zero bias; logits at bf16 midpoints (round to even)"))
    rng = np.random.default_rng(seed_of(c.name))
    L = np.zeros((4, 256))
    L[0] = rng.uniform(6.5, 12.0, 256)               # s == 1.0 in bf16 for all
    L[1] = R.bf16(rng.normal(0, 2.0, 256).astype(np.float32))
    mids = np.array([1.00390625, 1.01171875, -2.0078125, 0.50390625], dtype=np.float32)
    L[2] = rng.normal(0, 1.0, 256)
    L[2, 40:44] = mids                                # exact midpoints -> ties to even
    L[3] = np.repeat(np.linspace(-3.0, 3.0, 32), 8)   # plateaus of equal logits
    make_fixed(c, L.astype(np.float32), np.zeros(256))

    cfg = RouterConfig(32, 4, 2, 4, "sigmoid", "topsum", 2, "exclude", True, 0.0, 2.5, True,
                       precision="bf16")
    c = add(Case("bf16_underflow", cfg, "bf16: logits in [-92.5, -89] give s = 0 as torch's "
                 "fp32 sigmoid does (not the subnormal of an exact sigmoid); an all-zero "
                 "selection gets uniform weights"))
    rng = np.random.default_rng(seed_of(c.name))
    L = np.zeros((2, 32))
    L[0] = np.resize(np.arange(-89.0, -93.0, -0.5), 32)
    L[1] = rng.normal(0, 1.5, 32)
    L[1, [3, 12, 20, 29]] = [-89.0, -90.0, -91.5, -92.5]
    make_fixed(c, L.astype(np.float32), np.zeros(32))
    c.expect = {0: [0, 1, 2, 3]}
    c.expect_w = {0: [0.625] * 4}

    for c in cases:
        if c.cfg.precision != "bf16" or c.input != "logits" or c.cfg.score != "sigmoid":
            continue
        for t in range(len(c.logits)):
            ub = R.bf16(c.logits[t])
            live = ub >= R.SIGMOID_ZERO_BELOW
            sig = R.sigmoid64(ub[live])
            assert np.all(R.bf16_midpoint_distance(sig) > BF16_SIG_ULPS), (c.name, t)
    return cases


# ---------------------------------------------------------------- compute --

def compute(case):
    cfg = case.cfg
    cfg.validate()
    T = case.u64.shape[0]
    bias = case.bias
    res = [R.route_token(case.u64[t], bias, cfg) for t in range(T)]
    idx = np.array([r.indices for r in res], dtype=np.int32).reshape(T, cfg.top_k)
    w = np.array([r.weights for r in res], dtype=np.float64).reshape(T, cfg.top_k)
    s = np.array([r.scores for r in res], dtype=np.float64).reshape(T, cfg.experts)
    rng = np.random.default_rng(seed_of(case.name + "/dweights"))
    dw = rng.normal(size=(T, cfg.top_k)).astype(np.float32)
    # the backward receives fp32 scores: differentiate exactly at those values
    s32 = s.astype(np.float32).astype(np.float64)
    dl = R.backward(s32, idx, dw.astype(np.float64), cfg)
    if cfg.precision == "fp32":
        for t in range(T):
            emu = select_fp32_emulated(case.u64[t], bias, cfg)
            assert list(emu) == list(idx[t]), (case.name, t, emu, idx[t])
    if hasattr(case, "expect_first2"):
        assert all(set(idx[t, :2]) == case.expect_first2 for t in range(T)), case.name
    for t, want in case.expect.items():
        assert list(idx[t]) == want, (case.name, t, list(idx[t]), want)
    for t, want in case.expect_w.items():
        assert np.allclose(w[t], want, rtol=1e-2, atol=0), (case.name, t, w[t], want)
    case.results = (idx, w, s, dw, dl)


def fmt32(v):
    return str(np.float32(v))


def write_case(case, root):
    cfg = case.cfg
    d = os.path.join(root, case.name)
    os.makedirs(d)
    lines = [f"# dsmoe router golden case (written by tests/ref/gen_router_golden.py)",
             f"description = {case.description}"]
    if case.preset:
        lines.append(f"preset = {case.preset}")
    lines += [
        f"experts = {cfg.experts}", f"groups = {cfg.groups}",
        f"topk_groups = {cfg.topk_groups}", f"top_k = {cfg.top_k}",
        f"score = {cfg.score}", f"group_score = {cfg.group_score}",
        f"group_topm = {cfg.group_topm}", f"mask = {cfg.mask}",
        f"normalize = {int(cfg.normalize)}", f"norm_eps = {fmt32(cfg.norm_eps)}",
        f"scale = {fmt32(cfg.scale)}", f"use_bias = {int(cfg.use_bias)}",
        f"precision = {cfg.precision}", f"input = {case.input}",
        f"hidden_dim = {case.D}", f"gate_dtype = {case.gate_dtype}",
    ]
    with open(os.path.join(d, "config.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    idx, w, s, dw, dl = case.results

    def save(name, arr, dtype):
        np.save(os.path.join(d, name), np.ascontiguousarray(arr, dtype=dtype))

    if case.input == "logits":
        save("logits.npy", case.logits, "<f4")
    else:
        save("hidden.npy", case.hidden, "<f4")
        if case.gate_dtype == "bf16":
            save("gate_weight.npy", R.bf16_words(case.gate), "<u2")
        else:
            save("gate_weight.npy", case.gate, "<f4")
        save("proj_logits.npy", case.u64, "<f8")
    if cfg.use_bias:
        save("bias.npy", case.bias, "<f4")
    save("indices.npy", idx, "<i4")
    save("weights.npy", w, "<f8")
    save("scores.npy", s, "<f8")
    save("dweights.npy", dw, "<f4")
    save("dlogits.npy", dl, "<f8")


# -------------------------------------------------------- torch cross-check --

def torch_gate(logits_bf16, bias, cfg):
    """The official Gate.forward sequence (SPEC §2–§3) on bf16 logits, in torch."""
    import torch
    T = logits_bf16.shape[0]
    if cfg.score == "sigmoid":
        scores = logits_bf16.sigmoid()
    else:
        scores = logits_bf16.softmax(dim=-1, dtype=torch.float32)
    original = scores
    if bias is not None:
        scores = scores + bias
    if cfg.groups > 1:
        scores = scores.view(T, cfg.groups, -1)
        if bias is None:
            group_scores = scores.amax(dim=-1)
        else:
            group_scores = scores.topk(2, dim=-1)[0].sum(dim=-1)
        indices = group_scores.topk(cfg.topk_groups, dim=-1)[1]
        mask = scores.new_ones(T, cfg.groups, dtype=torch.bool).scatter_(1, indices, False)
        scores = scores.masked_fill_(mask.unsqueeze(-1), float("-inf")).flatten(1)
    indices = torch.topk(scores, cfg.top_k, dim=-1)[1]
    weights = original.gather(1, indices)
    if cfg.score == "sigmoid":
        weights /= weights.sum(dim=-1, keepdim=True)
    weights *= cfg.scale
    return weights.type_as(logits_bf16), indices


def has_tie(sel, cfg):
    G, TG, K = cfg.groups, cfg.topk_groups, cfg.top_k
    if G > 1 and TG < G:
        if sel.group_scores[sel.group_order[TG - 1]] == sel.group_scores[sel.group_order[TG]]:
            return True
    o = sel.cand_order
    return len(o) > K and sel.cand_values[o[K - 1]] == sel.cand_values[o[K]]


def torch_crosscheck(n_tokens=400):
    import torch
    torch.manual_seed(0)
    # 1. every finite bf16 logit: bf16(fp32(sigmoid)) with the fp32 underflow rule
    w = np.arange(65536, dtype=np.uint32)
    f = (w << np.uint32(16)).view(np.float32)
    f = f[np.isfinite(f)]
    t = torch.from_numpy(f.copy()).to(torch.bfloat16)
    got = torch.sigmoid(t).float().numpy()
    emu = R.sigmoid_bf16(f)
    nbad = int((got.view(np.uint32) != emu.view(np.uint32)).sum())
    close = int((R.bf16_midpoint_distance(R.sigmoid64(f)[f >= R.SIGMOID_ZERO_BELOW])
                 <= BF16_SIG_ULPS).sum())
    print(f"torch check: bf16 sigmoid over all {len(f)} finite bf16 inputs: "
          f"{nbad} differ from the emulation; {close} lie within {BF16_SIG_ULPS} fp32 ulps "
          f"of a bf16 midpoint (avoided in golden data)")
    assert nbad == 0

    # 2. the official gate on random tokens. torch < 2 on CPU multiplies a bf16 tensor
    #    by a Python float as bf16(scalar); CUDA and later CPU kernels keep it fp32.
    probe = torch.ones(1, dtype=torch.bfloat16)
    probe *= 2.446
    old_cpu = float(probe) == float(R.bf16(np.float32(2.446)))
    for name, bias_std in (("deepseek-v3", 0.05), ("deepseek-v2", None), ("moonlight", 0.05)):
        cfg = R.preset(name, precision="bf16")
        rng = np.random.default_rng(seed_of("torch/" + name))
        L = rng.normal(0, 1.5, (n_tokens, cfg.experts)).astype(np.float32)
        b = None if bias_std is None else rng.normal(0, bias_std, cfg.experts).astype(np.float32)
        lt = torch.from_numpy(L).to(torch.bfloat16)
        bt = None if b is None else torch.from_numpy(b)
        tw, ti = torch_gate(lt, bt, cfg)
        tw = tw.float().numpy()
        ti = ti.numpy()
        ties = set_eq = set_ne_tie = w_eq = w_ne = w_fp32_scale_ne = 0
        for k in range(n_tokens):
            r = R.route_token_bf16(L[k], b, cfg, torch113_cpu_scale=old_cpu)
            r32 = R.route_token_bf16(L[k], b, cfg)
            tie = has_tie(r.sel, cfg)
            ties += tie
            same = set(ti[k].tolist()) == set(r.indices.tolist())
            if not same:
                assert tie, f"{name} token {k}: expert sets differ without a tie"
                set_ne_tie += 1
                continue
            set_eq += 1
            want = dict(zip(r.indices.tolist(), r.weights.astype(np.float32).tolist()))
            w_fp32_scale_ne += int((r32.weights != r.weights).sum())
            for e, v in zip(ti[k].tolist(), tw[k].tolist()):
                if np.float32(v).view(np.uint32) == np.float32(want[e]).view(np.uint32):
                    w_eq += 1
                else:
                    w_ne += 1
        print(f"torch check: {name} bf16 gate, {n_tokens} tokens: {ties} with boundary ties, "
              f"sets equal {set_eq}, differ (ties only) {set_ne_tie}; weights bit-equal "
              f"{w_eq}, different {w_ne}" +
              (f" (emulating torch {torch.__version__}'s CPU bf16(scale); with the fp32 scale "
               f"of CUDA and newer CPU kernels, which dsmoe follows, {w_fp32_scale_ne} differ)"
               if old_cpu else ""))
        if cfg.score == "sigmoid":
            assert w_ne == 0, f"{name}: bf16 weights differ from torch"


# ------------------------------------------------------------------- main --

def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(here, "..", "golden", "router"))
    ap.add_argument("--skip-torch-check", action="store_true")
    args = ap.parse_args()
    if not args.skip_torch_check:
        torch_crosscheck()
    cases = build_cases()
    names = [c.name for c in cases]
    assert len(set(names)) == len(names)
    for c in cases:
        compute(c)
    root = os.path.normpath(args.out)
    if os.path.isdir(root):
        shutil.rmtree(root)
    os.makedirs(root)
    for c in cases:
        write_case(c, root)
    with open(os.path.join(root, "MANIFEST"), "w") as f:
        f.write("# router golden cases, one folder per line (tests/ref/gen_router_golden.py)\n")
        f.write("\n".join(names) + "\n")
    total = sum(os.path.getsize(os.path.join(dp, fn))
                for dp, _, fns in os.walk(root) for fn in fns)
    print(f"wrote {len(cases)} cases, {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
