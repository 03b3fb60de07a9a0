#!/usr/bin/env bash
# cli_layer.sh — `dsmoe layer` end to end: a checkpoint-format layer file and .npy
# hidden states in, output and routing out; routing equal to the reference's; the
# same bytes for any thread count; --prefix detection; the save round trip (a layer
# saved by dsmoe runs with its own routing config, bit for bit; flags that contradict
# it are errors); crafted files that claim a huge layer fail cleanly without the
# allocation; NaN weights are refused; errors naming the missing / mis-shaped /
# wrong-dtype tensor.
# Usage: bash cli_layer.sh <dsmoe> <source-dir> <tmpdir>
set -u
source "$(dirname "$0")/clilib.sh" "$@"
G="$SRC/tests/golden/moe"

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

# save round trip: dsmoe writes the layer with its routing config (top-k 4, 4 groups);
# a run on the saved file without router options routes with that config (not the
# deepseek-v3 preset) and gives the same output, bit for bit
S="$TMP/saved.safetensors"
expect 0 "" -- "$DSMOE" layer --weights "$L" --prefix $P --input "$G/cli_x.npy" \
    --output "$TMP/ys0.npy" --save "$S" --threads 1 "${ROUTER[@]}"
[ -s "$S" ] || fail "--save wrote nothing"
cmp -s "$TMP/ys0.npy" "$TMP/y1.npy" || fail "--save changed the output"
expect 0 "" -- "$DSMOE" layer --weights "$S" --input "$G/cli_x.npy" --output "$TMP/ys1.npy" \
    --out-indices "$TMP/is1.npy" --out-weights "$TMP/ws1.npy" --threads 1
cmp -s "$TMP/ys1.npy" "$TMP/y1.npy" || fail "saved layer: output differs from the original's"
cmp -s "$TMP/is1.npy" "$TMP/i.npy" || fail "saved layer: indices differ from the original's"
cmp -s "$TMP/ws1.npy" "$TMP/w.npy" || fail "saved layer: weights differ from the original's"
# flags that agree with the saved config are accepted; contradicting ones are errors
expect 0 "" -- "$DSMOE" layer --weights "$S" --prefix $P --input "$G/cli_x.npy" \
    --output "$TMP/ys2.npy" --threads 1 --top-k 4 --groups 4 --scale 2.5
cmp -s "$TMP/ys2.npy" "$TMP/y1.npy" || fail "saved layer with agreeing flags: output differs"
expect 2 "--top-k 8" -- "$DSMOE" layer --weights "$S" --input "$G/cli_x.npy" --output "$TMP/y.npy" \
    --top-k 8
grep -qF '"top_k": 4' "$TMP/err.txt" || fail "the contradiction message lacks the saved top_k"
expect 2 "--preset deepseek-v3" -- "$DSMOE" layer --weights "$S" --input "$G/cli_x.npy" \
    --output "$TMP/y.npy" --preset deepseek-v3
expect 2 "--no-bias" -- "$DSMOE" layer --weights "$S" --input "$G/cli_x.npy" --output "$TMP/y.npy" \
    --no-bias
expect 2 "--capacity-factor 1" -- "$DSMOE" layer --weights "$S" --input "$G/cli_x.npy" \
    --output "$TMP/y.npy" --capacity-factor 1
# bf16 storage saves BF16 tensors with the same routing config
expect 0 "" -- "$DSMOE" layer --weights "$L" --prefix $P --input "$G/cli_x.npy" \
    --output "$TMP/yb0.npy" --dtype bf16 --save "$TMP/saved_bf16.safetensors" "${ROUTER[@]}"
expect 0 "" -- "$DSMOE" layer --weights "$TMP/saved_bf16.safetensors" --input "$G/cli_x.npy" \
    --output "$TMP/yb1.npy" --dtype bf16
cmp -s "$TMP/yb0.npy" "$TMP/yb1.npy" || fail "saved bf16 layer: output differs from the original's"

# crafted files: st_file PATH HEADER DATA_BYTES writes a safetensors file whose data
# is DATA_BYTES zero bytes (then `put` patches bytes in)
st_file() {
    local n=${#2}
    {
        printf "$(printf '\\x%02x\\x%02x\\x%02x\\x%02x\\x00\\x00\\x00\\x00' $((n & 255)) \
            $(((n >> 8) & 255)) $(((n >> 16) & 255)) $(((n >> 24) & 255)))"
        printf '%s' "$2"
        head -c "$3" /dev/zero
    } >"$1"
}
# runs the CLI with at most 1 GiB of address space (under ASan, which needs far more
# address space for its shadow, with allocations of more than 1 GiB failing instead):
# a file must be checked whole before the layer is allocated
if bash -c 'ulimit -v 1048576; exec "$@"' probe "$DSMOE" layer --help >/dev/null 2>&1; then
    small_vm() { bash -c 'ulimit -v 1048576; exec "$@"' small_vm "$@"; }
else
    small_vm() {
        ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}max_allocation_size_mb=1024:allocator_may_return_null=1" "$@"
    }
fi
# 2.2 MB: gate BF16 (65536, 1), expert 0 BF16 (1048576, 1), nothing else: a 800 GB
# layer if allocated (once the path of a use after free in dsmoe_moe_create)
st_file "$TMP/huge_claim.safetensors" '{"gate.weight":{"dtype":"BF16","shape":[65536,1],"data_offsets":[0,131072]},"experts.0.gate_proj.weight":{"dtype":"BF16","shape":[1048576,1],"data_offsets":[131072,2228224]}}' 2228224
expect 1 "experts.0.up_proj.weight" -- small_vm "$DSMOE" layer --weights "$TMP/huge_claim.safetensors" \
    --input "$G/cli_x.npy" --output "$TMP/y.npy" --experts 65536 --groups 1 --topk-groups 1 --top-k 1 --no-bias
# 2.3 MB: gate (256, 512) and expert 0's gate_proj (2048, 512) of a 3.2 GB layer
st_file "$TMP/big_claim.safetensors" '{"model.layers.0.mlp.gate.weight":{"dtype":"BF16","shape":[256,512],"data_offsets":[0,262144]},"model.layers.0.mlp.experts.0.gate_proj.weight":{"dtype":"BF16","shape":[2048,512],"data_offsets":[262144,2359296]}}' 2359296
expect 1 "model.layers.0.mlp.experts.0.up_proj.weight" -- small_vm "$DSMOE" layer \
    --weights "$TMP/big_claim.safetensors" --input "$G/cli_x.npy" --output "$TMP/y.npy" --no-bias
# a NaN in an expert weight: an error naming the tensor and the element, not NaN outputs
T2='{"gate.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}'
for e in 0 1; do
    o=$((16 + e * 24))
    T2="$T2,\"experts.$e.gate_proj.weight\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[$o,$((o + 8))]}"
    T2="$T2,\"experts.$e.up_proj.weight\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[$((o + 8)),$((o + 16))]}"
    T2="$T2,\"experts.$e.down_proj.weight\":{\"dtype\":\"F32\",\"shape\":[2,1],\"data_offsets\":[$((o + 16)),$((o + 24))]}"
done
T2="$T2}"
st_file "$TMP/nan.safetensors" "$T2" 64
# experts.1.down_proj.weight element (1, 0) is the last 4 bytes: a quiet NaN
printf '\x00\x00\xc0\x7f' | dd of="$TMP/nan.safetensors" bs=1 seek=$(($(stat -c %s "$TMP/nan.safetensors") - 4)) conv=notrunc 2>/dev/null
expect 1 "experts.1.down_proj.weight': element (1, 0) is nan" -- "$DSMOE" layer \
    --weights "$TMP/nan.safetensors" --input "$G/cli_x.npy" --output "$TMP/y.npy" \
    --experts 2 --groups 1 --topk-groups 1 --top-k 1 --no-bias

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
expect 2 "--top-k" -- "$DSMOE" layer --weights "$L" --prefix $P --input "$G/cli_x.npy" \
    --output "$TMP/y.npy" --groups 4 --topk-groups 1 --top-k 9

if [ "$fails" -gt 0 ]; then
    echo "$fails failure(s)" >&2
    exit 1
fi
echo "cli_layer: all checks passed"
