#!/usr/bin/env bash
# cli_simulate.sh — tests of `dsmoe simulate`: usage errors exit 2, bad files exit 1,
# replay of recorded logits, trace keys, determinism across runs and thread counts,
# and the headline claim: on the default skewed traffic with the deepseek-v3 preset,
# the sign rule at gamma = 0.001 cuts MaxVio over the last 20% of steps at least
# tenfold compared with no balancing.
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

# --------------------------------------------- the tenfold claim (default) --
expect 0 "$DSMOE" simulate --json
getf() { sed "s/.*\"name\":\"$1\"[^}]*\"$2\":\([-0-9.eE+]*\).*/\1/" "$TMP/out"; }
none_last=$(getf none maxvio_last)
sign_last=$(getf sign maxvio_last)
prop_last=$(getf proportional maxvio_last)
none_run=$(getf none maxvio_run)
echo "default traffic: MaxVio last 20%: none $none_last, sign $sign_last, proportional $prop_last" >&2
awk -v n="$none_run" 'BEGIN { exit !(n > 1) }' || bad "default traffic not skewed enough: MaxVio without balancing $none_run <= 1"
awk -v n="$none_last" -v s="$sign_last" 'BEGIN { exit !(s > 0 && n / s >= 10) }' ||
    bad "sign rule did not cut MaxVio (last 20%) tenfold: none $none_last, sign $sign_last"
awk -v n="$none_last" -v s="$prop_last" 'BEGIN { exit !(s > 0 && n / s >= 10) }' ||
    bad "proportional rule did not cut MaxVio (last 20%) tenfold: none $none_last, proportional $prop_last"

echo "$pass passed, $fails failed"
[ "$fails" -eq 0 ]
