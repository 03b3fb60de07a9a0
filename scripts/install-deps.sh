#!/usr/bin/env bash
# Installs the Debian packages dsmoe needs, only those that are missing.
#   scripts/install-deps.sh          build + test dependencies (BLIS: libblis-pthread-dev)
#   scripts/install-deps.sh bench    also python3-numpy / python3-torch for the benchmarks
#   scripts/install-deps.sh ref      also python3-numpy / python3-torch for the golden generators
set -euo pipefail

pkgs=(gcc make cmake pkg-config libc6-dev libblis-pthread-dev clang libclang-rt-14-dev libomp-dev clang-tidy cppcheck)
case "${1:-}" in
  bench|ref) pkgs+=(python3 python3-numpy python3-torch) ;;
  "") ;;
  *) echo "usage: $0 [bench|ref]" >&2; exit 2 ;;
esac

missing=()
for p in "${pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "install-deps: installing ${missing[*]}" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
    echo "install-deps: need root to run: apt-get install -y ${missing[*]}" >&2; exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
