#!/usr/bin/env python3
"""Python binding benchmark: what a call from Python costs on top of the C call, and the
router called from Python against PyTorch's reference routing (route_torch.py, the
official Gate in fp32), all in one run on one thread.

  /usr/bin/python3 bench/bench_python.py [--build build] [--threads 1] [--rounds 5]

1. Per-call overhead at T = 1 (DeepSeek-V3 preset, 256 experts): dsmoe_router_forward
   timed in a C loop inside the extension (outputs in a reused scratch, no Python in
   the loop), against dsmoe.route(logits, bias) from Python (which also allocates its two
   output arrays and releases the GIL), and dsmoe.torch.route on a tensor that needs no
   gradient (tensor <-> array views; with a gradient it goes through an autograd
   Function). Overhead = Python per call − C per call; the target is under 2 µs.
2. Router from Python against PyTorch at T = 1 and 4096: dsmoe.route and
   route_torch.torch_route on the same logits and bias, tokens/s and the ratio.
Rounds alternate the contenders, so that they see the same machine load. The
per-call figures are the fastest of --rounds rounds (preemption on a shared machine
only ever adds time), the throughputs the median. The CPU line is `dsmoe bench
machine`'s.
"""
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from pin_threads import THREADS  # noqa: E402  (first: pins the thread pools)


def arg(name, default):
    if name in sys.argv:
        return sys.argv[sys.argv.index(name) + 1]
    return default


BUILD = arg("--build", os.path.join(HERE, "..", "build"))
ROUNDS = int(arg("--rounds", "7"))
sys.path.insert(0, os.path.join(BUILD, "python"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import dsmoe  # noqa: E402
import dsmoe.torch as dt  # noqa: E402
from dsmoe import _dsmoe  # noqa: E402
from route_torch import PRESETS, torch_route  # noqa: E402

torch.set_num_threads(THREADS)


def per_call(f, n):
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def main():
    machine = subprocess.run([os.path.join(BUILD, "dsmoe"), "bench", "machine"], check=True,
                             capture_output=True, text=True).stdout.splitlines()
    print(machine[0])
    print("Threads: 1 (dsmoe threads=%d; torch.get_num_threads() = %d)" % (THREADS,
                                                                             torch.get_num_threads()))
    print("dsmoe %s (kernels %s), Python %s, numpy %s, torch %s\n" % (
        dsmoe.__version__, dsmoe.isa(), sys.version.split()[0], np.__version__, torch.__version__))
    rng = np.random.default_rng(0)
    E, G, TG, K, score, rule, norm, scale, _ = PRESETS["deepseek-v3"]
    cfg = dsmoe.router_config("deepseek-v3")
    bias = (0.01 * rng.standard_normal(E)).astype(np.float32)
    tb = torch.from_numpy(bias)

    # 1. per-call overhead at T = 1
    x1 = rng.standard_normal((1, E)).astype(np.float32)
    t1 = torch.from_numpy(x1)
    n = 20000
    c, p, pt = [], [], []
    for _ in range(ROUNDS):
        for _ in range(5):
            c.append(_dsmoe.bench_route_c(cfg, x1, bias, 1, n))
            p.append(per_call(lambda: dsmoe.route(x1, bias, threads=THREADS), n))
        pt.append(per_call(lambda: dt.route(t1, tb, threads=THREADS), n // 5))
    c, p, pt = min(c), min(p), min(pt)
    print("Per-call cost at T = 1 (deepseek-v3, 256 experts), fastest of %d rounds:\n" % (5 * ROUNDS))
    print("| call | µs per call | overhead over the C call |")
    print("|---|---|---|")
    print("| dsmoe_router_forward, C loop | %.3f | — |" % (c * 1e6))
    print("| dsmoe.route(logits, bias), NumPy | %.3f | %.3f µs (target < 2 µs) |" % (p * 1e6, (p - c) * 1e6))
    print("| dsmoe.torch.route(tensor, bias), no graph recorded | %.3f | %.3f µs |" % (pt * 1e6, (pt - c) * 1e6))

    # 2. router from Python against PyTorch's reference routing
    print("\nRouter from Python against PyTorch (route_torch.torch_route, fp32), same logits:\n")
    print("| T | dsmoe.route tokens/s | PyTorch tokens/s | dsmoe / PyTorch | same experts |")
    print("|---|---|---|---|---|")
    for T in (1, 4096):
        x = rng.standard_normal((T, E)).astype(np.float32) * 1.5
        tx = torch.from_numpy(x)
        reps = 20000 if T == 1 else 20
        ds, ts = [], []
        for _ in range(ROUNDS):
            ds.append(per_call(lambda: dsmoe.route(x, bias, threads=THREADS), reps))
            with torch.no_grad():
                ts.append(per_call(lambda: torch_route(tx, tb, E, G, TG, K, score, rule, norm, scale), reps))
        d, t = median(ds), median(ts)
        idx, _ = dsmoe.route(x, bias)
        with torch.no_grad():
            _, tidx = torch_route(tx, tb, E, G, TG, K, score, rule, norm, scale)
        same = np.array_equal(np.sort(idx, axis=1), np.sort(tidx.numpy(), axis=1))
        print("| %d | %.3g | %.3g | %.1fx | %s |" % (T, T / d, T / t, t / d, "yes" if same else "no"))


if __name__ == "__main__":
    main()
