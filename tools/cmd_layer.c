/* cmd_layer.c — `dsmoe layer`: runs one DeepSeekMoE layer from a checkpoint-format
 * safetensors file (Hugging Face DeepseekV3 tensor names) on hidden states from a
 * .npy file, writing the layer output and optionally the routing. The tool an engine
 * author uses to check an MoE implementation against dsmoe. */
#include "cli.h"
#include "cli_mpi.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#ifdef DSMOE_HAVE_MPI
#include "dsmoe/ep.h"
#endif

static const char *const layer_usage =
    "usage: dsmoe layer --weights L.safetensors --input X.npy --output Y.npy [options]\n"
    "\n"
    "Runs one DeepSeek-V3 MoE layer: gate projection, routing, the routed SwiGLU experts,\n"
    "the weighted combine and the shared experts, y = sum_k w_k expert_k(x) + shared(x).\n"
    "Hidden size, expert size and expert count come from the tensor shapes of\n"
    "  PREFIXgate.weight (E, D), PREFIXgate.e_score_correction_bias (E),\n"
    "  PREFIXexperts.<e>.{gate_proj,up_proj,down_proj}.weight, PREFIXshared_experts.*\n"
    "(F32, BF16 or F16). A layer file saved by dsmoe carries its routing config (and\n"
    "capacity factor), which is used: a router option or --capacity-factor that\n"
    "contradicts it is an error (exit 2). Other files (Hugging Face checkpoints) route\n"
    "by the router options below.\n"
    "\n"
    "files:\n"
    "  --weights L.safetensors  the layer's tensors\n"
    "  --prefix P             tensor name prefix, e.g. model.layers.3.mlp. (default: found\n"
    "                         automatically when the file holds exactly one MoE layer)\n"
    "  --input X.npy          hidden states (T, D) float32\n"
    "  --output Y.npy         layer output (T, D) float32\n"
    "  --out-indices I.npy    chosen experts (T, K) int32, by descending selection score\n"
    "  --out-weights W.npy    routing weights (T, K) float32\n"
    "  --out-logits U.npy     gate logits (T, E) float32\n"
    "  --save L2.safetensors  also write the layer as dsmoe saves it: its tensors (in the\n"
    "                         storage dtype) with its routing config, so that a later\n"
    "                         run on L2 needs no router options\n"
    "layer:\n"
    "  --shared-experts N     shared experts (default: from the shape of\n"
    "                         shared_experts.gate_proj.weight, 0 if absent)\n"
    "  --dtype f32|bf16       weight storage: f32 (default) or bf16 (bf16 tensors kept as\n"
    "                         they are, f32 ones rounded; compute is fp32 either way)\n"
    "  --layout checkpoint|packed  expert weights as in the file (default) or in panels\n"
    "                         of 16 rows, which the products stream faster (same math,\n"
    "                         another summation order, so results differ in the last bits)\n"
    "  --capacity-factor C    per-expert capacity ceil(C*T*K/E), later tokens dropped\n"
    "                         (default 0: no limit, as DeepSeek-V3)\n"
    "  --json                 print a JSON summary (shapes, per-expert counts) on stdout\n"
    "  --threads N            threads (default: all; results identical for any N)\n"
    "  --help                 this text\n"
    "The checkpoint's gate.e_score_correction_bias is used when the router config uses a\n"
    "bias (--bias B.npy replaces it; --no-bias routes without it). Every weight must be\n"
    "finite. Inputs of more than 8192 tokens are processed in chunks of 8192 (a capacity\n"
    "limit applies per chunk).\n"
    "\n"
    "expert parallelism (mpirun -np R dsmoe layer ...):\n"
    "  every rank reads the same files; the routed experts are split over the ranks in\n"
    "  contiguous blocks and the input's tokens too: --ep-split blocks (default) gives\n"
    "  each rank whole blocks of 512 tokens (ceil(T/512/R) of them), which keeps the\n"
    "  output bit-identical to one process on every CPU; --ep-split even gives rank r\n"
    "  tokens [r*T/R, (r+1)*T/R) (bit-identical where BLIS's rows do not depend on the\n"
    "  call's row count, as with its skx kernels). Rank 0 writes the outputs, in token\n"
    "  order. The input is one step (no chunks of 8192). See docs/ep.md.\n"
    "  --ep-stats S.json      the step's communication figures: {\"ranks\": R, \"per_rank\":\n"
    "                         [{\"rank\": r, \"experts\": [first, last], \"tokens_in\": n,\n"
    "                         \"bytes_sent\": b, \"bytes_received\": b, ...}, ...], ...}\n"
    "                         (one process: \"ranks\": 1, no bytes)\n"
    "  --ep-split blocks|even  how the tokens are split over the ranks (above)\n"
    "\n";

#define LAYER_CHUNK 8192

/* Router flags seen in argv: [start, end] argument positions. */
#define LAYER_MAX_FLAGS 64

/* With a config dsmoe saved in the file, each router flag given (applied alone to the
 * saved routing) and --capacity-factor must leave it unchanged. Returns 0 or prints
 * the contradiction and returns CLI_USAGE. */
/* Two router configs route alike: every field equal (the struct has padding). */
static int same_router(const dsmoe_router_config *a, const dsmoe_router_config *b) {
    return a->n_experts == b->n_experts && a->n_groups == b->n_groups &&
           a->topk_groups == b->topk_groups && a->top_k == b->top_k &&
           a->score_func == b->score_func && a->group_score == b->group_score &&
           a->group_topm == b->group_topm && a->group_mask == b->group_mask &&
           a->normalize == b->normalize && a->norm_eps == b->norm_eps && a->scale == b->scale &&
           a->use_bias == b->use_bias && a->precision == b->precision &&
           a->nonfinite == b->nonfinite;
}

static int check_against_saved(const char *cmd, int argc, char **argv, const int *flag_at,
                               int n_flags, const dsmoe_moe_config *saved, const char *path,
                               int capacity_given, double capacity) {
    char js[1024];
    dsmoe_router_config_json(&saved->router, js, sizeof js);
    for (int f = 0; f < n_flags; f++) {
        int i = flag_at[f];
        const char *a = argv[i];
        dsmoe_router_config c;
        if (strcmp(a, "--preset") == 0) {
            if (dsmoe_router_preset(argv[i + 1], &c) != DSMOE_OK) continue; /* reported before */
            c.n_experts = saved->router.n_experts;
        } else {
            cli_router_flags one;
            memset(&one, 0, sizeof one);
            one.cfg = saved->router;
            int j = i;
            if (cli_router_flag(cmd, argc, argv, &j, &one) != 1) continue;
            c = one.cfg;
        }
        if (!same_router(&c, &saved->router)) {
            int has_value = i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0;
            return cli_fail(CLI_USAGE, cmd,
                            "%s%s%s contradicts the routing config saved with the layer in %s: "
                            "%s (drop the flag)",
                            a, has_value ? " " : "", has_value ? argv[i + 1] : "", path, js);
        }
    }
    if (capacity_given && (float)capacity != saved->capacity_factor)
        return cli_fail(CLI_USAGE, cmd,
                        "--capacity-factor %g contradicts the capacity factor %g saved with the "
                        "layer in %s (drop the flag)",
                        capacity, (double)saved->capacity_factor, path);
    return 0;
}

/* --ep-stats of one process: every token stays on the only rank. */
static int layer_stats_one(const char *cmd, const char *path, int64_t T, int32_t E, int32_t K) {
    FILE *f = fopen(path, "w");
    if (!f) return cli_fail(CLI_RUNTIME, cmd, "cannot write %s", path);
    fprintf(f, "{\"ranks\": 1, \"tokens\": %lld, \"mean_ranks_per_token\": %.6f, "
               "\"busiest_load_ratio\": %.6f, \"bytes_total\": 0, \"per_rank\": [{\"rank\": 0, "
               "\"experts\": [0, %d], \"tokens\": %lld, \"tokens_in\": %lld, "
               "\"assignments_in\": %lld, \"bytes_sent\": 0, \"bytes_received\": 0, "
               "\"dispatch_bytes_sent\": 0, \"remote_assignments\": 0}]}\n",
            (long long)T, T > 0 ? 1.0 : 0.0, T > 0 ? 1.0 : 0.0, (int)E - 1, (long long)T,
            (long long)T, (long long)T * K);
    if (fclose(f) != 0) return cli_fail(CLI_RUNTIME, cmd, "cannot write %s", path);
    return 0;
}

#ifdef DSMOE_HAVE_MPI
typedef struct layer_ep_outputs {
    const char *y, *idx, *w, *logits, *stats, *prefix;
    int json, even;
} layer_ep_outputs;

/* Gathers rows of `unit` elements (slices in rank order) to rank 0. */
static void layer_gather(const void *mine, int64_t n, void *all, const int64_t *off, int R,
                         int unit, MPI_Datatype type) {
    int *cnt = (int *)malloc((size_t)R * 2 * sizeof(int));
    if (!cnt || !off) { /* a few ints: the gather cannot go on */
        free(cnt);
        MPI_Abort(MPI_COMM_WORLD, 1);
        return;
    }
    for (int r = 0; r < R; r++) {
        cnt[r] = (int)((off[r + 1] - off[r]) * unit);
        cnt[R + r] = (int)(off[r] * unit);
    }
    MPI_Gatherv(mine, (int)(n * unit), type, all, cnt, cnt + R, type, 0, MPI_COMM_WORLD);
    free(cnt);
}

/* The layer over the ranks: this rank's slice of x, outputs gathered and written by
 * rank 0. Every rank returns the same code. */
static int layer_ep(const char *cmd, dsmoe_moe *moe, const float *x, int64_t T, int threads,
                    const layer_ep_outputs *o) {
    const dsmoe_moe_config *cfg = dsmoe_moe_get_config(moe);
    const int32_t D = cfg->hidden_size, E = cfg->router.n_experts, K = cfg->router.top_k;
    const int R = cli_mpi_size(), rank = cli_mpi_rank();
    if (T * (int64_t)(D > E ? D : E) > INT_MAX)
        return cli_fail(CLI_RUNTIME, cmd, "%lld tokens of %d floats are too many for one MPI "
                        "message: split the input", (long long)T, (int)(D > E ? D : E));
    dsmoe_ep *ep = NULL;
    dsmoe_status s = dsmoe_ep_create(MPI_COMM_WORLD, moe, NULL, &ep);
    if (s != DSMOE_OK) return cli_fail_status(cmd, "expert parallelism", s);
    int64_t *off = (int64_t *)malloc((size_t)(R + 1) * sizeof(int64_t));
    const int64_t nb = (T + 511) / 512, per = (nb + R - 1) / R;
    int rc = CLI_RUNTIME;
    float *y = NULL, *yall = NULL, *wall = NULL, *lall = NULL;
    int32_t *iall = NULL;
    int ok = off != NULL;
    if (off)
        for (int r = 0; r <= R; r++) {
            int64_t v = o->even ? T * r / R : per * r * 512;
            off[r] = v < T ? v : T;
        }
    const int64_t t0 = off ? off[rank] : 0, n = off ? off[rank + 1] - t0 : 0;
    if (ok) {
        y = (float *)malloc((size_t)(n > 0 ? n : 1) * (size_t)D * sizeof(float));
        if (rank == 0) {
            size_t TT = (size_t)(T > 0 ? T : 1);
            yall = (float *)malloc(TT * (size_t)D * sizeof(float));
            iall = (int32_t *)malloc(TT * (size_t)K * sizeof(int32_t));
            wall = (float *)malloc(TT * (size_t)K * sizeof(float));
            lall = (float *)malloc(TT * (size_t)E * sizeof(float));
            ok = yall && iall && wall && lall;
        }
        ok = ok && y;
    }
    if (!ok) cli_fail(CLI_RUNTIME, cmd, "out of memory for %lld tokens", (long long)T);
    if (cli_mpi_agree(ok ? CLI_OK : CLI_RUNTIME, cmd) != CLI_OK) goto done;
    s = dsmoe_ep_forward(ep, y, x + (size_t)t0 * (size_t)D, n, threads);
    if (s != DSMOE_OK) {
        rc = cli_fail_status(cmd, "forward", s);
        goto done;
    }
    const dsmoe_moe_routing *ro = dsmoe_ep_last_routing(ep);
    layer_gather(y, n, yall, off, R, D, MPI_FLOAT);
    layer_gather(ro->indices, n, iall, off, R, K, MPI_INT);
    layer_gather(ro->weights, n, wall, off, R, K, MPI_FLOAT);
    layer_gather(ro->logits, n, lall, off, R, E, MPI_FLOAT);
    dsmoe_ep_stats st;
    dsmoe_ep_get_stats(ep, &st);
    rc = CLI_OK;
    if (rank == 0) {
        int64_t shd[2] = {T, D}, shk[2] = {T, K}, she[2] = {T, E};
        if ((o->y && cli_save_npy(cmd, o->y, DSMOE_DTYPE_F32, 2, shd, yall)) ||
            (o->idx && cli_save_npy(cmd, o->idx, DSMOE_DTYPE_I32, 2, shk, iall)) ||
            (o->w && cli_save_npy(cmd, o->w, DSMOE_DTYPE_F32, 2, shk, wall)) ||
            (o->logits && cli_save_npy(cmd, o->logits, DSMOE_DTYPE_F32, 2, she, lall)))
            rc = CLI_RUNTIME;
        if (rc == CLI_OK && o->stats && dsmoe_ep_stats_write_json(&st, o->stats) != DSMOE_OK)
            rc = cli_fail_file(CLI_RUNTIME, cmd, o->stats);
        if (rc == CLI_OK && o->json) {
            char cj[2048];
            const int64_t *gc = dsmoe_ep_global_counts(ep);
            dsmoe_moe_config_json(cfg, cj, sizeof cj);
            printf("{\"tokens\": %lld, \"prefix\": \"%s\", \"dropped\": 0, \"isa\": \"%s\", "
                   "\"ranks\": %d, \"config\": %s, \"counts\": [",
                   (long long)T, o->prefix, dsmoe_isa(), R, cj);
            for (int32_t e = 0; e < E; e++) printf("%s%lld", e ? ", " : "", (long long)gc[e]);
            printf("]}\n");
        }
    }
    rc = cli_mpi_agree(rc, cmd);
done:
    free(off);
    free(y);
    free(yall);
    free(iall);
    free(wall);
    free(lall);
    dsmoe_ep_free(ep);
    return rc;
}
#endif

int cmd_layer(int argc, char **argv) {
    const char *cmd = "layer";
    cli_router_flags rf;
    const char *weights_path = NULL, *prefix_arg = NULL, *in_path = NULL, *out_path = NULL;
    const char *out_idx = NULL, *out_w = NULL, *out_l = NULL, *dtype_arg = NULL;
    const char *layout_arg = NULL, *save_path = NULL, *ep_stats = NULL, *ep_split = NULL;
    long long threads = 0, n_shared = -1;
    double capacity = 0.0;
    int json = 0, experts_given = 0, capacity_given = 0, n_flags = 0;
    int flag_at[LAYER_MAX_FLAGS];
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            printf("%s%s", layer_usage, cli_router_help);
            return CLI_OK;
        }
    if (cli_router_begin(cmd, argc, argv, &rf) < 0) return CLI_USAGE;
    for (int i = 1; i < argc; i++) {
        const char *v = NULL;
        int missing = 0;
        if (strcmp(argv[i], "--experts") == 0) experts_given = 1;
        const int at = i;
        int r = cli_router_flag(cmd, argc, argv, &i, &rf);
        if (r < 0) return CLI_USAGE;
        if (r > 0) {
            if (n_flags == LAYER_MAX_FLAGS)
                return cli_fail(CLI_USAGE, cmd, "more than %d router options", LAYER_MAX_FLAGS);
            flag_at[n_flags++] = at;
            continue;
        }
        if (cli_opt(argc, argv, &i, "--weights", &v, &missing)) weights_path = v;
        else if (cli_opt(argc, argv, &i, "--prefix", &v, &missing)) prefix_arg = v;
        else if (cli_opt(argc, argv, &i, "--input", &v, &missing)) in_path = v;
        else if (cli_opt(argc, argv, &i, "--output", &v, &missing)) out_path = v;
        else if (cli_opt(argc, argv, &i, "--out-indices", &v, &missing)) out_idx = v;
        else if (cli_opt(argc, argv, &i, "--out-weights", &v, &missing)) out_w = v;
        else if (cli_opt(argc, argv, &i, "--out-logits", &v, &missing)) out_l = v;
        else if (cli_opt(argc, argv, &i, "--save", &v, &missing)) save_path = v;
        else if (cli_opt(argc, argv, &i, "--ep-stats", &v, &missing)) ep_stats = v;
        else if (cli_opt(argc, argv, &i, "--ep-split", &v, &missing)) ep_split = v;
        else if (cli_opt(argc, argv, &i, "--dtype", &v, &missing)) dtype_arg = v;
        else if (cli_opt(argc, argv, &i, "--layout", &v, &missing)) layout_arg = v;
        else if (cli_opt(argc, argv, &i, "--shared-experts", &v, &missing)) {
            if (!missing && !cli_parse_int(v, 0, 64, &n_shared))
                return cli_fail(CLI_USAGE, cmd, "--shared-experts expects 0..64, got '%s'", v);
        } else if (cli_opt(argc, argv, &i, "--capacity-factor", &v, &missing)) {
            if (!missing && (!cli_parse_float(v, &capacity) || capacity < 0))
                return cli_fail(CLI_USAGE, cmd, "--capacity-factor expects a number >= 0, got '%s'", v);
            capacity_given = 1;
        } else if (cli_opt(argc, argv, &i, "--threads", &v, &missing)) {
            if (!missing && !cli_parse_int(v, 1, 1024, &threads))
                return cli_fail(CLI_USAGE, cmd, "--threads expects 1..1024, got '%s'", v);
        } else if (strcmp(argv[i], "--json") == 0) {
            json = 1;
        } else {
            return cli_fail(CLI_USAGE, cmd, "unknown option '%s' (see dsmoe layer --help)", argv[i]);
        }
        if (missing) return cli_fail(CLI_USAGE, cmd, "%s needs a value", argv[i]);
    }
    if (!weights_path) return cli_fail(CLI_USAGE, cmd, "--weights L.safetensors is required");
    if (!in_path) return cli_fail(CLI_USAGE, cmd, "--input X.npy is required");
    if (ep_split && strcmp(ep_split, "blocks") != 0 && strcmp(ep_split, "even") != 0)
        return cli_fail(CLI_USAGE, cmd, "--ep-split expects blocks or even, got '%s'", ep_split);
    if (!out_path && !out_idx && !out_w && !out_l && !json && !save_path && !ep_stats)
        return cli_fail(CLI_USAGE, cmd, "nothing to write: give --output (or --out-indices, "
                                        "--out-weights, --out-logits, --save, --json)");
    dsmoe_dtype storage = DSMOE_DTYPE_F32;
    if (dtype_arg) {
        if (strcmp(dtype_arg, "f32") == 0) storage = DSMOE_DTYPE_F32;
        else if (strcmp(dtype_arg, "bf16") == 0) storage = DSMOE_DTYPE_BF16;
        else return cli_fail(CLI_USAGE, cmd, "--dtype expects f32 or bf16, got '%s'", dtype_arg);
    }
    int32_t layout = DSMOE_MOE_LAYOUT_CHECKPOINT;
    if (layout_arg) {
        if (strcmp(layout_arg, "checkpoint") == 0) layout = DSMOE_MOE_LAYOUT_CHECKPOINT;
        else if (strcmp(layout_arg, "packed") == 0) layout = DSMOE_MOE_LAYOUT_PACKED;
        else return cli_fail(CLI_USAGE, cmd, "--layout expects checkpoint or packed, got '%s'", layout_arg);
    }

    int rc = CLI_RUNTIME, agreed = 0;
    dsmoe_safetensors *st = NULL;
    dsmoe_moe *moe = NULL;
    dsmoe_array x = {0}, bias = {0};
    float *y = NULL, *w = NULL, *lg = NULL;
    int32_t *idx = NULL;
    int64_t *counts = NULL;
    char prefix[512];
    dsmoe_status s = dsmoe_safetensors_open(weights_path, &st);
    if (s != DSMOE_OK) {
        cli_fail_file(CLI_RUNTIME, cmd, weights_path);
        goto done;
    }
    if (prefix_arg) {
        snprintf(prefix, sizeof prefix, "%s", prefix_arg);
    } else {
        int64_t n_layers = 0;
        s = dsmoe_moe_find_prefix(st, prefix, sizeof prefix, &n_layers);
        if (s != DSMOE_OK && n_layers > 1) {
            char a[512] = "", b[512] = "";
            dsmoe_moe_layer_prefix(st, 0, a, sizeof a);
            dsmoe_moe_layer_prefix(st, 1, b, sizeof b);
            rc = cli_fail(CLI_USAGE, cmd,
                          "%s holds %lld MoE layers ('%s', '%s', ...): choose one with --prefix",
                          weights_path, (long long)n_layers, a, b);
            goto done;
        }
        if (s != DSMOE_OK) {
            cli_fail_file(CLI_RUNTIME, cmd, weights_path);
            goto done;
        }
    }

    dsmoe_moe_config saved;
    s = dsmoe_moe_saved_config(st, prefix, &saved);
    if (s == DSMOE_OK) {
        rc = check_against_saved(cmd, argc, argv, flag_at, n_flags, &saved, weights_path,
                                 capacity_given, capacity);
        if (rc != CLI_OK) goto done;
        rc = CLI_RUNTIME;
    } else if (s != DSMOE_STATUS_NOT_FOUND) {
        cli_fail_file(CLI_RUNTIME, cmd, weights_path);
        goto done;
    }
    dsmoe_moe_config cfg;
    dsmoe_moe_config_default(&cfg);
    cfg.router = rf.cfg;
    cfg.n_shared = (int32_t)n_shared;
    cfg.weight_dtype = storage;
    cfg.weight_layout = layout;
    cfg.capacity_factor = (float)capacity;
    cfg.n_threads = (int32_t)threads;
    const int32_t E_flag = rf.cfg.n_experts;
    s = dsmoe_moe_config_from_safetensors(&cfg, st, prefix); /* the saved routing, if any */
    if (s != DSMOE_OK) {
        cli_fail_file(CLI_RUNTIME, cmd, weights_path);
        goto done;
    }
    if (experts_given && E_flag != cfg.router.n_experts) {
        cli_fail(CLI_RUNTIME, cmd, "--experts %d but %sgate.weight has %d rows", (int)E_flag, prefix,
                 (int)cfg.router.n_experts);
        goto done;
    }
    if (dsmoe_moe_config_validate(&cfg) != DSMOE_OK) {
        cli_fail_config(CLI_USAGE, cmd, "%s (with E = %d experts from %s)", dsmoe_last_error(),
                 (int)cfg.router.n_experts, weights_path);
        rc = CLI_USAGE;
        goto done;
    }
    const int32_t D = cfg.hidden_size, E = cfg.router.n_experts, K = cfg.router.top_k;
    cfg.max_tokens = 1; /* reserved for the input's T below */
    /* every tensor is checked before the layer is allocated */
    s = dsmoe_moe_load_from(st, prefix, &cfg, &moe);
    if (s != DSMOE_OK) {
        cli_fail(CLI_RUNTIME, cmd, "%s: %s%s", weights_path, dsmoe_last_error(),
                 s == DSMOE_STATUS_NOT_FOUND && strstr(dsmoe_last_error(), "e_score_correction_bias")
                     ? " (route without a bias: --no-bias)"
                     : "");
        goto done;
    }
    if (rf.bias_set) {
        int64_t wb[1] = {E};
        if (cli_load_npy(cmd, rf.bias_path, DSMOE_DTYPE_F32, 1, wb, &bias)) goto done;
        s = dsmoe_moe_set_bias(moe, (const float *)bias.data);
        if (s != DSMOE_OK) {
            cli_fail_file(CLI_RUNTIME, cmd, rf.bias_path);
            goto done;
        }
    }
    if (save_path && cli_mpi_rank() == 0) { /* under mpirun, rank 0 writes */
        s = dsmoe_moe_save(moe, save_path, prefix);
        if (s != DSMOE_OK) {
            cli_fail_file(CLI_RUNTIME, cmd, save_path);
            goto done;
        }
    }
    int64_t want[2] = {-1, D};
    if (cli_load_npy(cmd, in_path, DSMOE_DTYPE_F32, 2, want, &x)) goto done;
    const int64_t T = x.shape[0];
    if (cli_mpi_active()) { /* every rank got here, or all fail here */
        agreed = 1;
        rc = cli_mpi_agree(CLI_OK, cmd);
        if (rc != CLI_OK) goto done;
#ifdef DSMOE_HAVE_MPI
        layer_ep_outputs o = {out_path, out_idx, out_w, out_l, ep_stats, prefix, json,
                              ep_split && strcmp(ep_split, "even") == 0};
        rc = layer_ep(cmd, moe, (const float *)x.data, T, (int)threads, &o);
#endif
        goto done;
    }
    s = dsmoe_moe_reserve(moe, T < 1 ? 1 : (T < LAYER_CHUNK ? T : LAYER_CHUNK), (int)threads);
    if (s != DSMOE_OK) {
        cli_fail_status(cmd, "reserving the workspace", s);
        goto done;
    }
    size_t nTD = (size_t)(T > 0 ? T : 1) * (size_t)D, nTK = (size_t)(T > 0 ? T : 1) * (size_t)K;
    y = (float *)malloc(nTD * sizeof(float));
    idx = (int32_t *)malloc(nTK * sizeof(int32_t));
    w = (float *)malloc(nTK * sizeof(float));
    counts = (int64_t *)calloc((size_t)E, sizeof(int64_t));
    if (out_l) lg = (float *)malloc((size_t)(T > 0 ? T : 1) * (size_t)E * sizeof(float));
    if (!y || !idx || !w || !counts || (out_l && !lg)) {
        cli_fail(CLI_RUNTIME, cmd, "out of memory for %lld tokens", (long long)T);
        goto done;
    }
    dsmoe_moe_routing_out ro = {idx, w, NULL, lg, counts, 0};
    s = dsmoe_moe_forward_chunked(moe, y, (const float *)x.data, T, (int)threads, &ro);
    if (s != DSMOE_OK) {
        cli_fail_status(cmd, "forward", s);
        goto done;
    }
    const int64_t dropped = ro.n_dropped;
    int64_t shd[2] = {T, D}, shk[2] = {T, K}, she[2] = {T, E};
    if (out_path && cli_save_npy(cmd, out_path, DSMOE_DTYPE_F32, 2, shd, y)) goto done;
    if (out_idx && cli_save_npy(cmd, out_idx, DSMOE_DTYPE_I32, 2, shk, idx)) goto done;
    if (out_w && cli_save_npy(cmd, out_w, DSMOE_DTYPE_F32, 2, shk, w)) goto done;
    if (out_l && cli_save_npy(cmd, out_l, DSMOE_DTYPE_F32, 2, she, lg)) goto done;
    if (ep_stats && layer_stats_one(cmd, ep_stats, T, E, K)) goto done;
    if (json) {
        char cj[2048];
        dsmoe_moe_config_json(dsmoe_moe_get_config(moe), cj, sizeof cj);
        printf("{\"tokens\": %lld, \"prefix\": \"%s\", \"dropped\": %lld, \"isa\": \"%s\", "
               "\"config\": %s, \"counts\": [",
               (long long)T, prefix, (long long)dropped, dsmoe_isa(), cj);
        for (int32_t e = 0; e < E; e++) printf("%s%lld", e ? ", " : "", (long long)counts[e]);
        printf("]}\n");
    }
    rc = CLI_OK;
done:
    if (cli_mpi_active() && !agreed) rc = cli_mpi_agree(rc, cmd); /* no rank left waiting */
    free(y);
    free(idx);
    free(w);
    free(lg);
    free(counts);
    dsmoe_array_free(&x);
    dsmoe_array_free(&bias);
    dsmoe_moe_free(moe);
    dsmoe_safetensors_close(st);
    return rc;
}
