#!/usr/bin/env bash
# cli_model.sh — `dsmoe info / eval / generate` end to end on the tiny byte-vocabulary
# model tests/golden/model_cli/bytes_tiny (written with its expected results by
# tests/ref/gen_cli_model.py from the fp64 reference) and on the model golden cases:
# info's counts against the file's own sizes; eval's logits (one sequence and a batch)
# against the reference's within tolerance, the same bytes for 1 and 2 threads; the
# text loss against the reference's; greedy generation equal to the reference's greedy
# continuation, ids on a model without the byte vocabulary; reproducible seeds; and
# every bad input refused with a message naming it. Needs only coreutils and awk.
# Usage: bash cli_model.sh <dsmoe> <source-dir> <tmpdir>
set -u
source "$(dirname "$0")/clilib.sh" "$@"
M="$SRC/tests/golden/model_cli/bytes_tiny"
G="$SRC/tests/golden/model"

# close GOT.npy(float32) WANT.npy(float64) N ATOL RTOL: N values, |got - want| <= atol + rtol |want|
close() {
    local r
    r=$(paste <(npy_values "$1" f4) <(npy_values "$2" f8) | awk -v atol="$4" -v rtol="$5" '
        { n++; d = $1 - $2; if (d < 0) d = -d; w = $2 < 0 ? -$2 : $2
          if (!(d <= atol + rtol * w)) bad++; if (d > m) m = d }
        END { printf "%d %d %g", n, bad, m }')
    set -- "$@" $r
    [ "$6" = "$3" ] || fail "$1: $6 values, want $3"
    [ "$7" = 0 ] || fail "$1: $7 values differ from $2 (max |diff| $8)"
}

# an int32 .npy of the given values: i32_npy FILE SHAPE v...  (SHAPE like "3," or "2, 2")
i32_npy() {
    local f=$1 shape=$2
    shift 2
    local d="{'descr': '<i4', 'fortran_order': False, 'shape': ($shape), }"
    while [ $(((10 + ${#d} + 1) % 64)) != 0 ]; do d="$d "; done
    {
        printf '\x93NUMPY\x01\x00'
        printf "$(printf '\\x%02x\\x%02x' $(((${#d} + 1) & 255)) $(((${#d} + 1) >> 8)))"
        printf '%s\n' "$d"
        for v in "$@"; do
            printf "$(printf '\\x%02x\\x%02x\\x%02x\\x%02x' $((v & 255)) $(((v >> 8) & 255)) \
                $(((v >> 16) & 255)) $(((v >> 24) & 255)))"
        done
    } >"$f"
}

# value of KEY in expected.txt
want() { awk -v k="$1" '$1 == k { $1 = ""; sub(/^ /, ""); print }' "$M/expected.txt"; }
# |a - b| <= tol
near() { awk -v a="$1" -v b="$2" -v t="$3" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d <= t) }'; }

for c in info eval generate; do
    expect 0 "" -- "$DSMOE" $c --help
    grep -q -- "--model DIR" "$TMP/out.txt" || fail "$c --help lacks --model"
done
grep -q -- "--top-p" "$TMP/out.txt" || fail "generate --help lacks --top-p"
"$DSMOE" --help | grep -q "generate" || fail "dsmoe --help lacks generate"

# ---------------------------------------------------------------- info --
# The file is F32 and holds exactly the main model: its data bytes / 4 are the total.
hlen=$(od -An -tu8 -N8 "$M/model.safetensors" | tr -d ' ')
total=$((($(stat -c %s "$M/model.safetensors") - 8 - hlen) / 4))
cfg() { sed -n "s/.*\"$1\": \([0-9]*\).*/\1/p" "$M/config.json"; }
D=$(cfg hidden_size) E=$(cfg n_routed_experts) K=$(cfg num_experts_per_tok)
F=$(cfg moe_intermediate_size) L=$(cfg num_hidden_layers) H=$(cfg num_attention_heads)
C=$(cfg kv_lora_rank) R=$(cfg qk_rope_head_dim) N=$(cfg qk_nope_head_dim) VH=$(cfg v_head_dim)
active=$((total - (E - K) * 3 * D * F)) # one MoE layer
cache=$((L * (C + R) * 4)) mha=$((L * H * (N + R + VH) * 4))
expect 0 "" -- "$DSMOE" info --model "$M"
tr -d , <"$TMP/out.txt" >"$TMP/info.txt"
grep -qE "^parameters +$total total" "$TMP/info.txt" || fail "info: total is not $total"
grep -qE "^  active/token +$active " "$TMP/info.txt" || fail "info: active is not $active"
grep -qE "^cache/token +$cache bytes.* $mha bytes" "$TMP/info.txt" ||
    fail "info: cache bytes per token are not $cache against $mha"
grep -qE "^  routed experts +$((E * 3 * D * F))$" "$TMP/info.txt" || fail "info: routed experts"
grep -q "vocabulary       260 (dsmoe bytes" "$TMP/info.txt" || fail "info: byte vocabulary not shown"
grep -q "bos 256, eos 257" "$TMP/out.txt" || fail "info: special ids not shown"
grep -q "2 (1 dense, 1 MoE)" "$TMP/out.txt" || fail "info: layer kinds"
grep -qE "^  shard 0 +41 tensors \(F32 41\) $((total * 4)) bytes" "$TMP/info.txt" ||
    fail "info: shard summary"
expect 0 "" -- "$DSMOE" info --model "$M" --tensors
[ "$(grep -c ' shard 0$' "$TMP/out.txt")" = 41 ] || fail "info --tensors: not 41 tensors in shard 0"
grep -qE "model.layers.1.mlp.experts.3.down_proj.weight +F32 +\($D, $F\) +shard 0" "$TMP/out.txt" ||
    fail "info --tensors lacks an expert's down_proj"
# shards, MTP depths and stored dtypes of the model golden cases
expect 0 "" -- "$DSMOE" info --model "$G/v2_glg_sharded" --tensors
grep -q "^files            3 shards" "$TMP/out.txt" || fail "info: 3 shards not shown"
n_listed=$(grep -c ' shard [0-9]*$' "$TMP/out.txt")
n_summed=$(awk '$1 == "shard" && $3 ~ /^[0-9]+$/ { s += $3 } END { print s }' "$TMP/out.txt")
[ "$n_listed" = "$n_summed" ] || fail "info: shards hold $n_summed tensors, $n_listed listed"
grep -q "BF16" "$TMP/out.txt" || fail "info: BF16 not shown"
expect 0 "" -- "$DSMOE" info --model "$G/v3_yarn_q"
grep -q "MTP depths       1 stored of 1" "$TMP/out.txt" || fail "info: MTP depth not shown"
grep -q "YaRN factor 4" "$TMP/out.txt" || fail "info: YaRN not shown"
expect 0 "" -- "$DSMOE" info --model "$G/fp8_blocks"
grep -q "F8_E4M3" "$TMP/out.txt" || fail "info: F8_E4M3 not shown"

# ---------------------------------------------------------------- eval --
expect 0 "" -- "$DSMOE" eval --model "$M" --tokens "$M/tokens.npy" --out-logits "$TMP/l1.npy" --threads 1
head -c 128 "$TMP/l1.npy" | grep -q "(13, 260)" || fail "eval: logits shape is not (13, 260)"
close "$TMP/l1.npy" "$M/logits.npy" $((13 * 260)) 2e-5 2e-5
expect 0 "" -- "$DSMOE" eval --model "$M" --tokens "$M/tokens.npy" --out-logits "$TMP/l2.npy" --threads 2
cmp -s "$TMP/l1.npy" "$TMP/l2.npy" || fail "eval: logits differ between 1 and 2 threads"
expect 0 "" -- "$DSMOE" eval --model "$M" --tokens "$M/tokens_batch.npy" --out-logits "$TMP/lb.npy" \
    --threads 1
head -c 128 "$TMP/lb.npy" | grep -q "(2, 9, 260)" || fail "eval: batch logits shape is not (2, 9, 260)"
close "$TMP/lb.npy" "$M/logits_batch.npy" $((2 * 9 * 260)) 2e-5 2e-5
# a model without the byte vocabulary (YaRN, q_lora_rank, MTP stored and unused)
expect 0 "" -- "$DSMOE" eval --model "$G/v3_yarn_q" --tokens "$G/v3_yarn_q/tokens.npy" \
    --out-logits "$TMP/lv.npy" --threads 1
nv=$(npy_values "$G/v3_yarn_q/logits.npy" f8 | wc -l)
[ $((nv % 41)) = 0 ] && [ $nv -gt 0 ] || fail "v3_yarn_q/logits.npy: $nv values"
close "$TMP/lv.npy" "$G/v3_yarn_q/logits.npy" $nv 2e-5 2e-5

# text: loss, bits per byte and perplexity against the reference's
for ctx in 64 16; do
    args=()
    [ $ctx = 16 ] && args=(--context 16)
    expect 0 "" -- "$DSMOE" eval --model "$M" --text "$M/text.txt" --threads 1 "${args[@]}"
    loss=$(awk '$1 == "loss" { print $2 }' "$TMP/out.txt")
    bits=$(awk '$1 == "bits/byte" { print $2 }' "$TMP/out.txt")
    ppl=$(awk '$1 == "perplexity" { print $2 }' "$TMP/out.txt")
    near "$loss" "$(want loss_$ctx)" 1e-4 || fail "eval --text (context $ctx): loss $loss, want $(want loss_$ctx)"
    near "$bits" "$(want bits_$ctx)" 2e-4 || fail "eval --text (context $ctx): bits/byte $bits"
    near "$ppl" "$(want ppl_$ctx)" 1e-2 || fail "eval --text (context $ctx): perplexity $ppl"
    grep -q "151 bytes, 151 predicted" "$TMP/out.txt" || fail "eval --text: byte counts"
done
grep -q "10 windows of at most 16 positions" "$TMP/out.txt" || fail "eval --text --context 16: windows"

# ------------------------------------------------------------ generate --
# greedy: the reference's continuation of BOS "abc" (ending at EOS), the same on 2 threads
prompt=$(want greedy_prompt)
expect 0 "" -- "$DSMOE" generate --model "$M" --prompt "$prompt" --temperature 0 --threads 1
cmp -s "$TMP/out.txt" "$M/greedy.txt" || fail "generate greedy: '$(cat "$TMP/out.txt")', want '$(cat "$M/greedy.txt")'"
ngen=$(want greedy_ids | wc -w)
grep -q "$ngen generated" "$TMP/err.txt" || fail "generate: stderr lacks '$ngen generated'"
grep -q "stopped at EOS" "$TMP/err.txt" || fail "generate: did not stop at EOS"
grep -q "tokens/s" "$TMP/err.txt" || fail "generate: no tokens/s"
pos=$((1 + ${#prompt} + ngen - 1)) # BOS, the prompt, every generated token but EOS
grep -q "cache $pos positions x $cache bytes = $((pos * cache)) bytes (a plain multi-head cache: $((pos * mha)) bytes" \
    <(tr -d , <"$TMP/err.txt") || fail "generate: cache size line"
expect 0 "" -- "$DSMOE" generate --model "$M" --prompt "$prompt" --temperature 0 --threads 2
cmp -s "$TMP/out.txt" "$M/greedy.txt" || fail "generate greedy on 2 threads differs"
# --max-tokens cuts it short
expect 0 "" -- "$DSMOE" generate --model "$M" --prompt "$prompt" --temperature 0 --max-tokens 5 --threads 1
[ "$(cat "$TMP/out.txt")" = "$(head -c 5 "$M/greedy.txt")" ] || fail "generate --max-tokens 5"
# the same from --prompt-tokens (BOS a b c as ids)
i32_npy "$TMP/p.npy" "4," 256 97 98 99
expect 0 "" -- "$DSMOE" generate --model "$M" --prompt-tokens "$TMP/p.npy" --temperature 0 --threads 1
cmp -s "$TMP/out.txt" "$M/greedy.txt" || fail "generate --prompt-tokens differs from --prompt"
# ids on a model without the byte vocabulary: the first is the argmax of the reference's
# last logits row
first=$(npy_values "$G/v3_yarn_q/logits.npy" f8 | tail -n 41 |
    awk 'NR == 1 || $1 > m { m = $1; i = NR - 1 } END { print i }')
expect 0 "" -- "$DSMOE" generate --model "$G/v3_yarn_q" --prompt-tokens "$G/v3_yarn_q/tokens.npy" \
    --temperature 0 --max-tokens 4 --threads 1
read -r -a got <"$TMP/out.txt"
[ "${got[0]:-}" = "$first" ] || fail "generate ids: first '${got[0]:-}', want $first"
[ "${#got[@]}" -ge 1 ] && [ "${#got[@]}" -le 4 ] || fail "generate ids: ${#got[@]} ids"
# seeds: the same seed, the same text (and on 2 threads); another seed, another text
expect 0 "" -- "$DSMOE" generate --model "$M" --prompt "The " --seed 7 --temperature 1 --top-p 0.9 \
    --max-tokens 40 --threads 1
cp "$TMP/out.txt" "$TMP/s7a.txt"
expect 0 "" -- "$DSMOE" generate --model "$M" --prompt "The " --seed 7 --temperature 1 --top-p 0.9 \
    --max-tokens 40 --threads 2
cmp -s "$TMP/out.txt" "$TMP/s7a.txt" || fail "generate --seed 7 not reproducible"
expect 0 "" -- "$DSMOE" generate --model "$M" --prompt "The " --seed 8 --temperature 1 --top-p 0.9 \
    --max-tokens 40 --threads 1
cmp -s "$TMP/out.txt" "$TMP/s7a.txt" && fail "generate: seeds 7 and 8 give the same text"
# the context fills up: 64 positions, a prompt of 60 bytes (+ BOS)
long=$(printf '0%.0s' $(seq 60))
expect 0 "max_position_embeddings" -- "$DSMOE" generate --model "$M" --prompt "$long" \
    --temperature 0 --max-tokens 100 --threads 1

# -------------------------------------------------------------- errors --
expect 1 "$TMP/none" -- "$DSMOE" info --model "$TMP/none"
expect 1 "$TMP/none" -- "$DSMOE" eval --model "$TMP/none" --tokens "$M/tokens.npy" --out-logits "$TMP/x.npy"
expect 1 "$TMP/none" -- "$DSMOE" generate --model "$TMP/none" --prompt abc
expect 1 "q_b_proj.weight_scale_inv" -- "$DSMOE" info --model "$G/fp8_noscale"
expect 1 "logits.npy: dtype" -- "$DSMOE" eval --model "$M" --tokens "$M/logits.npy" --out-logits "$TMP/x.npy"
expect 1 "$TMP/missing.npy" -- "$DSMOE" eval --model "$M" --tokens "$TMP/missing.npy" --out-logits "$TMP/x.npy"
i32_npy "$TMP/bad_id.npy" "3," 97 260 98
expect 1 "token [1] = 260" -- "$DSMOE" eval --model "$M" --tokens "$TMP/bad_id.npy" --out-logits "$TMP/x.npy"
i32_npy "$TMP/neg_id.npy" "2, 2" 97 98 -1 99
expect 1 "token [1, 0] = -1" -- "$DSMOE" eval --model "$M" --tokens "$TMP/neg_id.npy" --out-logits "$TMP/x.npy"
expect 1 "token [1] = 260" -- "$DSMOE" generate --model "$M" --prompt-tokens "$TMP/bad_id.npy"
i32_npy "$TMP/long.npy" "65," $(seq 65)
expect 1 "max_position_embeddings" -- "$DSMOE" eval --model "$M" --tokens "$TMP/long.npy" --out-logits "$TMP/x.npy"
expect 1 "max_position_embeddings" -- "$DSMOE" generate --model "$M" --prompt "$long$long"
[ -e "$TMP/x.npy" ] && fail "a failed eval wrote its output"
expect 2 "--text" -- "$DSMOE" eval --model "$G/v3_yarn_q" --text "$M/text.txt"
expect 2 "--prompt" -- "$DSMOE" generate --model "$G/v3_yarn_q" --prompt abc
: >"$TMP/empty.txt"
expect 1 "empty" -- "$DSMOE" eval --model "$M" --text "$TMP/empty.txt"
expect 1 "$TMP/nofile.txt" -- "$DSMOE" eval --model "$M" --text "$TMP/nofile.txt"
expect 2 "--context 65" -- "$DSMOE" eval --model "$M" --text "$M/text.txt" --context 65
expect 2 "--context" -- "$DSMOE" eval --model "$M" --text "$M/text.txt" --context 0
for p in 0 1.5 -0.1 abc nan; do
    expect 2 "--top-p" -- "$DSMOE" generate --model "$M" --prompt abc --top-p $p
done
expect 2 "--temperature" -- "$DSMOE" generate --model "$M" --prompt abc --temperature -1
expect 2 "--max-tokens" -- "$DSMOE" generate --model "$M" --prompt abc --max-tokens 0
expect 2 "--seed" -- "$DSMOE" generate --model "$M" --prompt abc --seed x
expect 2 "one prompt" -- "$DSMOE" generate --model "$M"
expect 2 "one prompt" -- "$DSMOE" generate --model "$M" --prompt abc --prompt-tokens "$TMP/p.npy"
expect 2 "--model" -- "$DSMOE" eval --tokens "$M/tokens.npy" --out-logits "$TMP/x.npy"
expect 2 "--out-logits" -- "$DSMOE" eval --model "$M" --tokens "$M/tokens.npy"
expect 2 "nothing to evaluate" -- "$DSMOE" eval --model "$M"
expect 2 "--threads" -- "$DSMOE" eval --model "$M" --text "$M/text.txt" --threads 0
expect 2 "--bogus" -- "$DSMOE" info --model "$M" --bogus
expect 2 "--model needs a value" -- "$DSMOE" info --model

if [ $fails -ne 0 ]; then
    echo "$fails failure(s)" >&2
    exit 1
fi
echo "cli_model: all checks passed"
