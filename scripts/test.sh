#!/usr/bin/env bash
# The whole test suite, as CI runs it: a Release build with gcc and its tests (the
# Python package's included, label python; the library's once more on the scalar
# reference kernels), the installed Python package imported from its prefix, the same tests under
# AddressSanitizer + UndefinedBehaviorSanitizer, a clang build with -Werror, a short
# libFuzzer run of every file parser, the installed-package check and clang-tidy +
# cppcheck.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-2}
FUZZ_SECONDS=${FUZZ_SECONDS:-20}
step() { printf '\n=== %s (at %d s)\n' "$*" "$SECONDS"; }

step "Release build (gcc) and tests"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$JOBS"
ctest --test-dir build --output-on-failure -j "$JOBS"

# The same library tests on the scalar reference kernels, which the dispatch never picks
# on an x86 CPU with AVX2: their own products, their thresholds between the streaming
# product and SGEMM (8 rows instead of 16 or none) and their selection code. The CLI
# tests add nothing here (same plumbing) and take minutes on scalar kernels.
step "Release tests on the reference kernels (DSMOE_FORCE_REF=1)"
DSMOE_FORCE_REF=1 ctest --test-dir build --output-on-failure -j "$JOBS" -LE "slow|cli|python"

# The Python tests ran above (ctest label python) on the build tree's package; here the
# installed one: `make install`'s layout (P/lib/python3/dist-packages/dsmoe), imported
# with PYTHONPATH alone (no LD_LIBRARY_PATH), routes as the CLI does.
if [ -d build/python/dsmoe ]; then
  step "Python package: installed layout"
  bash python/tests/check_install.sh build
else
  step "Python package: not built (no python3-dev)"
fi

step "AddressSanitizer + UndefinedBehaviorSanitizer build and tests"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDSMOE_SANITIZE=ON -DDSMOE_BENCH=OFF >/dev/null
cmake --build build-asan -j "$JOBS"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir build-asan --output-on-failure -j "$JOBS" -LE slow

step "clang build with -Werror"
CC=clang cmake -S . -B build-clang -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build-clang -j "$JOBS"

if [ -f scripts/fuzz-smoke.sh ]; then
  step "fuzz smoke (${FUZZ_SECONDS}s per target)"
  FUZZ_SECONDS="$FUZZ_SECONDS" bash scripts/fuzz-smoke.sh build-fuzz
fi

step "install + find_package / pkg-config consumer"
bash scripts/check-install.sh build

step "static analysis (clang-tidy, cppcheck)"
bash scripts/lint.sh build-lint

step "all test stages passed"
