#!/usr/bin/env python3
"""PyTorch and NumPy implementations of DeepSeek-V3 routing (fp32, CPU), written from the
routing spec for the benchmark; prints one JSON line per measurement.

  route_torch.py --preset deepseek-v3 --tokens 4096 [--hidden 7168] [--repeat 5] [--threads 1]

Threads are pinned to --threads (dsmoe's count in the same comparison): the BLAS and
OpenMP pools through OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS, set before
numpy and torch are imported (Debian's torch calls the system OpenBLAS, whose threads
torch.set_num_threads does not control), and torch's own pool by torch.set_num_threads.
"""
import argparse
import json
import os
import sys
import time


from pin_threads import THREADS  # noqa: E402  (first: pins the thread pools)
import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(THREADS)


def thread_report():
    return {"threads": THREADS, "torch_threads": torch.get_num_threads(),
            "OPENBLAS_NUM_THREADS": os.environ["OPENBLAS_NUM_THREADS"],
            "OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"],
            "MKL_NUM_THREADS": os.environ["MKL_NUM_THREADS"]}


PRESETS = {
    # E, G, TG, K, score, group rule, normalize, scale, bias
    "deepseek-v3": (256, 8, 4, 8, "sigmoid", "top2", True, 2.5, True),
    "deepseek-v2": (160, 8, 3, 6, "softmax", "max", False, 16.0, False),
    "moonlight": (64, 1, 1, 6, "sigmoid", "top2", True, 2.446, True),
}


def torch_route(logits, bias, E, G, TG, K, score, rule, normalize, scale):
    """The official Gate.forward, in fp32."""
    s = logits.sigmoid() if score == "sigmoid" else logits.softmax(dim=-1, dtype=torch.float32)
    original = s
    if bias is not None:
        s = s + bias
    if G > 1:
        sv = s.view(s.size(0), G, -1)
        gs = sv.amax(dim=-1) if rule == "max" else sv.topk(2, dim=-1)[0].sum(dim=-1)
        keep = gs.topk(TG, dim=-1)[1]
        mask = s.new_ones(s.size(0), G, dtype=torch.bool).scatter_(1, keep, False)
        s = sv.masked_fill_(mask.unsqueeze(-1), float("-inf")).flatten(1)
    idx = torch.topk(s, K, dim=-1)[1]
    w = original.gather(1, idx)
    if normalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w * scale, idx


def numpy_route(logits, bias, E, G, TG, K, score, rule, normalize, scale):
    if score == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-logits))
    else:
        z = np.exp(logits - logits.max(axis=-1, keepdims=True))
        s = z / z.sum(axis=-1, keepdims=True)
    c = s + bias if bias is not None else s
    T = logits.shape[0]
    if G > 1:
        cv = c.reshape(T, G, -1)
        gs = cv.max(-1) if rule == "max" else np.partition(cv, -2, axis=-1)[..., -2:].sum(-1)
        keep = np.argpartition(-gs, TG - 1, axis=-1)[:, :TG]
        mask = np.ones((T, G), dtype=bool)
        np.put_along_axis(mask, keep, False, axis=1)
        c = np.where(mask[:, :, None], -np.inf, cv).reshape(T, -1)
    idx = np.argpartition(-c, K - 1, axis=-1)[:, :K]
    order = np.argsort(-np.take_along_axis(c, idx, -1), axis=-1, kind="stable")
    idx = np.take_along_axis(idx, order, -1)
    w = np.take_along_axis(s, idx, -1)
    if normalize:
        w = w / w.sum(-1, keepdims=True)
    return w * scale, idx


def timeit(fn, repeat, min_time=0.05):
    fn()
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < min_time / 4:
        fn()
        n += 1
    per = (time.perf_counter() - t0) / n
    n = max(1, int(min_time / max(per, 1e-9)))
    times = []
    for _ in range(repeat):
        a = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - a) / n)
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="deepseek-v3", choices=sorted(PRESETS))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1,
                    help="threads of every pool (read before the imports)")
    a = ap.parse_args()
    E, G, TG, K, score, rule, norm, scale, has_bias = PRESETS[a.preset]
    rng = np.random.default_rng(0)
    logits_np = (3.0 * rng.uniform(-1, 1, (a.tokens, E))).astype(np.float32)
    bias_np = (0.01 * rng.uniform(-1, 1, E)).astype(np.float32) if has_bias else None
    logits = torch.from_numpy(logits_np)
    bias = torch.from_numpy(bias_np) if has_bias else None
    args = (E, G, TG, K, score, rule, norm, scale)
    out = {"preset": a.preset, "tokens": a.tokens, "torch_version": torch.__version__,
           "numpy_version": np.__version__}
    out.update(thread_report())
    with torch.no_grad():
        t = timeit(lambda: torch_route(logits, bias, *args), a.repeat, a.min_time)
        out["torch_tokens_per_s"] = a.tokens / t
        t = timeit(lambda: numpy_route(logits_np, bias_np, *args), a.repeat, a.min_time)
        out["numpy_tokens_per_s"] = a.tokens / t
        if a.hidden:
            x = torch.from_numpy(rng.uniform(-1, 1, (a.tokens, a.hidden)).astype(np.float32))
            W = torch.from_numpy((0.02 * rng.uniform(-1, 1, (E, a.hidden))).astype(np.float32))
            t = timeit(lambda: torch_route(torch.nn.functional.linear(x, W), bias, *args), a.repeat,
                       a.min_time)
            out["torch_hidden_tokens_per_s"] = a.tokens / t
            out["torch_hidden_gflops"] = 2.0 * a.tokens * a.hidden * E / t * 1e-9
    print(json.dumps(out))


if __name__ == "__main__":
    main()
