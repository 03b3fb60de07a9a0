#!/usr/bin/env bash
# cli_mtp.sh — `dsmoe generate --mtp` end to end on the golden models with stored MTP
# layers (tests/golden/model/v3_mtp2, two depths; v3_yarn_q, one): the ids printed are
# those of plain `dsmoe generate` (greedy and sampled, 1 to 3 drafts, 1 and 2 threads),
# the report names the acceptance per depth and overall, tokens per verify pass, both
# rates, the speed-up and "outputs identical"; a model without MTP layers and bad --draft
# values are refused with a message naming them. Needs only coreutils.
# Usage: bash cli_mtp.sh <dsmoe> <source-dir> <tmpdir>
set -u
source "$(dirname "$0")/clilib.sh" "$@"
G="$SRC/tests/golden/model"

for case in "v3_mtp2 80 0 1" "v3_mtp2 80 0 2" "v3_mtp2 60 0.9 3" "v3_yarn_q 40 0 1" "v3_yarn_q 40 0.7 2"; do
    set -- $case
    m=$G/$1
    for t in 1 2; do
        expect 0 "" -- "$DSMOE" generate --model "$m" --prompt-tokens "$m/tokens.npy" --max-tokens "$2" \
            --temperature "$3" --seed 5 --threads "$t"
        cp "$TMP/out.txt" "$TMP/plain.txt"
        expect 0 "outputs identical" -- "$DSMOE" generate --model "$m" --prompt-tokens "$m/tokens.npy" \
            --max-tokens "$2" --temperature "$3" --seed 5 --threads "$t" --mtp --draft "$4" --runs 2
        cmp -s "$TMP/out.txt" "$TMP/plain.txt" || fail "$case threads $t: --mtp printed '$(cat "$TMP/out.txt")', plain '$(cat "$TMP/plain.txt")'"
        for needle in "$4 drafts per verify pass" "acceptance: depth 1 " "overall " "tokens per pass" \
            "plain decoding, same prompt and seed" "speed-up" "fastest of 2 runs each" " generated"; do
            grep -qF -- "$needle" "$TMP/err.txt" || fail "$case: stderr lacks '$needle'"
        done
        [ "$4" -lt 2 ] || grep -qF "depth $4 " "$TMP/err.txt" || fail "$case: no depth $4 rate"
    done
done
# the default draft count is the stored depths
expect 0 "2 drafts per verify pass (2 MTP depths stored)" -- "$DSMOE" generate --model "$G/v3_mtp2" \
    --prompt-tokens "$G/v3_mtp2/tokens.npy" --max-tokens 10 --temperature 0 --mtp
# refusals
expect 2 "--mtp needs a model with MTP layers" -- "$DSMOE" generate --model "$G/v3_yarn_q_nomtp" \
    --prompt-tokens "$G/v3_yarn_q/tokens.npy" --mtp
grep -qF "num_nextn_predict_layers 0, 0 stored" "$TMP/err.txt" || fail "no-MTP refusal lacks the counts"
expect 2 "--mtp needs a model with MTP layers" -- "$DSMOE" generate --model "$SRC/tests/golden/model_cli/bytes_tiny" \
    --prompt "ab" --mtp
for bad in 0 8 -1 x 1.5; do
    expect 2 "--draft expects a number of drafts per step in 1..7, got '$bad'" -- "$DSMOE" generate \
        --model "$G/v3_mtp2" --prompt-tokens "$G/v3_mtp2/tokens.npy" --mtp --draft "$bad"
done
expect 2 "--draft needs a value" -- "$DSMOE" generate --model "$G/v3_mtp2" --prompt-tokens "$G/v3_mtp2/tokens.npy" --mtp --draft
expect 2 "--runs needs --mtp" -- "$DSMOE" generate --model "$G/v3_mtp2" --prompt-tokens "$G/v3_mtp2/tokens.npy" --runs 2
expect 2 "--runs expects 1..100, got '0'" -- "$DSMOE" generate --model "$G/v3_mtp2" --prompt-tokens "$G/v3_mtp2/tokens.npy" --mtp --runs 0
expect 2 "--draft needs --mtp" -- "$DSMOE" generate --model "$G/v3_mtp2" --prompt-tokens "$G/v3_mtp2/tokens.npy" --draft 2
"$DSMOE" generate --help | grep -qF -- "--mtp" || fail "generate --help lacks --mtp"
"$DSMOE" generate --help | grep -qF -- "--draft N" || fail "generate --help lacks --draft"
[ "$fails" = 0 ] && echo "cli_mtp: all passed"
exit $((fails > 0))
