/* cmd_route.c — `dsmoe route`: logits, or hidden states and a gate weight, to expert
 * indices and routing weights (.npy in, .npy out), with an optional JSON summary. */
#include "cli.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char *const route_usage =
    "usage: dsmoe route [router options] INPUT [outputs]\n"
    "\n"
    "Routes tokens with the DeepSeek-V3 router: sigmoid (or softmax) scores, biased\n"
    "group-limited top-k selection, normalised and scaled weights.\n"
    "\n"
    "input (one of):\n"
    "  --logits L.npy         router logits (T, E) float32\n"
    "  --hidden X.npy --gate-weight W.npy\n"
    "                         hidden states (T, D) float32 and gate weight (E, D) float32 or\n"
    "                         bf16 stored as uint16 ('<u2')\n"
    "  --random T             T tokens of standard-normal logits (synthetic; see --seed)\n"
    "outputs:\n"
    "  --out-indices I.npy    expert indices (T, K) int32, by descending selection score\n"
    "  --out-weights W.npy    routing weights (T, K) float32\n"
    "  --out-scores S.npy     affinities (T, E) float32 (sigmoid or softmax, before the bias)\n"
    "  --out-logits L.npy     the logits routed (T, E) float32: projected from --hidden, or the\n"
    "                         synthetic ones of --random\n"
    "  --json                 print a JSON summary (tokens, per-expert counts, MaxVio) on stdout\n"
    "other:\n"
    "  --threads N            threads (default: all; results identical for any N)\n"
    "  --seed S               seed for --random (default 1)\n"
    "  --help                 this text\n"
    "\n";

int cmd_route(int argc, char **argv) {
    const char *cmd = "route";
    cli_router_flags rf;
    const char *logits_path = NULL, *hidden_path = NULL, *gate_path = NULL;
    const char *out_idx = NULL, *out_w = NULL, *out_s = NULL, *out_l = NULL;
    long long random_T = -1, seed = 1, threads = 0;
    int json = 0;
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            printf("%s%s", route_usage, cli_router_help);
            return CLI_OK;
        }
    if (cli_router_begin(cmd, argc, argv, &rf) < 0) return CLI_USAGE;
    for (int i = 1; i < argc; i++) {
        const char *v = NULL;
        int missing = 0;
        int r = cli_router_flag(cmd, argc, argv, &i, &rf);
        if (r < 0) return CLI_USAGE;
        if (r > 0) continue;
        if (cli_opt(argc, argv, &i, "--logits", &v, &missing)) logits_path = v;
        else if (cli_opt(argc, argv, &i, "--hidden", &v, &missing)) hidden_path = v;
        else if (cli_opt(argc, argv, &i, "--gate-weight", &v, &missing)) gate_path = v;
        else if (cli_opt(argc, argv, &i, "--out-indices", &v, &missing)) out_idx = v;
        else if (cli_opt(argc, argv, &i, "--out-weights", &v, &missing)) out_w = v;
        else if (cli_opt(argc, argv, &i, "--out-scores", &v, &missing)) out_s = v;
        else if (cli_opt(argc, argv, &i, "--out-logits", &v, &missing)) out_l = v;
        else if (cli_opt(argc, argv, &i, "--random", &v, &missing)) {
            if (!missing && !cli_parse_int(v, 0, 100000000, &random_T))
                return cli_fail(CLI_USAGE, cmd, "--random expects a token count, got '%s'", v);
        } else if (cli_opt(argc, argv, &i, "--seed", &v, &missing)) {
            if (!missing && !cli_parse_int(v, 0, (long long)1 << 62, &seed))
                return cli_fail(CLI_USAGE, cmd, "--seed expects a non-negative integer, got '%s'", v);
        } else if (cli_opt(argc, argv, &i, "--threads", &v, &missing)) {
            if (!missing && !cli_parse_int(v, 1, 1024, &threads))
                return cli_fail(CLI_USAGE, cmd, "--threads expects 1..1024, got '%s'", v);
        } else if (strcmp(argv[i], "--json") == 0) {
            json = 1;
        } else {
            return cli_fail(CLI_USAGE, cmd, "unknown option '%s' (see dsmoe route --help)", argv[i]);
        }
        if (missing) return cli_fail(CLI_USAGE, cmd, "%s needs a value", argv[i]);
    }
    int n_inputs = (logits_path != NULL) + (hidden_path != NULL || gate_path != NULL) + (random_T >= 0);
    if (n_inputs != 1)
        return cli_fail(CLI_USAGE, cmd, "give exactly one input: --logits, --hidden with --gate-weight, or --random");
    if ((hidden_path != NULL) != (gate_path != NULL))
        return cli_fail(CLI_USAGE, cmd, "--hidden and --gate-weight go together");
    dsmoe_router_config *cfg = &rf.cfg;
    if (cli_router_validate(cmd, &rf) < 0) return CLI_USAGE;

    const int64_t E = cfg->n_experts, K = cfg->top_k;
    int rc = CLI_RUNTIME;
    dsmoe_array logits = {0}, hidden = {0}, gate = {0}, bias = {0};
    float *zero_bias = NULL, *weights = NULL, *scores = NULL, *proj = NULL;
    int32_t *indices = NULL;
    int64_t *counts = NULL;
    void *ws = NULL;
    int64_t T = 0, D = 0;

    if (logits_path) {
        int64_t want[2] = {-1, E};
        if (cli_load_npy(cmd, logits_path, DSMOE_DTYPE_F32, 2, want, &logits)) goto done;
        T = logits.shape[0];
    } else if (random_T >= 0) {
        int64_t shape[2] = {random_T, E};
        if (dsmoe_array_alloc(&logits, DSMOE_DTYPE_F32, 2, shape) != DSMOE_OK) {
            cli_fail_status(cmd, "allocating logits", DSMOE_STATUS_OUT_OF_MEMORY);
            goto done;
        }
        dsmoe_rng rng;
        dsmoe_rng_seed(&rng, (uint64_t)seed);
        float *l = (float *)logits.data;
        for (int64_t i = 0; i < random_T * E; i++) l[i] = (float)dsmoe_rng_normal(&rng);
        T = random_T;
    } else {
        int64_t want_h[2] = {-1, -1};
        if (cli_load_npy(cmd, hidden_path, DSMOE_DTYPE_F32, 2, want_h, &hidden)) goto done;
        T = hidden.shape[0];
        D = hidden.shape[1];
        if (D < 1) {
            cli_fail(CLI_RUNTIME, cmd, "%s: hidden size is 0", hidden_path);
            goto done;
        }
        if (dsmoe_npy_read(gate_path, &gate) != DSMOE_OK) {
            cli_fail_file(CLI_RUNTIME, cmd, gate_path);
            goto done;
        }
        if ((gate.dtype != DSMOE_DTYPE_F32 && gate.dtype != DSMOE_DTYPE_BF16) || gate.ndim != 2 ||
            gate.shape[0] != E || gate.shape[1] != D) {
            cli_fail(CLI_RUNTIME, cmd,
                     "%s: gate weight must be (E=%lld, D=%lld) float32 or bf16 ('<u2'), got %s with %d dims "
                     "(%lld, %lld)",
                     gate_path, (long long)E, (long long)D, dsmoe_dtype_name(gate.dtype), (int)gate.ndim,
                     (long long)(gate.ndim > 0 ? gate.shape[0] : 0),
                     (long long)(gate.ndim > 1 ? gate.shape[1] : 0));
            goto done;
        }
    }
    const float *bias_ptr = NULL;
    if (cfg->use_bias) {
        if (rf.bias_set) {
            int64_t want[1] = {E};
            if (cli_load_npy(cmd, rf.bias_path, DSMOE_DTYPE_F32, 1, want, &bias)) goto done;
            bias_ptr = (const float *)bias.data;
        } else {
            zero_bias = calloc((size_t)E, sizeof(float));
            if (!zero_bias) goto done;
            bias_ptr = zero_bias;
        }
    }
    indices = malloc((size_t)(T * K > 0 ? T * K : 1) * sizeof(int32_t));
    weights = malloc((size_t)(T * K > 0 ? T * K : 1) * sizeof(float));
    counts = malloc((size_t)E * sizeof(int64_t));
    if (out_s) scores = malloc((size_t)(T * E > 0 ? T * E : 1) * sizeof(float));
    if (!indices || !weights || !counts || (out_s && !scores)) {
        cli_fail(CLI_RUNTIME, cmd, "out of memory for %lld tokens", (long long)T);
        goto done;
    }
    if (out_l && hidden_path) {
        proj = malloc((size_t)(T * E > 0 ? T * E : 1) * sizeof(float));
        if (!proj) {
            cli_fail(CLI_RUNTIME, cmd, "out of memory for %lld tokens", (long long)T);
            goto done;
        }
    }
    dsmoe_router_output out = {indices, weights, scores, proj, counts};
    size_t ws_size = dsmoe_router_workspace_size(cfg, T, (int32_t)D, gate.dtype, (int)threads);
    ws = dsmoe_malloc(ws_size);
    if (!ws) {
        cli_fail(CLI_RUNTIME, cmd, "out of memory for a %zu-byte workspace", ws_size);
        goto done;
    }
    dsmoe_status st;
    if (hidden_path)
        st = dsmoe_router_forward_hidden(cfg, &out, (const float *)hidden.data, gate.data, gate.dtype,
                                         (int32_t)D, bias_ptr, T, ws, ws_size, (int)threads);
    else
        st = dsmoe_router_forward(cfg, &out, (const float *)logits.data, bias_ptr, T, ws, ws_size,
                                  (int)threads);
    if (st != DSMOE_OK) {
        cli_fail_status(cmd, "routing failed", st);
        goto done;
    }
    int64_t shape_k[2] = {T, K}, shape_e[2] = {T, E};
    if (out_idx && cli_save_npy(cmd, out_idx, DSMOE_DTYPE_I32, 2, shape_k, indices)) goto done;
    if (out_w && cli_save_npy(cmd, out_w, DSMOE_DTYPE_F32, 2, shape_k, weights)) goto done;
    if (out_s && cli_save_npy(cmd, out_s, DSMOE_DTYPE_F32, 2, shape_e, scores)) goto done;
    if (out_l && cli_save_npy(cmd, out_l, DSMOE_DTYPE_F32, 2, shape_e, hidden_path ? proj : logits.data))
        goto done;

    dsmoe_load_stats ls;
    st = dsmoe_load_stats_compute(counts, (int32_t)E, 1, &ls);
    if (st != DSMOE_OK) {
        cli_fail_status(cmd, "load statistics", st);
        goto done;
    }
    const double maxvio = ls.maxvio;
    const long long dead = ls.dead;
    if (json) {
        char cfgjson[1024];
        dsmoe_router_config_json(cfg, cfgjson, sizeof cfgjson);
        printf("{\"tokens\": %lld, \"experts\": %lld, \"top_k\": %lld, \"maxvio_batch\": %.6f, "
               "\"dead_experts\": %lld, \"isa\": \"%s\", \"config\": %s, \"counts\": [",
               (long long)T, (long long)E, (long long)K, maxvio, (long long)dead, dsmoe_isa(), cfgjson);
        for (int64_t e = 0; e < E; e++) printf("%s%lld", e ? ", " : "", (long long)counts[e]);
        printf("]}\n");
    } else if (!out_idx && !out_w && !out_s && !out_l) {
        printf("routed %lld tokens to %lld experts (top-%lld): MaxVio(batch) %.4f, %lld experts unused\n",
               (long long)T, (long long)E, (long long)K, maxvio, (long long)dead);
        if (T > 0) {
            printf("token 0 ->");
            for (int64_t k = 0; k < K; k++) printf(" %d:%.4f", indices[k], (double)weights[k]);
            printf("\n");
        }
    }
    rc = CLI_OK;
done:
    dsmoe_array_free(&logits);
    dsmoe_array_free(&hidden);
    dsmoe_array_free(&gate);
    dsmoe_array_free(&bias);
    free(zero_bias);
    free(indices);
    free(weights);
    free(scores);
    free(proj);
    free(counts);
    dsmoe_free(ws);
    return rc;
}
