#!/usr/bin/env bash
# bench_moe.sh — the MoE layer benchmark: dsmoe (bench_moe) and the Hugging Face-style
# PyTorch loop (moe_torch.py) at the same shapes, one thread each, in one run, with the
# SGEMM rate of the layer's BLAS (BLIS, one thread per call), the memory read bandwidth
# and the FMA peak measured alongside (and the CPU printed: bench_machine.h); prints a
# table of ratios. Then thread scaling: the Moonlight-like forward and backward at
# T = 512 on 1 and 2 threads (bench_moe --threads 1,2), PyTorch on 1 and 2 threads, and
# 1 and 2 concurrent SGEMM callers. The forward runs in both weight layouts: the
# checkpoint's (rows as in the file) and the packed one (panels of 16 rows, inference only; see include/dsmoe/moe.h).
# Usage: bash bench/bench_moe.sh [BUILD_DIR] [--quick]
#   BUILD_DIR   a configured build (default: build); bench_moe is taken from it, or
#               compiled against its libdsmoe.a when the build has no bench target
#   --quick     fewer repetitions, Moonlight-like shape only
# Needs Debian's /usr/bin/python3 with python3-torch (make bench installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
quick=0
[ "${2:-}" = "--quick" ] && quick=1
py=/usr/bin/python3
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

bin="$build/bench_moe"
if [ ! -x "$bin" ]; then
  # no bench target in this build: compile it against the build's library
  blas=$(sed -n 's/^DSMOE_BLAS_LIB:[A-Z]*=//p' "$build/CMakeCache.txt")
  [ -f "$build/libdsmoe.a" ] || { echo "bench_moe: build $build first (make)" >&2; exit 2; }
  cc -O2 -std=c11 -D_POSIX_C_SOURCE=200809L -fopenmp -Iinclude -Isrc bench/bench_moe.c \
    "$build/libdsmoe.a" "$blas" -lpthread -lm -Wl,-rpath,"$(dirname "$blas")" -o "$out/bench_moe"
  bin="$out/bench_moe"
fi

shapes="moonlight v3-quarter"
repeat=5
if [ $quick = 1 ]; then
  shapes=moonlight
  repeat=3
fi
# one thread on both sides: dsmoe's default, and every pool of PyTorch's (moe_torch.py pins
# them again before it imports torch)
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
# dsmoe and PyTorch alternate per token count, so that both see the same machine state
for s in $shapes; do
  for T in 1 32 512; do
    echo "bench_moe: $s, forward, T = $T: dsmoe (checkpoint, packed layout), PyTorch ..." >&2
    "$bin" --shape "$s" --tokens $T --backward 0 --repeat $repeat >>"$out/results.jsonl"
    "$bin" --shape "$s" --tokens $T --backward 0 --repeat $repeat --packed | grep '"dsmoe"' >>"$out/results.jsonl"
    "$py" bench/moe_torch.py --shape "$s" --tokens $T --backward 0 --repeat $repeat >>"$out/results.jsonl"
  done
  echo "bench_moe: $s, backward, T = 512: dsmoe, PyTorch ..." >&2
  "$bin" --shape "$s" --tokens 0 --backward 512 --repeat $repeat >>"$out/results.jsonl"
  "$py" bench/moe_torch.py --shape "$s" --tokens "" --backward 512 --repeat $repeat >>"$out/results.jsonl"
  echo "bench_moe: $s, bf16 weights ..." >&2
  "$bin" --shape "$s" --tokens 1,32 --backward 0 --repeat $repeat --bf16 | grep '"dsmoe"' >>"$out/results.jsonl"
  "$bin" --shape "$s" --tokens 1,32 --backward 0 --repeat $repeat --bf16 --packed | grep '"dsmoe"' >>"$out/results.jsonl"
done

# Thread scaling: dsmoe times both counts within each repetition; PyTorch per count.
echo "bench_moe: moonlight, T = 512, thread scaling: dsmoe (1 and 2 threads), PyTorch ..." >&2
"$bin" --shape moonlight --tokens 512 --backward 512 --repeat $repeat --threads 1,2 >"$out/scaling.jsonl"
for n in 1 2; do
  OMP_NUM_THREADS=$n OPENBLAS_NUM_THREADS=$n "$py" bench/moe_torch.py --shape moonlight \
    --tokens 512 --backward 512 --repeat $repeat --threads $n >>"$out/scaling.jsonl"
done

"$py" - "$out/results.jsonl" "$out/scaling.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
mem = [r for r in rows if r["impl"] == "memory"]
bw = [r["read_gb_per_s"] for r in mem]
peak_fma = max(r.get("fma_peak_gflops", 0) for r in mem)
tt = [r for r in rows if r["impl"] == "torch_threads"]
m = mem[0]
if "cpu_name" in m:
    print("CPU: %s (%s family 0x%X model 0x%X stepping %d: %s), AVX2 %s, AVX-512F %s; dsmoe kernels %s" % (
        m["cpu_name"], m["cpu_vendor"], m["cpu_family"], m["cpu_model"], m["cpu_stepping"], m["uarch"],
        "yes" if m["avx2"] else "no", "yes" if m["avx512f"] else "no", m["isa"]))
    print("FMA peak (register-only fp32 FMA loop, one thread): %.1f GFLOP/s AVX-512, %.1f AVX2 (best of the run)" % (
        max(r["fma_peak_avx512_gflops"] for r in mem), max(r["fma_peak_avx2_gflops"] for r in mem)))
if tt:
    print("Threads: dsmoe 1; PyTorch %d (torch.get_num_threads), OPENBLAS_NUM_THREADS=%s OMP_NUM_THREADS=%s "
          "MKL_NUM_THREADS=%s" % (tt[0]["torch_threads"], tt[0]["OPENBLAS_NUM_THREADS"], tt[0]["OMP_NUM_THREADS"],
                                  tt[0]["MKL_NUM_THREADS"]))
sgemm = {}
for r in rows:
    if r["impl"] == "sgemm":
        sgemm.setdefault(r["shape"], []).append(r["gflops_per_s"])
torch = {(r["shape"], r["pass"], r["T"]): r["seconds"] for r in rows if r["impl"] == "torch"}
pk = peak_fma if peak_fma > 0 else float("nan")
blas = [r.get("blas", "BLIS") for r in rows if r["impl"] == "memory"][0]
print("Memory read bandwidth: %.1f GB/s; %s SGEMM (one thread): %s (best of the run's "
      "measurements)" % (max(bw), blas, ", ".join("%s %.1f GFLOP/s (%.0f%% of the FMA peak)" % (s, max(v), 100 * max(v) / pk)
                                             for s, v in sgemm.items())))
print()
print("| shape | pass | T | weights | dsmoe ms | GFLOP/s | % of FMA peak | % of SGEMM | weights read GB/s (% of bandwidth) | PyTorch ms | dsmoe speed-up |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    if r["impl"] != "dsmoe":
        continue
    key = (r["shape"], r["pass"], r["T"])
    t = torch.get(key) if r.get("dtype", "f32") == "f32" else None
    peak = max(sgemm[r["shape"]])
    rd = ("%.1f (%.0f%%)" % (r["read_gb_per_s"], 100 * r["read_gb_per_s"] / max(bw))
          if "read_gb_per_s" in r and r["T"] <= 32 else "")
    print("| %s | %s | %d | %s | %.2f | %.1f | %.0f%% | %.0f%% | %s | %s | %s |" % (
        r["shape"], r["pass"], r["T"],
        r.get("dtype", "f32") + (" packed" if r.get("layout") == "packed" else ""),
        1e3 * r["seconds"], r["gflops_per_s"], 100 * r["gflops_per_s"] / pk,
        100 * r["gflops_per_s"] / peak, rd, "%.2f" % (1e3 * t) if t else "",
        "%.2fx" % (t / r["seconds"]) if t else ""))

sc = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
d = {(r["impl"], r.get("pass"), r["threads"]): r for r in sc if r["impl"] in ("dsmoe", "torch", "sgemm")}
print()
print("Thread scaling, Moonlight-like shape, T = 512 (best of the run's repetitions):")
print()
print("| pass | dsmoe 1 thread ms | dsmoe 2 threads ms | dsmoe speed-up | PyTorch 1 thread ms | PyTorch 2 threads ms | PyTorch speed-up |")
print("|---|---|---|---|---|---|---|")
for p in ("forward", "backward"):
    a, b = d[("dsmoe", p, 1)]["seconds"], d[("dsmoe", p, 2)]["seconds"]
    ta, tb = d[("torch", p, 1)]["seconds"], d[("torch", p, 2)]["seconds"]
    print("| %s | %.1f | %.1f | %.2fx | %.1f | %.1f | %.2fx |" % (p, 1e3 * a, 1e3 * b, a / b, 1e3 * ta, 1e3 * tb, ta / tb))
s1, s2 = d[("sgemm", None, 1)]["gflops_per_s"], d[("sgemm", None, 2)]["gflops_per_s"]
print()
print("SGEMM, 1 caller: %.1f GFLOP/s; 2 concurrent callers: %.1f GFLOP/s in total (%.2fx)" % (s1, s2, s2 / s1))
EOF
