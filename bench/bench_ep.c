/*
 * bench_ep.c — expert parallelism under `mpirun -np R bench_ep` (bench/bench_ep.sh runs
 * R = 1, 2, 4). Prints JSON lines from rank 0:
 *   "throughput": the layer's forward tokens/s over the ranks (global batch / step time,
 *                 the step time being the slowest rank's, after a barrier);
 *   "bytes":      bytes per token sent between ranks, with node-limited routing (a group
 *                 per rank, topk_groups of them per token) and without (every group), on
 *                 the same tokens and weights, next to the formula's prediction for the
 *                 combine, K·D·4 bytes per token times the fraction of remote experts
 *                 ((E - E_r)/E averaged over the token's rank);
 *   "skew":       on skewed traffic (dsmoe_traffic logits fed through an identity gate,
 *                 D = E), the step time and the busiest rank's load against the mean,
 *                 with the bias that the controller (sign rule) reached after --warmup
 *                 steps of routing the same traffic, and without (bias 0).
 * Options: --tokens T (global, per step) --hidden D --ffn F --experts E --top-k K
 *          --topk-groups M --steps N --warmup W --skew S --threads N
 */
#include "bench_common.h"
#include "dsmoe/ep.h"

#include <math.h>
#include <mpi.h>

static int g_rank, g_R;

static void fill_normal(float *p, size_t n, uint64_t seed) {
    dsmoe_rng r = {seed * 0x9e3779b97f4a7c15ull + 7};
    for (size_t i = 0; i < n; i += 2) {
        double u1 = (double)(dsmoe_rng_next(&r) >> 11) * 0x1.0p-53,
               u2 = (double)(dsmoe_rng_next(&r) >> 11) * 0x1.0p-53;
        if (u1 < 1e-300) u1 = 1e-300;
        double m = sqrt(-2.0 * log(u1));
        p[i] = (float)(m * cos(6.283185307179586 * u2));
        if (i + 1 < n) p[i + 1] = (float)(m * sin(6.283185307179586 * u2));
    }
}

static dsmoe_moe_config layer_cfg(int32_t D, int32_t F, int32_t E, int32_t K, int32_t G,
                                  int32_t M, int64_t T, int nt) {
    dsmoe_moe_config c;
    dsmoe_moe_config_default(&c);
    dsmoe_router_preset("deepseek-v3", &c.router);
    c.router.n_experts = E;
    c.router.n_groups = G;
    c.router.topk_groups = M;
    c.router.top_k = K;
    if (c.router.group_topm > E / G) c.router.group_topm = E / G;
    c.hidden_size = D;
    c.expert_size = F;
    c.n_shared = 1;
    c.max_tokens = T;
    c.n_threads = nt;
    return c;
}

/* Times `steps` forwards; returns the mean step time (slowest rank). */
static double time_steps(dsmoe_ep *ep, float *y, const float *x, int64_t T, int steps, int nt) {
    double tot = 0;
    for (int s = 0; s < steps; s++) {
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        if (dsmoe_ep_forward(ep, y, x, T, nt) != DSMOE_OK) {
            fprintf(stderr, "bench_ep: %s\n", dsmoe_last_error());
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        double dt = MPI_Wtime() - t0;
        MPI_Allreduce(MPI_IN_PLACE, &dt, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
        tot += dt;
    }
    return tot / steps;
}

static void slice(int64_t Tg, int64_t *t0, int64_t *n) {
    *t0 = Tg * g_rank / g_R;
    *n = Tg * (g_rank + 1) / g_R - *t0;
}

static double remote_fraction(const dsmoe_ep *ep, int32_t E) {
    /* tokens are spread evenly over ranks: mean over ranks of (E - E_r) / E */
    double f = 0;
    for (int r = 0; r < g_R; r++) {
        int32_t a, b;
        dsmoe_ep_experts(ep, r, &a, &b);
        f += (double)(E - (b - a + 1)) / E;
    }
    return f / g_R;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g_R);
    int64_t Tg = 2048;
    int32_t D = 256, F = 128, E = 32, K = 8, M = 2;
    int steps = 5, warmup = 200, nt = 1;
    double skew = 1.0;
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *a = argv[i];
        long long v = atoll(argv[i + 1]);
        if (!strcmp(a, "--tokens")) Tg = v;
        else if (!strcmp(a, "--hidden")) D = (int32_t)v;
        else if (!strcmp(a, "--ffn")) F = (int32_t)v;
        else if (!strcmp(a, "--experts")) E = (int32_t)v;
        else if (!strcmp(a, "--top-k")) K = (int32_t)v;
        else if (!strcmp(a, "--topk-groups")) M = (int32_t)v;
        else if (!strcmp(a, "--steps")) steps = (int)v;
        else if (!strcmp(a, "--warmup")) warmup = (int)v;
        else if (!strcmp(a, "--skew")) skew = atof(argv[i + 1]);
        else if (!strcmp(a, "--threads")) nt = (int)v;
        else {
            if (g_rank == 0) fprintf(stderr, "bench_ep: unknown option %s\n", a);
            MPI_Finalize();
            return 2;
        }
    }
    if (E % g_R != 0) {
        if (g_rank == 0) fprintf(stderr, "bench_ep: E = %d must be a multiple of R = %d\n", (int)E, g_R);
        MPI_Finalize();
        return 2;
    }
    int64_t t0, T;
    slice(Tg, &t0, &T);
    float *x = bench_malloc("bench_ep", (size_t)Tg * D * 4);
    float *y = bench_malloc("bench_ep", (size_t)(T + 1) * D * 4);
    fill_normal(x, (size_t)Tg * D, 11);

    /* ---- throughput and bytes: group = rank (G = R), M groups vs all groups ---- */
    const int32_t G = g_R, Mn = M < G ? M : (G > 1 ? G / 2 : 1);
    const int32_t Ms[2] = {G, Mn};
    double bytes_tok[2][3] = {{0}}, tps = 0, frac = 0, mean_ranks[2] = {0};
    for (int v = 0; v < 2; v++) {
        dsmoe_moe_config c = layer_cfg(D, F, E, K, G, Ms[v], Tg, nt);
        if (K > Ms[v] * (E / G)) c.router.top_k = Ms[v] * (E / G);
        dsmoe_moe *moe = NULL;
        dsmoe_ep *ep = NULL;
        if (dsmoe_moe_create(&c, &moe) != DSMOE_OK) {
            fprintf(stderr, "bench_ep: %s\n", dsmoe_last_error());
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        dsmoe_moe_init_random(moe, 5);
        if (dsmoe_ep_create(MPI_COMM_WORLD, moe, NULL, &ep) != DSMOE_OK) {
            fprintf(stderr, "bench_ep: %s\n", dsmoe_last_error());
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        time_steps(ep, y, x + (size_t)t0 * D, T, 1, nt); /* warm */
        double st = time_steps(ep, y, x + (size_t)t0 * D, T, steps, nt);
        if (v == 0) tps = (double)Tg / st;
        dsmoe_ep_stats s;
        dsmoe_ep_get_stats(ep, &s);
        int64_t disp = 0, tot = 0;
        for (int r = 0; r < g_R; r++) {
            disp += s.per_rank[r].dispatch_bytes_sent;
            tot += s.per_rank[r].bytes_sent;
        }
        bytes_tok[v][0] = (double)disp / (double)Tg;
        bytes_tok[v][1] = (double)(tot - disp) / (double)Tg;
        bytes_tok[v][2] = (double)tot / (double)Tg;
        mean_ranks[v] = s.mean_ranks_per_token;
        frac = remote_fraction(ep, E);
        dsmoe_ep_free(ep);
        dsmoe_moe_free(moe);
    }
    if (g_rank == 0) {
        printf("{\"bench\": \"throughput\", \"ranks\": %d, \"tokens\": %lld, \"D\": %d, \"F\": %d, "
               "\"E\": %d, \"K\": %d, \"threads_per_rank\": %d, \"tokens_per_s\": %.1f}\n",
               g_R, (long long)Tg, (int)D, (int)F, (int)E, (int)K, nt, tps);
        const double pred = (double)K * D * 4.0 * frac;
        for (int v = 0; v < 2; v++)
            printf("{\"bench\": \"bytes\", \"ranks\": %d, \"groups\": %d, \"topk_groups\": %d, "
                   "\"node_limited\": %s, \"mean_ranks_per_token\": %.3f, "
                   "\"dispatch_bytes_per_token\": %.1f, \"combine_bytes_per_token\": %.1f, "
                   "\"bytes_per_token\": %.1f, \"formula_combine_bytes_per_token\": %.1f, "
                   "\"remote_fraction\": %.4f}\n",
                   g_R, (int)G, (int)Ms[v], v == 1 && Mn < G ? "true" : "false", mean_ranks[v],
                   bytes_tok[v][0], bytes_tok[v][1], bytes_tok[v][2], pred, frac);
        fflush(stdout);
    }

    /* ---- skewed traffic: identity gate (D = E), with and without the bias ---- */
    {
        const int32_t De = E;
        dsmoe_moe_config c = layer_cfg(De, 4 * F, E, K, 1, 1, Tg, nt); /* D = E is small: wider experts */
        c.n_shared = 0;
        dsmoe_moe *moe = NULL;
        dsmoe_ep *ep = NULL;
        dsmoe_moe_create(&c, &moe);
        dsmoe_moe_init_random(moe, 9);
        dsmoe_moe_tensor gw;
        dsmoe_moe_tensor_get(moe, "gate.weight", &gw);
        float *W = (float *)gw.data;
        memset(W, 0, (size_t)E * De * 4);
        for (int32_t e = 0; e < E; e++) W[(size_t)e * De + e] = 1.0f; /* logits = x */
        dsmoe_traffic_config tc;
        dsmoe_traffic_config_default(E, &tc);
        tc.tokens = Tg;
        tc.seq_len = Tg;
        tc.skew = skew;
        tc.steps = warmup + 2 * steps + 2;
        dsmoe_traffic *tr = NULL;
        if (dsmoe_traffic_create(&tc, &tr) != DSMOE_OK) {
            fprintf(stderr, "bench_ep: %s\n", dsmoe_last_error());
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        float *lg = bench_malloc("bench_ep", (size_t)Tg * E * 4);
        /* the controller on the same traffic, routing only (the global batch on every
         * rank: the counts it sees are the all-reduced counts of the layer) */
        dsmoe_balancer_config bc;
        dsmoe_balancer_config_default(E, &bc);
        bc.gamma = 0.01f;
        dsmoe_balancer *bal = NULL;
        dsmoe_balancer_create(&bc, &bal);
        size_t wsz = dsmoe_router_workspace_size(&c.router, Tg, 0, DSMOE_DTYPE_F32, nt);
        void *ws = bench_malloc("bench_ep", wsz);
        int32_t *idx = bench_malloc("bench_ep", (size_t)Tg * K * 4);
        float *wt = bench_malloc("bench_ep", (size_t)Tg * K * 4);
        int64_t *cnt = bench_malloc("bench_ep", (size_t)E * 8);
        for (int s = 0; s < warmup; s++) {
            dsmoe_traffic_next(tr, lg, NULL);
            dsmoe_router_output ro = {idx, wt, NULL, NULL, cnt};
            dsmoe_router_forward(&c.router, &ro, lg, dsmoe_balancer_bias(bal), Tg, ws, wsz, nt);
            dsmoe_balancer_accumulate_counts(bal, cnt, Tg);
            dsmoe_balancer_step(bal);
        }
        dsmoe_traffic_next(tr, lg, NULL);
        dsmoe_ep_create(MPI_COMM_WORLD, moe, NULL, &ep);
        double st[2], ratio[2], cpu[2];
        float *zero = calloc((size_t)E, 4);
        for (int v = 0; v < 2; v++) {
            dsmoe_moe_set_bias(moe, v ? dsmoe_balancer_bias(bal) : zero);
            time_steps(ep, y, lg + (size_t)t0 * E, T, 1, nt);
            st[v] = 0;
            cpu[v] = 0;
            for (int s1 = 0; s1 < steps; s1++) { /* per step: the slowest rank's expert CPU time */
                st[v] += time_steps(ep, y, lg + (size_t)t0 * E, T, 1, nt) / steps;
                dsmoe_ep_stats s;
                dsmoe_ep_get_stats(ep, &s);
                ratio[v] = s.busiest_load_ratio;
                cpu[v] += s.max_expert_cpu_s / steps;
            }
        }
        if (g_rank == 0)
            printf("{\"bench\": \"skew\", \"ranks\": %d, \"skew\": %.2f, \"warmup_steps\": %d, "
                   "\"step_s_no_bias\": %.5f, \"step_s_bias\": %.5f, "
                   "\"slowest_rank_expert_cpu_s_no_bias\": %.5f, \"slowest_rank_expert_cpu_s_bias\": %.5f, "
                   "\"busiest_load_ratio_no_bias\": %.3f, \"busiest_load_ratio_bias\": %.3f, "
                   "\"excess_removed\": %.3f}\n",
                   g_R, skew, warmup, st[0], st[1], cpu[0], cpu[1], ratio[0], ratio[1],
                   ratio[0] > 1.0 ? (ratio[0] - ratio[1]) / (ratio[0] - 1.0) : 0.0);
        free(zero);
        dsmoe_free(ws);
        dsmoe_free(idx);
        dsmoe_free(wt);
        dsmoe_free(cnt);
        dsmoe_free(lg);
        dsmoe_balancer_free(bal);
        dsmoe_traffic_free(tr);
        dsmoe_ep_free(ep);
        dsmoe_moe_free(moe);
    }
    dsmoe_free(x);
    dsmoe_free(y);
    MPI_Finalize();
    return 0;
}
