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
