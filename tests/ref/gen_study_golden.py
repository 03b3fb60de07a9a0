#!/usr/bin/env python3
"""gen_study_golden.py — a synthetic study folder in the exact metrics.jsonl schema of
docs/train.md ("Runs") and the summary values of every run recomputed from it with NumPy
(fp64), independently of the C code: tests/golden/study/.

    /usr/bin/python3 tests/ref/gen_study_golden.py [OUT_DIR]

Four runs (two strategies × two seeds) with known traces: E = 8 experts, top-4, three
domains, two main MoE layers and one MTP layer (whose values are absurd, so that a
summary that does not leave MTP layers out is caught), nulls where the schema allows
them, a loss spike planted at a known step, evaluations at steps 12 and 30. Writes
runs/<name>/metrics.jsonl and expected.txt: "<run> <metric> <value>" per line (nan for
a value that cannot be computed), plus "group <name> <metric> <mean> <std> <min> <max>"
(metric "domain:<d>": the validation loss on domain d).
"""
import json
import math
import os
import sys

import numpy as np

E, K, D = 8, 4, 3
DOMAINS = ["arith", "records", "text"]
LAYERS = [{"layer": 1, "mtp": False}, {"layer": 2, "mtp": False}, {"layer": 4, "mtp": True}]
STEPS = 30
EVALS = [12, 30]
BINS = 20
METRICS = ["val_loss", "val_ppl", "maxvio_global", "maxvio_batch_tail", "load_entropy",
           "dead_experts", "top_weight_mean", "top_weight_high", "score_entropy",
           "mutual_information", "mi_kept", "loss_spikes", "grad_norm_max", "bias_drift",
           "tokens_per_s", "ep_max_share", "ep_step_rel"]


def num(v):
    return None if v is None or not math.isfinite(v) else v


def make_run(strategy, seed, skew):
    rng = np.random.default_rng(1000 * seed + len(strategy))
    lines = [{"type": "run", "version": 1, "strategy": strategy, "preset": "tiny", "steps": STEPS,
              "batch": 2, "seq_len": 16, "seed": seed, "threads": 1, "experts": E, "top_k": K,
              "domains": DOMAINS, "moe_layers": LAYERS, "model": {"n_routed_experts": E},
              "optimizer": {"lr": 1e-3}, "balancer": {"gamma": 0.001, "rule": "sign"},
              "balance_loss": {"kind": "seq", "alpha": 1e-4}, "valid_tokens": 960}]
    trace = {"step": [], "loss": [], "grad": [], "tps": [], "counts": [], "bias": []}
    for s in range(1, STEPS + 1):
        loss = 4.0 * math.exp(-s / 15) + 1.0 + 0.02 * rng.standard_normal()
        if s == 22 + seed:  # a planted spike
            loss *= 4.0
        if s == 5:
            loss = None  # a non-finite loss, written as null
        grad = float(rng.uniform(0.5, 2.0)) if s != 9 else None
        tps = float(rng.uniform(900, 1100))
        layers, counts, bias = [], [], []
        for li, L in enumerate(LAYERS):
            w = np.exp(-skew * np.arange(E) * (1 + 0.3 * li)) + 0.05 * rng.random(E)
            c = rng.multinomial(32 * K, w / w.sum()).astype(np.int64)
            if L["mtp"]:
                c = np.zeros(E, np.int64)
                c[0] = 10 ** 6  # absurd: must be left out
            b = rng.normal(0, 0.01 * s / STEPS, E)
            layers.append({"layer": L["layer"], "mtp": L["mtp"], "counts": c.tolist(),
                           "maxvio": float(c.max() / c.mean() - 1), "entropy": 0.0,
                           "bias_mean": float(b.mean()), "bias_std": float(b.std()),
                           "bias_min": float(b.min()), "bias_max": float(b.max())})
            if not L["mtp"]:
                counts.append(c)
                bias.append(max(abs(b.min()), abs(b.max())))
        rec = {"type": "train", "step": s, "lr": 1e-3, "loss": num(loss), "ce": num(loss),
               "mtp": 0.0, "balance": 0.0, "grad_norm": num(grad), "tokens": 32 * s,
               "tokens_per_s": tps, "elapsed_s": s * 0.03, "maxvio_batch": 0.0, "layers": layers}
        lines.append(rec)
        trace["step"].append(s)
        trace["loss"].append(np.nan if loss is None else loss)
        trace["grad"].append(np.nan if grad is None else grad)
        trace["tps"].append(tps)
        trace["counts"].append(counts)
        trace["bias"].append(bias)
        if s in EVALS:
            ev_layers = []
            ev = {"counts": [], "dcounts": [], "hist": [], "sent": []}
            for li, L in enumerate(LAYERS):
                dc = np.zeros((D, E), np.int64)
                for d in range(D):
                    w = np.exp(-skew * ((np.arange(E) - 3 * d) % E)) + 0.02
                    dc[d] = rng.multinomial(320 * K, w / w.sum())
                if li == 1:
                    dc[:, E - 1] = 0  # a dead expert
                c = dc.sum(0)
                hist = rng.multinomial(960, np.linspace(1, 1 + 3 * skew, BINS) / np.linspace(1, 1 + 3 * skew, BINS).sum())
                sent = float(rng.uniform(1.5, 3.0))
                if L["mtp"]:
                    c = np.full(E, 7, np.int64)
                    c[1] = 10 ** 6
                    sent = 99.0
                ev_layers.append({"layer": L["layer"], "mtp": L["mtp"], "counts": c.tolist(),
                                  "maxvio_global": 0.0, "entropy": 0.0,
                                  "dead_experts": int((c == 0).sum()),
                                  "domain_counts": dc.tolist(), "mutual_information": 0.0,
                                  "top_weight_hist": hist.tolist(), "score_entropy": sent})
                if not L["mtp"]:
                    ev["counts"].append(c)
                    ev["dcounts"].append(dc)
                    ev["hist"].append(hist)
                    ev["sent"].append(sent)
            vloss = 2.0 + 0.1 * skew + 0.01 * seed + (0.5 if s == 12 else 0.0)
            dl = {DOMAINS[0]: {"loss": vloss - 0.2, "tokens": 320},
                  DOMAINS[2]: {"loss": vloss + 0.3, "tokens": 320}}  # "records": no tokens
            lines.append({"type": "eval", "step": s, "loss": vloss, "ppl": math.exp(vloss),
                          "bits_per_byte": vloss / math.log(2), "tokens": 960, "maxvio_global": 0.0,
                          "domains": dl, "layers": ev_layers})
            trace["eval"] = (vloss, dl, ev)
    lines.insert(3, {"type": "note-from-a-later-version", "text": "ignored"})
    return lines, trace


# ------------------------------------------------------------ the measures --
def maxvio(c):
    c = np.asarray(c, np.float64)
    return c.max() / c.mean() - 1 if c.sum() > 0 else np.nan


def entropy_bits(c):
    p = np.asarray(c, np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log2(p)).sum())


def mutual_info(dc):
    p = np.asarray(dc, np.float64)
    p = p / p.sum()
    pd = p.sum(1, keepdims=True)
    pe = p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log2(p[nz] / (pd * pe)[nz])).sum())


def spikes(loss, window=20, thr=0.10, sigmas=3.0, min_hist=5):
    x = [v for v in loss if np.isfinite(v)]
    n = 0
    for i in range(min_hist, len(x)):
        w = np.array(x[max(0, i - window):i])
        m = w.mean()
        n += x[i] - m > max(thr * abs(m), sigmas * w.std())
    return n


def summarize(trace):
    steps = np.array(trace["step"])
    S = steps[-1]
    tail = steps > 0.8 * S
    counts = np.array(trace["counts"], np.float64)  # (steps, layers, E)
    mv = np.array([[maxvio(c) for c in rec] for rec in counts]).mean(1)
    share = (counts.max(2) / counts.sum(2)).mean(1)
    vloss, dl, ev = trace["eval"]
    hist = np.sum(ev["hist"], 0).astype(np.float64)
    centres = (np.arange(BINS) + 0.5) / BINS
    out = {
        "val_loss": vloss, "val_ppl": math.exp(vloss),
        "maxvio_global": np.mean([maxvio(c) for c in ev["counts"]]),
        "maxvio_batch_tail": mv[tail].mean(),
        "load_entropy": np.mean([entropy_bits(c) for c in ev["counts"]]),
        "dead_experts": float(sum((np.asarray(c) == 0).sum() for c in ev["counts"])),
        "top_weight_mean": float((hist * centres).sum() / hist.sum()),
        "top_weight_high": float(hist[18:].sum() / hist.sum()),
        "score_entropy": float(np.mean(ev["sent"])),
        "mutual_information": float(np.mean([mutual_info(dc) for dc in ev["dcounts"]])),
        "mi_kept": np.nan,  # set across the study below
        "loss_spikes": float(spikes(trace["loss"])),
        "grad_norm_max": float(np.nanmax(trace["grad"])),
        "bias_drift": float(max(trace["bias"][-1])),
        "tokens_per_s": float(np.median(trace["tps"])),
        "ep_max_share": float(share[tail].mean()),
        "ep_step_rel": float(E * share[tail].mean()),
    }
    out["domain_loss"] = {d: dl[d]["loss"] if d in dl else np.nan for d in DOMAINS}
    return out


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "golden", "study")
    runs = [("aux-loss", 1, 0.6), ("aux-loss", 2, 0.65), ("v3", 1, 0.1), ("v3", 2, 0.12)]
    sums = {}
    for strategy, seed, skew in runs:
        name = f"{strategy}-seed{seed}"
        lines, trace = make_run(strategy, seed, skew)
        d = os.path.join(out, "runs", name)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "metrics.jsonl"), "w") as f:
            for rec in lines:
                f.write(json.dumps(rec, separators=(",", ":"), allow_nan=False) + "\n")
        sums[name] = (strategy, summarize(trace))
    # mi_kept: no v3-no-balance in this study, so relative to the largest group mean
    gmi = {}
    for name, (g, s) in sums.items():
        gmi.setdefault(g, []).append(s["mutual_information"])
    ref = max(np.mean(v) for v in gmi.values())
    for name, (g, s) in sums.items():
        s["mi_kept"] = s["mutual_information"] / ref
    with open(os.path.join(out, "expected.txt"), "w") as f:
        for name, (g, s) in sorted(sums.items()):
            for m in METRICS:
                f.write(f"{name} {m} {s[m]!r}\n")
            for d in DOMAINS:
                f.write(f"{name} domain:{d} {s['domain_loss'][d]!r}\n")
        for g in sorted(gmi):
            for m in METRICS:
                v = np.array([s[m] for n, (gg, s) in sums.items() if gg == g], np.float64)
                v = v[np.isfinite(v)]
                f.write(f"group {g} {m} {v.mean()!r} {v.std(ddof=1)!r} {v.min()!r} {v.max()!r}\n")
            for d in DOMAINS:
                v = np.array([s["domain_loss"][d] for n, (gg, s) in sums.items() if gg == g], np.float64)
                v = v[np.isfinite(v)]
                if len(v):
                    f.write(f"group {g} domain:{d} {v.mean()!r} {v.std(ddof=1)!r} {v.min()!r} {v.max()!r}\n")
                else:
                    f.write(f"group {g} domain:{d} nan nan nan nan\n")


if __name__ == "__main__":
    main()
