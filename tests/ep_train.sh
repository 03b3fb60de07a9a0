#!/usr/bin/env bash
# ep_train.sh — data-parallel training under mpirun (`mpirun -np R dsmoe train`), at the
# tiny preset: 2 and 4 ranks follow the one-process run on the same global batch (every
# train and eval loss within a relative 1e-5; measured: a few 1e-8), repeated runs of 2
# ranks are byte-identical (metrics apart from times, checkpoint); a run saved by 2 ranks
# resumes in one process and the other way round, ending within the same tolerance;
# the balance losses over the whole batch (aux-loss, v2: f from the counts summed over the
# ranks) follow one process within the same tolerance, v2 with --expert-parallel too;
# batch % ranks != 0 is refused naming it; a data
# file one rank cannot read and an unwritable run folder fail on every rank with the
# failing rank's message, within the timeout, instead of hanging. `mpirun -np 2 dsmoe
# eval --text` prints what one process prints, and `--tokens` writes the same logits.
# --expert-parallel (each MoE layer through dsmoe_ep): the same tolerance against one
# process, repeatable, not the data-parallel bits, resumable in one process and by other
# rank counts; each rank's peak resident memory drops by its share of the other ranks'
# experts (parameters, gradients, AdamW moments) against plain data parallelism.
# `mpirun -np 2 dsmoe study`: each run data-parallel, within the tolerance of the
# one-process study; rank 0 alone prints the report path; started again, it skips; its
# errors stop every rank, printed once.
# Usage: bash ep_train.sh <dsmoe> <source-dir> <tmpdir> <mpirun> [mpirun flags...]
set -u
DS=$1 SR=$2 TD=$3 MPIRUN=$4
shift 4
MPIFLAGS=("$@")
source "$(dirname "$0")/clilib.sh" "$DS" "$SR" "$TD"
export OMP_WAIT_POLICY=PASSIVE OMPI_MCA_mpi_yield_when_idle=1 OMPI_MCA_btl_vader_single_copy_mechanism=none OMP_NUM_THREADS=1
MPI=(timeout 120 "$MPIRUN" "${MPIFLAGS[@]}")
T=(--preset tiny --threads 1 --quiet --corpus-tokens 60000 --eval-tokens 512 --sample-tokens 0
   --steps 8 --eval-every 4 --batch 8)

# compare A B [exact]: the train and eval records of two runs (step by step)
compare() {
    /usr/bin/python3 - "$1/metrics.jsonl" "$2/metrics.jsonl" "${3:-}" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
exact = sys.argv[3] == "exact"
assert len(a) == len(b), (len(a), len(b))
worst = 0.0
for x, y in zip(a[1:], b[1:]):
    assert (x["type"], x["step"]) == (y["type"], y["step"]), (x["type"], y["type"])
    keys = ["loss", "ce", "mtp", "balance", "grad_norm"] if x["type"] == "train" else ["loss"]
    for k in keys:
        d = abs(x[k] - y[k]) / max(abs(x[k]), 1e-30)
        worst = max(worst, d)
        if exact: assert x[k] == y[k], (x["step"], k, x[k], y[k])
        else: assert d <= 1e-5, (x["type"], x["step"], k, x[k], y[k])
    assert x["tokens"] == y["tokens"]
print("largest relative difference %.3g" % worst)
PY
}

# one process, then 2 ranks (twice) and 4 ranks on the same global batch
expect 0 "" -- "$DSMOE" train "${T[@]}" --out "$TMP/one"
for np in 2 4; do
    expect 0 "" -- "${MPI[@]}" -np $np "$DSMOE" train "${T[@]}" --out "$TMP/r$np"
    compare "$TMP/one" "$TMP/r$np" || fail "$np ranks differ from one process"
    grep -q "\"ranks\":$np" "$TMP/r$np/metrics.jsonl" || fail "the run record lacks \"ranks\":$np"
done
expect 0 "" -- "${MPI[@]}" -np 2 "$DSMOE" train "${T[@]}" --out "$TMP/r2b"
compare "$TMP/r2" "$TMP/r2b" exact || fail "two runs of 2 ranks differ"
cmp -s "$TMP/r2/checkpoint/model.safetensors" "$TMP/r2b/checkpoint/model.safetensors" ||
    fail "two runs of 2 ranks wrote different checkpoints"
# -np 1 under mpirun is the one-process run, bit for bit
expect 0 "" -- "${MPI[@]}" -np 1 "$DSMOE" train "${T[@]}" --out "$TMP/r1"
cmp -s "$TMP/one/checkpoint/model.safetensors" "$TMP/r1/checkpoint/model.safetensors" ||
    fail "mpirun -np 1 differs from one process"

# resume across a change of R: 2 ranks then one process, one process then 2 ranks
expect 0 "" -- "${MPI[@]}" -np 2 "$DSMOE" train "${T[@]}" --stop-at 3 --out "$TMP/s21"
expect 0 "" -- "$DSMOE" train --resume --threads 1 --quiet --sample-tokens 0 --out "$TMP/s21"
compare "$TMP/one" "$TMP/s21" || fail "2 ranks resumed in one process: off the one-process run"
expect 0 "" -- "$DSMOE" train "${T[@]}" --stop-at 5 --out "$TMP/s12"
expect 0 "" -- "${MPI[@]}" -np 2 "$DSMOE" train --resume --threads 1 --quiet --sample-tokens 0 \
    --out "$TMP/s12"
compare "$TMP/one" "$TMP/s12" || fail "one process resumed by 2 ranks: off the one-process run"
[ "$(grep -c '"type":"train"' "$TMP/s12/metrics.jsonl")" = 8 ] || fail "resumed run: 8 train records"

# --expert-parallel: the MoE layers through dsmoe_ep (each rank runs its block of
# experts); the same losses within the tolerance, repeatable, resumable in one process
for np in 2 4; do
    expect 0 "" -- "${MPI[@]}" -np $np "$DSMOE" train "${T[@]}" --expert-parallel --out "$TMP/x$np"
    compare "$TMP/one" "$TMP/x$np" || fail "$np expert-parallel ranks differ from one process"
done
expect 0 "" -- "${MPI[@]}" -np 2 "$DSMOE" train "${T[@]}" --expert-parallel --out "$TMP/x2b"
cmp -s "$TMP/x2/checkpoint/model.safetensors" "$TMP/x2b/checkpoint/model.safetensors" ||
    fail "two expert-parallel runs of 2 ranks wrote different checkpoints"
cmp -s "$TMP/r2/checkpoint/model.safetensors" "$TMP/x2/checkpoint/model.safetensors" &&
    fail "--expert-parallel gave the data-parallel bits: dsmoe_ep not used?"
expect 0 "" -- "${MPI[@]}" -np 2 "$DSMOE" train "${T[@]}" --expert-parallel --stop-at 3 \
    --out "$TMP/xs"
expect 0 "" -- "$DSMOE" train --resume --threads 1 --quiet --sample-tokens 0 --out "$TMP/xs"
compare "$TMP/one" "$TMP/xs" || fail "expert-parallel run resumed in one process"
# resumed with expert parallelism (each rank reads only its own experts): one process by
# 2 ranks, 2 ranks by 4
expect 0 "" -- "$DSMOE" train "${T[@]}" --stop-at 5 --out "$TMP/xs12"
expect 0 "" -- "${MPI[@]}" -np 2 "$DSMOE" train --resume --threads 1 --quiet --sample-tokens 0 \
    --expert-parallel --out "$TMP/xs12"
compare "$TMP/one" "$TMP/xs12" || fail "one process resumed by 2 expert-parallel ranks"
expect 0 "" -- "${MPI[@]}" -np 2 "$DSMOE" train "${T[@]}" --expert-parallel --stop-at 3 \
    --out "$TMP/xs24"
expect 0 "" -- "${MPI[@]}" -np 4 "$DSMOE" train --resume --threads 1 --quiet --sample-tokens 0 \
    --expert-parallel --out "$TMP/xs24"
compare "$TMP/one" "$TMP/xs24" || fail "2 expert-parallel ranks resumed by 4"
[ "$(grep -c '"type":"train"' "$TMP/xs24/metrics.jsonl")" = 8 ] || fail "xs24: 8 train records"

# Memory: each expert-parallel rank keeps only its own experts' parameters, gradients and
# AdamW moments resident. Peak resident memory (ru_maxrss of each rank's process) of 2
# plain data-parallel ranks against 2 expert-parallel ranks, on a model whose routed
# experts dominate it (E = 64, D = 32, F = 256, 4 MoE layers with the MTP depth's: 24 MiB
# of experts per array). Expected saving: rank 1 the other half of the experts in all four
# arrays; rank 0 in two (it receives the other experts' parameters, then their two
# moments, to write the checkpoint after the last step).
M=(--preset tiny --threads 1 --quiet --corpus-tokens 60000 --eval-tokens 128 --sample-tokens 0
   --steps 2 --batch 2 --seq-len 32 --experts 64 --moe-intermediate-size 256 --layers 4)
RSS='import resource, subprocess, sys
c = subprocess.call(sys.argv[2:])
open(sys.argv[1], "w").write("%d\n" % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(c)'
for mode in dp ep; do
    flag=()
    [ $mode = ep ] && flag=(--expert-parallel)
    expect 0 "" -- "${MPI[@]}" -np 2 bash -c \
        'exec /usr/bin/python3 -c "$1" "$2.$OMPI_COMM_WORLD_RANK" "${@:3}"' _ "$RSS" \
        "$TMP/rss_$mode" "$DSMOE" train "${M[@]}" "${flag[@]}" --out "$TMP/mem_$mode"
done
/usr/bin/python3 - "$TMP" <<'PY' || fail "expert-parallel ranks do not save the experts' memory"
import json, sys
t = sys.argv[1]
run = json.loads(open(t + "/mem_ep/metrics.jsonl").readline())
m = run["model"]
E, D, F = m["n_routed_experts"], m["hidden_size"], m["moe_intermediate_size"]
pad = lambda n: (n + 15) // 16 * 16
per = pad(2 * F * D) + pad(D * F)          # floats per expert
n_moe = len(run["moe_layers"])
experts = n_moe * E * per                  # floats of all the routed experts
half = experts // 2 * 4 / 1024             # KiB of the other rank's experts, one array
kb = {(mode, r): int(open("%s/rss_%s.%d" % (t, mode, r)).read()) for mode in ("dp", "ep") for r in (0, 1)}
print("parameters %d floats, routed experts %d (%.0f%%)" % (run["params"], experts, 100.0 * experts / run["params"]))
print("gradient average per step: %d bytes data-parallel, %d expert-parallel"
      % (run["params"] * 4, (run["params"] - experts) * 4))
ok = True
for r, arrays in ((0, 2), (1, 4)):
    drop, want = kb[("dp", r)] - kb[("ep", r)], arrays * half
    print("rank %d peak RSS: %d KiB data-parallel, %d KiB expert-parallel: %d KiB less, expected %d KiB (%d arrays of half the experts) -> %.0f%%"
          % (r, kb[("dp", r)], kb[("ep", r)], drop, want, arrays, 100.0 * drop / want))
    ok = ok and drop >= 0.85 * want
sys.exit(0 if ok else 1)
PY
compare "$TMP/mem_dp" "$TMP/mem_ep" || fail "the memory runs differ"

# the balance losses over the whole batch: aux-loss (expert kind, sigmoid) on 2 ranks,
# v2 (expert kind, softmax) on 2 expert-parallel ranks, against one process
for s in aux-loss v2; do
    x=""; [ $s = v2 ] && x=--expert-parallel
    expect 0 "" -- "$DSMOE" train "${T[@]}" --strategy $s --out "$TMP/$s-1"
    expect 0 "" -- "${MPI[@]}" -np 2 "$DSMOE" train "${T[@]}" --strategy $s $x --out "$TMP/$s-2"
    compare "$TMP/$s-1" "$TMP/$s-2" || fail "$s on 2 ranks $x differs from one process"
    /usr/bin/python3 -c '
import json, sys
assert all(r["balance"] > 0 for r in map(json.loads, open(sys.argv[1])) if r["type"] == "train")
' "$TMP/$s-2/metrics.jsonl" || fail "$s: a train record without a balance loss"
done

# a study under mpirun: its runs data-parallel over the ranks, rank 0 writing the files
S=(study --preset tiny --strategies v3,aux-loss --seeds 1 --steps 6 --eval-every 3
   --eval-tokens 512 --corpus-tokens 60000 --batch 8 --threads 1 --quiet)
expect 0 "" -- "$DSMOE" "${S[@]}" --out "$TMP/st1"
expect 0 "" -- "${MPI[@]}" -np 2 "$DSMOE" "${S[@]}" --out "$TMP/st2"
[ "$(wc -l <"$TMP/out.txt")" = 1 ] || fail "study under 2 ranks: not one report line"
for run in v3-seed1 aux-loss-seed1; do
    compare "$TMP/st1/runs/$run" "$TMP/st2/runs/$run" || fail "study run $run on 2 ranks"
    grep -q '"ranks":2' "$TMP/st2/runs/$run/metrics.jsonl" || fail "study run $run not data-parallel"
done
[ -s "$TMP/st2/summary.json" ] && [ -s "$TMP/st2/report.html" ] || fail "study: no summary or report"
# with --expert-parallel each run shards its experts over the ranks (dsmoe_ep): the same
# study to the tolerance
expect 0 "" -- "${MPI[@]}" -np 2 "$DSMOE" "${S[@]}" --expert-parallel --out "$TMP/st2e"
for run in v3-seed1 aux-loss-seed1; do
    compare "$TMP/st1/runs/$run" "$TMP/st2e/runs/$run" || fail "study run $run on 2 expert-parallel ranks"
done
cp "$TMP/st2/runs/v3-seed1/metrics.jsonl" "$TMP/st2.m"
expect 0 "" -- "${MPI[@]}" -np 2 "$DSMOE" "${S[@]}" --out "$TMP/st2"
cmp -s "$TMP/st2.m" "$TMP/st2/runs/v3-seed1/metrics.jsonl" || fail "a finished study ran again"
# a study's errors stop every rank, printed once: a run's (batch 6 on 4 ranks), a folder's
expect 2 "not a multiple of the 4 ranks" -- "${MPI[@]}" -np 4 "$DSMOE" "${S[@]}" --batch 6 \
    --out "$TMP/st4"
[ "$(grep -c "dsmoe study:" "$TMP/err.txt")" = 1 ] || fail "study error: not printed once"
: >"$TMP/afile2"
expect 1 "rank 0: " -- "${MPI[@]}" -np 2 "$DSMOE" "${S[@]}" --out "$TMP/afile2/st"

# refusals, the same on every rank
expect 2 "not a multiple of the 4 ranks" -- "${MPI[@]}" -np 4 "$DSMOE" train "${T[@]}" --batch 6 \
    --out "$TMP/b6"
grep -q -- "--batch" "$TMP/err.txt" || fail "the batch error does not name --batch"
[ -e "$TMP/b6/checkpoint" ] && fail "a refused run wrote a checkpoint"
# a data file rank 1 cannot read: every rank stops, naming rank 1 and the file
for i in $(seq 1 300); do echo "line $i of a small text file"; echo; done >"$TMP/data.txt"
expect 1 "rank 1" -- "${MPI[@]}" -np 2 bash -c \
    'D="$1"; [ "$OMPI_COMM_WORLD_RANK" = 1 ] && D="$1.missing"; shift; exec "$@" --data "$D"' \
    _ "$TMP/data.txt" "$DSMOE" train "${T[@]}" --seq-len 16 --valid-fraction 0.2 --out "$TMP/miss"
grep -q "data.txt.missing" "$TMP/err.txt" || fail "the failing rank's message lacks the file"
# a run folder rank 0 cannot create: every rank stops
: >"$TMP/afile"
expect 1 "rank 0" -- "${MPI[@]}" -np 2 "$DSMOE" train "${T[@]}" --out "$TMP/afile/run"

# eval --text: rank 0 prints the one-process lines
"$DSMOE" eval --model "$TMP/one/checkpoint" --text "$TMP/data.txt" --context 64 --threads 1 \
    >"$TMP/e1.txt" 2>/dev/null || fail "eval, one process"
expect 0 "" -- "${MPI[@]}" -np 2 "$DSMOE" eval --model "$TMP/one/checkpoint" --text "$TMP/data.txt" \
    --context 64 --threads 1
cmp -s "$TMP/e1.txt" "$TMP/out.txt" || { fail "eval under 2 ranks prints otherwise"; diff "$TMP/e1.txt" "$TMP/out.txt" >&2; }

# eval --tokens: sequences dealt to the ranks, rank 0 writes the one-process logits
/usr/bin/python3 -c "
import numpy as np, sys
np.save(sys.argv[1], (np.arange(3 * 20).reshape(3, 20) * 7 % 250).astype(np.int32))
" "$TMP/tok.npy" || fail "cannot write the tokens"
"$DSMOE" eval --model "$TMP/one/checkpoint" --tokens "$TMP/tok.npy" --out-logits "$TMP/l1.npy" \
    --threads 1 2>/dev/null || fail "eval --tokens, one process"
expect 0 "" -- "${MPI[@]}" -np 2 "$DSMOE" eval --model "$TMP/one/checkpoint" --tokens "$TMP/tok.npy" \
    --out-logits "$TMP/l2.npy" --threads 1
cmp -s "$TMP/l1.npy" "$TMP/l2.npy" || fail "eval --tokens under 2 ranks wrote other logits"

[ $fails -eq 0 ] && echo "ep_train: all passed"
exit $((fails > 0))
