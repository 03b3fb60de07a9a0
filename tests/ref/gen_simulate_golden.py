"""gen_simulate_golden.py — writes tests/golden/balance/simulate/ from an independent
Python implementation of the synthetic traffic of dsmoe_traffic (balance.h, "synthetic
traffic"), written from the header's description, not from the C code.

    /usr/bin/python3 tests/ref/gen_simulate_golden.py

The stream is integer arithmetic (splitmix64) plus a few float roundings, so the C
generator must reproduce it bit for bit:

  * one splitmix64 stream, state = seed * 0x2545F4914F6CDD1D + 0x5EAD (mod 2^64);
  * profile[r] = float32(-skew * ln(1 + r) - mean_r(-skew * ln(1 + r))) in float64;
  * per domain d and ranking p (ceil(drift) + 1 of them), in that order, a
    Fisher-Yates shuffle of 0..E-1: for i = E-1 .. 1, j = next() % (i + 1), swap;
    perm[i] is the rank of expert i;
  * step s: x = drift * min(s, steps-1) / (steps - 1) (0 for one step),
    k = clamp(floor(x), 0, n_perm - 2), frac = x - k (0 with one ranking),
    mu[d, i] = float32((1 - frac) * profile[A[i]] + frac * profile[B[i]]) with A, B
    the rankings k and k+1 (A twice with one ranking);
  * then per sequence of seq_len tokens: its domain next() % n_domains (no draw
    with one domain), and per token and expert, z from one next(): the four 16-bit
    fields summed to v, z = float32((v + 2) / 65536 - 2) * float32(sqrt 3) in float32,
    logit = mu + float32(noise) * z in float32.

traffic/  E=16, steps 5, T=48, seq_len 12, 3 domains, skew 0.7, noise 0.8, drift 1.5,
          seed 5: logits (5, 48, 16) f32 and domains (5, 48) i32.
"""

import math
import os

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "golden", "balance",
                    "simulate")
M64 = (1 << 64) - 1

E, STEPS, T, SEQ, DOMAINS = 16, 5, 48, 12, 3
SKEW, NOISE, DRIFT, SEED = 0.7, 0.8, 1.5, 5


class SplitMix64:
    def __init__(self, state):
        self.state = state & M64

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & M64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)


def noise_z(rng):
    x = rng.next()
    v = (x & 0xFFFF) + ((x >> 16) & 0xFFFF) + ((x >> 32) & 0xFFFF) + (x >> 48)
    return np.float32((v + 2.0) / 65536.0 - 2.0) * np.float32(1.7320508075688772)


def traffic(E, steps, T, seq_len, n_domains, skew, noise, drift, seed):
    rng = SplitMix64(seed * 0x2545F4914F6CDD1D + 0x5EAD)
    vals = [-skew * math.log(1.0 + r) for r in range(E)]
    mean = 0.0
    for v in vals:
        mean += v
    mean /= E
    profile = [float(np.float32(v - mean)) for v in vals]
    n_perm = int(math.ceil(drift)) + 1
    perms = []
    for _ in range(n_domains * n_perm):
        pm = list(range(E))
        for i in range(E - 1, 0, -1):
            j = rng.next() % (i + 1)
            pm[i], pm[j] = pm[j], pm[i]
        perms.append(pm)
    logits = np.zeros((steps, T, E), dtype=np.float32)
    domains = np.zeros((steps, T), dtype=np.int32)
    for s in range(steps):
        x = drift * min(s, steps - 1) / (steps - 1) if steps > 1 else 0.0
        k = min(max(int(math.floor(x)), 0), max(n_perm - 2, 0))
        frac = x - k if n_perm > 1 else 0.0
        mu = []
        for d in range(n_domains):
            a = perms[d * n_perm + k]
            b = perms[d * n_perm + k + 1] if n_perm > 1 else a
            mu.append([np.float32((1.0 - frac) * profile[a[i]] + frac * profile[b[i]])
                       for i in range(E)])
        for s0 in range(0, T, seq_len):
            d = rng.next() % n_domains if n_domains > 1 else 0
            for t in range(s0, s0 + seq_len):
                for i in range(E):
                    logits[s, t, i] = mu[d][i] + np.float32(noise) * noise_z(rng)
                domains[s, t] = d
    return logits, domains


def main():
    os.makedirs(ROOT, exist_ok=True)
    logits, domains = traffic(E, STEPS, T, SEQ, DOMAINS, SKEW, NOISE, DRIFT, SEED)
    np.save(os.path.join(ROOT, "traffic_logits.npy"), logits)
    np.save(os.path.join(ROOT, "traffic_domains.npy"), domains)
    print("traffic: logits", logits.shape, "domains", np.bincount(domains.ravel()))


if __name__ == "__main__":
    main()
