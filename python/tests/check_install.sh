#!/usr/bin/env bash
# Installs the build in $1 into a scratch prefix and imports the Python package from
# P/lib/python3/dist-packages with PYTHONPATH alone (LD_LIBRARY_PATH unset: the
# extension finds libdsmoe through its run path), then routes one batch and compares
# it with the installed CLI's output.
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${1:-build}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cmake --install "$build" --prefix "$tmp/prefix" >/dev/null
cd "$tmp"
env -u LD_LIBRARY_PATH PYTHONPATH="$tmp/prefix/lib/python3/dist-packages" /usr/bin/python3 - "$tmp" <<'PY'
import os, subprocess, sys
import numpy as np
import dsmoe
tmp = sys.argv[1]
assert dsmoe.__file__.startswith(os.path.join(tmp, "prefix", "lib", "python3", "dist-packages", "dsmoe")), dsmoe.__file__
x = np.random.default_rng(0).standard_normal((16, 256)).astype(np.float32)
np.save(os.path.join(tmp, "x.npy"), x)
subprocess.run([os.path.join(tmp, "prefix", "bin", "dsmoe"), "route", "--logits", os.path.join(tmp, "x.npy"),
                "--out-indices", os.path.join(tmp, "i.npy"), "--out-weights", os.path.join(tmp, "w.npy")],
               check=True, stdout=subprocess.DEVNULL)
i, w = dsmoe.route(x)
assert np.array_equal(i, np.load(os.path.join(tmp, "i.npy")))
assert w.tobytes() == np.load(os.path.join(tmp, "w.npy")).tobytes()
print("python install check: dsmoe %s imported from the installed prefix, routes as the CLI" % dsmoe.__version__)
PY
