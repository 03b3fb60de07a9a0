#!/usr/bin/env bash
# cli_layer.sh — `dsmoe layer` end to end: a checkpoint-format layer file and .npy
# hidden states in, output and routing out; routing equal to the reference's; the
# same bytes for any thread count; save-format round trip via --prefix detection;
# and errors naming the missing / mis-shaped / wrong-dtype tensor.
# Usage: bash cli_layer.sh <dsmoe> <source-dir> <tmpdir>
set -u
DSMOE=$1
SRC=$2
TMP=$3
G="$SRC/tests/golden/moe"
rm -rf "$TMP"
mkdir -p "$TMP"
fails=0
fail() { echo "FAIL: $*" >&2; fails=$((fails + 1)); }

# expect CODE NEEDLE -- command...: exit code and a message fragment on stderr
expect() {
    local code=$1 needle=$2
    shift 3
    "$@" >"$TMP/out.txt" 2>"$TMP/err.txt"
    local rc=$?
    if [ "$rc" != "$code" ]; then
        fail "exit $rc (want $code): $*"
        cat "$TMP/err.txt" >&2
    elif [ -n "$needle" ] && ! grep -qF -- "$needle" "$TMP/err.txt"; then
        fail "stderr lacks '$needle': $*"
        cat "$TMP/err.txt" >&2
    fi
}

# data bytes of a .npy (everything after the header)
npy_data() {
    python_free_len=$(($(od -An -tu2 -j8 -N2 "$1" | tr -d ' ') + 10))
    tail -c +$((python_free_len + 1)) "$1"
}

L="$G/v3_groups.safetensors"
P=model.layers.1.mlp.
ROUTER=(--experts 16 --groups 4 --topk-groups 2 --top-k 4 --scale 2.5)

expect 0 "" -- "$DSMOE" layer --help
grep -q -- "--shared-experts" "$TMP/out.txt" || fail "--help lacks --shared-experts"
grep -q -- "--preset" "$TMP/out.txt" || fail "--help lacks the router flags"

# run, outputs, routing equal to the reference
expect 0 "" -- "$DSMOE" layer --weights "$L" --prefix $P --input "$G/cli_x.npy" \
    --output "$TMP/y1.npy" --out-indices "$TMP/i.npy" --out-weights "$TMP/w.npy" \
    --out-logits "$TMP/u.npy" --threads 1 "${ROUTER[@]}"
for f in y1 i w u; do [ -s "$TMP/$f.npy" ] || fail "$f.npy not written"; done
head -c 128 "$TMP/y1.npy" | grep -q "(13, 20)" || fail "y shape is not (13, 20)"
head -c 128 "$TMP/i.npy" | grep -q "(13, 4)" || fail "indices shape is not (13, 4)"
head -c 128 "$TMP/u.npy" | grep -q "(13, 16)" || fail "logits shape is not (13, 16)"
cmp -s <(npy_data "$TMP/i.npy") <(npy_data "$G/cli_indices.npy") ||
    fail "indices differ from the reference's"

# the same bytes on two threads, and the preset form of the same routing
expect 0 "" -- "$DSMOE" layer --weights "$L" --prefix $P --input "$G/cli_x.npy" \
    --output "$TMP/y2.npy" --threads 2 "${ROUTER[@]}"
cmp -s "$TMP/y1.npy" "$TMP/y2.npy" || fail "output differs between 1 and 2 threads"
expect 0 "" -- "$DSMOE" layer --weights "$L" --prefix $P --input "$G/cli_x.npy" \
    --output "$TMP/y3.npy" --preset deepseek-v3 --groups 4 --topk-groups 2 --top-k 4 \
    --shared-experts 1 --threads 1
cmp -s "$TMP/y1.npy" "$TMP/y3.npy" || fail "--preset deepseek-v3 with overrides differs"

# bf16 storage runs and keeps the routing here
expect 0 "" -- "$DSMOE" layer --weights "$L" --prefix $P --input "$G/cli_x.npy" \
    --out-indices "$TMP/ib.npy" --dtype bf16 "${ROUTER[@]}"

# the packed layout: the same routing, the same bytes on 1 and 2 threads (its values
# against the checkpoint layout's are checked in test_moe)
expect 0 "" -- "$DSMOE" layer --weights "$L" --prefix $P --input "$G/cli_x.npy" \
    --output "$TMP/yp1.npy" --out-indices "$TMP/ip.npy" --layout packed --threads 1 "${ROUTER[@]}"
expect 0 "" -- "$DSMOE" layer --weights "$L" --prefix $P --input "$G/cli_x.npy" \
    --output "$TMP/yp2.npy" --layout packed --threads 2 "${ROUTER[@]}"
cmp -s <(npy_data "$TMP/ip.npy") <(npy_data "$G/cli_indices.npy") ||
    fail "packed layout: indices differ from the reference's"
cmp -s "$TMP/yp1.npy" "$TMP/yp2.npy" || fail "packed layout: output differs between 1 and 2 threads"
head -c 128 "$TMP/yp1.npy" | grep -q "(13, 20)" || fail "packed layout: y shape is not (13, 20)"

# JSON summary
expect 0 "" -- "$DSMOE" layer --weights "$L" --prefix $P --input "$G/cli_x.npy" --json "${ROUTER[@]}"
grep -q '"tokens": 13' "$TMP/out.txt" || fail "--json lacks the token count"
grep -q '"n_shared_experts":1' "$TMP/out.txt" || fail "--json lacks the shared-expert count"

# errors naming the tensor, the file or the flag
expect 1 "model.layers.9.mlp.gate.weight" -- "$DSMOE" layer --weights "$L" --prefix model.layers.9.mlp. \
    --input "$G/cli_x.npy" --output "$TMP/y.npy" "${ROUTER[@]}"
expect 1 "shared_experts.gate_proj.weight" -- "$DSMOE" layer --weights "$L" --prefix $P \
    --input "$G/cli_x.npy" --output "$TMP/y.npy" --shared-experts 3 "${ROUTER[@]}"
expect 2 "choose one with --prefix" -- "$DSMOE" layer --weights "$L" \
    --input "$G/cli_x.npy" --output "$TMP/y.npy" "${ROUTER[@]}"
expect 1 "experts.1.down_proj.weight" -- "$DSMOE" layer --weights "$G/cli_bad_shape.safetensors" \
    --input "$G/cli_x.npy" --output "$TMP/y.npy" --experts 6 --groups 2 --topk-groups 1 --top-k 2
expect 1 "experts.2.up_proj.weight" -- "$DSMOE" layer --weights "$G/cli_bad_dtype.safetensors" \
    --input "$G/cli_x.npy" --output "$TMP/y.npy" --experts 6 --groups 2 --topk-groups 1 --top-k 2
expect 1 "e_score_correction_bias" -- "$DSMOE" layer --weights "$G/v2_softmax.safetensors" --prefix $P \
    --input "$G/cli_x.npy" --output "$TMP/y.npy" --groups 4 --topk-groups 2 --top-k 3
expect 1 "cli_x.npy" -- "$DSMOE" layer --weights "$G/odd_t1.safetensors" --prefix $P \
    --input "$G/cli_x.npy" --output "$TMP/y.npy" --experts 6 --groups 2 --topk-groups 1 --top-k 2
expect 1 "--experts 8" -- "$DSMOE" layer --weights "$L" --prefix $P --input "$G/cli_x.npy" \
    --output "$TMP/y.npy" --experts 8 --groups 4 --topk-groups 2 --top-k 4
expect 1 "no-such.safetensors" -- "$DSMOE" layer --weights "$TMP/no-such.safetensors" \
    --input "$G/cli_x.npy" --output "$TMP/y.npy"
expect 2 "unknown option" -- "$DSMOE" layer --weights "$L" --bogus
expect 2 "--weights" -- "$DSMOE" layer --input "$G/cli_x.npy" --output "$TMP/y.npy"
expect 2 "--dtype" -- "$DSMOE" layer --weights "$L" --input "$G/cli_x.npy" --output "$TMP/y.npy" --dtype f64
expect 2 "--layout" -- "$DSMOE" layer --weights "$L" --input "$G/cli_x.npy" --output "$TMP/y.npy" --layout rows
expect 2 "top_k" -- "$DSMOE" layer --weights "$L" --prefix $P --input "$G/cli_x.npy" \
    --output "$TMP/y.npy" --groups 4 --topk-groups 1 --top-k 9

if [ "$fails" -gt 0 ]; then
    echo "$fails failure(s)" >&2
    exit 1
fi
echo "cli_layer: all checks passed"
