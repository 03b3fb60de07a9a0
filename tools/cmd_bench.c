/* cmd_bench.c — `dsmoe bench route`: routing throughput from logits and with the gate
 * projection, next to the bare SGEMM of the same shape (the library's own BLAS wrapper:
 * BLIS, one thread per call) and the machine's FMA peak and read bandwidth
 * (bench/bench_machine.h), all measured in the same run; and
 * `dsmoe bench machine`: that header alone. Figures are medians over repeats; compare
 * shares and ratios, not absolute times. */
#include "bench_machine.h"
#include "cli.h"
#include "kernels/blas.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *const bench_usage =
    "usage: dsmoe bench route [--preset NAME] [--tokens T] [--threads N] [--hidden D]\n"
    "                         [--gate f32|bf16] [--repeat R] [--min-time S] [--isa NAME]\n"
    "                         [--json]\n"
    "\n"
    "Measures routing throughput from logits and, when --hidden D > 0, with the gate\n"
    "projection from hidden size D, and the bare SGEMM (T x D x E, BLIS) in the same run,\n"
    "next to the machine's FMA peak and read bandwidth (see dsmoe bench machine): the logits\n"
    "are reported as a share of the read bandwidth, the projection as a share of the peak.\n"
    "  --preset NAME   router preset (default deepseek-v3); other router flags are accepted\n"
    "  --tokens T      tokens per call (default 4096)\n"
    "  --threads N     threads (default 1)\n"
    "  --hidden D      hidden size for the projection (default 0: logits only)\n"
    "  --gate f32|bf16 gate weight storage (default f32)\n"
    "  --repeat R      timed repeats; the median is reported (default 5)\n"
    "  --min-time S    seconds per repeat at least (default 0.05)\n"
    "  --isa NAME      kernel set: avx512, avx2 or ref (default: the best the CPU has)\n"
    "  --json          one JSON object on stdout (tokens_per_s, ns_per_token, ...)\n";

static const char *const machine_usage =
    "usage: dsmoe bench machine [--threads N] [--json]\n"
    "\n"
    "Prints the CPU (model name, family/model/stepping, the microarchitecture they imply,\n"
    "AVX2/AVX-512F, the kernel set dsmoe chose) and measures the FMA peak (a register-only\n"
    "fp32 FMA loop, AVX-512 and AVX2) and the read bandwidth (a streaming sum of 256 MiB),\n"
    "on one thread and on N threads (default 1).\n";

/* The buffer the read bandwidth is measured on: far larger than any L3 here. */
#define BENCH_BW_BYTES ((size_t)256 << 20)

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

typedef struct bench_ctx {
    const dsmoe_router_config *cfg;
    const dsmoe_router_output *out;
    const float *logits, *bias, *hidden;
    const void *gate;
    dsmoe_dtype gate_dtype;
    float *sgemm_out;
    int64_t T;
    int32_t D;
    void *ws;
    size_t ws_size;
    int threads;
} bench_ctx;

enum { B_ROUTE, B_HIDDEN, B_SGEMM };

static int run_once(const bench_ctx *c, int what) {
    if (what == B_ROUTE)
        return dsmoe_router_forward(c->cfg, c->out, c->logits, c->bias, c->T, c->ws, c->ws_size,
                                    c->threads) != DSMOE_OK;
    if (what == B_HIDDEN)
        return dsmoe_router_forward_hidden(c->cfg, c->out, c->hidden, c->gate, c->gate_dtype, c->D,
                                           c->bias, c->T, c->ws, c->ws_size, c->threads) != DSMOE_OK;
    dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__TRANS, (int)c->T, c->cfg->n_experts, c->D, 1.0f, c->hidden,
                 c->D, (const float *)c->gate, c->D, 0.0f, c->sgemm_out, c->cfg->n_experts);
    return 0;
}

/* Median seconds per call over `repeat` repeats of at least min_time each. */
static double time_calls(const bench_ctx *c, int what, int repeat, double min_time) {
    if (run_once(c, what)) return -1.0;
    double t0 = now_s();
    long iters = 0;
    do {
        run_once(c, what);
        iters++;
    } while (now_s() - t0 < min_time / 4);
    double per = (now_s() - t0) / (double)iters;
    long n = (long)(min_time / (per > 1e-9 ? per : 1e-9)) + 1;
    double times[64] = {0};
    if (repeat > 64) repeat = 64;
    for (int r = 0; r < repeat; r++) {
        double a = now_s();
        for (long i = 0; i < n; i++) run_once(c, what);
        times[r] = (now_s() - a) / (double)n;
    }
    qsort(times, (size_t)repeat, sizeof(double), cmp_double);
    return times[repeat / 2];
}

/* uniform in [-1, 1) */
static float brand(dsmoe_rng *r) { return (float)(dsmoe_rng_uniform(r) * 2.0 - 1.0); }

static int bench_route(int argc, char **argv) {
    const char *cmd = "bench route";
    cli_router_flags rf;
    long long T = 4096, threads = 1, D = 0, repeat = 5;
    double min_time = 0.05;
    int json = 0;
    dsmoe_dtype gate_dtype = DSMOE_DTYPE_F32;
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            printf("%s\n%s", bench_usage, cli_router_help);
            return CLI_OK;
        }
    if (cli_router_begin(cmd, argc, argv, &rf) < 0) return CLI_USAGE;
    for (int i = 1; i < argc; i++) {
        const char *v = NULL;
        int missing = 0;
        int r = cli_router_flag(cmd, argc, argv, &i, &rf);
        if (r < 0) return CLI_USAGE;
        if (r > 0) continue;
        if (cli_opt(argc, argv, &i, "--tokens", &v, &missing)) {
            if (!missing && !cli_parse_int(v, 1, 1 << 24, &T))
                return cli_fail(CLI_USAGE, cmd, "--tokens expects 1..16777216, got '%s'", v);
        } else if (cli_opt(argc, argv, &i, "--threads", &v, &missing)) {
            if (!missing && !cli_parse_int(v, 1, 1024, &threads))
                return cli_fail(CLI_USAGE, cmd, "--threads expects 1..1024, got '%s'", v);
        } else if (cli_opt(argc, argv, &i, "--hidden", &v, &missing)) {
            if (!missing && !cli_parse_int(v, 0, 1 << 20, &D))
                return cli_fail(CLI_USAGE, cmd, "--hidden expects 0..1048576, got '%s'", v);
        } else if (cli_opt(argc, argv, &i, "--repeat", &v, &missing)) {
            if (!missing && !cli_parse_int(v, 1, 64, &repeat))
                return cli_fail(CLI_USAGE, cmd, "--repeat expects 1..64, got '%s'", v);
        } else if (cli_opt(argc, argv, &i, "--min-time", &v, &missing)) {
            if (!missing && (!cli_parse_float(v, &min_time) || min_time <= 0 || min_time > 60))
                return cli_fail(CLI_USAGE, cmd, "--min-time expects seconds in (0, 60], got '%s'", v);
        } else if (cli_opt(argc, argv, &i, "--gate", &v, &missing)) {
            if (!missing && strcmp(v, "f32") == 0) gate_dtype = DSMOE_DTYPE_F32;
            else if (!missing && strcmp(v, "bf16") == 0) gate_dtype = DSMOE_DTYPE_BF16;
            else if (!missing) return cli_fail(CLI_USAGE, cmd, "--gate expects f32 or bf16, got '%s'", v);
        } else if (cli_opt(argc, argv, &i, "--isa", &v, &missing)) {
            if (!missing && dsmoe_set_isa(v) != DSMOE_OK)
                return cli_fail(CLI_USAGE, cmd, "--isa: %s", dsmoe_last_error());
        } else if (strcmp(argv[i], "--json") == 0) {
            json = 1;
        } else {
            return cli_fail(CLI_USAGE, cmd, "unknown option '%s' (see dsmoe bench route --help)", argv[i]);
        }
        if (missing) return cli_fail(CLI_USAGE, cmd, "%s needs a value", argv[i]);
    }
    if (cli_router_validate(cmd, &rf) != 0) return CLI_USAGE;
    const dsmoe_router_config *cfg = &rf.cfg;
    const int64_t E = cfg->n_experts, K = cfg->top_k;
    size_t nl = (size_t)(T * E), nh = (size_t)(T * D), nw = (size_t)(E * D);
    float *logits = malloc(nl * 4), *bias = malloc((size_t)E * 4), *weights = malloc((size_t)(T * K) * 4);
    int32_t *indices = malloc((size_t)(T * K) * 4);
    float *hidden = D ? malloc(nh * 4) : NULL, *gate32 = D ? malloc(nw * 4) : NULL;
    float *sg_out = D ? malloc(nl * 4) : NULL;
    uint16_t *gate16 = D ? malloc(nw * 2) : NULL;
    size_t ws_size = dsmoe_router_workspace_size(cfg, T, (int32_t)D, gate_dtype, (int)threads);
    void *ws = dsmoe_malloc(ws_size);
    int rc = CLI_RUNTIME;
    if (!logits || !bias || !weights || !indices || !ws || (D && (!hidden || !gate32 || !sg_out || !gate16))) {
        cli_fail(CLI_RUNTIME, cmd, "out of memory");
        goto done;
    }
    dsmoe_rng rng;
    dsmoe_rng_seed(&rng, 12345);
    for (size_t i = 0; i < nl; i++) logits[i] = 3.0f * brand(&rng);
    for (int64_t e = 0; e < E; e++) bias[e] = 0.01f * brand(&rng);
    for (size_t i = 0; i < nh; i++) hidden[i] = brand(&rng);
    for (size_t i = 0; i < nw; i++) {
        gate32[i] = 0.02f * brand(&rng);
        gate16[i] = dsmoe_f32_to_bf16(gate32[i]);
    }
    dsmoe_router_output out = {indices, weights, NULL, NULL, NULL};
    bench_ctx c = {cfg, &out, logits, cfg->use_bias ? bias : NULL, hidden,
                   gate_dtype == DSMOE_DTYPE_BF16 ? (const void *)gate16 : (const void *)gate32,
                   gate_dtype, sg_out, T, (int32_t)D, ws, ws_size, (int)threads};
    double t_route = time_calls(&c, B_ROUTE, (int)repeat, min_time);
    if (t_route < 0) {
        cli_fail_status(cmd, "routing failed", DSMOE_STATUS_INTERNAL);
        goto done;
    }
    double t_hidden = 0, t_sgemm = 0;
    if (D) {
        t_hidden = time_calls(&c, B_HIDDEN, (int)repeat, min_time);
        bench_ctx cs = c;
        cs.gate = gate32;
        t_sgemm = time_calls(&cs, B_SGEMM, (int)repeat, min_time);
        if (t_hidden < 0) {
            cli_fail(CLI_RUNTIME, cmd, "projected routing failed: %s", dsmoe_last_error());
            goto done;
        }
    }
    double flops = 2.0 * (double)T * (double)D * (double)E;
    /* the machine's references, measured in the same run after the timings */
    bench_machine mach;
    bench_machine_measure(&mach, (int)threads, BENCH_BW_BYTES);
    const double peak = bench_machine_peak(&mach);
    /* from logits: the logits are read once (T x E fp32), a share of the read bandwidth */
    const double logit_bw = (double)nl * 4.0 / t_route;
    const double bw_share = mach.read_n > 0 ? logit_bw / mach.read_n : 0.0;
    if (json) {
        printf("{\"bench\": \"route\", \"tokens\": %lld, \"experts\": %lld, \"top_k\": %lld, \"threads\": %lld, "
               "\"tokens_per_s\": %.6g, \"ns_per_token\": %.6g, \"seconds_per_call\": %.6g, "
               "\"logits_gb_per_s\": %.4g, \"read_bandwidth_share\": %.4f, ",
               T, (long long)E, (long long)K, threads, (double)T / t_route, 1e9 * t_route / (double)T, t_route,
               logit_bw * 1e-9, bw_share);
        bench_machine_json(stdout, &mach, dsmoe_isa());
        if (D)
            printf(", \"hidden\": %lld, \"gate\": \"%s\", \"hidden_tokens_per_s\": %.6g, \"hidden_seconds_per_call\": %.6g, "
                   "\"hidden_gflops\": %.6g, \"sgemm_seconds_per_call\": %.6g, \"sgemm_gflops\": %.6g, "
                   "\"ratio_vs_sgemm\": %.4f, \"hidden_peak_share\": %.4f, \"sgemm_peak_share\": %.4f",
                   D, gate_dtype == DSMOE_DTYPE_BF16 ? "bf16" : "f32", (double)T / t_hidden, t_hidden,
                   flops / t_hidden * 1e-9, t_sgemm, flops / t_sgemm * 1e-9, t_sgemm / t_hidden,
                   peak > 0 ? flops / t_hidden * 1e-9 / peak : 0.0, peak > 0 ? flops / t_sgemm * 1e-9 / peak : 0.0);
        printf("}\n");
    } else {
        bench_machine_print(stdout, &mach, dsmoe_isa());
        printf("route from logits: %lld tokens x %lld experts, %lld thread(s), kernels %s\n", T, (long long)E,
               threads, dsmoe_isa());
        printf("  %.3g tokens/s, %.1f ns/token, %.3g s/call; logits read at %.2f GB/s = %.1f%% of the read "
               "bandwidth\n",
               (double)T / t_route, 1e9 * t_route / (double)T, t_route, logit_bw * 1e-9, 100.0 * bw_share);
        if (D) {
            printf("route with projection from D=%lld (%s gate):\n", D, gate_dtype == DSMOE_DTYPE_BF16 ? "bf16" : "f32");
            printf("  %.3g tokens/s, %.2f GFLOP/s = %.1f%% of the FMA peak; bare SGEMM %.2f GFLOP/s = %.1f%%; "
                   "ratio %.3f\n",
                   (double)T / t_hidden, flops / t_hidden * 1e-9, peak > 0 ? 100.0 * flops / t_hidden * 1e-9 / peak : 0.0,
                   flops / t_sgemm * 1e-9, peak > 0 ? 100.0 * flops / t_sgemm * 1e-9 / peak : 0.0, t_sgemm / t_hidden);
        }
    }
    rc = CLI_OK;
done:
    free(logits);
    free(bias);
    free(weights);
    free(indices);
    free(hidden);
    free(gate32);
    free(gate16);
    free(sg_out);
    dsmoe_free(ws);
    return rc;
}

static int bench_machine_cmd(int argc, char **argv) {
    const char *cmd = "bench machine";
    long long threads = 1;
    int json = 0;
    for (int i = 1; i < argc; i++) {
        const char *v = NULL;
        int missing = 0;
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            printf("%s", machine_usage);
            return CLI_OK;
        } else if (cli_opt(argc, argv, &i, "--threads", &v, &missing)) {
            if (!missing && !cli_parse_int(v, 1, 1024, &threads))
                return cli_fail(CLI_USAGE, cmd, "--threads expects 1..1024, got '%s'", v);
        } else if (strcmp(argv[i], "--json") == 0) {
            json = 1;
        } else {
            return cli_fail(CLI_USAGE, cmd, "unknown option '%s' (see dsmoe bench machine --help)", argv[i]);
        }
        if (missing) return cli_fail(CLI_USAGE, cmd, "%s needs a value", argv[i]);
    }
    bench_machine m;
    bench_machine_measure(&m, (int)threads, BENCH_BW_BYTES);
    if (json) {
        printf("{\"bench\": \"machine\", ");
        bench_machine_json(stdout, &m, dsmoe_isa());
        printf("}\n");
    } else {
        bench_machine_print(stdout, &m, dsmoe_isa());
    }
    return CLI_OK;
}

int cmd_bench(int argc, char **argv) {
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        printf("usage: dsmoe bench <what> [options]\n\n  route     routing throughput (dsmoe bench route --help)\n"
               "  machine   CPU, FMA peak and read bandwidth (dsmoe bench machine --help)\n");
        return argc < 2 ? CLI_USAGE : CLI_OK;
    }
    if (strcmp(argv[1], "route") == 0) return bench_route(argc - 1, argv + 1);
    if (strcmp(argv[1], "machine") == 0) return bench_machine_cmd(argc - 1, argv + 1);
    return cli_fail(CLI_USAGE, "bench", "unknown benchmark '%s' (known: route, machine)", argv[1]);
}
