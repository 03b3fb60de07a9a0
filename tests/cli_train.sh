#!/usr/bin/env bash
# cli_train.sh — `dsmoe train` end to end at the tiny preset: --help documents the
# flags; a run ends with the validation loss, MaxVio_global and a sample; --stop-at then
# --resume gives the uninterrupted run's checkpoint byte for byte; kill -9 at random
# moments (saves every step) always leaves a checkpoint that opens, and resuming after
# each kill still ends on the uninterrupted run's bytes; `dsmoe eval --text` and
# `dsmoe generate --prompt` read the checkpoint; bad flags, missing data, an unwritable
# folder and a NaN are refused naming them, the checkpoint left whole.
# Usage: bash cli_train.sh <dsmoe> <source-dir> <tmpdir>
set -u
source "$(dirname "$0")/clilib.sh" "$@"

T="--preset tiny --threads 1 --quiet --corpus-tokens 60000 --eval-tokens 512"

# --help
"$DSMOE" train --help >"$TMP/help.txt" || fail "train --help"
for f in --preset --strategy --steps --seed --out --data --save-every --eval-every --eval-tokens \
    --resume --stop-at --threads --hidden-size --layers --experts --top-k --groups --heads \
    --kv-lora-rank --mtp-depths --lr --warmup --min-lr-ratio --weight-decay --clip --beta1 \
    --beta2 --batch --seq-len --gamma --bias-rule --alpha --balance-loss --mtp-lambda \
    aux-loss v3-no-balance softmax-norm; do
    grep -qF -- "$f" "$TMP/help.txt" || fail "train --help lacks $f"
done
"$DSMOE" --help | grep -q "train" || fail "dsmoe --help lacks train"
"$DSMOE" --help | grep -q "simulate" || fail "dsmoe --help lacks simulate"

# A whole run, its summary and sample.
"$DSMOE" train $T --steps 30 --out "$TMP/whole" --save-every 10 --sample-tokens 40 \
    >"$TMP/whole.out" 2>"$TMP/whole.err" || { fail "tiny run"; cat "$TMP/whole.err" >&2; }
grep -q "validation loss" "$TMP/whole.err" || fail "no validation loss in the summary"
grep -q "MaxVio_global" "$TMP/whole.err" || fail "no MaxVio_global in the summary"
grep -q "samples" "$TMP/whole.err" || fail "no samples"; [ "$(grep -c -- "--- sample" "$TMP/whole.out")" = 3 ] || fail "not 3 samples"
[ -f "$TMP/whole/metrics.jsonl" ] || fail "no metrics.jsonl"
[ "$(grep -c '"type":"train"' "$TMP/whole/metrics.jsonl")" = 30 ] || fail "30 train records"
"$DSMOE" info --model "$TMP/whole/checkpoint" >/dev/null || fail "info on the checkpoint"

# Stop and resume: the same model bytes.
"$DSMOE" train $T --steps 30 --out "$TMP/parts" --save-every 10 --stop-at 13 \
    2>"$TMP/err.txt" || fail "stop-at"
"$DSMOE" train --resume --out "$TMP/parts" --threads 1 --quiet --sample-tokens 0 \
    2>"$TMP/err.txt" || { fail "resume"; cat "$TMP/err.txt" >&2; }
cmp -s "$TMP/whole/checkpoint/model.safetensors" "$TMP/parts/checkpoint/model.safetensors" ||
    fail "stop + resume differs from the uninterrupted run"
# A resume with other flags than the run's is refused, naming the flag.
expect 2 "--lr" -- "$DSMOE" train $T --steps 30 --save-every 10 --lr 0.5 --resume --out "$TMP/parts"
# A fresh run into a run's folder is refused.
expect 1 "resume" -- "$DSMOE" train $T --steps 30 --out "$TMP/parts"

# kill -9 at random moments while saving every step; each time the checkpoint (if one
# was written yet) opens, and the run resumes; the end equals the uninterrupted run.
"$DSMOE" train $T --steps 30 --save-every 1 --out "$TMP/ref1" --sample-tokens 0 2>/dev/null ||
    fail "reference run"
K="$TMP/killed"
started=0
for i in 1 2 3 4 5 6 7 8; do
    if [ $started = 0 ]; then
        "$DSMOE" train $T --steps 30 --save-every 1 --out "$K" --sample-tokens 0 2>/dev/null &
    else
        "$DSMOE" train --resume --out "$K" --threads 1 --quiet --sample-tokens 0 2>/dev/null &
    fi
    pid=$!
    sleep "0.$((RANDOM % 4))$((RANDOM % 10))"
    kill -9 $pid 2>/dev/null
    wait $pid 2>/dev/null
    if [ -e "$K/checkpoint" ] || ls "$K" 2>/dev/null | grep -q '^checkpoint\.old'; then
        started=1
        "$DSMOE" info --model "$K/checkpoint" >/dev/null 2>"$TMP/err.txt" ||
            { fail "kill $i: the checkpoint does not open"; cat "$TMP/err.txt" >&2; }
    fi
done
if [ $started = 1 ]; then
    "$DSMOE" train --resume --out "$K" --threads 1 --quiet --sample-tokens 0 2>"$TMP/err.txt" ||
        { fail "resume after kills"; cat "$TMP/err.txt" >&2; }
else
    "$DSMOE" train $T --steps 30 --save-every 1 --out "$K" --sample-tokens 0 2>/dev/null
fi
cmp -s "$TMP/ref1/checkpoint/model.safetensors" "$K/checkpoint/model.safetensors" ||
    fail "kills and resumes end elsewhere than the uninterrupted run"
ls "$K" | grep -q '\.tmp\.' && fail "temporary folders left behind: $(ls "$K")"
# A kill between a save's swap and its removal of the old checkpoint leaves that one
# beside the new; resuming the finished run (which saves nothing) still removes it.
dead=$(sh -c 'echo $$')
cp -r "$K/checkpoint" "$K/checkpoint.tmp.$dead.0"
"$DSMOE" train --resume --out "$K" --threads 1 --quiet --sample-tokens 0 2>"$TMP/err.txt" ||
    { fail "resume of the finished run"; cat "$TMP/err.txt" >&2; }
[ -e "$K/checkpoint.tmp.$dead.0" ] && fail "a dead save's folder survives the resume"
cmp -s "$TMP/ref1/checkpoint/model.safetensors" "$K/checkpoint/model.safetensors" ||
    fail "resuming the finished run changed its checkpoint"

# eval --text and generate --prompt on the trained checkpoint.
printf '12+34=46\n(5+6)*7=77\nrev abc|cba\n' >"$TMP/text.txt"
"$DSMOE" eval --model "$TMP/whole/checkpoint" --text "$TMP/text.txt" >"$TMP/eval.txt" 2>&1 ||
    fail "eval --text"
grep -qi "bits" "$TMP/eval.txt" || fail "eval --text prints no bits per byte"
"$DSMOE" generate --model "$TMP/whole/checkpoint" --prompt "12+" --max-tokens 20 --seed 3 \
    >"$TMP/gen1.txt" 2>/dev/null || fail "generate --prompt"
"$DSMOE" generate --model "$TMP/whole/checkpoint" --prompt "12+" --max-tokens 20 --seed 3 \
    >"$TMP/gen2.txt" 2>/dev/null
cmp -s "$TMP/gen1.txt" "$TMP/gen2.txt" || fail "generate is not reproducible"

# Errors.
expect 2 "unknown name 'v9'" -- "$DSMOE" train $T --strategy v9 --out "$TMP/e1"
expect 2 "--lr expects" -- "$DSMOE" train $T --lr abc --out "$TMP/e1"
expect 2 "unknown option '--bogus'" -- "$DSMOE" train $T --bogus --out "$TMP/e1"
expect 2 "--out DIR is required" -- "$DSMOE" train $T
expect 2 "--seq-len" -- "$DSMOE" train $T --seq-len 5000 --out "$TMP/e1"
expect 2 "--balance-loss expects" -- "$DSMOE" train $T --balance-loss nope --out "$TMP/e1"
expect 1 "no/such.txt" -- "$DSMOE" train $T --data no/such.txt --out "$TMP/e2"
printf 'x' >"$TMP/afile"
expect 1 "$TMP/afile" -- "$DSMOE" train $T --out "$TMP/afile/run"
expect 1 "no checkpoint" -- "$DSMOE" train --resume --out "$TMP/nothing"
# A NaN: the step named, the last checkpoint whole.
expect 1 "step " -- "$DSMOE" train $T --lr 1000 --warmup 3 --save-every 1 --steps 50 --out "$TMP/nan"
grep -q "NaN\|nan\|inf" "$TMP/err.txt" || fail "the NaN message does not say so: $(cat "$TMP/err.txt")"
"$DSMOE" info --model "$TMP/nan/checkpoint" >/dev/null 2>&1 || fail "checkpoint after NaN"

# A text-file run.
for i in $(seq 1 300); do echo "line $i of a small text file"; echo; done >"$TMP/data.txt"
"$DSMOE" train $T --steps 5 --seq-len 16 --valid-fraction 0.2 --data "$TMP/data.txt" \
    --out "$TMP/text" --sample-tokens 0 2>"$TMP/err.txt" || { fail "text run"; cat "$TMP/err.txt" >&2; }
grep -q '"text":{"loss"' "$TMP/text/metrics.jsonl" || fail "text domain loss missing"

[ $fails = 0 ] && echo "cli_train: all passed"
exit $((fails > 0))
