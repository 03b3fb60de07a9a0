#!/usr/bin/env python3
"""Router benchmark: dsmoe vs PyTorch (CPU) and NumPy on the same shapes and the same
thread count, plus the gate projection against the bare SGEMM (BLIS), and the machine's
FMA peak and read bandwidth, all measured in the same run.

  /usr/bin/python3 bench/bench_route.py [--dsmoe build/dsmoe] [--preset deepseek-v3]
                                        [--tokens 1,32,256,4096] [--hidden 7168] [--threads 1]

Prints the CPU (family/model and the microarchitecture they imply), the FMA peak and the
read bandwidth, then Markdown tables: the routing from logits as tokens/s, its ratio to
PyTorch and NumPy and the logits' read rate as a share of the read bandwidth; the
projection's GFLOP/s as a share of the FMA peak next to the SGEMM's. Machines here are
shared: read the shares and ratios, measured side by side, rather than the absolute rates.
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run_json(cmd, env=None):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
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
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for dsmoe and for every PyTorch / NumPy / BLAS pool")
    ap.add_argument("--isa", default=None, help="dsmoe kernel set (avx512, avx2, ref)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="dsmoe and PyTorch runs alternate this many times; medians are compared")
    a = ap.parse_args()
    # the same thread count on both sides, whatever the caller's environment says
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads),
               MKL_NUM_THREADS=str(a.threads))
    rows = []
    for T in [int(x) for x in a.tokens.split(",")]:
        hidden = a.hidden if T >= 32 else 0
        common = ["--tokens", str(T), "--repeat", str(a.repeat), "--threads", str(a.threads)]
        ds, ts = [], []
        for _ in range(a.rounds):  # alternate, so that both see the same machine load
            ds.append(run_json([a.dsmoe, "bench", "route", "--preset", a.preset, "--json"] + common +
                               (["--isa", a.isa] if a.isa else []) +
                               (["--hidden", str(hidden)] if hidden else []), env))
            ts.append(run_json([sys.executable, os.path.join(HERE, "route_torch.py"), "--preset",
                                a.preset] + common + (["--hidden", str(hidden)] if hidden else []), env))
        rows.append((T, median_dict(ds), median_dict(ts)))
        sys.stderr.write(f"T={T} done\n")
    m, t0 = rows[0][1], rows[0][2]
    print(f"CPU: {m['cpu_name']} ({m['cpu_vendor']} family 0x{m['cpu_family']:X} model "
          f"0x{m['cpu_model']:X} stepping {m['cpu_stepping']}: {m['uarch']}), AVX2 "
          f"{'yes' if m['avx2'] else 'no'}, AVX-512F {'yes' if m['avx512f'] else 'no'}")
    print(f"FMA peak (register-only fp32 FMA loop, {a.threads} thread(s), medians of the run): "
          f"{m['fma_peak_avx512_gflops_n']:.1f} GFLOP/s AVX-512, {m['fma_peak_avx2_gflops_n']:.1f} AVX2; "
          f"read bandwidth {m['read_gb_per_s_n']:.1f} GB/s")
    print(f"Threads: dsmoe {a.threads}; PyTorch {t0['torch_threads']} (torch.get_num_threads), "
          f"OPENBLAS_NUM_THREADS={t0['OPENBLAS_NUM_THREADS']} OMP_NUM_THREADS={t0['OMP_NUM_THREADS']} "
          f"MKL_NUM_THREADS={t0['MKL_NUM_THREADS']}")
    print(f"\nRouter benchmark, preset {a.preset}, kernels {m['isa']}, torch {t0['torch_version']}, "
          f"numpy {t0['numpy_version']}\n")
    print("| T | dsmoe tokens/s | ns/token | logits read, % of read BW | PyTorch tokens/s | dsmoe / PyTorch "
          "| NumPy tokens/s | dsmoe / NumPy |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for T, d, t in rows:
        print(f"| {T} | {d['tokens_per_s']:.3g} | {d['ns_per_token']:.0f} | {d['read_bandwidth_share']:.1%} | "
              f"{t['torch_tokens_per_s']:.3g} | {d['tokens_per_s'] / t['torch_tokens_per_s']:.1f}x | "
              f"{t['numpy_tokens_per_s']:.3g} | {d['tokens_per_s'] / t['numpy_tokens_per_s']:.1f}x |")
    hid = [(T, d, t) for T, d, t in rows if "hidden" in d]
    if hid:
        print(f"\nWith the gate projection from D = {a.hidden} (fp32 gate weight):\n")
        print("| T | dsmoe GFLOP/s | % of FMA peak | bare SGEMM GFLOP/s | % of FMA peak | dsmoe / SGEMM "
              "| PyTorch linear+route GFLOP/s | dsmoe / PyTorch |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for T, d, t in hid:
            print(f"| {T} | {d['hidden_gflops']:.1f} | {d['hidden_peak_share']:.1%} | {d['sgemm_gflops']:.1f} | "
                  f"{d['sgemm_peak_share']:.1%} | {d['ratio_vs_sgemm']:.1%} | {t['torch_hidden_gflops']:.1f} | "
                  f"{d['hidden_gflops'] / t['torch_hidden_gflops']:.2f}x |")


if __name__ == "__main__":
    main()
