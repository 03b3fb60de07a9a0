#!/usr/bin/env bash
# ep_cli.sh — `mpirun -np R dsmoe layer` (R = 1, 2, 4): the output and the routing are
# the bytes one process writes (tokens split in blocks of 512; the even split too where
# the test program found BLIS's rows independent of the call's row count: not checked
# here), --ep-stats has the documented fields with "ranks": R, and one process writes
# "ranks": 1; a weights file that one rank cannot read fails on every rank with a
# message, within the timeout, instead of hanging.
# Usage: bash ep_cli.sh <dsmoe> <source-dir> <tmpdir> <mpirun> [mpirun flags...]
set -u
DS=$1 SR=$2 TD=$3 MPIRUN=$4
shift 4
MPIFLAGS=("$@")
source "$(dirname "$0")/clilib.sh" "$DS" "$SR" "$TD"
G="$SRC/tests/golden/moe"
L="$G/v3_groups.safetensors"
ROUTER=(--prefix model.layers.1.mlp. --experts 16 --groups 4 --topk-groups 2 --top-k 4 --scale 2.5)
export OMP_WAIT_POLICY=PASSIVE OMPI_MCA_mpi_yield_when_idle=1 OMPI_MCA_btl_vader_single_copy_mechanism=none OMP_NUM_THREADS=1

# 1100 tokens: the golden input (13, 20) repeated, so that blocks of 512 split it
X="$TMP/x.npy"
/usr/bin/python3 -c "
import numpy as np, sys
x = np.load(sys.argv[1]); np.save(sys.argv[2], np.tile(x, (85, 1))[:1100] * 1.0)
" "$G/cli_x.npy" "$X" || fail "cannot write the input"

expect 0 "" -- "$DSMOE" layer --weights "$L" --input "$X" --output "$TMP/y1.npy" \
    --out-indices "$TMP/i1.npy" --ep-stats "$TMP/s1.json" "${ROUTER[@]}"
/usr/bin/python3 - "$TMP/s1.json" 1 <<'PY' || fail "one-process stats"
import json, sys
s = json.load(open(sys.argv[1])); R = int(sys.argv[2])
assert s["ranks"] == R and len(s["per_rank"]) == R, s
for r, p in enumerate(s["per_rank"]):
    assert p["rank"] == r and len(p["experts"]) == 2
    for k in ("tokens_in", "bytes_sent", "bytes_received"): assert isinstance(p[k], int), k
assert sum(p["bytes_sent"] for p in s["per_rank"]) == sum(p["bytes_received"] for p in s["per_rank"])
assert s["per_rank"][0]["experts"][0] == 0 and s["per_rank"][-1]["experts"][1] == 15
PY

for np in 1 2 4; do
    expect 0 "" -- timeout 60 "$MPIRUN" "${MPIFLAGS[@]}" -np $np "$DSMOE" layer --weights "$L" \
        --input "$X" --output "$TMP/y$np.npy" --out-indices "$TMP/i$np.npy" \
        --ep-stats "$TMP/s$np.json" "${ROUTER[@]}"
    cmp -s "$TMP/y1.npy" "$TMP/y$np.npy" || fail "output of $np ranks differs from one process"
    cmp -s "$TMP/i1.npy" "$TMP/i$np.npy" || fail "indices of $np ranks differ from one process"
    /usr/bin/python3 - "$TMP/s$np.json" $np <<'PY' || fail "stats of $np ranks"
import json, sys
s = json.load(open(sys.argv[1])); R = int(sys.argv[2])
assert s["ranks"] == R and len(s["per_rank"]) == R, s
assert sum(p["assignments_in"] for p in s["per_rank"]) == 1100 * 4
assert sum(p["bytes_sent"] for p in s["per_rank"]) == sum(p["bytes_received"] for p in s["per_rank"])
if R == 1: assert s["per_rank"][0]["bytes_sent"] == 0
else: assert s["bytes_total"] > 0
# group = rank with 4 groups, 2 kept: a token reaches at most 2 ranks (4 ranks)
if R == 4: assert s["mean_ranks_per_token"] <= 2.0 + 1e-9, s["mean_ranks_per_token"]
PY
done

# a file that rank 1 cannot read: every rank fails, rank 0 says which rank and why
expect 1 "rank 1" -- timeout 60 "$MPIRUN" "${MPIFLAGS[@]}" -np 2 bash -c \
    'W="$1"; [ "$OMPI_COMM_WORLD_RANK" = 1 ] && W="$1.missing"; shift; exec "$@" --weights "$W"' \
    _ "$L" "$DSMOE" layer --input "$X" --output "$TMP/yf.npy" "${ROUTER[@]}"
grep -q "missing" "$TMP/err.txt" || fail "the failing rank's message lacks the file name"
[ -e "$TMP/yf.npy" ] && fail "an output was written after a failure"

[ $fails -eq 0 ] && echo "ep_cli: all passed"
exit $((fails > 0))
