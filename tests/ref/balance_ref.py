"""balance_ref.py — independent fp64 reference of dsmoe's load balancing.

Written from SPEC-routing §7–§8 and the papers, not from the C code:

  * bias update (Wang et al. 2024; DeepSeek-V3 §2.1.2), per step with global counts c
    and mean cbar = sum(c) / E:
        sign:          b += gamma * sign(cbar - c)          (sign(0) = 0)
        proportional:  b += gamma * (cbar - c) / cbar
    optionally re-centred (the update minus its mean); gamma switches to gamma_after
    once the tokens of earlier steps reach gamma_until_tokens.
  * load statistics: MaxVio = (max c - cbar) / cbar, CV, entropy / ln E, dead experts,
    group MaxVio, mean number of groups per token.
  * balance losses (mean over sequences of T_s tokens), written as functions of the
    logits in torch float64 so that autograd — not a hand derivation — gives the
    reference gradient:
        seq / expert:  alpha * sum_i f_i P_i,  f_i = E/(K T_s) * count_i,
                       P_i = mean_t s'_{i,t},  s' = s / sum_j s_j  (or s when raw)
        device:        alpha * sum_d mean_{i in d}(f_i) * sum_{i in d} P_i
        comm:          alpha * sum_d D/(M T_s) * reach_d * sum_{i in d} P_i
        switch:        alpha * E * sum_i count_i/(K T_s) * P_i
        zloss:         alpha * mean_t logsumexp(u_t)^2
    Counts are constants (from the routed indices or the plain top-K of s, ties to the
    lower id).

The routing used to produce indices is a minimal DeepSeek-V3 router (sigmoid or
softmax, bias for selection only, group stage by top-m sum or max, dropped groups
excluded, lowest id wins ties via a stable sort) in float64.

Run `/usr/bin/python3 tests/ref/balance_ref.py` to check itself;
`gen_balance_golden.py` writes tests/golden/balance/.
"""

import numpy as np
import torch

torch.set_default_dtype(torch.float64)


# ---------------------------------------------------------------- routing --

def affinities(u, score):
    u = np.asarray(u, dtype=np.float64)
    if score == "sigmoid":
        return 1.0 / (1.0 + np.exp(-u))
    m = u.max(axis=1, keepdims=True)
    e = np.exp(u - m)
    return e / e.sum(axis=1, keepdims=True)


def stable_desc(v):
    """Indices ordering v by value descending, index ascending."""
    return np.argsort(-v, kind="stable")


def route(u, bias, E, G, TG, K, score="sigmoid", group_score="topsum", m=2):
    """Returns (indices (T, K), scores s (T, E), min selection margin)."""
    s = affinities(u, score)
    T = s.shape[0]
    c = s + (0.0 if bias is None else np.asarray(bias, dtype=np.float64))
    idx = np.zeros((T, K), dtype=np.int64)
    margin = np.inf
    EpG = E // G
    for t in range(T):
        ct = c[t].copy()
        if G > 1:
            cg = ct.reshape(G, EpG)
            if group_score == "topsum":
                gs = np.sort(cg, axis=1)[:, ::-1][:, :m].sum(axis=1)
            else:
                gs = cg.max(axis=1)
            order = stable_desc(gs)
            if TG < G:
                margin = min(margin, gs[order[TG - 1]] - gs[order[TG]])
            keep = np.zeros(G, dtype=bool)
            keep[order[:TG]] = True
            ct = np.where(np.repeat(keep, EpG), ct, -np.inf)
        order = stable_desc(ct)
        idx[t] = order[:K]
        if K < E and np.isfinite(ct[order[K]]):
            margin = min(margin, ct[order[K - 1]] - ct[order[K]])
    return idx, s, margin


# ------------------------------------------------------------ bias update --

def bias_update(bias, counts, rule, gamma, recenter=False):
    counts = np.asarray(counts, dtype=np.float64)
    if counts.sum() <= 0 or gamma <= 0:
        return np.array(bias, dtype=np.float64)
    mean = counts.sum() / counts.size
    e = mean - counts
    d = gamma * np.sign(e) if rule == "sign" else gamma * e / mean
    if recenter:
        d = d - d.mean()
    return np.asarray(bias, dtype=np.float64) + d


# ------------------------------------------------------------ statistics --

def load_stats(counts, G=1):
    c = np.asarray(counts, dtype=np.float64)
    E = c.size
    tot = c.sum()
    out = dict(total=tot, max=c.max(), min=c.min(), dead=int((c == 0).sum()),
               argmax=int(np.argmax(c)), maxvio=0.0, cv=0.0, entropy=0.0,
               group_maxvio=0.0, group_cv=0.0)
    if tot > 0:
        mean = tot / E
        out["maxvio"] = (c.max() - mean) / mean
        out["cv"] = np.sqrt(((c - mean) ** 2).mean()) / mean
        p = c[c > 0] / tot
        out["entropy"] = 1.0 if E == 1 else float(-(p * np.log(p)).sum() / np.log(E))
        if G > 1:
            g = c.reshape(G, E // G).sum(axis=1)
            gm = tot / G
            out["group_maxvio"] = (g.max() - gm) / gm
            out["group_cv"] = np.sqrt(((g - gm) ** 2).mean()) / gm
    return out


def groups_per_token(idx, E, G):
    g = np.asarray(idx) // (E // G)
    return float(np.mean([len(set(row)) for row in g])) if len(g) else 0.0


# ----------------------------------------------------------------- losses --

def topk_raw(s, K):
    return np.stack([stable_desc(row)[:K] for row in s])


def balance_loss(kind, u, idx, E, K, score="sigmoid", alpha=1e-4, seq_len=0,
                 count_from="routed", normalize=True, D=1, M=1, counts=None, counts_T=0):
    """Loss (float) and dL/du (T, E) in float64 via torch autograd.

    counts (E), counts_T: f from these assignments over counts_T tokens (a batch split
    over processes: the whole batch's counts) instead of the tokens given; one sequence,
    kinds seq, expert, switch and device."""
    u = np.asarray(u, dtype=np.float64)
    T = u.shape[0]
    ut = torch.tensor(u, requires_grad=True)
    if kind == "zloss":
        lse = torch.logsumexp(ut, dim=1)
        loss = alpha * (lse ** 2).mean()
        loss.backward()
        return float(loss), ut.grad.numpy().copy()
    s = torch.sigmoid(ut) if score == "sigmoid" else torch.softmax(ut, dim=1)
    if count_from == "topk":
        sel = topk_raw(s.detach().numpy(), K)
    else:
        sel = np.asarray(idx)
    Ts = seq_len if seq_len > 0 else T
    n_seq = T // Ts
    EpD = E // D
    total = 0.0
    for q in range(n_seq):
        sq = s[q * Ts:(q + 1) * Ts]
        p = sq / sq.sum(dim=1, keepdim=True) if normalize else sq
        P = p.mean(dim=0)                                # (E)
        cnt = np.bincount(sel[q * Ts:(q + 1) * Ts].ravel(), minlength=E).astype(np.float64)
        Tf = Ts
        if counts is not None:
            assert n_seq == 1 and kind in ("seq", "expert", "switch", "device")
            cnt, Tf = np.asarray(counts, dtype=np.float64), counts_T
        f = torch.tensor(E / (K * Tf) * cnt)
        if kind in ("seq", "expert"):
            Lq = alpha * (f * P).sum()
        elif kind == "switch":
            Lq = alpha * E * (torch.tensor(cnt / (K * Tf)) * P).sum()
        elif kind == "device":
            fd = f.reshape(D, EpD).mean(dim=1)
            Pd = P.reshape(D, EpD).sum(dim=1)
            Lq = alpha * (fd * Pd).sum()
        elif kind == "comm":
            dev = sel[q * Ts:(q + 1) * Ts] // EpD
            reach = np.zeros(D)
            for row in dev:
                for d in set(row.tolist()):
                    reach[d] += 1
            fd = torch.tensor(D / (M * Ts) * reach)
            Pd = P.reshape(D, EpD).sum(dim=1)
            Lq = alpha * (fd * Pd).sum()
        else:
            raise ValueError(kind)
        total = total + Lq
    loss = total / n_seq
    loss.backward()
    return float(loss), ut.grad.numpy().copy()


# ------------------------------------------------------------- self-check --

def _selfcheck():
    rng = np.random.default_rng(0)
    # sign(0) = 0; overloaded down, underloaded up
    b = bias_update(np.zeros(4), [1, 2, 3, 2], "sign", 0.001)
    assert np.allclose(b, [0.001, 0, -0.001, 0])
    b = bias_update(np.zeros(4), [1, 2, 3, 2], "proportional", 0.1)
    assert np.allclose(b, [0.05, 0, -0.05, 0])
    b = bias_update(np.zeros(3), [0, 0, 3], "sign", 1.0, recenter=True)
    assert abs(b.sum()) < 1e-15
    # perfect balance gives alpha for the count-based losses
    E, K, T = 8, 2, 8
    u = np.zeros((T, E))
    idx = np.array([[(2 * t) % E, (2 * t + 1) % E] for t in range(T)])
    for kind, D, M in (("seq", 1, 1), ("expert", 1, 1), ("switch", 1, 1), ("device", 4, 1),
                       ("comm", 4, 1)):
        L, _ = balance_loss(kind, u, idx, E, K, alpha=0.25, D=D, M=M)
        assert abs(L - 0.25) < 1e-12, (kind, L)
    # gradient of the analytic chain: finite differences on the torch loss
    u = rng.normal(size=(6, E))
    idx, _, _ = route(u, None, E, 1, 1, K)
    L0, g = balance_loss("seq", u, idx, E, K, alpha=1.0, seq_len=3)
    h = 1e-6
    for t, j in ((0, 0), (4, 5)):
        up = u.copy(); up[t, j] += h
        dn = u.copy(); dn[t, j] -= h
        fd = (balance_loss("seq", up, idx, E, K, alpha=1.0, seq_len=3)[0]
              - balance_loss("seq", dn, idx, E, K, alpha=1.0, seq_len=3)[0]) / (2 * h)
        assert abs(fd - g[t, j]) < 1e-8, (fd, g[t, j])
    s = load_stats([0, 2, 2, 4], G=2)
    assert abs(s["maxvio"] - 1.0) < 1e-15 and s["dead"] == 1
    print("balance_ref self-check ok")


if __name__ == "__main__":
    _selfcheck()
