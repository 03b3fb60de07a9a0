#!/usr/bin/env bash
# bench_ep.sh — expert parallelism (bench_ep under mpirun) for 1, 2 and 4 ranks, one
# thread each: the layer's tokens/s; bytes per token sent between ranks with node-limited
# routing (a group per rank, half the groups kept per token) and without (all groups) on
# the same tokens, next to the formula K·D·4·(fraction of remote experts) for the combine;
# on skewed traffic (dsmoe_traffic), the step time and the slowest rank's expert CPU time
# with the bias the controller reaches and without. Prints a table (and the JSON lines
# with --json). Ranks on one machine share its cores: on a loaded or small machine the
# wall-clock step times mostly measure the scheduler; the expert CPU time of the slowest
# rank and the busiest rank's load ratio do not depend on it.
# Usage: bash bench/bench_ep.sh [BUILD_DIR] [--json] [bench_ep options...]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
shift || true
json=0
if [ "${1:-}" = "--json" ]; then json=1; shift; fi
bin="$build/bench_ep"
[ -x "$bin" ] || { echo "bench_ep: not built (MPI missing? apt-get install libopenmpi-dev openmpi-bin)" >&2; exit 2; }
flags=(--oversubscribe)
[ "$(id -u)" = 0 ] && flags+=(--allow-run-as-root)
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE OMPI_MCA_mpi_yield_when_idle=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for np in 1 2 4; do
  echo "bench_ep: $np rank(s) ..." >&2
  mpirun "${flags[@]}" -np $np "$bin" "$@" >>"$out"
done
[ $json = 1 ] && cat "$out"
/usr/bin/python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
def of(kind): return [r for r in rows if r["bench"] == kind]
t = of("throughput")
if t:
    r0 = t[0]
    print(f"layer: T = {r0['tokens']} tokens per step, D = {r0['D']}, F = {r0['F']}, E = {r0['E']}, K = {r0['K']}, 1 thread per rank")
    print(f"{'ranks':>5} {'tokens/s':>10}")
    for r in t: print(f"{r['ranks']:>5} {r['tokens_per_s']:>10.0f}")
print()
print("bytes per token sent between ranks (dispatch: a token once per rank it reaches, + 12 B per assignment;")
print("combine: one row per assignment), formula = K*D*4 * fraction of remote experts (combine)")
print(f"{'ranks':>5} {'groups kept':>11} {'ranks/token':>11} {'dispatch':>9} {'combine':>9} {'total':>9} {'formula':>9}")
for r in of("bytes"):
    print(f"{r['ranks']:>5} {str(r['topk_groups'])+'/'+str(r['groups']):>11} {r['mean_ranks_per_token']:>11.3f} "
          f"{r['dispatch_bytes_per_token']:>9.1f} {r['combine_bytes_per_token']:>9.1f} {r['bytes_per_token']:>9.1f} "
          f"{r['formula_combine_bytes_per_token']:>9.1f}")
print()
print("skewed traffic: busiest rank's load / mean, slowest rank's expert CPU s per step, step wall s")
print(f"{'ranks':>5} {'load no bias':>12} {'load bias':>9} {'excess removed':>14} {'cpu no bias':>11} {'cpu bias':>9} {'step no bias':>12} {'step bias':>9}")
for r in of("skew"):
    print(f"{r['ranks']:>5} {r['busiest_load_ratio_no_bias']:>12.3f} {r['busiest_load_ratio_bias']:>9.3f} "
          f"{100*r['excess_removed']:>13.0f}% {r['slowest_rank_expert_cpu_s_no_bias']:>11.4f} "
          f"{r['slowest_rank_expert_cpu_s_bias']:>9.4f} {r['step_s_no_bias']:>12.4f} {r['step_s_bias']:>9.4f}")
PY
