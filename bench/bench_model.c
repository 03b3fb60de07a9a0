/*
 * bench_model.c — times a whole model (a Hugging Face model directory, e.g. the one
 * bench/gen_bench_model.py writes) through the public API only (dsmoe_model_open,
 * dsmoe_model_cache_*, dsmoe_model_forward), next to what the machine can do, measured
 * in the same run (bench_machine.h): the CPU, the FMA peak and the read bandwidth.
 *
 *   bench_model --model DIR [--threads 1,2] [--prompt 256] [--decode-prompt 64]
 *               [--decode 32] [--repeat 3] [--check-out FILE.npy] [--check-tokens 16]
 *
 * For each thread count the model is opened with that many threads and measures:
 *   prompt  one forward of --prompt tokens from an empty cache, logits of the last
 *           position only (as the official inference code computes them), best of
 *           --repeat after a warm-up; reported as tokens/s and as GFLOP/s, a share of
 *           the FMA peak on that many threads (measured again just before: on a shared
 *           machine the header's may be minutes old). FLOPs: 2 per multiply-add of every
 *           product a token runs (the active matrices: attention, dense FFN, router,
 *           shared and top-k routed experts; the head once), plus attention's causal
 *           T² terms, 2·H·(n + r + v) per (query, key) pair with key <= query.
 *   decode  --decode tokens one forward each (logits of the token) after a prompt of
 *           --decode-prompt tokens, best of --repeat; reported as tokens/s and as the
 *           bytes of weights each token reads, at their stored dtype (every matrix and
 *           vector of the attention, the dense FFN, the router, the shared experts, K of
 *           the E routed experts, the final norm and head, and one embedding row), per
 *           second: a share of the read bandwidth on that many threads (measured again
 *           just before).
 * Also the cache bytes per token against a plain multi-head cache of the same attention.
 * Token ids are a 64-bit LCG (bench/model_torch.py draws the same ones), so PyTorch runs
 * the same tokens. --check-out writes the logits (T, V) of the first --check-tokens
 * check tokens (fp32 .npy, first thread count) for model_torch.py --check.
 *
 * Prints the machine header on stderr and one JSON line per measurement on stdout;
 * bench/bench_model.sh turns them, with model_torch.py's, into a table.
 */
#include "bench_common.h"
#include "dsmoe.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PROG "bench_model"

static void die(const char *what) {
    fprintf(stderr, PROG ": %s: %s\n", what, dsmoe_last_error());
    exit(1);
}

static double dtype_bytes(const char *dt) {
    if (strcmp(dt, "F32") == 0) return 4.0;
    if (strcmp(dt, "F8_E4M3") == 0) return 1.0;
    return 2.0; /* BF16, F16 */
}

typedef struct model_cost {
    double decode_bytes;   /* weight bytes one decoded token reads */
    double token_flops;    /* product FLOPs per token, without the head */
    double head_flops;     /* 2·V·D */
    double pair_flops;     /* attention FLOPs per (query, key) pair, all layers */
    double active_params;  /* per token, embedding row and head included */
    const char *dtype;     /* the stored dtype of the attention's kv_b_proj */
} model_cost;

/* Walks the tensor table of the model's config with the stored dtype of each tensor. */
static model_cost cost_of(const dsmoe_model *m) {
    const dsmoe_model_config *c = dsmoe_model_get_config(m);
    const dsmoe_model_files *mf = dsmoe_model_get_files(m);
    model_cost k;
    memset(&k, 0, sizeof k);
    k.dtype = "?";
    const int64_t n = dsmoe_model_tensor_count(c, 0);
    if (n < 0) die("tensor table");
    double emb_esz = 4.0;
    const double routed = c->n_routed_experts > 0 ? (double)c->num_experts_per_tok / c->n_routed_experts : 0.0;
    for (int64_t i = 0; i < n; i++) {
        dsmoe_model_tensor_spec s;
        dsmoe_model_tensor_info ti;
        if (dsmoe_model_tensor_at(c, 0, i, &s) != DSMOE_OK) die("tensor table");
        if (dsmoe_model_files_get(mf, s.name, &ti) != DSMOE_OK) die(s.name);
        const double elems = (double)s.shape[0] * (double)(s.ndim == 2 ? s.shape[1] : 1);
        double share = 1.0;
        if (strcmp(s.name, "model.embed_tokens.weight") == 0) {
            emb_esz = dtype_bytes(ti.stored_dtype);
            k.decode_bytes += (double)s.shape[1] * emb_esz; /* one row */
            k.active_params += (double)s.shape[1];
            continue;
        }
        if (strstr(s.name, ".mlp.experts.")) share = routed;
        k.decode_bytes += share * elems * dtype_bytes(ti.stored_dtype);
        if (ti.has_scale) /* fp8 block scales, 4 bytes per block */
            k.decode_bytes += share * 4.0 * elems / ((double)c->fp8_block_rows * c->fp8_block_cols);
        k.active_params += share * elems;
        if (s.ndim == 2) {
            if (strcmp(s.name, "lm_head.weight") == 0) k.head_flops = 2.0 * elems;
            else k.token_flops += 2.0 * share * elems;
        }
        if (strstr(s.name, "layers.0.self_attn.kv_b_proj")) k.dtype = ti.stored_dtype;
    }
    if (c->tie_word_embeddings) { /* the head is the embedding, read whole */
        k.head_flops = 2.0 * (double)c->vocab_size * c->hidden_size;
        k.decode_bytes += (double)c->vocab_size * c->hidden_size * emb_esz;
        k.active_params += (double)c->vocab_size * c->hidden_size;
    }
    k.pair_flops = 2.0 * c->num_hidden_layers * (double)c->num_attention_heads *
                   (double)(c->qk_nope_head_dim + c->qk_rope_head_dim + c->v_head_dim);
    return k;
}

static double min_of(const double *v, int n) {
    double b = v[0];
    for (int i = 1; i < n; i++) b = v[i] < b ? v[i] : b;
    return b;
}

static void write_npy_f32(const char *path, const float *a, int64_t rows, int64_t cols) {
    char h[128];
    int n = snprintf(h, sizeof h, "{'descr': '<f4', 'fortran_order': False, 'shape': (%lld, %lld), }",
                     (long long)rows, (long long)cols);
    int total = 10 + n + 1;
    int pad = (64 - total % 64) % 64;
    FILE *f = fopen(path, "wb");
    if (!f) {
        fprintf(stderr, PROG ": cannot write %s\n", path);
        exit(1);
    }
    const unsigned short hl = (unsigned short)(n + pad + 1);
    fwrite("\x93NUMPY\x01\x00", 1, 8, f);
    fputc(hl & 0xFF, f);
    fputc(hl >> 8, f);
    fwrite(h, 1, (size_t)n, f);
    for (int i = 0; i < pad; i++) fputc(' ', f);
    fputc('\n', f);
    if (fwrite(a, sizeof(float), (size_t)(rows * cols), f) != (size_t)(rows * cols) || fclose(f) != 0) {
        fprintf(stderr, PROG ": cannot write %s\n", path);
        exit(1);
    }
}

int main(int argc, char **argv) {
    const char *dir = NULL, *threads_arg = "1,2", *check_out = NULL;
    int prompt = 256, dprompt = 64, decode = 32, repeat = 3, check_T = 16;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--model") == 0 && v) dir = argv[++i];
        else if (strcmp(a, "--threads") == 0 && v) threads_arg = argv[++i];
        else if (strcmp(a, "--prompt") == 0 && v) prompt = atoi(argv[++i]);
        else if (strcmp(a, "--decode-prompt") == 0 && v) dprompt = atoi(argv[++i]);
        else if (strcmp(a, "--decode") == 0 && v) decode = atoi(argv[++i]);
        else if (strcmp(a, "--repeat") == 0 && v) repeat = atoi(argv[++i]);
        else if (strcmp(a, "--check-out") == 0 && v) check_out = argv[++i];
        else if (strcmp(a, "--check-tokens") == 0 && v) check_T = atoi(argv[++i]);
        else {
            fprintf(stderr,
                    "usage: " PROG " --model DIR [--threads 1,2] [--prompt 256] [--decode-prompt 64]\n"
                    "       [--decode 32] [--repeat 3] [--check-out FILE.npy] [--check-tokens 16]\n");
            return 2;
        }
    }
    if (!dir || prompt < 0 || dprompt < 1 || decode < 0 || repeat < 1 || check_T < 1) {
        fprintf(stderr, PROG ": need --model DIR; --prompt, --decode >= 0, --decode-prompt, --repeat, "
                        "--check-tokens >= 1\n");
        return 2;
    }
    int th[8];
    const int nth = bench_parse_threads(PROG, threads_arg, th, 8);
    if (nth < 0) return 2;
    int maxth = 1;
    for (int i = 0; i < nth; i++) maxth = th[i] > maxth ? th[i] : maxth;

    /* the machine: CPU, FMA peak and read bandwidth (1 GiB streaming sum) */
    bench_machine mach;
    bench_machine_measure(&mach, maxth, (size_t)1 << 30);
    bench_machine_print(stderr, &mach, dsmoe_isa());
    printf("{\"impl\": \"machine\", ");
    bench_machine_json(stdout, &mach, dsmoe_isa());
    printf(", \"version\": \"%s\"}\n", dsmoe_version());
    fflush(stdout);

    for (int ti = 0; ti < nth; ti++) {
        const int n = th[ti];
        dsmoe_model_options o;
        dsmoe_model_options_default(&o);
        o.n_threads = n;
        o.max_tokens = prompt > 256 ? prompt : 256;
        dsmoe_model *m = NULL;
        double t_open = bench_now();
        if (dsmoe_model_open(dir, &o, &m) != DSMOE_OK) die(dir);
        t_open = bench_now() - t_open;
        const dsmoe_model_config *c = dsmoe_model_get_config(m);
        const int32_t V = c->vocab_size;
        const model_cost k = cost_of(m);
        int64_t cap = prompt > dprompt + decode ? prompt : dprompt + decode;
        if (check_out && check_T > cap) cap = check_T;
        dsmoe_model_cache *cache = NULL;
        if (dsmoe_model_cache_create(m, cap, &cache) != DSMOE_OK) die("cache");
        float *logits = (float *)bench_malloc(PROG, sizeof(float) * (size_t)V * (size_t)(check_T > 1 ? check_T : 1));
        int32_t *tok = (int32_t *)bench_malloc(PROG, sizeof(int32_t) * (size_t)(cap + 1));
        double *times = (double *)bench_malloc(PROG, sizeof(double) * (size_t)(repeat + 1));
        if (ti == 0)
            printf("{\"impl\": \"dsmoe\", \"test\": \"model\", \"dtype\": \"%s\", \"layers\": %d, "
                   "\"hidden\": %d, \"experts\": %d, \"top_k\": %d, \"vocab\": %d, \"active_params\": %.0f, "
                   "\"decode_bytes_per_token\": %.0f, \"token_flops\": %.0f, \"head_flops\": %.0f, "
                   "\"pair_flops\": %.0f, \"cache_bytes_per_token\": %lld, \"mha_cache_bytes_per_token\": %lld, "
                   "\"open_seconds\": %.3f}\n",
                   k.dtype, c->num_hidden_layers, c->hidden_size, c->n_routed_experts, c->num_experts_per_tok, V,
                   k.active_params, k.decode_bytes, k.token_flops, k.head_flops, k.pair_flops,
                   (long long)dsmoe_model_cache_bytes_per_token(c), (long long)dsmoe_model_mha_cache_bytes_per_token(c), t_open);

        if (check_out && ti == 0) {
            bench_tokens(tok, check_T, V, 42);
            if (dsmoe_model_cache_truncate(cache, 0) != DSMOE_OK ||
                dsmoe_model_forward(m, cache, tok, check_T, logits, 0) != DSMOE_OK)
                die("check forward");
            write_npy_f32(check_out, logits, check_T, V);
        }
        if (prompt > 0) {
            /* the FMA peak on n threads again, right before the timings: on a shared
               machine the header's figure may be minutes old */
            const double peak = bench_fma_peak_gflops(mach.cpu.avx512f, n, 5);
            bench_tokens(tok, prompt, V, 7);
            for (int r = 0; r <= repeat; r++) {
                if (dsmoe_model_cache_truncate(cache, 0) != DSMOE_OK) die("truncate");
                double t = bench_now();
                if (dsmoe_model_forward(m, cache, tok, prompt, logits, DSMOE_MODEL_LOGITS_LAST) != DSMOE_OK)
                    die("prompt forward");
                t = bench_now() - t;
                if (r) times[r - 1] = t;
            }
            const double sec = min_of(times, repeat);
            const double pairs = (double)prompt * (prompt + 1) / 2.0;
            const double flops = k.token_flops * prompt + k.head_flops + k.pair_flops * pairs;
            printf("{\"impl\": \"dsmoe\", \"test\": \"prompt\", \"dtype\": \"%s\", \"threads\": %d, \"T\": %d, "
                   "\"seconds\": %.6f, \"tokens_per_s\": %.3f, \"gflops\": %.4f, \"gflops_per_s\": %.3f, "
                   "\"peak_gflops\": %.3f, \"peak_fraction\": %.4f, \"reps\": %d}\n",
                   k.dtype, n, prompt, sec, prompt / sec, flops * 1e-9, flops / sec * 1e-9, peak,
                   flops / sec * 1e-9 / peak, repeat);
            fflush(stdout);
        }
        if (decode > 0) {
            const double bw = bench_read_bandwidth((size_t)1 << 30, n, 3); /* likewise */
            bench_tokens(tok, dprompt + decode, V, 11);
            for (int r = 0; r < repeat; r++) {
                if (dsmoe_model_cache_truncate(cache, 0) != DSMOE_OK ||
                    dsmoe_model_forward(m, cache, tok, dprompt, logits, DSMOE_MODEL_LOGITS_LAST) != DSMOE_OK)
                    die("decode prompt");
                double t = bench_now();
                for (int i = dprompt; i < dprompt + decode; i++)
                    if (dsmoe_model_forward(m, cache, tok + i, 1, logits, DSMOE_MODEL_LOGITS_LAST) != DSMOE_OK)
                        die("decode forward");
                times[r] = bench_now() - t;
            }
            const double sec = min_of(times, repeat), tps = decode / sec;
            printf("{\"impl\": \"dsmoe\", \"test\": \"decode\", \"dtype\": \"%s\", \"threads\": %d, "
                   "\"prompt\": %d, \"T\": %d, \"seconds\": %.6f, \"tokens_per_s\": %.3f, "
                   "\"weights_gb_per_s\": %.3f, \"read_gb_per_s\": %.3f, \"bandwidth_fraction\": %.4f, "
                   "\"reps\": %d}\n",
                   k.dtype, n, dprompt, decode, sec, tps, k.decode_bytes * tps * 1e-9, bw * 1e-9,
                   k.decode_bytes * tps / bw, repeat);
            fflush(stdout);
        }
        dsmoe_free(times);
        dsmoe_free(tok);
        dsmoe_free(logits);
        dsmoe_model_cache_free(cache);
        dsmoe_model_free(m);
    }
    return 0;
}
