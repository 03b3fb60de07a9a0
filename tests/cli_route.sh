#!/usr/bin/env bash
# CLI tests of `dsmoe route` and `dsmoe bench route`: usage errors exit 2, bad files exit 1
# with a message, results are reproducible and identical across thread counts.
# usage: cli_route.sh <dsmoe> <source-dir> <scratch-dir>
set -u
DSMOE=$1
TMP=$3
rm -rf "$TMP" && mkdir -p "$TMP" && cd "$TMP" || exit 1
fails=0 passes=0
check() { # check NAME EXPECTED_RC CMD...
  local name=$1 want=$2; shift 2
  "$@" >out.txt 2>err.txt
  local rc=$?
  if [ "$rc" -ne "$want" ]; then
    echo "FAIL $name: exit $rc, want $want"; sed 's/^/  | /' err.txt | head -5; fails=$((fails + 1))
  elif [ "$want" -ne 0 ] && ! grep -q "dsmoe" err.txt; then
    echo "FAIL $name: no error message on stderr"; fails=$((fails + 1))
  else
    echo "ok   $name"; passes=$((passes + 1))
  fi
}
same() { # same NAME FILE1 FILE2
  if cmp -s "$2" "$3"; then echo "ok   $1"; passes=$((passes + 1)); else echo "FAIL $1: $2 and $3 differ"; fails=$((fails + 1)); fi
}

check help 0 "$DSMOE" route --help
grep -q -- "--topk-groups" out.txt || { echo "FAIL help lists router flags"; fails=$((fails + 1)); }
check top-help 0 "$DSMOE" --help
check version 0 "$DSMOE" --version
check random 0 "$DSMOE" route --random 97 --seed 3 --out-logits L.npy --out-indices I1.npy --out-weights W1.npy --threads 1
check from-file 0 "$DSMOE" route --logits L.npy --out-indices I2.npy --out-weights W2.npy --out-scores S.npy --threads 2
same "file input reproduces --random" I1.npy I2.npy
same "weights identical for 1 and 2 threads" W1.npy W2.npy
check json 0 "$DSMOE" route --logits L.npy --json
grep -q '"maxvio_batch"' out.txt && grep -q '"counts"' out.txt || { echo "FAIL json keys"; fails=$((fails + 1)); }
sum=$(sed 's/.*"counts": \[\([^]]*\)\].*/\1/' out.txt | tr ',' '\n' | awk '{s+=$1} END {print s}')
[ "$sum" = "$((97 * 8))" ] && echo "ok   counts sum to T*K" || { echo "FAIL counts sum $sum"; fails=$((fails + 1)); }
check bf16 0 "$DSMOE" route --logits L.npy --precision bf16 --out-weights Wb.npy
check hf-preset 0 "$DSMOE" route --preset deepseek-v3-hf --logits L.npy --out-indices Ih.npy
check v2-shape-mismatch 1 "$DSMOE" route --preset deepseek-v2 --logits L.npy
grep -q "shape" err.txt || { echo "FAIL shape message"; fails=$((fails + 1)); }

# usage errors
check no-input 2 "$DSMOE" route
check two-inputs 2 "$DSMOE" route --random 3 --logits L.npy
check unknown-option 2 "$DSMOE" route --random 3 --frobnicate
check bad-int 2 "$DSMOE" route --random 3 --top-k abc
check missing-value 2 "$DSMOE" route --random 3 --scale
check bad-config 2 "$DSMOE" route --random 3 --groups 7
# the validator's message names the flags the user typed, not the struct fields
names_flag() { # names_flag NAME FLAG FIELD
  if grep -q -- "$2" err.txt && ! grep -q "$3" err.txt; then echo "ok   $1 message names $2"; passes=$((passes + 1))
  else echo "FAIL $1 message should name $2, not $3:"; sed 's/^/  | /' err.txt; fails=$((fails + 1)); fi
}
names_flag bad-config "--groups 7" "n_groups"
check bad-k 2 "$DSMOE" route --random 3 --top-k 200
names_flag bad-k "--top-k 200" "top_k"
check bad-topk-groups 2 "$DSMOE" route --random 3 --topk-groups 9
names_flag bad-topk-groups "--topk-groups 9" "topk_groups"
check bad-scale 2 "$DSMOE" route --random 3 --scale 0
names_flag bad-scale "--scale 0" "scale ="
check bad-group-score 2 "$DSMOE" route --random 3 --group-score top64sum
names_flag bad-group-score "--group-score topNsum = 64" "group_topm"
check unknown-preset 2 "$DSMOE" route --preset gpt5 --random 3
check hidden-without-gate 2 "$DSMOE" route --hidden L.npy
check unknown-command 2 "$DSMOE" frobnicate

# bad files
check missing-file 1 "$DSMOE" route --logits nope.npy
head -c 100 L.npy > trunc.npy
check truncated 1 "$DSMOE" route --logits trunc.npy
check wrong-dtype 1 "$DSMOE" route --logits I1.npy
check bias-shape 1 "$DSMOE" route --logits L.npy --bias W1.npy
printf 'not a numpy file at all' > junk.npy
check junk 1 "$DSMOE" route --logits junk.npy
# a NaN logit: patch 4 bytes of token 5 in the data section
hlen=$(od -An -tu2 -j8 -N2 L.npy | tr -d ' ')
cp L.npy nan.npy
printf '\x00\x00\xc0\x7f' | dd of=nan.npy bs=1 seek=$((10 + hlen + (5 * 256 + 17) * 4)) conv=notrunc status=none
check nan-logit 1 "$DSMOE" route --logits nan.npy
grep -q "token 5, expert 17" err.txt || { echo "FAIL nan message names token and expert"; sed 's/^/  | /' err.txt; fails=$((fails + 1)); }
check nan-sanitized 0 "$DSMOE" route --logits nan.npy --nonfinite sanitize --out-indices In.npy
check unwritable 1 "$DSMOE" route --logits L.npy --out-indices no/such/dir/I.npy

check bench 0 "$DSMOE" bench route --tokens 16 --repeat 1 --min-time 0.001 --json
grep -q '"tokens_per_s"' out.txt || { echo "FAIL bench json"; fails=$((fails + 1)); }
grep -q '"fma_peak_gflops"' out.txt || { echo "FAIL bench json has the machine's FMA peak"; fails=$((fails + 1)); }
grep -q '"read_bandwidth_share"' out.txt || { echo "FAIL bench json has the read bandwidth share"; fails=$((fails + 1)); }
check bench-isa-ref 0 "$DSMOE" bench route --tokens 16 --repeat 1 --min-time 0.001 --json --isa ref
grep -q '"isa": "ref"' out.txt || { echo "FAIL bench --isa ref"; fails=$((fails + 1)); }
check bench-bad-isa 2 "$DSMOE" bench route --isa sse9
check machine 0 "$DSMOE" bench machine --json
grep -q '"uarch"' out.txt || { echo "FAIL bench machine json"; fails=$((fails + 1)); }
check bench-bad 2 "$DSMOE" bench route --tokens 0
check bench-unknown 2 "$DSMOE" bench nothing

echo "$passes passed, $fails failed"
[ "$fails" -eq 0 ]
