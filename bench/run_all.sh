#!/usr/bin/env bash
# Runs every benchmark in bench/ against the build in $1 (default build) and prints their
# tables. Uses Debian's python3 with python3-numpy and python3-torch (make bench installs
# them). One thread everywhere: dsmoe's --threads 1, and every BLAS / OpenMP pool of the
# references pinned to 1 here (and again by each Python script before it imports numpy or
# torch); the whole-model benchmark runs one and two threads on both sides, its table
# says which. Each benchmark prints the CPU, the FMA peak and the read bandwidth it measured
# in the same run, and reports its figures as shares of them next to the library ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
py=/usr/bin/python3
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
echo "## Machine"
"$build/dsmoe" bench machine
echo "Threads: 1 (OPENBLAS_NUM_THREADS=$OPENBLAS_NUM_THREADS OMP_NUM_THREADS=$OMP_NUM_THREADS MKL_NUM_THREADS=$MKL_NUM_THREADS)"
echo
echo "## Router"
"$py" bench/bench_route.py --dsmoe "$build/dsmoe" --threads 1
if [ -d "$build/python/dsmoe" ]; then
  echo
  echo "## Python binding"
  "$py" bench/bench_python.py --build "$build" --threads 1
fi
if [ -f bench/bench_moe.sh ]; then
  echo
  echo "## MoE layer"
  bash bench/bench_moe.sh "$build"
fi
if [ -x "$build/bench_model" ]; then
  echo
  echo "## Whole model (prompt and decode; fp32 and bf16 models written to a temporary directory)"
  bash bench/bench_model.sh "$build"
fi
if [ -x "$build/bench_gemm" ]; then
  echo
  echo "## The layer's weight-streaming product, by rows per expert"
  echo "(inner size 1408: 32 routed experts; 2816: the two shared experts, 8 times, on T = 32 rows)"
  { "$build/bench_gemm"
    "$build/bench_gemm" --inner 2816 --experts 8 --rows 32; } | "$py" -c '
import json, sys
rows = [json.loads(l) for l in sys.stdin if l.strip()]
m = [r for r in rows if r["impl"] == "machine"][0]
peak = [r for r in rows if r["impl"] == "sgemm"][0]
print("CPU: %s (family 0x%X model 0x%X: %s); FMA peak %.1f GFLOP/s (1 thread, %s)" % (
    m["cpu_name"], m["cpu_family"], m["cpu_model"], m["uarch"], m["fma_peak_gflops"],
    "AVX-512" if m["fma_peak_avx512_gflops"] > 0 else "AVX2"))
print("BLIS SGEMM (512 rows, one thread): %.1f GFLOP/s = %.0f%% of the FMA peak" % (peak["gflops_per_s"],
      100 * peak["peak_fraction"]))
print()
print("| inner size | rows | weights GB/s | % of read bandwidth | GFLOP/s | % of FMA peak | % of SGEMM | vs BLIS SGEMM, same rows |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    if r["impl"] == "dsmoe":
        print("| %d | %d | %.1f | %.0f%% | %.1f | %.0f%% | %.0f%% | %.2fx |" % (r["inner"], r["rows"], r["weights_gb_per_s"],
              100 * r["bandwidth_fraction"], r["gflops_per_s"], 100 * r["peak_fraction"],
              100 * r["sgemm_fraction"], r["speedup_vs_blas"]))'
fi
if [ -x "$build/bench_wlinear" ]; then
  echo
  echo "## Products with weights as stored (attention, dense FFN, head), one and two threads"
  OMP_NUM_THREADS=2 "$build/bench_wlinear" --threads 1,2
fi
