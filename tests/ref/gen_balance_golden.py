"""gen_balance_golden.py — writes tests/golden/balance/ from balance_ref.py.

    /usr/bin/python3 tests/ref/gen_balance_golden.py

Deterministic (fixed seeds). Inputs are stored as float32 (what the C code reads);
the reference works in float64 from those float32 values. Routing cases are
regenerated with another seed until every selection has a margin above 1e-5, so
that fp32 and fp64 routing cannot disagree on a near-tie.

steps/   router E=16 G=4 TG=2 K=4 sigmoid top-2-sum with bias; 8 steps of 48 tokens
         logits (S,T,E) f32, bias0 (E) f32, mask (S,T) u8 (0 = padding)
         per variant V: V_counts (S,E) i64, V_bias (S,E) f64 (after each step),
         V_maxvio (S) f64; sign_stats (S,6) f64 = maxvio, cv, entropy, dead,
         group_maxvio, groups_per_token of each step's counts (G = 4)
losses/  T=24 tokens, seq_len 8 where used; per router config R (sig, smx):
         R_logits (T,E) f32, R_scores (T,E) f32, R_indices (T,K) i32, and per loss
         case C: R_C_loss (1) f64, R_C_dlogits (T,E) f64;
         a batch split in two halves of T/2 tokens (data parallelism), f from the whole
         batch's counts, per split case C and half h: R_C_half{h}_loss (1) f64,
         R_C_half{h}_dlogits (T/2,E) f64 (the mean of the halves is the whole batch's)
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import balance_ref as ref  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "golden", "balance")

E, G, TG, K = 16, 4, 2, 4
S, T = 8, 48

# Variants of the bias controller: name -> (rule, gamma, recenter, until, after, masked)
VARIANTS = {
    "sign": ("sign", 0.01, False, 0, 0.0, False),
    "prop": ("proportional", 0.01, False, 0, 0.0, False),
    "center": ("sign", 0.01, True, 0, 0.0, False),
    "sched": ("sign", 0.01, False, 3 * T, 0.002, False),
    "masked": ("sign", 0.01, False, 0, 0.0, True),
}

# Loss cases: name -> (kind, alpha, seq_len, count_from, normalize)
LOSSES = {
    "seq": ("seq", 0.3, 8, "routed", True),
    "seqtopk": ("seq", 0.3, 8, "topk", True),
    "seqraw": ("seq", 0.3, 8, "routed", False),
    "expert": ("expert", 0.2, 0, "routed", True),
    "device": ("device", 0.1, 8, "routed", True),
    "comm": ("comm", 0.15, 8, "routed", True),
    "switch": ("switch", 0.05, 0, "routed", True),
    "zloss": ("zloss", 0.01, 0, "routed", True),
}
# Split cases (one sequence): name -> (kind, alpha)
SPLITS = {
    "expert": ("expert", 0.2),
    "switch": ("switch", 0.05),
    "device1": ("device", 0.1),
}
LOSS_T = 24
LOSS_D, LOSS_M = 4, 2


def save(sub, name, arr):
    d = os.path.join(ROOT, sub)
    os.makedirs(d, exist_ok=True)
    np.save(os.path.join(d, name + ".npy"), arr)


def run_variant(logits, bias0, mask, rule, gamma, recenter, until, after, masked):
    b = bias0.astype(np.float64)
    tokens = 0
    counts_all, bias_all, mv, margin, stats = [], [], [], np.inf, []
    for st in range(S):
        idx, _, mg = ref.route(logits[st], b, E, G, TG, K)
        margin = min(margin, mg)
        keep = mask[st].astype(bool) if masked else np.ones(T, dtype=bool)
        c = np.bincount(idx[keep].ravel(), minlength=E)
        g = gamma if (until <= 0 or tokens < until) else after
        b = ref.bias_update(b, c, rule, g, recenter)
        tokens += int(keep.sum())
        counts_all.append(c)
        bias_all.append(b.copy())
        s = ref.load_stats(c, G)
        mv.append(s["maxvio"])
        stats.append([s["maxvio"], s["cv"], s["entropy"], s["dead"], s["group_maxvio"],
                      ref.groups_per_token(idx[keep], E, G)])
    return (np.array(counts_all, dtype=np.int64), np.array(bias_all), np.array(mv),
            np.array(stats), margin)


def gen_steps():
    seed = 1
    while True:
        rng = np.random.default_rng(seed)
        mu = np.linspace(-1.5, 1.5, E)[rng.permutation(E)]
        logits = (mu + rng.normal(size=(S, T, E))).astype(np.float32)
        bias0 = (0.02 * rng.normal(size=E)).astype(np.float32)
        mask = (rng.random((S, T)) > 0.2).astype(np.uint8)
        results = {}
        ok = True
        for name, v in VARIANTS.items():
            r = run_variant(logits.astype(np.float64), bias0, mask, *v)
            if r[4] < 1e-5:
                ok = False
                break
            results[name] = r
        if ok:
            break
        seed += 1
    save("steps", "logits", logits)
    save("steps", "bias0", bias0)
    save("steps", "mask", mask)
    for name, (counts, bias, mv, stats, _) in results.items():
        save("steps", name + "_counts", counts)
        save("steps", name + "_bias", bias)
        save("steps", name + "_maxvio", mv)
        if name == "sign":
            save("steps", "sign_stats", stats)
    print(f"steps: seed {seed}, min margin {min(r[4] for r in results.values()):.3g}")


def gen_losses():
    configs = {
        "sig": dict(score="sigmoid", group_score="topsum", bias=True),
        "smx": dict(score="softmax", group_score="max", bias=False),
    }
    for rname, rc in configs.items():
        seed = 100
        while True:
            rng = np.random.default_rng(seed)
            logits = (rng.normal(size=(LOSS_T, E)) * 1.5).astype(np.float32)
            bias = (0.05 * rng.normal(size=E)).astype(np.float32) if rc["bias"] else None
            idx, s, mg = ref.route(logits.astype(np.float64), bias, E, G, TG, K, rc["score"],
                                   rc["group_score"])
            # the plain top-K of s must also be unambiguous
            srt = -np.sort(-s, axis=1)
            if mg > 1e-5 and (srt[:, K - 1] - srt[:, K]).min() > 1e-5:
                break
            seed += 1
        save("losses", rname + "_logits", logits)
        if bias is not None:
            save("losses", rname + "_bias", bias)
        save("losses", rname + "_scores", s.astype(np.float32))
        save("losses", rname + "_indices", idx.astype(np.int32))
        for cname, (kind, alpha, seq_len, count_from, normalize) in LOSSES.items():
            L, g = ref.balance_loss(kind, logits.astype(np.float64), idx, E, K, rc["score"],
                                    alpha, seq_len, count_from, normalize, LOSS_D, LOSS_M)
            save("losses", f"{rname}_{cname}_loss", np.array([L]))
            save("losses", f"{rname}_{cname}_dlogits", g)
        counts = np.bincount(idx.ravel(), minlength=E)
        h2 = LOSS_T // 2
        for cname, (kind, alpha) in SPLITS.items():
            args = (E, K, rc["score"], alpha, 0, "routed", True, LOSS_D, LOSS_M)
            L, g = ref.balance_loss(kind, logits.astype(np.float64), idx, *args)
            parts = []
            for h in range(2):
                rows = slice(h * h2, (h + 1) * h2)
                Lh, gh = ref.balance_loss(kind, logits[rows].astype(np.float64), idx[rows], *args,
                                          counts=counts, counts_T=LOSS_T)
                save("losses", f"{rname}_{cname}_half{h}_loss", np.array([Lh]))
                save("losses", f"{rname}_{cname}_half{h}_dlogits", gh)
                parts.append((Lh, gh))
            # the mean over the two halves is the whole batch's loss and gradient
            assert abs((parts[0][0] + parts[1][0]) / 2 - L) <= 1e-12 * abs(L)
            assert np.allclose(np.concatenate([parts[0][1], parts[1][1]]) / 2, g,
                               rtol=1e-10, atol=1e-15)
        print(f"losses {rname}: seed {seed}, margin {mg:.3g}")


if __name__ == "__main__":
    gen_steps()
    gen_losses()
