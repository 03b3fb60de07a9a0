#!/usr/bin/env bash
# Runs every benchmark in bench/ against the build in $1 (default build) and prints their
# tables. Uses Debian's python3 with python3-numpy and python3-torch (make bench installs
# them). One thread everywhere; ratios are measured side by side in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
py=/usr/bin/python3
echo "## Router"
"$py" bench/bench_route.py --dsmoe "$build/dsmoe"
if [ -f bench/bench_moe.sh ]; then
  echo
  echo "## MoE layer"
  bash bench/bench_moe.sh "$build"
fi
if [ -x "$build/bench_gemm" ]; then
  echo
  echo "## The layer's weight-streaming product, by rows per expert"
  echo "(inner size 1408: 32 routed experts; 2816: the two shared experts, 8 times, on T = 32 rows)"
  { OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 "$build/bench_gemm"
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 "$build/bench_gemm" --inner 2816 --experts 8 --rows 32; } | "$py" -c '
import json, sys
rows = [json.loads(l) for l in sys.stdin if l.strip()]
peak = [r for r in rows if r["impl"] == "sgemm"][0]["gflops_per_s"]
print("BLIS SGEMM (512 rows, one thread): %.1f GFLOP/s" % peak)
print()
print("| inner size | rows | weights GB/s | % of read bandwidth | GFLOP/s | % of SGEMM | vs BLIS SGEMM, same rows |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    if r["impl"] == "dsmoe":
        print("| %d | %d | %.1f | %.0f%% | %.1f | %.0f%% | %.2fx |" % (r["inner"], r["rows"], r["weights_gb_per_s"],
              100 * r["bandwidth_fraction"], r["gflops_per_s"], 100 * r["sgemm_fraction"],
              r["speedup_vs_blas"]))'
fi
