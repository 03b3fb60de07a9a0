#!/usr/bin/env bash
# Static analysis: clang-tidy (config in .clang-tidy) over the library, CLI and tests using
# the compile database of a Release build, and cppcheck over the same sources. Exits
# non-zero on any finding.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
files=$(ls src/*.c src/kernels/*.c tools/*.c tests/test_*.c)
status=0
echo "== clang-tidy"
out=$(clang-tidy -p "$build" --quiet $files 2>/dev/null | grep -E "warning:|error:" || true)
if [ -n "$out" ]; then echo "$out"; status=1; fi
echo "== cppcheck"
if ! cppcheck --enable=warning,performance,portability --std=c11 --inline-suppr --quiet \
     --error-exitcode=1 -Iinclude -Isrc -Itools -Itests -D__GNUC__ -D__x86_64__ \
     --suppress=missingIncludeSystem $files; then
  status=1
fi
[ $status -eq 0 ] && echo "lint: clean"
exit $status
