#!/usr/bin/env bash
# Installs the Debian packages dsmoe needs, only those that are missing.
#   scripts/install-deps.sh          build + test dependencies (BLIS: libblis-pthread-dev; the
#                                    Python package's python3-dev / python3-numpy, and
#                                    python3-torch for its PyTorch tests: when torch cannot
#                                    be installed those tests skip, saying so)
#   scripts/install-deps.sh bench    also python3-numpy / python3-torch for the benchmarks
#   scripts/install-deps.sh ref      also python3-numpy / python3-torch for the golden generators
set -euo pipefail

pkgs=(gcc make cmake pkg-config libc6-dev libblis-pthread-dev clang libclang-rt-14-dev libomp-dev clang-tidy cppcheck
      python3 python3-dev python3-numpy
      libopenmpi-dev openmpi-bin) # expert parallelism (src/ep) and its tests under mpirun
optional=(python3-torch  # the Python package's PyTorch tests (large; skipped if unavailable)
          chromium)      # the report's screenshot test (about 35 s to install; skipped if unavailable)
case "${1:-}" in
  bench|ref) pkgs+=(python3-torch); optional=(chromium) ;;
  "") ;;
  *) echo "usage: $0 [bench|ref]" >&2; exit 2 ;;
esac

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
missing=()
for p in "${pkgs[@]}"; do
  installed "$p" || missing+=("$p")
done
opt_missing=()
for p in "${optional[@]}"; do
  installed "$p" || opt_missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && [ ${#opt_missing[@]} -eq 0 ] && exit 0

echo "install-deps: installing ${missing[*]} ${opt_missing[*]}" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
    echo "install-deps: need root to run: apt-get install -y ${missing[*]}" >&2; exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ ${#opt_missing[@]} -gt 0 ] &&
   ! $SUDO apt-get install -y -qq --no-install-recommends "${opt_missing[@]}" >/dev/null; then
  echo "install-deps: could not install ${opt_missing[*]}: the tests that need them (PyTorch, the report's screenshot) will be skipped" >&2
fi
