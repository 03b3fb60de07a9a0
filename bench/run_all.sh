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
  OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 "$build/bench_gemm" | "$py" -c '
import json, sys
rows = [json.loads(l) for l in sys.stdin if l.strip()]
peak = [r for r in rows if r["impl"] == "sgemm"][0]["gflops_per_s"]
print("OpenBLAS SGEMM (512 rows): %.1f GFLOP/s" % peak)
print()
print("| rows | weights GB/s | % of read bandwidth | GFLOP/s | % of SGEMM | vs OpenBLAS, same rows |")
print("|---|---|---|---|---|---|")
for r in rows:
    if r["impl"] == "dsmoe":
        print("| %d | %.1f | %.0f%% | %.1f | %.0f%% | %.2fx |" % (r["rows"], r["weights_gb_per_s"],
              100 * r["bandwidth_fraction"], r["gflops_per_s"], 100 * r["sgemm_fraction"],
              r["speedup_vs_openblas"]))'
fi
