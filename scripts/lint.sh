#!/usr/bin/env bash
# Static analysis: clang-tidy (config in .clang-tidy, tests/.clang-tidy) over the library,
# CLI and tests using the compile database of a Release build, and cppcheck over the same
# sources with the build's defines. Prints every finding and exits non-zero on any of them,
# on a missing tool or on a file either tool could not analyse; prints "lint: clean" when
# there is nothing to report.
#   scripts/lint.sh [BUILD_DIR]      (default: build)
# CLANG_TIDY and CPPCHECK name other binaries (e.g. CLANG_TIDY=clang-tidy-14).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
clang_tidy=${CLANG_TIDY:-clang-tidy}
cppcheck=${CPPCHECK:-cppcheck}
for tool in "$clang_tidy" "$cppcheck" cmake; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "lint: $tool not found (Debian: apt-get install clang-tidy cppcheck)" >&2
    exit 2
  fi
done

# Tests and SIMD kernels on, so that every file below is in the compile database.
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DDSMOE_TESTS=ON -DDSMOE_SIMD=ON >/dev/null
files=(src/*/*.c tools/*.c tests/test_*.c)
db="$build/compile_commands.json"
status=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

missing=()
kept=()
for f in "${files[@]}"; do
  if grep -qF "/$f\"" "$db"; then
    kept+=("$f")
  elif [[ $f == src/ep/* || $f == tests/test_ep* || $f == tools/cli_mpi.c ]]; then
    echo "lint: $f skipped (built only where MPI is found)" >&2
  else
    missing+=("$f")
  fi
done
files=("${kept[@]}")
if [ ${#missing[@]} -gt 0 ]; then
  echo "lint: not in $db (clang-tidy would guess their flags): ${missing[*]}" >&2
  exit 2
fi

echo "== clang-tidy (${#files[@]} files)"
# Findings go to stdout; stderr carries "N warnings generated." and any real trouble
# (a config that does not parse, a file that does not compile).
# The files are split over JOBS clang-tidy processes (each file is analysed alone anyway).
jobs=${JOBS:-2}
tidy_rc=0
pids=()
for ((p = 0; p < jobs; p++)); do
  part=()
  for ((i = p; i < ${#files[@]}; i += jobs)); do part+=("${files[$i]}"); done
  [ ${#part[@]} -gt 0 ] || continue
  ( "$clang_tidy" -p "$build" --quiet "${part[@]}" >"$tmp/tidy.$p.out" 2>"$tmp/tidy.$p.err" ) &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || tidy_rc=$?; done
cat "$tmp"/tidy.*.out >"$tmp/tidy.out" 2>/dev/null || true
cat "$tmp"/tidy.*.err >"$tmp/tidy.err" 2>/dev/null || true
if grep -qE "(warning|error):" "$tmp/tidy.out"; then
  grep -E "(warning|error):" "$tmp/tidy.out"
  status=1
fi
if grep -vqE "^[0-9]+ (warnings?|errors?)( and [0-9]+ errors?)? generated\.$" "$tmp/tidy.err"; then
  grep -vE "^[0-9]+ (warnings?|errors?)( and [0-9]+ errors?)? generated\.$" "$tmp/tidy.err" >&2
  status=1
fi
if [ $tidy_rc -ne 0 ]; then
  echo "lint: clang-tidy exited with status $tidy_rc" >&2
  status=1
fi

echo "== cppcheck"
# One configuration: the defines of the x86-64 gcc build (CMakeLists.txt: _POSIX_C_SOURCE,
# the SIMD kernels, OpenMP, the shared-library export; tests/CMakeLists.txt: the golden
# data directory). information reports headers it could not find and unused
# suppressions; system headers are not analysed.
if ! "$cppcheck" --enable=warning,performance,portability,information --std=c11 \
     --inline-suppr --quiet --error-exitcode=1 \
     -Iinclude -Isrc -Isrc/kernels -Itools -Itests \
     -D__GNUC__ -D__x86_64__ -D__BYTE_ORDER__=1234 -D__ORDER_LITTLE_ENDIAN__=1234 \
     -D_POSIX_C_SOURCE=200809L -D_OPENMP=201511 -DDSMOE_HAVE_AVX2 -DDSMOE_HAVE_AVX512 \
     -DDSMOE_SHARED_BUILD '-DDSMOE_TEST_DATA_DIR="tests/golden"' \
     --suppress=missingIncludeSystem "${files[@]}"; then
  status=1
fi

if [ $status -eq 0 ]; then echo "lint: clean"; else echo "lint: findings above" >&2; fi
exit $status
