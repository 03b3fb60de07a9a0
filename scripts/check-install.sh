#!/usr/bin/env bash
# Installs the build in $1 into a scratch prefix and builds examples/route_logits.c
# against it four ways: CMake's find_package(dsmoe) with dsmoe::dsmoe (shared) and
# dsmoe::dsmoe_static, and pkg-config with the shared library and, with --static, the
# archive. Every consumer runs with LD_LIBRARY_PATH unset: the run paths the package
# hands out must be enough.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
run() { env -u LD_LIBRARY_PATH "$@" | tail -n 1; }
cmake --install "$build" --prefix "$tmp/prefix" >/dev/null

# find_package: the shared target (examples/CMakeLists.txt) and the static one
cmake -S examples -B "$tmp/ex" -DCMAKE_PREFIX_PATH="$tmp/prefix" >/dev/null
cmake --build "$tmp/ex" >/dev/null
run "$tmp/ex/route_logits"
mkdir -p "$tmp/static"
cat >"$tmp/static/CMakeLists.txt" <<CMAKE
cmake_minimum_required(VERSION 3.18)
project(dsmoe_static_consumer C)
find_package(dsmoe 0.1 REQUIRED)
add_executable(route_static "$PWD/examples/route_logits.c")
target_link_libraries(route_static PRIVATE dsmoe::dsmoe_static)
CMAKE
cmake -S "$tmp/static" -B "$tmp/static/b" -DCMAKE_PREFIX_PATH="$tmp/prefix" >/dev/null
cmake --build "$tmp/static/b" >/dev/null
run "$tmp/static/b/route_static"

# pkg-config: nothing added by hand, no LD_LIBRARY_PATH at run time
pcdir=$(ls -d "$tmp"/prefix/lib*/pkgconfig | head -n 1)
export PKG_CONFIG_PATH="$pcdir"
# shellcheck disable=SC2046  # pkg-config's flags are meant to be split
cc -std=c11 examples/route_logits.c -o "$tmp/route_pc" $(pkg-config --cflags --libs dsmoe)
run "$tmp/route_pc"
# shellcheck disable=SC2046
cc -std=c11 examples/route_logits.c -o "$tmp/route_pc_static" $(pkg-config --cflags dsmoe) \
  $(pkg-config --static --libs dsmoe | sed 's/-ldsmoe\b/-l:libdsmoe.a/')
if readelf -d "$tmp/route_pc_static" | grep -q 'libdsmoe\.so'; then
  echo "install check: the --static pkg-config consumer still needs libdsmoe.so" >&2
  exit 1
fi
run "$tmp/route_pc_static"
run "$tmp/prefix/bin/dsmoe" --version
echo "install check: find_package (shared, static) and pkg-config (shared, static) consumers built and ran without LD_LIBRARY_PATH"
