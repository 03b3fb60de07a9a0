#!/usr/bin/env bash
# Fuzz smoke test of the file parsers (and the layer's load path on top of the
# safetensors reader): builds the libFuzzer targets with clang
# (DSMOE_FUZZ=ON) in the build folder $1 (default build-fuzz), then runs each one
# for $FUZZ_SECONDS seconds (default 30) on a fresh copy of its seed corpus
# (fuzz/seeds/<format>/) with its dictionary. Fails on any crash, sanitizer
# report, leak or timeout; the reproducer is left in the build folder.
#   scripts/fuzz-smoke.sh [BUILD_DIR]          FUZZ_SECONDS=300 scripts/fuzz-smoke.sh
# Needs clang and libclang-rt-14-dev (libFuzzer, ASan, UBSan runtimes).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-build-fuzz}
secs=${FUZZ_SECONDS:-30}
jobs=${JOBS:-2}

cmake -S "$root" -B "$build" -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DDSMOE_FUZZ=ON -DDSMOE_TESTS=OFF -DDSMOE_OPENMP=OFF >/dev/null
cmake --build "$build" -j "$jobs" --target fuzz_npy fuzz_safetensors fuzz_layer fuzz_config >/dev/null

# One target per core at a time (each libFuzzer run is single-threaded), so the
# smoke takes about ceil(targets / JOBS) * FUZZ_SECONDS.
run_one() {
  local fmt=$1 corpus="$build/corpus-$1" log="$build/fuzz_$1.log"
  rm -rf "$corpus"
  mkdir -p "$corpus"
  cp "$root/fuzz/seeds/$fmt/"* "$corpus/"
  "$build/fuzz_$fmt" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=4096 \
    -dict="$root/fuzz/$fmt.dict" -artifact_prefix="$build/fuzz_$fmt-" -print_final_stats=1 \
    "$corpus" >"$log" 2>&1
}

status=0
fmts=(npy safetensors layer config)
for ((i = 0; i < ${#fmts[@]}; i += jobs)); do
  batch=("${fmts[@]:i:jobs}")
  pids=()
  for fmt in "${batch[@]}"; do
    echo "fuzz-smoke: fuzz_$fmt for ${secs}s (log: $build/fuzz_$fmt.log)"
    run_one "$fmt" &
    pids+=($!)
  done
  for k in "${!batch[@]}"; do
    fmt=${batch[$k]}
    if wait "${pids[$k]}"; then
      grep -E '^stat::number_of_executed_units|^stat::new_units_added' "$build/fuzz_$fmt.log" |
        sed "s/^/  fuzz_$fmt: /"
    else
      status=1
      echo "fuzz-smoke: fuzz_$fmt FAILED; the end of its log:" >&2
      tail -n 60 "$build/fuzz_$fmt.log" >&2
    fi
  done
done
exit "$status"
