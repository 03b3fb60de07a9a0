#!/usr/bin/env bash
# cli_simulate.sh — tests of `dsmoe simulate`: usage errors exit 2, bad files exit 1,
# messages naming the flags, replay of recorded logits, trace keys, the replayed
# counts against the committed NumPy golden counts (tests/golden/balance/steps/,
# written by tests/ref/gen_balance_golden.py), the atomic trace, determinism across
# runs and thread counts, and the published figures: the default run's table must be
# the one README.md and docs/balance.md publish (sign rule 220.9x better than none),
# with the ratio itself checked against the published 221x.
#
#   bash tests/cli_simulate.sh <dsmoe-binary> <source-dir> <tmpdir>
set -u
DSMOE=$1
SRC=$2
TMP=$3
mkdir -p "$TMP"
fails=0
pass=0

ok() { pass=$((pass + 1)); }
bad() { echo "FAIL: $*" >&2; fails=$((fails + 1)); }

# expect CODE -- command...: runs it, checks the exit code, keeps stderr in $TMP/err
expect() {
    local want=$1
    shift
    "$@" >"$TMP/out" 2>"$TMP/err"
    local got=$?
    if [ "$got" -ne "$want" ]; then
        bad "exit $got (want $want): $*"
        sed 's/^/    /' "$TMP/err" >&2
    else
        ok
    fi
}

STEPS=$SRC/tests/golden/balance/steps/logits.npy   # (8, 48, 16) float32
BIAS0=$SRC/tests/golden/balance/steps/bias0.npy    # (16) float32
SMALL=(--experts 16 --groups 4 --topk-groups 2 --top-k 4)

# ---------------------------------------------------------------- usage: 2 --
expect 0 "$DSMOE" simulate --help
grep -q -- "--compare" "$TMP/out" || bad "--help does not describe --compare"
grep -q -- "--preset" "$TMP/out" || bad "--help does not list the router flags"
expect 2 "$DSMOE" simulate --bogus
expect 2 "$DSMOE" simulate --steps
expect 2 "$DSMOE" simulate --steps 0
expect 2 "$DSMOE" simulate --tokens -5
expect 2 "$DSMOE" simulate --gamma -1
expect 2 "$DSMOE" simulate --gamma abc
expect 2 "$DSMOE" simulate --rule median
expect 2 "$DSMOE" simulate --compare none,magic
expect 2 "$DSMOE" simulate --compare sign:-3
expect 2 "$DSMOE" simulate --compare none:0.1
expect 2 "$DSMOE" simulate --compare sign --rule sign
expect 2 "$DSMOE" simulate --tokens 100 --seq-len 30
expect 2 "$DSMOE" simulate --last 0
expect 2 "$DSMOE" simulate --no-bias
expect 2 "$DSMOE" simulate --preset no-such-preset
expect 2 "$DSMOE" simulate --experts 10 --groups 3
expect 2 "$DSMOE" simulate --seq-count sometimes
expect 2 "$DSMOE" simulate --logits "$STEPS" --steps 3 "${SMALL[@]}"
grep -q "steps" "$TMP/err" || bad "--logits with --steps: message does not say why"

# messages name the flags the user typed, not the library's struct fields
names_flag() { # names_flag FLAG-TEXT FIELD
    if ! grep -q -- "$1" "$TMP/err" || grep -q "$2" "$TMP/err"; then
        bad "message should name '$1', not '$2': $(cat "$TMP/err")"
    fi
}
expect 2 "$DSMOE" simulate --experts 10 --groups 3
names_flag "--experts 10 is not divisible by --groups 3" "n_groups"
expect 2 "$DSMOE" simulate --tokens 100 --seq-len 30
names_flag "--seq-len 30 does not divide the 100 tokens" "seq_len"
expect 2 "$DSMOE" simulate --top-k 200
names_flag "--top-k 200" "top_k"
expect 2 "$DSMOE" simulate --logits "$STEPS" "${SMALL[@]}" --seq-len 5
names_flag "--seq-len 5 does not divide the 48 tokens" "seq_len"
expect 2 "$DSMOE" simulate --logits "$STEPS" "${SMALL[@]}" --seq-len 96
names_flag "--seq-len 96" "seq_len"

# ------------------------------------------------------------ bad files: 1 --
expect 1 "$DSMOE" simulate --logits "$TMP/does-not-exist.npy" "${SMALL[@]}"
printf 'this is not a numpy file\n' >"$TMP/text.npy"
expect 1 "$DSMOE" simulate --logits "$TMP/text.npy" "${SMALL[@]}"
expect 1 "$DSMOE" simulate --logits "$STEPS"            # E = 16 but the preset has 256
grep -q "E=256" "$TMP/err" || bad "E mismatch: message does not name the expected E"
expect 1 "$DSMOE" simulate --logits "$STEPS" "${SMALL[@]}" --bias0 "$TMP/text.npy"
expect 1 "$DSMOE" simulate --steps 2 --tokens 64 --bias0 "$BIAS0"   # (16) for E = 256
expect 1 "$DSMOE" simulate --steps 2 --tokens 64 --trace "$TMP/no/such/dir/t.jsonl"

# ------------------------------------------------- replay, trace, summary --
expect 0 "$DSMOE" simulate --logits "$STEPS" "${SMALL[@]}" --bias0 "$BIAS0" --seq-len 16 \
    --compare none,sign:0.01,proportional:0.01 --trace "$TMP/replay.jsonl" --json
lines=$(wc -l <"$TMP/replay.jsonl")
[ "$lines" -eq 24 ] || bad "replay trace has $lines lines, want 8 steps x 3 strategies = 24"
for key in '"step":' '"strategy":' '"counts":\[' '"maxvio_batch":' '"bias":\[' '"seq_aux":' \
    '"gamma":' '"groups_per_token":'; do
    n=$(grep -c "$key" "$TMP/replay.jsonl")
    [ "$n" -eq 24 ] || bad "trace key $key on $n of 24 lines"
done
grep -q '"maxvio_last":' "$TMP/out" || bad "--json summary lacks maxvio_last"
grep -q '"strategies":\[' "$TMP/out" || bad "--json summary lacks strategies"
# 'none' keeps the initial bias: its first bias value is bias0[0] on every line
first_bias() { grep "\"strategy\":\"$1\"" "$TMP/replay.jsonl" | sed 's/.*"bias":\[\([^,]*\),.*/\1/' | sort -u | wc -l; }
[ "$(first_bias none)" -eq 1 ] || bad "strategy none changed its bias"
[ "$(first_bias sign:0.01)" -gt 1 ] || bad "strategy sign:0.01 never changed its bias"
# each step's counts sum to T*K = 48*4
awk -F'"counts":\\[' '{split($2, a, "]"); n = split(a[1], c, ","); s = 0;
     for (i = 1; i <= n; i++) s += c[i]; if (s != 192 || n != 16) { print "bad counts: " s " " n; exit 1 } }' \
    "$TMP/replay.jsonl" || bad "trace counts do not sum to T*K"
# the replayed counts are the NumPy reference's, exactly (E=16 G=4 TG=2 K=4 top-2 sum,
# gamma 0.01 from bias0): sign, proportional, re-centred sign, scheduled sign
npy_i64() { # values of a little-endian int64 .npy (format 1.0), one per line
    local hlen
    hlen=$(od -An -tu2 -j8 -N2 "$1" | tr -d ' ')
    od -An -v -td8 -j $((10 + hlen)) "$1" | tr -s ' ' '\n' | sed '/^$/d'
}
trace_counts() { # the counts of strategy $2 in trace $1, one value per line
    grep "\"strategy\":\"$2\"" "$1" | sed 's/.*"counts":\[\([^]]*\)\].*/\1/' | tr ',' '\n'
}
golden_counts() { # golden_counts VARIANT TRACE STRATEGY
    local want=$SRC/tests/golden/balance/steps/$1_counts.npy
    npy_i64 "$want" >"$TMP/want.txt"
    trace_counts "$2" "$3" >"$TMP/got.txt"
    if [ "$(wc -l <"$TMP/want.txt")" -ne 128 ]; then
        bad "$want: expected 8 x 16 counts"
    elif ! cmp -s "$TMP/want.txt" "$TMP/got.txt"; then
        bad "replayed counts of $3 differ from the golden $1_counts.npy"
    else
        ok
    fi
}
golden_counts sign "$TMP/replay.jsonl" sign:0.01
golden_counts prop "$TMP/replay.jsonl" proportional:0.01
expect 0 "$DSMOE" simulate --logits "$STEPS" "${SMALL[@]}" --bias0 "$BIAS0" --rule sign --gamma 0.01 \
    --recenter --trace "$TMP/center.jsonl"
golden_counts center "$TMP/center.jsonl" sign
expect 0 "$DSMOE" simulate --logits "$STEPS" "${SMALL[@]}" --bias "$BIAS0" --rule sign --gamma 0.01 \
    --gamma-until 144 --gamma-after 0.002 --trace "$TMP/sched.jsonl"
golden_counts sched "$TMP/sched.jsonl" sign
# without the bias0 the counts differ (the comparison can fail)
expect 0 "$DSMOE" simulate --logits "$STEPS" "${SMALL[@]}" --rule sign --gamma 0.01 --trace "$TMP/nob.jsonl"
trace_counts "$TMP/nob.jsonl" sign >"$TMP/got.txt"
npy_i64 "$SRC/tests/golden/balance/steps/sign_counts.npy" >"$TMP/want.txt"
cmp -s "$TMP/want.txt" "$TMP/got.txt" && bad "counts without bias0 equal the golden ones: the check cannot fail"

# the trace replaces its file only when the run succeeds: a NaN logit at step 3 fails
# the run (exit 1) and leaves the old trace and no temporary file
cp "$STEPS" "$TMP/nan.npy"
hlen=$(od -An -tu2 -j8 -N2 "$TMP/nan.npy" | tr -d ' ')
printf '\x00\x00\xc0\x7f' | dd of="$TMP/nan.npy" bs=1 seek=$((10 + hlen + ((3 * 48 + 5) * 16 + 2) * 4)) \
    conv=notrunc status=none
echo "old trace" >"$TMP/keep.jsonl"
expect 1 "$DSMOE" simulate --logits "$TMP/nan.npy" "${SMALL[@]}" --trace "$TMP/keep.jsonl"
grep -q "token 5, expert 2" "$TMP/err" || bad "NaN logit: message does not name token and expert: $(cat "$TMP/err")"
grep -q "step 3" "$TMP/err" || bad "NaN logit: message does not name the step: $(cat "$TMP/err")"
[ "$(cat "$TMP/keep.jsonl")" = "old trace" ] || bad "a failed run replaced the trace"
ls "$TMP" | grep -q 'keep.jsonl.tmp' && bad "a failed run left a temporary trace file"
expect 0 "$DSMOE" simulate --logits "$STEPS" "${SMALL[@]}" --trace "$TMP/keep.jsonl"
[ "$(wc -l <"$TMP/keep.jsonl")" -eq 24 ] || bad "a successful run did not replace the trace"

# a (T, E) file is one step
expect 0 "$DSMOE" simulate --logits "$SRC/tests/golden/balance/losses/sig_logits.npy" "${SMALL[@]}" \
    --rule sign --trace "$TMP/one.jsonl"
[ "$(wc -l <"$TMP/one.jsonl")" -eq 1 ] || bad "(T, E) replay should be one step"
grep -q '^| sign |' "$TMP/out" || bad "table lacks the sign row"

# ------------------------------------------------------------ determinism --
args=(--steps 30 --tokens 256 --seq-len 64 --domains 3 --drift 1.5 --seed 7)
expect 0 "$DSMOE" simulate "${args[@]}" --threads 1 --trace "$TMP/d1.jsonl"
cp "$TMP/out" "$TMP/d1.txt"
expect 0 "$DSMOE" simulate "${args[@]}" --threads 2 --trace "$TMP/d2.jsonl"
cmp -s "$TMP/d1.jsonl" "$TMP/d2.jsonl" || bad "traces differ between --threads 1 and 2"
cmp -s "$TMP/d1.txt" "$TMP/out" || bad "summaries differ between --threads 1 and 2"
expect 0 "$DSMOE" simulate "${args[@]}" --threads 1 --trace "$TMP/d3.jsonl"
cmp -s "$TMP/d1.jsonl" "$TMP/d3.jsonl" || bad "the same seed gave a different trace"
expect 0 "$DSMOE" simulate --steps 30 --tokens 256 --seq-len 64 --domains 3 --drift 1.5 --seed 8 \
    --trace "$TMP/d4.jsonl"
cmp -s "$TMP/d1.jsonl" "$TMP/d4.jsonl" && bad "a different seed gave the same trace"

# ---------------------------------------- the published figures (default run) --
# README.md and docs/balance.md publish the default run's table (deepseek-v3 preset,
# 400 steps x 2048 tokens, seed 1): every row printed must appear there verbatim, and
# the sign rule's ratio must be the published 221x (220.9x; at least 200x).
expect 0 "$DSMOE" simulate
cp "$TMP/out" "$TMP/default.txt"
rows=$(grep -c '^| \(none\|sign\|proportional\) |' "$TMP/default.txt")
[ "$rows" -eq 3 ] || bad "default table has $rows strategy rows, want 3"
for doc in README.md docs/balance.md; do
    while IFS= read -r row; do
        grep -qxF -- "$row" "$SRC/$doc" || bad "$doc does not publish the default run's row: $row"
    done < <(grep '^| \(none\|sign\|proportional\) |' "$TMP/default.txt")
done
grep -q 'from 7.20 to 0.033 (221×)' "$SRC/README.md" || bad "README no longer states the 221x figure this test checks"
col() { grep "^| $1 |" "$TMP/default.txt" | awk -F'|' -v c="$2" '{ gsub(/[ x]/, "", $c); print $c }'; }
none_run=$(col none 4)
sign_ratio=$(col sign 10)
prop_ratio=$(col proportional 10)
echo "default run: MaxVio run without balancing $none_run; MaxVio last 20% vs none: sign ${sign_ratio}x, proportional ${prop_ratio}x" >&2
awk -v n="$none_run" 'BEGIN { exit !(n > 7) }' || bad "default traffic not skewed as published: MaxVio without balancing $none_run <= 7"
awk -v r="$sign_ratio" 'BEGIN { exit !(r >= 200 && r < 250) }' ||
    bad "sign rule vs none on the default run: ${sign_ratio}x, published 221x"
awk -v r="$prop_ratio" 'BEGIN { exit !(r >= 200) }' ||
    bad "proportional rule vs none on the default run: ${prop_ratio}x, published 286x"

echo "$pass passed, $fails failed"
[ "$fails" -eq 0 ]
