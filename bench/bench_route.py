#!/usr/bin/env python3
"""Router benchmark: dsmoe vs PyTorch (CPU) and NumPy on the same shapes, one thread,
plus the gate projection against the bare SGEMM (BLIS) measured in the same run.

  /usr/bin/python3 bench/bench_route.py [--dsmoe build/dsmoe] [--preset deepseek-v3]
                                        [--tokens 1,32,256,4096] [--hidden 7168]

Prints a Markdown table; machines here are shared, so read the ratios, which are measured
side by side, rather than the absolute rates.
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run_json(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def median_dict(runs):
    """Per-key median of numeric fields over repeated runs (other fields from the first)."""
    out = dict(runs[0])
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            vals = sorted(r[k] for r in runs)
            out[k] = vals[len(vals) // 2]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsmoe", default=os.path.join(HERE, "..", "build", "dsmoe"))
    ap.add_argument("--preset", default="deepseek-v3")
    ap.add_argument("--tokens", default="1,32,256,4096")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3,
                    help="dsmoe and PyTorch runs alternate this many times; medians are compared")
    a = ap.parse_args()
    rows = []
    for T in [int(x) for x in a.tokens.split(",")]:
        hidden = a.hidden if T >= 32 else 0
        common = ["--tokens", str(T), "--repeat", str(a.repeat)]
        ds, ts = [], []
        for _ in range(a.rounds):  # alternate, so that both see the same machine load
            ds.append(run_json([a.dsmoe, "bench", "route", "--preset", a.preset, "--threads", "1",
                                "--json"] + common + (["--hidden", str(hidden)] if hidden else [])))
            ts.append(run_json([sys.executable, os.path.join(HERE, "route_torch.py"), "--preset",
                                a.preset] + common + (["--hidden", str(hidden)] if hidden else [])))
        rows.append((T, median_dict(ds), median_dict(ts)))
        sys.stderr.write(f"T={T} done\n")
    print(f"Router benchmark, preset {a.preset}, one thread, kernels {rows[0][1]['isa']}, "
          f"torch {rows[0][2]['torch_version']}, numpy {rows[0][2]['numpy_version']}\n")
    print("| T | dsmoe tokens/s | PyTorch tokens/s | dsmoe / PyTorch | NumPy tokens/s | dsmoe / NumPy |")
    print("|---:|---:|---:|---:|---:|---:|")
    for T, d, t in rows:
        print(f"| {T} | {d['tokens_per_s']:.3g} | {t['torch_tokens_per_s']:.3g} | "
              f"{d['tokens_per_s'] / t['torch_tokens_per_s']:.1f}x | {t['numpy_tokens_per_s']:.3g} | "
              f"{d['tokens_per_s'] / t['numpy_tokens_per_s']:.1f}x |")
    hid = [(T, d, t) for T, d, t in rows if "hidden" in d]
    if hid:
        print(f"\nWith the gate projection from D = {a.hidden} (fp32 gate weight):\n")
        print("| T | dsmoe GFLOP/s | bare SGEMM GFLOP/s | dsmoe / SGEMM | PyTorch linear+route GFLOP/s | dsmoe / PyTorch |")
        print("|---:|---:|---:|---:|---:|---:|")
        for T, d, t in hid:
            print(f"| {T} | {d['hidden_gflops']:.1f} | {d['sgemm_gflops']:.1f} | {d['ratio_vs_sgemm']:.1%} | "
                  f"{t['torch_hidden_gflops']:.1f} | {d['hidden_gflops'] / t['torch_hidden_gflops']:.2f}x |")


if __name__ == "__main__":
    main()
