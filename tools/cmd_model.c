/* cmd_model.c — whole models (Hugging Face model directories):
 *   `dsmoe info`      the config, parameter counts, cache bytes per token, and the files;
 *   `dsmoe eval`      logits of token ids (.npy), or loss and perplexity of a text file
 *                     (models with dsmoe's byte vocabulary);
 *   `dsmoe generate`  a prompt prefilled in one forward, then decoding token by token
 *                     with dsmoe_sample, streamed as text (byte vocabularies) or ids.
 *                     (--mtp: speculative decoding with the MTP layers, dsmoe_model_spec,
 *                     against plain decoding in the same run).
 * Public API only: dsmoe_model_open, the cache, dsmoe_model_forward, dsmoe_sample. */
#include "cli.h"
#include "cli_mpi.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ================================================================ helpers == */

/* n with thousands separators ("671,026,419,200"). */
static const char *grouped(int64_t n, char *buf, size_t cap) {
    char digits[32];
    int neg = n < 0;
    snprintf(digits, sizeof digits, "%llu", (unsigned long long)(neg ? -n : n));
    size_t nd = strlen(digits), o = 0;
    if (neg && o + 1 < cap) buf[o++] = '-';
    for (size_t i = 0; i < nd && o + 2 < cap; i++) {
        if (i > 0 && (nd - i) % 3 == 0) buf[o++] = ',';
        buf[o++] = digits[i];
    }
    buf[o] = '\0';
    return buf;
}

/* n in K / M / B (three significant digits or more). */
static const char *human(int64_t n, char *buf, size_t cap) {
    double x = (double)n;
    if (x >= 1e9) snprintf(buf, cap, "%.2f B", x / 1e9);
    else if (x >= 1e6) snprintf(buf, cap, "%.2f M", x / 1e6);
    else if (x >= 1e3) snprintf(buf, cap, "%.2f K", x / 1e3);
    else snprintf(buf, cap, "%lld", (long long)n);
    return buf;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int is_help(int argc, char **argv) {
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) return 1;
    return 0;
}

/* Opens the model with n_threads; prints the error and returns NULL on failure. */
static dsmoe_model *open_model(const char *cmd, const char *dir, long long threads) {
    dsmoe_model_options o;
    dsmoe_model_options_default(&o);
    o.n_threads = (int32_t)threads;
    dsmoe_model *m = NULL;
    if (dsmoe_model_open(dir, &o, &m) != DSMOE_OK) {
        cli_fail_file(CLI_RUNTIME, cmd, dir);
        return NULL;
    }
    return m;
}

static const char *byte_vocab_hint =
    "needs a model with dsmoe's byte vocabulary (config.json \"dsmoe_vocab\": \"bytes\")";

/* ================================================================== info == */

static const char *const info_usage =
    "usage: dsmoe info --model DIR [--tensors]\n"
    "\n"
    "Describes a Hugging Face model directory (config.json and model.safetensors, or shards\n"
    "listed by model.safetensors.index.json), checked as dsmoe loads it: the configuration,\n"
    "parameter counts (total, active per token, by part), the cache bytes per token of\n"
    "MLA's compressed latent against a plain multi-head cache, the multi-token-prediction\n"
    "depths stored, and the files (per shard: tensors, dtypes, bytes). Nothing is computed\n"
    "and no weight is read.\n"
    "\n"
    "  --model DIR   the model directory\n"
    "  --tensors     also list every tensor: name, stored dtype, shape, shard\n"
    "  --help        this text\n";

static int64_t dtype_bytes(const char *dt) {
    if (strcmp(dt, "F32") == 0) return 4;
    if (strcmp(dt, "BF16") == 0 || strcmp(dt, "F16") == 0) return 2;
    return 1; /* F8_E4M3 */
}

#define INFO_DTYPES 4
static const char *const info_dtype_names[INFO_DTYPES] = {"F32", "BF16", "F16", "F8_E4M3"};

int cmd_info(int argc, char **argv) {
    const char *cmd = "info", *dir = NULL;
    int list = 0;
    if (is_help(argc, argv)) {
        fputs(info_usage, stdout);
        return CLI_OK;
    }
    for (int i = 1; i < argc; i++) {
        const char *v = NULL;
        int missing = 0;
        if (cli_opt(argc, argv, &i, "--model", &v, &missing)) dir = v;
        else if (strcmp(argv[i], "--tensors") == 0) list = 1;
        else return cli_fail(CLI_USAGE, cmd, "unknown option '%s' (see dsmoe info --help)", argv[i]);
        if (missing) return cli_fail(CLI_USAGE, cmd, "%s needs a value", argv[i]);
    }
    if (!dir) return cli_fail(CLI_USAGE, cmd, "--model DIR is required");

    dsmoe_model_config c;
    if (dsmoe_model_config_from_dir(dir, &c) != DSMOE_OK) return cli_fail_file(CLI_RUNTIME, cmd, dir);
    dsmoe_model_files *mf = NULL;
    if (dsmoe_model_files_open(dir, &c, &mf) != DSMOE_OK) return cli_fail_file(CLI_RUNTIME, cmd, dir);
    dsmoe_model_counts k;
    if (dsmoe_model_count_params(&c, &k) != DSMOE_OK) {
        dsmoe_model_files_close(mf);
        return cli_fail_file(CLI_RUNTIME, cmd, dir);
    }
    char a[48], b[48];
    const int32_t L = c.num_hidden_layers;
    int32_t n_moe = 0;
    for (int32_t l = 0; l < L; l++) n_moe += dsmoe_model_layer_is_moe(&c, l);

    printf("model            %s\n", dir);
    printf("layers           %d (%d dense, %d MoE), hidden %d, %d heads, %lld positions\n", (int)L,
           (int)(L - n_moe), (int)n_moe, (int)c.hidden_size, (int)c.num_attention_heads,
           (long long)c.max_position_embeddings);
    printf("vocabulary       %d", (int)c.vocab_size);
    if (c.byte_vocab) printf(" (dsmoe bytes: ids 0-255 the bytes)");
    if (c.bos_token_id >= 0) printf(", bos %d", (int)c.bos_token_id);
    if (c.eos_token_id >= 0) printf(", eos %d", (int)c.eos_token_id);
    printf("%s\n", c.tie_word_embeddings ? ", head tied to the embedding" : "");
    printf("attention        MLA: ");
    if (c.q_lora_rank > 0) printf("q_lora_rank %d, ", (int)c.q_lora_rank);
    else printf("plain q_proj, ");
    printf("kv_lora_rank %d, qk_nope_head_dim %d, qk_rope_head_dim %d, v_head_dim %d\n",
           (int)c.kv_lora_rank, (int)c.qk_nope_head_dim, (int)c.qk_rope_head_dim,
           (int)c.v_head_dim);
    printf("rope             theta %g", c.rope_theta);
    if (c.rope_type == DSMOE_ROPE_TYPE_YARN)
        printf(", YaRN factor %g from %lld positions (beta_fast %g, beta_slow %g, mscale %g)",
               c.rope_factor, (long long)c.rope_original_max_position_embeddings, c.rope_beta_fast,
               c.rope_beta_slow, c.rope_mscale_all_dim);
    printf("\n");
    if (L - n_moe > 0) printf("dense FFN        SwiGLU of %d\n", (int)c.intermediate_size);
    if (n_moe > 0) {
        static const char *const methods[3] = {"noaux_tc", "group_limited_greedy", "greedy"};
        printf("MoE              %d routed experts of %d, top-%d", (int)c.n_routed_experts,
               (int)c.moe_intermediate_size, (int)c.num_experts_per_tok);
        if (c.topk_method != DSMOE_TOPK_METHOD_GREEDY)
            printf(" in %d groups (%d kept)", (int)c.n_group, (int)c.topk_group);
        printf(", %s, %s, %s, scale %g; %d shared\n",
               c.scoring_func == DSMOE_SCORE_FUNC_SIGMOID ? "sigmoid" : "softmax",
               methods[c.topk_method], c.norm_topk_prob ? "normalised" : "not normalised",
               (double)c.routed_scaling_factor, (int)c.n_shared_experts);
    }
    if (c.fp8_block_rows > 0)
        printf("quantization     fp8 e4m3, %dx%d block scales\n", (int)c.fp8_block_rows,
               (int)c.fp8_block_cols);

    printf("parameters       %s total (%s)\n", grouped(k.total, a, sizeof a), human(k.total, b, sizeof b));
    printf("  active/token   %s (%s, %.1f%% of the total)\n", grouped(k.active, a, sizeof a),
           human(k.active, b, sizeof b), 100.0 * (double)k.active / (double)k.total);
    const struct {
        const char *name;
        int64_t v;
    } parts[] = {{"embedding", k.embedding},        {"head", k.head},
                 {"attention", k.attention},        {"dense FFN", k.dense_ffn},
                 {"routed experts", k.routed_experts}, {"shared experts", k.shared_experts},
                 {"router", k.router},              {"final norm", k.final_norm}};
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++)
        printf("  %-14s %s\n", parts[i].name, grouped(parts[i].v, a, sizeof a));
    printf("  %-14s %s (not in the total)\n", "MTP", grouped(k.mtp, a, sizeof a));
    const int64_t cb = dsmoe_model_cache_bytes_per_token(&c), mb = dsmoe_model_mha_cache_bytes_per_token(&c);
    printf("cache/token      %s bytes (per layer: latent %d + rope key %d fp32 values); a plain "
           "multi-head cache: %s bytes, %.1fx more\n",
           grouped(cb, a, sizeof a), (int)c.kv_lora_rank, (int)c.qk_rope_head_dim,
           grouped(mb, b, sizeof b), (double)mb / (double)cb);
    const int32_t depths = dsmoe_model_files_mtp_depths(mf);
    printf("MTP depths       %d stored of %d configured (used by generate --mtp only)\n",
           (int)depths, (int)c.num_nextn_predict_layers);

    /* The files: per shard, tensors by dtype and bytes (F8 block scales included). */
    const int32_t S = dsmoe_model_files_shard_count(mf);
    const int64_t n = dsmoe_model_tensor_count(&c, depths);
    int64_t *per = (int64_t *)calloc((size_t)S * (INFO_DTYPES + 2), sizeof(int64_t));
    int rc = CLI_OK;
    if (!per) {
        dsmoe_model_files_close(mf);
        return cli_fail(CLI_RUNTIME, cmd, "out of memory");
    }
    printf("files            %d shard%s%s\n", (int)S, S == 1 ? "" : "s",
           S == 1 ? " (model.safetensors)" : " (in the order of model.safetensors.index.json)");
    if (list) printf("tensors\n");
    for (int64_t i = 0; i < n; i++) {
        dsmoe_model_tensor_spec sp;
        dsmoe_model_tensor_info ti;
        if (dsmoe_model_tensor_at(&c, depths, i, &sp) != DSMOE_OK ||
            dsmoe_model_files_get(mf, sp.name, &ti) != DSMOE_OK) {
            rc = cli_fail_file(CLI_RUNTIME, cmd, dir);
            break;
        }
        int64_t numel = ti.shape[0] * (ti.ndim == 2 ? ti.shape[1] : 1);
        int64_t bytes = numel * dtype_bytes(ti.stored_dtype);
        if (ti.has_scale && c.fp8_block_rows > 0)
            bytes += (ti.shape[0] + c.fp8_block_rows - 1) / c.fp8_block_rows *
                     ((ti.shape[1] + c.fp8_block_cols - 1) / c.fp8_block_cols) * 4;
        int64_t *row = per + (size_t)ti.shard * (INFO_DTYPES + 2);
        for (int d = 0; d < INFO_DTYPES; d++)
            if (strcmp(ti.stored_dtype, info_dtype_names[d]) == 0) row[d]++;
        row[INFO_DTYPES]++;
        row[INFO_DTYPES + 1] += bytes;
        if (list) {
            char shape[64];
            if (ti.ndim == 2)
                snprintf(shape, sizeof shape, "(%lld, %lld)", (long long)ti.shape[0],
                         (long long)ti.shape[1]);
            else
                snprintf(shape, sizeof shape, "(%lld)", (long long)ti.shape[0]);
            printf("  %-60s %-8s %-14s shard %d%s\n", ti.name, ti.stored_dtype, shape,
                   (int)ti.shard, ti.has_scale ? " (+ _scale_inv)" : "");
        }
    }
    for (int32_t s = 0; rc == CLI_OK && s < S; s++) {
        const int64_t *row = per + (size_t)s * (INFO_DTYPES + 2);
        printf("  shard %-8d %lld tensors (", (int)s, (long long)row[INFO_DTYPES]);
        int first = 1;
        for (int d = 0; d < INFO_DTYPES; d++)
            if (row[d]) {
                printf("%s%s %lld", first ? "" : ", ", info_dtype_names[d], (long long)row[d]);
                first = 0;
            }
        printf("), %s bytes\n", grouped(row[INFO_DTYPES + 1], a, sizeof a));
    }
    free(per);
    dsmoe_model_files_close(mf);
    return rc;
}

/* ================================================================== eval == */

static const char *const eval_usage =
    "usage: dsmoe eval --model DIR (--tokens T.npy --out-logits L.npy | --text FILE) [options]\n"
    "\n"
    "Runs a model directory forward. Each sequence starts at position 0 and attends\n"
    "causally; multi-token-prediction depths are not used. Under `mpirun -np R`, --text\n"
    "deals its windows to the ranks and rank 0 prints the one-process result; --tokens\n"
    "deals the sequences (b to rank b % R) and rank 0 writes the logits.\n"
    "\n"
    "  --model DIR         the model directory (config.json + safetensors)\n"
    "  --tokens T.npy      token ids, int32, (T,) or (B, T): B sequences of T tokens, each\n"
    "                      its own sequence; T <= max_position_embeddings\n"
    "  --out-logits L.npy  logits of every position, float32, (T, V) or (B, T, V)\n"
    "  --text FILE         loss of a text file (models with dsmoe's byte vocabulary: ids\n"
    "                      0-255 are the bytes): BOS (when the config has one), then the\n"
    "                      file's bytes; every byte is predicted from the ones before it in\n"
    "                      its window. Prints the mean next-byte cross-entropy in nats, in\n"
    "                      bits per byte, and the perplexity\n"
    "  --context N         window of --text: at most N positions, each window from position\n"
    "                      0 again (default min(max_position_embeddings, 1024))\n"
    "  --threads N         threads (default: all; results identical for any N)\n"
    "  --help              this text\n";

/* Loss of the text file at path under the byte vocabulary, in windows of C positions. */
/* Under mpirun, 1 once eval_text's ranks agreed on its outcome (cmd_eval then does not
 * agree again). */
static int eval_agreed;

/* Under mpirun the windows are dealt to the ranks (window w to rank w % R); each
 * window's loss sum goes back to every rank and rank 0 adds them in window order, so it
 * prints the bits one process prints. */
static int eval_text(const char *cmd, dsmoe_model *m, const char *path, int64_t C) {
    const dsmoe_model_config *c = dsmoe_model_get_config(m);
    FILE *f = fopen(path, "rb");
    if (!f) return cli_fail(CLI_RUNTIME, cmd, "%s: %s", path, strerror(errno));
    size_t cap = 1 << 16, n = 0;
    unsigned char *text = (unsigned char *)malloc(cap);
    for (size_t got; text && (got = fread(text + n, 1, cap - n, f)) > 0;) {
        n += got;
        if (n == cap) {
            unsigned char *g = (unsigned char *)realloc(text, cap * 2);
            if (!g) free(text);
            text = g;
            cap *= 2;
        }
    }
    int err = ferror(f);
    fclose(f);
    if (!text) return cli_fail(CLI_RUNTIME, cmd, "%s: out of memory", path);
    if (err) {
        free(text);
        return cli_fail(CLI_RUNTIME, cmd, "%s: read error", path);
    }
    if (n == 0) {
        free(text);
        return cli_fail(CLI_RUNTIME, cmd, "%s: the file is empty (no byte to predict)", path);
    }
    /* tokens: BOS (if any) and the bytes; targets are every byte */
    const int have_bos = c->bos_token_id >= 0;
    const int64_t N = (int64_t)n + have_bos, V = c->vocab_size;
    int32_t *tok = (int32_t *)malloc((size_t)N * sizeof *tok);
    float *lg = (float *)malloc((size_t)C * (size_t)V * sizeof *lg);
    const int64_t nwin = (N - 1 + C - 1) / C;
    double *wsum = (double *)calloc((size_t)(nwin > 0 ? nwin : 1), sizeof *wsum);
    dsmoe_model_cache *cache = NULL;
    int rc = CLI_RUNTIME;
    if (!tok || !lg || !wsum) {
        cli_fail(CLI_RUNTIME, cmd, "out of memory for %lld tokens", (long long)N);
        goto done;
    }
    if (have_bos) tok[0] = c->bos_token_id;
    for (size_t i = 0; i < n; i++) tok[have_bos + (int64_t)i] = text[i];
    dsmoe_status cs = dsmoe_model_cache_create(m, C, &cache);
    if (cs != DSMOE_OK) {
        cli_fail_status(cmd, "cache", cs);
        goto done;
    }
    /* Without BOS the first byte has nothing to be predicted from: targets start at 1. */
    double total = 0.0;
    int64_t scored = 0, windows = 0;
    const double t0 = now_s();
    const int R = cli_mpi_size(), me = cli_mpi_rank();
    int frc = CLI_OK;
    for (int64_t s = 0; s + 1 < N; s += C) {
        const int64_t len = (N - 1 - s) < C ? (N - 1 - s) : C;
        scored += len;
        windows++;
        if ((windows - 1) % R != me) continue;
        dsmoe_model_cache_truncate(cache, 0);
        dsmoe_status st = dsmoe_model_forward(m, cache, tok + s, len, lg, 0);
        if (st != DSMOE_OK) {
            frc = cli_fail_status(cmd, "forward", st);
            break;
        }
        double ws = 0.0;
        for (int64_t t = 0; t < len; t++) {
            const float *row = lg + t * V;
            double mx = row[0], sum = 0.0;
            for (int64_t v = 1; v < V; v++) mx = row[v] > mx ? row[v] : mx;
            for (int64_t v = 0; v < V; v++) sum += exp((double)row[v] - mx);
            // cppcheck-suppress invalidFunctionArg ; sum >= 1: the max's own term is exp(0)
            ws += mx + log(sum) - (double)row[tok[s + t + 1]];
        }
        wsum[windows - 1] = ws;
    }
    if (cli_mpi_active()) {
        eval_agreed = 1;
        if ((frc = cli_mpi_agree(frc, cmd)) != CLI_OK) {
            rc = frc;
            goto done;
        }
        /* each window's sum is nonzero on one rank only: the sum is exact */
        if (cli_mpi_sum_f64(wsum, nwin)) {
            cli_fail(CLI_RUNTIME, cmd, "the ranks' window sums failed (communication)");
            goto done;
        }
    } else if (frc != CLI_OK) {
        goto done;
    }
    for (int64_t w = 0; w < nwin; w++) total += wsum[w];
    const double secs = now_s() - t0;
    if (scored == 0) {
        cli_fail(CLI_RUNTIME, cmd, "%s: one byte and no BOS in the config: nothing to predict", path);
        goto done;
    }
    const double loss = total / (double)scored;
    rc = CLI_OK;
    if (me != 0) goto done; /* rank 0 prints */
    printf("text         %s: %zu bytes, %lld predicted, %lld window%s of at most %lld positions\n",
           path, n, (long long)scored, (long long)windows, windows == 1 ? "" : "s", (long long)C);
    printf("loss         %.6f nats per byte\n", loss);
    printf("bits/byte    %.6f\n", loss / log(2.0));
    printf("perplexity   %.6f\n", exp(loss));
    fprintf(stderr, "dsmoe eval: %lld tokens in %.3f s (%.1f tokens/s)\n", (long long)scored, secs,
            secs > 0 ? (double)scored / secs : 0.0);
done:
    dsmoe_model_cache_free(cache);
    free(tok);
    free(lg);
    free(wsum);
    free(text);
    return rc;
}

static int eval_main(int argc, char **argv) {
    const char *cmd = "eval", *dir = NULL, *tok_path = NULL, *out_path = NULL, *text_path = NULL;
    long long threads = 0, context = 0;
    if (is_help(argc, argv)) {
        fputs(eval_usage, stdout);
        return CLI_OK;
    }
    for (int i = 1; i < argc; i++) {
        const char *v = NULL;
        int missing = 0;
        if (cli_opt(argc, argv, &i, "--model", &v, &missing)) dir = v;
        else if (cli_opt(argc, argv, &i, "--tokens", &v, &missing)) tok_path = v;
        else if (cli_opt(argc, argv, &i, "--out-logits", &v, &missing)) out_path = v;
        else if (cli_opt(argc, argv, &i, "--text", &v, &missing)) text_path = v;
        else if (cli_opt(argc, argv, &i, "--context", &v, &missing)) {
            if (!missing && !cli_parse_int(v, 1, INT32_MAX, &context))
                return cli_fail(CLI_USAGE, cmd, "--context expects a number of positions >= 1, got '%s'", v);
        } else if (cli_opt(argc, argv, &i, "--threads", &v, &missing)) {
            if (!missing && !cli_parse_int(v, 1, 1024, &threads))
                return cli_fail(CLI_USAGE, cmd, "--threads expects 1..1024, got '%s'", v);
        } else {
            return cli_fail(CLI_USAGE, cmd, "unknown option '%s' (see dsmoe eval --help)", argv[i]);
        }
        if (missing) return cli_fail(CLI_USAGE, cmd, "%s needs a value", argv[i]);
    }
    if (!dir) return cli_fail(CLI_USAGE, cmd, "--model DIR is required");
    if (!tok_path && !text_path)
        return cli_fail(CLI_USAGE, cmd, "nothing to evaluate: give --tokens T.npy --out-logits L.npy, "
                                        "or --text FILE");
    if (tok_path && !out_path)
        return cli_fail(CLI_USAGE, cmd, "--tokens needs --out-logits L.npy (where the logits go)");
    if (out_path && !tok_path) return cli_fail(CLI_USAGE, cmd, "--out-logits needs --tokens T.npy");
    if (context && !text_path) return cli_fail(CLI_USAGE, cmd, "--context applies to --text only");

    /* The token file is checked before the model is loaded (a cheap error first). */
    dsmoe_array ids = {0};
    if (tok_path) {
        if (dsmoe_npy_read(tok_path, &ids) != DSMOE_OK) return cli_fail_file(CLI_RUNTIME, cmd, tok_path);
        int bad = ids.dtype != DSMOE_DTYPE_I32 || (ids.ndim != 1 && ids.ndim != 2);
        if (bad || dsmoe_array_numel(&ids) == 0) {
            int r = cli_fail(CLI_RUNTIME, cmd, "%s: %s %s of rank %d, expected int32 token ids of "
                             "shape (T,) or (B, T) with T >= 1", tok_path,
                             bad ? "dtype" : "an empty array,", dsmoe_dtype_name(ids.dtype),
                             (int)ids.ndim);
            dsmoe_array_free(&ids);
            return r;
        }
    }
    dsmoe_model *m = open_model(cmd, dir, threads);
    if (!m) {
        dsmoe_array_free(&ids);
        return CLI_RUNTIME;
    }
    const dsmoe_model_config *c = dsmoe_model_get_config(m);
    int rc = CLI_OK;
    if (text_path && !c->byte_vocab) {
        rc = cli_fail(CLI_USAGE, cmd, "--text %s; %s has a vocabulary of %d token ids without it "
                      "(give --tokens T.npy instead)", byte_vocab_hint, dir, (int)c->vocab_size);
        goto done;
    }
    if (text_path) {
        const int64_t maxpos = c->max_position_embeddings;
        int64_t C = context ? context : (maxpos < 1024 ? maxpos : 1024);
        if (C > maxpos) {
            rc = cli_fail(CLI_USAGE, cmd, "--context %lld exceeds the model's max_position_embeddings "
                          "(%lld)", context, (long long)maxpos);
            goto done;
        }
        rc = eval_text(cmd, m, text_path, C);
        if (rc != CLI_OK) goto done;
    }
    if (tok_path) { /* under mpirun: sequence b on rank b % R, rank 0 gathers and writes */
        const int64_t B = ids.ndim == 2 ? ids.shape[0] : 1, T = ids.shape[ids.ndim - 1];
        const int64_t V = c->vocab_size;
        const int32_t *tk = (const int32_t *)ids.data;
        for (int64_t i = 0; i < B * T; i++)
            if (tk[i] < 0 || tk[i] >= V) {
                if (ids.ndim == 2)
                    rc = cli_fail(CLI_RUNTIME, cmd, "%s: token [%lld, %lld] = %d is outside the "
                                  "vocabulary 0..%lld", tok_path, (long long)(i / T),
                                  (long long)(i % T), (int)tk[i], (long long)V - 1);
                else
                    rc = cli_fail(CLI_RUNTIME, cmd, "%s: token [%lld] = %d is outside the "
                                  "vocabulary 0..%lld", tok_path, (long long)i, (int)tk[i],
                                  (long long)V - 1);
                goto done;
            }
        if (T > c->max_position_embeddings) {
            rc = cli_fail(CLI_RUNTIME, cmd, "%s: %lld tokens per sequence exceed the model's "
                          "max_position_embeddings (%lld)", tok_path, (long long)T,
                          (long long)c->max_position_embeddings);
            goto done;
        }
        float *lg = (float *)malloc((size_t)(B * T) * (size_t)V * sizeof(float));
        dsmoe_model_cache *cache = NULL;
        if (!lg || dsmoe_model_cache_create(m, T, &cache) != DSMOE_OK) {
            free(lg);
            rc = cli_fail(CLI_RUNTIME, cmd, "out of memory for %lld x %lld logits", (long long)B * (long long)T,
                          (long long)V);
            goto done;
        }
        const double t0 = now_s();
        const int R = cli_mpi_size(), me = cli_mpi_rank();
        for (int64_t b = 0; b < B && rc == CLI_OK; b++) {
            if (b % R != me) continue;
            dsmoe_model_cache_truncate(cache, 0);
            dsmoe_status st = dsmoe_model_forward(m, cache, tk + b * T, T, lg + b * T * V, 0);
            if (st != DSMOE_OK) rc = cli_fail_status(cmd, "forward", st);
        }
        if (cli_mpi_active()) {
            eval_agreed = 1;
            rc = cli_mpi_agree(rc, cmd);
            if (rc == CLI_OK && cli_mpi_gather_rows_f32(lg, B, T * V))
                rc = cli_fail(CLI_RUNTIME, cmd, "gathering the ranks' logits failed (communication)");
        }
        const double secs = now_s() - t0;
        if (rc == CLI_OK && me == 0) {
            int64_t shape[3] = {B, T, V};
            if (ids.ndim == 1) {
                shape[0] = T;
                shape[1] = V;
            }
            rc = cli_save_npy(cmd, out_path, DSMOE_DTYPE_F32, ids.ndim + 1, shape, lg);
        }
        if (rc == CLI_OK && me == 0)
            fprintf(stderr, "dsmoe eval: %lld x %lld tokens in %.3f s (%.1f tokens/s) -> %s\n",
                    (long long)B, (long long)T, secs, secs > 0 ? (double)(B * T) / secs : 0.0,
                    out_path);
        dsmoe_model_cache_free(cache);
        free(lg);
    }
done:
    dsmoe_model_free(m);
    dsmoe_array_free(&ids);
    return rc;
}

/* Under mpirun: every rank runs eval_main; a rank that failed before eval_text's
 * agreement still meets the others there (no rank left waiting), and every rank exits
 * with the same code. */
int cmd_eval(int argc, char **argv) {
    eval_agreed = 0;
    int rc = eval_main(argc, argv);
    if (cli_mpi_active() && !eval_agreed) rc = cli_mpi_agree(rc, "eval");
    return rc;
}

/* ============================================================== generate == */

static const char *const generate_usage =
    "usage: dsmoe generate --model DIR (--prompt TEXT | --prompt-tokens T.npy) [options]\n"
    "\n"
    "Prefills the prompt in one forward, then decodes one token at a time from the\n"
    "compressed-latent cache, each drawn by temperature and nucleus (top-p) sampling.\n"
    "Models with dsmoe's byte vocabulary stream the generated bytes to stdout as text\n"
    "(ending at EOS); other models print the generated ids, one line. At the end stderr\n"
    "shows prompt and decode tokens/s, the token counts and the cache size against a plain\n"
    "multi-head cache.\n"
    "\n"
    "  --model DIR          the model directory\n"
    "  --prompt TEXT        the prompt as text (byte vocabularies: BOS, when the config\n"
    "                       has one, then the bytes of TEXT)\n"
    "  --prompt-tokens T.npy  the prompt as int32 ids (T,), used as given\n"
    "  --max-tokens N       tokens to generate at most (default 128); generation also ends\n"
    "                       at EOS or when max_position_embeddings positions are used\n"
    "  --temperature X      >= 0; 0 is greedy (the largest logit, lowest id among ties)\n"
    "                       (default 0.8)\n"
    "  --top-p P            keep the smallest set of most likely tokens whose probability\n"
    "                       reaches P, in (0, 1] (default 0.95; 1 keeps every token)\n"
    "  --seed S             seed of the sampling (default 0): the same seed, the same text\n"
    "  --mtp                speculative decoding with the model's MTP layers: each step\n"
    "                       drafts the next tokens with the MTP depths and verifies them\n"
    "                       with the main model in one forward; a draft is kept while it\n"
    "                       equals the main model's own (sampled or greedy) token, so the\n"
    "                       text is exactly plain decoding's with the same seed. The same\n"
    "                       generation also runs plain; both are timed (the text is printed\n"
    "                       after them) and stderr shows the acceptance rate per depth and\n"
    "                       overall, tokens per verify pass, both tokens/s, the speed-up,\n"
    "                       and whether the outputs agree\n"
    "  --runs N             with --mtp: time plain and speculative decoding N times each,\n"
    "                       alternately, and keep the fastest of each (default 3, 1..100)\n"
    "  --draft N            drafts per step with --mtp, 1..7 (default: the MTP depths\n"
    "                       stored; depths past them reuse the last one)\n"
    "  --threads N          threads (default: all; results identical for any N)\n"
    "  --help               this text\n";

/* One generation's tokens and timings. */
typedef struct gen_run {
    int32_t *out;      /* the tokens produced (room for max_tokens + draft) */
    int64_t produced;  /* tokens produced */
    int64_t steps;     /* forwards after the prompt's (plain) or verify passes (--mtp) */
    double t_prefill, t_decode;
    int stop_eos, stop_full, last_nl;
} gen_run;

/* Prints one produced token as generate streams it (bytes, or ids on one line). */
static void emit(const dsmoe_model_config *c, int32_t next, gen_run *r) {
    if (c->byte_vocab) {
        if (next < 256) {
            fputc(next, stdout);
            r->last_nl = next == '\n';
        }
    } else {
        printf("%s%d", r->produced > 1 ? " " : "", (int)next);
    }
    fflush(stdout);
}

/* Takes `next` as produced token; 1 when generation ends with it (EOS or max_tokens). */
static int take(const dsmoe_model_config *c, int32_t next, int64_t max_tokens, int print, gen_run *r) {
    r->out[r->produced++] = next;
    if (print) emit(c, next, r);
    if (next == c->eos_token_id) {
        r->stop_eos = 1;
        return 1;
    }
    return r->produced >= max_tokens;
}

/* Plain decoding: the prompt in one forward, then one forward per token. */
static int run_plain(const char *cmd, const char *dir, dsmoe_model *m, const int32_t *tok, int64_t P,
                     int64_t max_tokens, double temperature, double top_p, uint64_t seed, int print,
                     gen_run *r, dsmoe_model_cache **cache_out) {
    const dsmoe_model_config *c = dsmoe_model_get_config(m);
    const int32_t V = c->vocab_size;
    /* Positions: the prompt and every generated token but the last, which is never fed. */
    int64_t capacity = P + max_tokens - 1;
    if (capacity > c->max_position_embeddings) capacity = c->max_position_embeddings;
    float *logits = (float *)malloc((size_t)V * sizeof(float));
    float *scratch = (float *)malloc((size_t)V * 2 * sizeof(float));
    dsmoe_model_cache *cache = NULL;
    int rc = CLI_RUNTIME;
    if (!logits || !scratch) {
        cli_fail(CLI_RUNTIME, cmd, "out of memory");
        goto done;
    }
    if (dsmoe_model_cache_create(m, capacity, &cache) != DSMOE_OK) {
        cli_fail_file(CLI_RUNTIME, cmd, dir);
        goto done;
    }
    dsmoe_rng rng;
    dsmoe_rng_seed(&rng, seed);
    const double t0 = now_s();
    dsmoe_status st = dsmoe_model_forward(m, cache, tok, P, logits, DSMOE_MODEL_LOGITS_LAST);
    r->t_prefill = now_s() - t0;
    if (st != DSMOE_OK) {
        cli_fail_status(cmd, "prompt forward", st);
        goto done;
    }
    const double t1 = now_s();
    for (;;) {
        int32_t next = dsmoe_sample(logits, V, (float)temperature, (float)top_p, &rng, scratch);
        if (next < 0) {
            cli_fail(CLI_RUNTIME, cmd, "sampling token %lld: %s", (long long)r->produced,
                     dsmoe_last_error());
            goto done;
        }
        if (take(c, next, max_tokens, print, r)) break;
        if (dsmoe_model_cache_length(cache) >= capacity) {
            r->stop_full = 1;
            break;
        }
        st = dsmoe_model_forward(m, cache, &next, 1, logits, DSMOE_MODEL_LOGITS_LAST);
        if (st != DSMOE_OK) {
            cli_fail_status(cmd, "decode forward", st);
            goto done;
        }
        r->steps++;
    }
    r->t_decode = now_s() - t1;
    rc = CLI_OK;
done:
    if (rc == CLI_OK && cache_out) *cache_out = cache;
    else dsmoe_model_cache_free(cache);
    free(logits);
    free(scratch);
    return rc;
}

/* Speculative decoding with N drafts per verify pass; the statistics into *stats. */
static int run_spec(const char *cmd, dsmoe_model *m, int32_t N, const int32_t *tok, int64_t P,
                    int64_t max_tokens, double temperature, double top_p, uint64_t seed, int print,
                    gen_run *r, dsmoe_model_spec_stats *stats) {
    const dsmoe_model_config *c = dsmoe_model_get_config(m);
    const int64_t maxpos = c->max_position_embeddings;
    /* the verify pass of the last tokens may reach N positions past plain decoding's */
    int64_t capacity = P + max_tokens - 1 + N;
    if (capacity > maxpos) capacity = maxpos;
    dsmoe_model_spec *s = NULL;
    int32_t step_out[DSMOE_MODEL_SPEC_MAX_DRAFT + 1];
    if (dsmoe_model_spec_create(m, N, capacity, &s) != DSMOE_OK)
        return cli_fail(CLI_RUNTIME, cmd, "%s", dsmoe_last_error());
    dsmoe_rng rng;
    dsmoe_rng_seed(&rng, seed);
    int rc = CLI_RUNTIME;
    int32_t first = -1;
    const double t0 = now_s();
    dsmoe_status st = dsmoe_model_spec_prefill(s, tok, P, (float)temperature, (float)top_p, &rng, &first);
    r->t_prefill = now_s() - t0;
    if (st != DSMOE_OK) {
        cli_fail_status(cmd, "prompt forward", st);
        goto done;
    }
    const double t1 = now_s();
    int end = take(c, first, max_tokens, print, r);
    while (!end) {
        /* positions used: the prompt and every produced token but the last */
        if (P + r->produced - 1 >= maxpos) {
            r->stop_full = 1;
            break;
        }
        int32_t n = 0;
        st = dsmoe_model_spec_step(s, (float)temperature, (float)top_p, &rng, step_out, &n);
        if (st != DSMOE_OK) {
            cli_fail_status(cmd, "speculative step", st);
            goto done;
        }
        r->steps++;
        for (int32_t i = 0; i < n && !end; i++) end = take(c, step_out[i], max_tokens, print, r);
    }
    r->t_decode = now_s() - t1;
    *stats = *dsmoe_model_spec_get_stats(s);
    rc = CLI_OK;
done:
    dsmoe_model_spec_free(s);
    return rc;
}

static const char *stop_reason(const gen_run *r) {
    return r->stop_eos    ? "; stopped at EOS"
           : r->stop_full ? "; stopped: max_position_embeddings positions used"
                          : "";
}

/* The --mtp report on stderr; CLI_RUNTIME when the outputs differ (a bug). */
static int spec_report(const dsmoe_model *m, int32_t N, int64_t P, const gen_run *sp,
                       const gen_run *pl, const dsmoe_model_spec_stats *st, int runs) {
    fprintf(stderr, "dsmoe generate --mtp: prompt %lld tokens in %.3f s; %lld generated%s\n",
            (long long)P, sp->t_prefill, (long long)sp->produced, stop_reason(sp));
    int64_t dr = 0, ac = 0;
    fprintf(stderr, "dsmoe generate --mtp: %d drafts per verify pass (%d MTP depths stored); "
            "acceptance:", (int)N, (int)dsmoe_model_mtp_depths(m));
    for (int32_t k = 0; k < N; k++) {
        dr += st->drafted[k];
        ac += st->accepted[k];
        fprintf(stderr, " depth %d %.1f%% (%lld/%lld)%s", (int)k + 1,
                st->drafted[k] ? 100.0 * (double)st->accepted[k] / (double)st->drafted[k] : 0.0,
                (long long)st->accepted[k], (long long)st->drafted[k], k + 1 < N ? "," : "");
    }
    fprintf(stderr, "; overall %.1f%% (%lld/%lld)\n", dr ? 100.0 * (double)ac / (double)dr : 0.0,
            (long long)ac, (long long)dr);
    /* the decode phase: every token after the prompt's forward */
    const int64_t ns = sp->produced - 1, np = pl->produced - 1;
    const double rs = sp->t_decode > 0 ? (double)ns / sp->t_decode : 0.0,
                 rp = pl->t_decode > 0 ? (double)np / pl->t_decode : 0.0;
    fprintf(stderr, "dsmoe generate --mtp: %lld verify passes, %.2f tokens per pass; decoding "
            "%lld tokens in %.3f s (%.1f tokens/s)\n", (long long)sp->steps,
            sp->steps ? (double)st->produced / (double)sp->steps : 0.0, (long long)ns,
            sp->t_decode, rs);
    fprintf(stderr, "dsmoe generate --mtp: plain decoding, same prompt and seed: %lld tokens in "
            "%.3f s (%.1f tokens/s); speed-up %.2fx (fastest of %d runs each)\n", (long long)np,
            pl->t_decode, rp, rp > 0 ? rs / rp : 0.0, runs);
    int64_t diff = -1;
    for (int64_t i = 0; i < sp->produced && i < pl->produced && diff < 0; i++)
        if (sp->out[i] != pl->out[i]) diff = i;
    if (diff < 0 && sp->produced != pl->produced)
        diff = sp->produced < pl->produced ? sp->produced : pl->produced;
    if (diff < 0) {
        fprintf(stderr, "dsmoe generate --mtp: outputs identical (%lld tokens)\n",
                (long long)sp->produced);
        return CLI_OK;
    }
    return cli_fail(CLI_RUNTIME, "generate", "--mtp: the output differs from plain decoding at "
                    "token %lld (a bug: please report it)", (long long)diff);
}

int cmd_generate(int argc, char **argv) {
    const char *cmd = "generate", *dir = NULL, *prompt = NULL, *prompt_path = NULL;
    long long threads = 0, max_tokens = 128, seed = 0, draft = 0, runs = 3;
    double temperature = 0.8, top_p = 0.95;
    int mtp = 0;
    if (is_help(argc, argv)) {
        fputs(generate_usage, stdout);
        return CLI_OK;
    }
    for (int i = 1; i < argc; i++) {
        const char *v = NULL;
        int missing = 0;
        if (cli_opt(argc, argv, &i, "--model", &v, &missing)) dir = v;
        else if (cli_opt(argc, argv, &i, "--prompt", &v, &missing)) prompt = v;
        else if (cli_opt(argc, argv, &i, "--prompt-tokens", &v, &missing)) prompt_path = v;
        else if (cli_opt(argc, argv, &i, "--max-tokens", &v, &missing)) {
            if (!missing && !cli_parse_int(v, 1, INT32_MAX, &max_tokens))
                return cli_fail(CLI_USAGE, cmd, "--max-tokens expects a number >= 1, got '%s'", v);
        } else if (cli_opt(argc, argv, &i, "--temperature", &v, &missing)) {
            if (!missing && (!cli_parse_float(v, &temperature) || temperature < 0))
                return cli_fail(CLI_USAGE, cmd, "--temperature expects a number >= 0, got '%s'", v);
        } else if (cli_opt(argc, argv, &i, "--top-p", &v, &missing)) {
            if (!missing && (!cli_parse_float(v, &top_p) || !(top_p > 0 && top_p <= 1)))
                return cli_fail(CLI_USAGE, cmd, "--top-p expects a probability in (0, 1], got '%s'", v);
        } else if (cli_opt(argc, argv, &i, "--seed", &v, &missing)) {
            if (!missing && !cli_parse_int(v, 0, INT64_MAX, &seed))
                return cli_fail(CLI_USAGE, cmd, "--seed expects an integer >= 0, got '%s'", v);
        } else if (cli_opt(argc, argv, &i, "--threads", &v, &missing)) {
            if (!missing && !cli_parse_int(v, 1, 1024, &threads))
                return cli_fail(CLI_USAGE, cmd, "--threads expects 1..1024, got '%s'", v);
        } else if (cli_opt(argc, argv, &i, "--runs", &v, &missing)) {
            if (!missing && !cli_parse_int(v, 1, 100, &runs))
                return cli_fail(CLI_USAGE, cmd, "--runs expects 1..100, got '%s'", v);
        } else if (strcmp(argv[i], "--mtp") == 0) {
            mtp = 1;
        } else if (cli_opt(argc, argv, &i, "--draft", &v, &missing)) {
            if (!missing && !cli_parse_int(v, 1, DSMOE_MODEL_SPEC_MAX_DRAFT, &draft))
                return cli_fail(CLI_USAGE, cmd, "--draft expects a number of drafts per step in "
                                "1..%d, got '%s'", DSMOE_MODEL_SPEC_MAX_DRAFT, v);
        } else {
            return cli_fail(CLI_USAGE, cmd, "unknown option '%s' (see dsmoe generate --help)", argv[i]);
        }
        if (missing) return cli_fail(CLI_USAGE, cmd, "%s needs a value", argv[i]);
    }
    if (!dir) return cli_fail(CLI_USAGE, cmd, "--model DIR is required");
    if (!prompt == !prompt_path)
        return cli_fail(CLI_USAGE, cmd, "give one prompt: --prompt TEXT or --prompt-tokens T.npy");
    if (draft && !mtp) return cli_fail(CLI_USAGE, cmd, "--draft needs --mtp");
    for (int i = 1; i < argc; i++)
        if (!mtp && strcmp(argv[i], "--runs") == 0) return cli_fail(CLI_USAGE, cmd, "--runs needs --mtp");

    dsmoe_array ids = {0};
    if (prompt_path) {
        int64_t want[1] = {-1};
        if (cli_load_npy(cmd, prompt_path, DSMOE_DTYPE_I32, 1, want, &ids)) return CLI_RUNTIME;
        if (ids.shape[0] < 1) {
            dsmoe_array_free(&ids);
            return cli_fail(CLI_RUNTIME, cmd, "%s: an empty prompt", prompt_path);
        }
    }
    dsmoe_model *m = NULL;
    {
        dsmoe_model_options o;
        dsmoe_model_options_default(&o);
        o.n_threads = (int32_t)threads;
        o.mtp = mtp;
        if (dsmoe_model_open(dir, &o, &m) != DSMOE_OK) {
            dsmoe_array_free(&ids);
            return cli_fail_file(CLI_RUNTIME, cmd, dir);
        }
    }
    const dsmoe_model_config *c = dsmoe_model_get_config(m);
    const int32_t V = c->vocab_size;
    const int64_t maxpos = c->max_position_embeddings;
    int32_t *tok = NULL;
    dsmoe_model_cache *cache = NULL;
    gen_run sp, pl;
    memset(&sp, 0, sizeof sp);
    memset(&pl, 0, sizeof pl);
    sp.last_nl = pl.last_nl = 1;
    int64_t P = 0;
    int rc = CLI_RUNTIME;
    if (mtp && dsmoe_model_mtp_depths(m) == 0) {
        rc = cli_fail(CLI_USAGE, cmd, "--mtp needs a model with MTP layers; %s has none "
                      "(num_nextn_predict_layers %d, %d stored)", dir,
                      (int)c->num_nextn_predict_layers,
                      (int)dsmoe_model_files_mtp_depths(dsmoe_model_get_files(m)));
        goto done;
    }
    if (mtp && !draft) draft = dsmoe_model_mtp_depths(m);
    if (draft > DSMOE_MODEL_SPEC_MAX_DRAFT) draft = DSMOE_MODEL_SPEC_MAX_DRAFT;
    if (prompt && !c->byte_vocab) {
        rc = cli_fail(CLI_USAGE, cmd, "--prompt %s; %s has a vocabulary of %d token ids without it "
                      "(give --prompt-tokens T.npy instead)", byte_vocab_hint, dir, (int)V);
        goto done;
    }
    P = prompt ? (int64_t)strlen(prompt) + (c->bos_token_id >= 0) : ids.shape[0];
    if (P < 1) {
        rc = cli_fail(CLI_USAGE, cmd, "--prompt is empty and the config has no bos_token_id to start from");
        goto done;
    }
    if (P > maxpos) {
        rc = cli_fail(CLI_RUNTIME, cmd, "the prompt has %lld tokens, more than the model's "
                      "max_position_embeddings (%lld)", (long long)P, (long long)maxpos);
        goto done;
    }
    /* tokens produced: at most max_tokens, and at most maxpos − P + 1 */
    const int64_t most = (max_tokens < maxpos - P + 1 ? max_tokens : maxpos - P + 1) + draft + 1;
    tok = (int32_t *)malloc((size_t)P * sizeof *tok);
    sp.out = (int32_t *)malloc((size_t)(2 * most) * sizeof(int32_t));
    pl.out = (int32_t *)malloc((size_t)(2 * most) * sizeof(int32_t));
    if (!tok || !sp.out || !pl.out) {
        cli_fail(CLI_RUNTIME, cmd, "out of memory");
        goto done;
    }
    if (prompt) {
        int64_t o = 0;
        if (c->bos_token_id >= 0) tok[o++] = c->bos_token_id;
        for (const unsigned char *p = (const unsigned char *)prompt; *p; p++) tok[o++] = *p;
    } else {
        memcpy(tok, ids.data, (size_t)P * sizeof *tok);
        for (int64_t i = 0; i < P; i++)
            if (tok[i] < 0 || tok[i] >= V) {
                cli_fail(CLI_RUNTIME, cmd, "%s: token [%lld] = %d is outside the vocabulary 0..%d",
                         prompt_path, (long long)i, (int)tok[i], (int)V - 1);
                goto done;
            }
    }
    if (mtp) {
        dsmoe_model_spec_stats st;
        memset(&st, 0, sizeof st);
        /* both timed without printing, alternately (plain first), `runs` times each; the
         * fastest of each counts, every run must produce the same tokens; then the text */
        for (long long r = 0; r < runs; r++) {
            gen_run p2 = pl, s2 = sp;
            if (r > 0) {
                p2.out = pl.out + most;
                s2.out = sp.out + most;
                p2.produced = s2.produced = p2.steps = s2.steps = 0;
            }
            if (run_plain(cmd, dir, m, tok, P, max_tokens, temperature, top_p, (uint64_t)seed, 0,
                          r ? &p2 : &pl, NULL) != CLI_OK ||
                run_spec(cmd, m, (int32_t)draft, tok, P, max_tokens, temperature, top_p,
                         (uint64_t)seed, 0, r ? &s2 : &sp, &st) != CLI_OK)
                goto done;
            if (r == 0) continue;
            if (s2.produced != sp.produced || p2.produced != pl.produced ||
                memcmp(s2.out, sp.out, (size_t)sp.produced * sizeof(int32_t)) != 0 ||
                memcmp(p2.out, pl.out, (size_t)pl.produced * sizeof(int32_t)) != 0) {
                rc = cli_fail(CLI_RUNTIME, cmd, "--mtp: run %lld produced other tokens than run "
                              "1 (a bug: please report it)", r + 1);
                goto done;
            }
            if (p2.t_decode < pl.t_decode) pl.t_decode = p2.t_decode;
            if (s2.t_decode < sp.t_decode) sp.t_decode = s2.t_decode;
        }
        const int64_t n = sp.produced;
        for (sp.produced = 1; sp.produced <= n; sp.produced++) emit(c, sp.out[sp.produced - 1], &sp);
        sp.produced = n;
        if (!c->byte_vocab || (!sp.last_nl && isatty(1))) printf("\n");
        fflush(stdout);
        rc = spec_report(m, (int32_t)draft, P, &sp, &pl, &st, (int)runs);
        goto done;
    }
    if (run_plain(cmd, dir, m, tok, P, max_tokens, temperature, top_p, (uint64_t)seed, 1, &pl,
                  &cache) != CLI_OK)
        goto done;
    if (!c->byte_vocab || (!pl.last_nl && isatty(1))) printf("\n");
    fflush(stdout);
    char a[48], b[48];
    const int64_t pos = dsmoe_model_cache_length(cache);
    const int64_t cb = dsmoe_model_cache_bytes_per_token(c), mb = dsmoe_model_mha_cache_bytes_per_token(c);
    fprintf(stderr,
            "dsmoe generate: prompt %lld tokens in %.3f s (%.1f tokens/s); %lld generated, %lld "
            "decode steps in %.3f s (%.1f tokens/s)%s\n",
            (long long)P, pl.t_prefill, pl.t_prefill > 0 ? (double)P / pl.t_prefill : 0.0,
            (long long)pl.produced, (long long)pl.steps, pl.t_decode,
            pl.t_decode > 0 ? (double)pl.steps / pl.t_decode : 0.0, stop_reason(&pl));
    fprintf(stderr,
            "dsmoe generate: cache %lld positions x %lld bytes = %s bytes (a plain multi-head "
            "cache: %s bytes, %.1fx more)\n",
            (long long)pos, (long long)cb, grouped(pos * cb, a, sizeof a), grouped(pos * mb, b, sizeof b),
            (double)mb / (double)cb);
    rc = CLI_OK;
done:
    dsmoe_model_cache_free(cache);
    dsmoe_model_free(m);
    dsmoe_array_free(&ids);
    free(tok);
    free(sp.out);
    free(pl.out);
    return rc;
}
