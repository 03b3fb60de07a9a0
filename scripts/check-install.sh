#!/usr/bin/env bash
# Installs the build in $1 into a scratch prefix and builds examples/route_logits.c
# against it twice: with CMake's find_package(dsmoe) and with pkg-config.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cmake --install "$build" --prefix "$tmp/prefix" >/dev/null
cmake -S examples -B "$tmp/ex" -DCMAKE_PREFIX_PATH="$tmp/prefix" >/dev/null
cmake --build "$tmp/ex" >/dev/null
"$tmp/ex/route_logits" | tail -n 1
libdir=$(ls -d "$tmp"/prefix/lib*/pkgconfig | head -n 1)
PKG_CONFIG_PATH="$libdir" cc -std=c11 examples/route_logits.c -o "$tmp/route_pc" \
  $(PKG_CONFIG_PATH="$libdir" pkg-config --cflags --libs dsmoe) -Wl,-rpath,"$(dirname "$libdir")"
"$tmp/route_pc" | tail -n 1
"$tmp/prefix/bin/dsmoe" --version
echo "install check: find_package and pkg-config consumers built and ran"
