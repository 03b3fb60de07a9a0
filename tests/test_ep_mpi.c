/*
 * test_ep_mpi.c — expert parallelism (dsmoe/ep.h) under `mpirun -np R` (ctest runs R =
 * 1, 2, 4). Every rank also holds the single-process layer and runs it on the whole
 * global batch: the reference its slice is compared with, bit for bit:
 *  - forward output, routing, dx and the routed experts' weight gradients (on their
 *    owner rank); gate / shared gradients summed over ranks to rounding (bit-exact at
 *    R = 1); global counts equal to the reference's on every rank;
 *  - uneven expert splits (a rank with none), groups spanning ranks, group = rank, a
 *    rank with no tokens, the decode path (T <= 8), row blocks and router blocks;
 *  - the balancer: counts all-reduced, the same bias on every rank as one process;
 *  - misconfiguration (weights or config that differ on one rank, a file one rank
 *    cannot read, a non-finite input on one rank) fails on every rank with a message.
 */
#include "dsmoe/ep.h"

#include "kernels/blas.h"
#include "testlib.h"

#include <mpi.h>

static int g_rank, g_R;

/* Is a BLIS SGEMM row's result independent of the call's row count here (skx / generic
 * kernels)? Then any split of the tokens is bit-identical; otherwise only splits at
 * multiples of 512 tokens are (ep.h "Bits"), and unaligned ones are checked to rounding
 * in the dense per-token parts. */
static int g_rows_independent = 1;

static void probe_blas(void) {
    enum { M = 40, N = 24, KD = 64 };
    static float A[M * KD], W[N * KD], C0[M * N], C1[M * N];
    for (int i = 0; i < M * KD; i++) A[i] = (float)tl_normal();
    for (int i = 0; i < N * KD; i++) W[i] = (float)tl_normal();
    dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__TRANS, M, N, KD, 1.0f, A, KD, W, KD, 0.0f, C0, N);
    for (int m = 1; m <= 17; m += 4) {
        dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__TRANS, m, N, KD, 1.0f, A + 7 * KD, KD, W, KD, 0.0f,
                     C1, N);
        if (memcmp(C1, C0 + 7 * N, (size_t)m * N * 4) != 0) g_rows_independent = 0;
    }
}

typedef struct tcase {
    int32_t D, F, E, K, G, TG, ns;
    int64_t Tg;
    int split;          /* 0: uneven with an empty rank, 1: at multiples of 512 */
    int bounds;         /* 0: default, 1: uneven with a rank owning none */
} tcase;

static dsmoe_moe_config case_cfg(const tcase *c, int64_t max_tokens) {
    dsmoe_moe_config m;
    dsmoe_moe_config_default(&m);
    m.hidden_size = c->D;
    m.expert_size = c->F;
    m.n_shared = c->ns;
    m.router = tl_router_cfg(c->E, c->G, c->TG, c->K, DSMOE_SCORE_FUNC_SIGMOID, DSMOE_GROUP_SCORE_TOPSUM,
                             2, DSMOE_GROUP_MASK_EXCLUDE, 1, 0.0f, 2.5f, 1);
    m.train = 1;
    m.max_tokens = max_tokens;
    m.n_threads = 2;
    return m;
}

/* Token slice [off[r], off[r+1]) of each rank. */
static void split_tokens(int64_t Tg, int R, int mode, int64_t *off) {
    off[0] = 0;
    if (mode == 1) {
        for (int r = 0; r < R; r++) {
            int64_t end = r == R - 1 ? Tg : (int64_t)(r + 1) * 512;
            off[r + 1] = end < Tg ? end : Tg;
            if (off[r + 1] < off[r]) off[r + 1] = off[r];
        }
        return;
    }
    /* weights 2, 0 (rank 1 gets no tokens), 3, 1, ... */
    int64_t w[64], tot = 0;
    for (int r = 0; r < R; r++) {
        w[r] = r == 1 ? 0 : (r % 3) + 2;
        tot += w[r];
    }
    int64_t acc = 0;
    for (int r = 0; r < R; r++) {
        acc += w[r];
        off[r + 1] = r == R - 1 ? Tg : Tg * acc / tot;
    }
}

static void uneven_bounds(int32_t E, int R, int32_t *b) {
    /* rank 0 one expert, rank 1 none (when R > 2), the rest shared out unevenly */
    b[0] = 0;
    if (R == 1) {
        b[1] = E;
        return;
    }
    b[1] = 1;
    int r0 = 2;
    if (R > 2) {
        b[2] = 1;
        r0 = 3;
    }
    for (int r = r0; r <= R; r++) {
        int32_t left = R - r + 1;
        b[r] = r == R ? E : b[r - 1] + (E - b[r - 1]) * 2 / (left + 1);
    }
}

static void fill(float *p, size_t n, double scale) {
    for (size_t i = 0; i < n; i++) p[i] = (float)(scale * tl_normal());
}

static void run_case(const tcase *c) {
    tl_seed(1000 + (uint64_t)c->Tg * 7 + (uint64_t)c->E);
    const int64_t Tg = c->Tg;
    const int32_t D = c->D, E = c->E, K = c->K;
    dsmoe_moe_config cfg = case_cfg(c, Tg);
    dsmoe_moe *ref = NULL, *moe = NULL;
    ASSERT_OK(dsmoe_moe_create(&cfg, &ref));
    ASSERT_OK(dsmoe_moe_create(&cfg, &moe));
    if (!ref || !moe) return;
    dsmoe_moe_init_random(ref, 77);
    dsmoe_moe_init_random(moe, 77);
    float *bias = (float *)malloc((size_t)E * 4);
    fill(bias, (size_t)E, 0.05);
    dsmoe_moe_set_bias(ref, bias);
    dsmoe_moe_set_bias(moe, bias);
    size_t nTD = (size_t)Tg * D;
    float *x = malloc(nTD * 4), *dy = malloc(nTD * 4), *y = malloc(nTD * 4), *dx = malloc(nTD * 4);
    float *extra = malloc((size_t)Tg * E * 4 + 4);
    fill(x, nTD, 1.0);
    fill(dy, nTD, 1.0);
    fill(extra, (size_t)Tg * E, 0.01);
    memset(dx, 0, nTD * 4);
    ASSERT_OK(dsmoe_moe_forward(ref, y, x, Tg, 2));
    ASSERT_OK(dsmoe_moe_backward(ref, dx, dy, x, extra, Tg, 2));
    const dsmoe_moe_routing *rr = dsmoe_moe_last_routing(ref);

    int32_t bnd[65];
    if (c->bounds) uneven_bounds(E, g_R, bnd);
    dsmoe_ep *ep = NULL;
    ASSERT_OK(dsmoe_ep_create(MPI_COMM_WORLD, moe, c->bounds ? bnd : NULL, &ep));
    if (!ep) return;
    int64_t off[65];
    split_tokens(Tg, g_R, c->split, off);
    const int64_t t0 = off[g_rank], T = off[g_rank + 1] - off[g_rank];
    float *yl = malloc((size_t)(T + 1) * D * 4), *dxl = calloc((size_t)(T + 1) * D, 4);
    ASSERT_OK(dsmoe_ep_forward(ep, yl, x + (size_t)t0 * D, T, 2));
    /* dense parts by the token's rank: exact when the split is aligned or BLIS rows
     * are independent of the call's row count */
    const int exact = g_rows_independent || c->split == 1 || g_R == 1;
    if (exact) {
        tl_same_bits("y", yl, y + (size_t)t0 * D, T * D);
    } else {
        double *yd = malloc((size_t)(T + 1) * D * 8);
        for (int64_t i = 0; i < T * D; i++) yd[i] = y[(size_t)t0 * D + (size_t)i];
        tl_allclose("y", yl, yd, T * D, 1e-5, 1e-4);
        free(yd);
    }
    const dsmoe_moe_routing *er = dsmoe_ep_last_routing(ep);
    ASSERT_TRUE(er != NULL);
    if (er && exact) {
        ASSERT_TRUE(memcmp(er->indices, rr->indices + t0 * K, (size_t)(T * K) * 4) == 0);
        tl_same_bits("weights", er->weights, rr->weights + t0 * K, T * K);
    }
    const int64_t *gc = dsmoe_ep_global_counts(ep);
    ASSERT_TRUE(gc != NULL);
    if (gc && exact)
        for (int32_t e = 0; e < E; e++) ASSERT_EQ_INT(gc[e], rr->counts[e]);
    if (gc) { /* the same on every rank */
        int64_t *mx = malloc((size_t)E * 8);
        MPI_Allreduce(gc, mx, E, MPI_INT64_T, MPI_MAX, MPI_COMM_WORLD);
        ASSERT_TRUE(memcmp(mx, gc, (size_t)E * 8) == 0);
        free(mx);
    }
    /* backward */
    dsmoe_moe_zero_grad(moe);
    ASSERT_OK(dsmoe_ep_backward(ep, dxl, dy + (size_t)t0 * D, x + (size_t)t0 * D,
                                extra + (size_t)t0 * E, T, 2));
    if (exact) {
        tl_same_bits("dx", dxl, dx + (size_t)t0 * D, T * D);
    } else {
        double *d = malloc((size_t)(T + 1) * D * 8);
        for (int64_t i = 0; i < T * D; i++) d[i] = dx[(size_t)t0 * D + (size_t)i];
        tl_allclose("dx", dxl, d, T * D, 1e-5, 1e-4);
        free(d);
    }
    int32_t first, last;
    dsmoe_ep_experts(ep, g_rank, &first, &last);
    char name[96];
    for (int32_t e = first; e <= last; e++) {
        const char *parts[] = {"gate_proj", "up_proj", "down_proj"};
        for (int p = 0; p < 3; p++) {
            dsmoe_moe_tensor a, b;
            snprintf(name, sizeof name, "experts.%d.%s.weight", (int)e, parts[p]);
            ASSERT_OK(dsmoe_moe_tensor_get(moe, name, &a));
            ASSERT_OK(dsmoe_moe_tensor_get(ref, name, &b));
            if (exact) tl_same_bits(name, a.grad, b.grad, a.shape[0] * a.shape[1]);
            else {
                int64_t n = a.shape[0] * a.shape[1];
                double *d = malloc((size_t)n * 8);
                for (int64_t i = 0; i < n; i++) d[i] = b.grad[i];
                tl_allclose(name, a.grad, d, n, 1e-5, 1e-4);
                free(d);
            }
        }
    }
    /* gate and shared: per-rank parts summed over ranks */
    ASSERT_OK(dsmoe_ep_allreduce_grads(ep));
    const char *rep[] = {"gate.weight", "shared_experts.gate_proj.weight",
                         "shared_experts.up_proj.weight", "shared_experts.down_proj.weight"};
    for (int i = 0; i < (c->ns ? 4 : 1); i++) {
        dsmoe_moe_tensor a, b;
        ASSERT_OK(dsmoe_moe_tensor_get(moe, rep[i], &a));
        ASSERT_OK(dsmoe_moe_tensor_get(ref, rep[i], &b));
        int64_t n = a.shape[0] * a.shape[1];
        if (g_R == 1) {
            tl_same_bits(rep[i], a.grad, b.grad, n);
        } else {
            double *d = malloc((size_t)n * 8);
            for (int64_t j = 0; j < n; j++) d[j] = b.grad[j];
            tl_allclose(rep[i], a.grad, d, n, 1e-5, 1e-4);
            free(d);
        }
    }
    /* statistics: tokens and loads add up */
    dsmoe_ep_stats st;
    ASSERT_OK(dsmoe_ep_get_stats(ep, &st));
    ASSERT_EQ_INT(st.ranks, g_R);
    ASSERT_EQ_INT(st.tokens, Tg);
    int64_t asg = 0, sent = 0, recv = 0;
    for (int r = 0; r < g_R; r++) {
        asg += st.per_rank[r].assignments_in;
        sent += st.per_rank[r].bytes_sent;
        recv += st.per_rank[r].bytes_received;
        ASSERT_EQ_INT(st.per_rank[r].tokens, off[r + 1] - off[r]);
    }
    ASSERT_EQ_INT(asg, Tg * K);
    ASSERT_EQ_INT(sent, recv);
    if (g_R == 1) ASSERT_EQ_INT(sent, 0);
    ASSERT_TRUE(st.mean_ranks_per_token >= 1.0 && st.mean_ranks_per_token <= (double)K);
    dsmoe_ep_free(ep);
    free(yl);
    free(dxl);
    free(x);
    free(dy);
    free(y);
    free(dx);
    free(extra);
    free(bias);
    dsmoe_moe_free(ref);
    dsmoe_moe_free(moe);
}

/* group = rank where R divides G; default split; several batch sizes */
static void test_bit_identical_default(void) {
    const int64_t Ts[] = {5, 37, 300};
    for (int i = 0; i < 3; i++) {
        tcase c = {24, 16, 16, 4, 4, 2, 1, Ts[i], 0, 0};
        run_case(&c);
    }
}

/* uneven expert split with a rank that owns none; a rank with no tokens */
static void test_uneven_split(void) {
    tcase c = {24, 16, 12, 3, 1, 1, 2, 41, 0, 1};
    run_case(&c);
}

/* two groups of eight experts over four ranks: each group spans two ranks */
static void test_groups_span_ranks(void) {
    tcase c = {16, 8, 16, 4, 2, 1, 0, 29, 0, 0};
    run_case(&c);
}

/* more tokens than a router block, split at multiples of 512: exact on any BLIS */
static void test_aligned_split(void) {
    tcase c = {16, 8, 8, 2, 1, 1, 1, 1100, 1, 0};
    run_case(&c);
}

/* the balancer sums counts over ranks: every rank holds the single process's bias */
static void test_balancer_allreduce(void) {
    tcase c = {16, 8, 16, 4, 4, 2, 0, 64, 0, 0};
    tl_seed(5);
    dsmoe_moe_config cfg = case_cfg(&c, c.Tg);
    dsmoe_moe *moe = NULL;
    ASSERT_OK(dsmoe_moe_create(&cfg, &moe));
    if (!moe) return;
    dsmoe_moe_init_random(moe, 3);
    dsmoe_ep *ep = NULL;
    ASSERT_OK(dsmoe_ep_create(MPI_COMM_WORLD, moe, NULL, &ep));
    if (!ep) return;
    dsmoe_balancer_config bc;
    dsmoe_balancer_config_default(c.E, &bc);
    bc.gamma = 0.01f;
    dsmoe_balancer *b = NULL, *b1 = NULL;
    ASSERT_OK(dsmoe_balancer_create(&bc, &b));
    ASSERT_OK(dsmoe_balancer_create(&bc, &b1));
    dsmoe_ep_attach_balancer(ep, b);
    int64_t off[65];
    split_tokens(c.Tg, g_R, 0, off);
    const int64_t T = off[g_rank + 1] - off[g_rank];
    float *x = malloc((size_t)c.Tg * c.D * 4), *y = malloc((size_t)c.Tg * c.D * 4);
    for (int step = 0; step < 5; step++) {
        fill(x, (size_t)c.Tg * c.D, 1.0);
        ASSERT_OK(dsmoe_ep_forward(ep, y, x + (size_t)off[g_rank] * c.D, T, 1));
        ASSERT_OK(dsmoe_balancer_accumulate_counts(b, dsmoe_ep_last_routing(ep)->counts, T));
        ASSERT_OK(dsmoe_balancer_step(b));
        /* one process: the global counts in one step */
        ASSERT_OK(dsmoe_balancer_accumulate_counts(b1, dsmoe_ep_global_counts(ep), c.Tg));
        ASSERT_OK(dsmoe_balancer_step(b1));
        ASSERT_OK(dsmoe_moe_set_bias(moe, dsmoe_balancer_bias(b)));
    }
    tl_same_bits("bias vs one process", dsmoe_balancer_bias(b), dsmoe_balancer_bias(b1), c.E);
    float *mx = malloc((size_t)c.E * 4);
    MPI_Allreduce(dsmoe_balancer_bias(b), mx, c.E, MPI_FLOAT, MPI_MAX, MPI_COMM_WORLD);
    tl_same_bits("bias on every rank", mx, dsmoe_balancer_bias(b), c.E);
    ASSERT_TRUE(dsmoe_balancer_counts_last(b)[0] == dsmoe_ep_global_counts(ep)[0]);
    free(mx);
    free(x);
    free(y);
    dsmoe_balancer_free(b);
    dsmoe_balancer_free(b1);
    dsmoe_ep_free(ep);
    dsmoe_moe_free(moe);
}

static int msg_has(const char *s) { return strstr(dsmoe_last_error(), s) != NULL; }

/* misconfiguration on the last rank fails on every rank, with a message */
static void test_misconfig(void) {
    tcase c = {16, 8, 8, 2, 1, 1, 0, 16, 0, 0};
    dsmoe_moe_config cfg = case_cfg(&c, 16);
    const int bad = g_R - 1;
    /* weights that differ */
    dsmoe_moe *moe = NULL;
    ASSERT_OK(dsmoe_moe_create(&cfg, &moe));
    dsmoe_moe_init_random(moe, g_rank == bad && g_R > 1 ? 2 : 1);
    dsmoe_ep *ep = (dsmoe_ep *)1;
    if (g_R > 1) {
        ASSERT_STATUS(dsmoe_ep_create(MPI_COMM_WORLD, moe, NULL, &ep), DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_TRUE(ep == NULL);
        ASSERT_TRUE(msg_has("weights or bias of rank"));
    }
    dsmoe_moe_free(moe);
    /* a config that differs (top_k) */
    dsmoe_moe_config c2 = cfg;
    if (g_rank == bad && g_R > 1) c2.router.top_k = 1;
    ASSERT_OK(dsmoe_moe_create(&c2, &moe));
    dsmoe_moe_init_random(moe, 1);
    if (g_R > 1) {
        ASSERT_STATUS(dsmoe_ep_create(MPI_COMM_WORLD, moe, NULL, &ep), DSMOE_STATUS_INVALID_CONFIG);
        ASSERT_TRUE(msg_has("config"));
    }
    dsmoe_moe_free(moe);
    /* unsupported: capacity (every rank) */
    c2 = cfg;
    c2.capacity_factor = 1.0f;
    ASSERT_OK(dsmoe_moe_create(&c2, &moe));
    ASSERT_STATUS(dsmoe_ep_create(MPI_COMM_WORLD, moe, NULL, &ep), DSMOE_STATUS_UNSUPPORTED);
    dsmoe_moe_free(moe);
    /* bad bounds on one rank only */
    ASSERT_OK(dsmoe_moe_create(&cfg, &moe));
    dsmoe_moe_init_random(moe, 1);
    int32_t bnd[65];
    for (int r = 0; r <= g_R; r++) bnd[r] = (int32_t)((int64_t)r * c.E / g_R);
    if (g_rank == bad) bnd[g_R] = c.E + 1;
    ASSERT_STATUS(dsmoe_ep_create(MPI_COMM_WORLD, moe, bnd, &ep), DSMOE_STATUS_INVALID_ARGUMENT);
    {
        char want[32];
        snprintf(want, sizeof want, "rank %d:", bad);
        ASSERT_TRUE(msg_has(want));
    }
    /* a file one rank cannot read: the load's status agreed on */
    dsmoe_moe *loaded = NULL;
    char path[4096];
    snprintf(path, sizeof path, "%s", tl_tmp("ep_layer.safetensors"));
    if (g_rank == 0) ASSERT_OK(dsmoe_moe_save(moe, path, ""));
    MPI_Barrier(MPI_COMM_WORLD);
    dsmoe_status s = dsmoe_moe_load(g_rank == bad ? "no/such/ep_layer.safetensors" : path, NULL,
                                    NULL, &loaded);
    s = dsmoe_ep_agree(MPI_COMM_WORLD, s);
    ASSERT_TRUE(s != DSMOE_OK);
    ASSERT_TRUE(msg_has("ep_layer.safetensors"));
    dsmoe_moe_free(loaded);
    /* a non-finite input on one rank: every rank's forward fails */
    ep = NULL;
    ASSERT_OK(dsmoe_ep_create(MPI_COMM_WORLD, moe, NULL, &ep));
    float x[4 * 16], y[4 * 16];
    for (int i = 0; i < 4 * 16; i++) x[i] = 0.1f * (float)(i % 7);
    if (g_rank == bad) x[2 * 16 + 3] = NAN;
    ASSERT_STATUS(dsmoe_ep_forward(ep, y, x, 4, 1), DSMOE_STATUS_NON_FINITE);
    ASSERT_TRUE(msg_has("token 2"));
    /* a bad T on one rank */
    ASSERT_STATUS(dsmoe_ep_forward(ep, y, x, g_rank == bad ? -1 : 4, 1),
                  DSMOE_STATUS_INVALID_ARGUMENT);
    /* backward without a forward */
    ASSERT_STATUS(dsmoe_ep_backward(ep, NULL, y, x, NULL, 4, 1), DSMOE_STATUS_INVALID_ARGUMENT);
    /* the layer still works afterwards */
    for (int i = 0; i < 4 * 16; i++) x[i] = 0.1f * (float)(i % 7);
    ASSERT_OK(dsmoe_ep_forward(ep, y, x, 4, 1));
    dsmoe_ep_free(ep);
    dsmoe_moe_free(moe);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g_R);
    if (g_R > 64) {
        MPI_Finalize();
        return 1;
    }
    tl_seed(99);
    probe_blas();
    if (g_rank == 0)
        fprintf(stderr, "ranks %d, BLIS %s: rows %s of the call's row count\n", g_R,
                dsmoe__blas_kernels(), g_rows_independent ? "independent" : "dependent");
    RUN(test_bit_identical_default);
    RUN(test_uneven_split);
    RUN(test_groups_span_ranks);
    RUN(test_aligned_split);
    RUN(test_balancer_allreduce);
    RUN(test_misconfig);
    int rc = TEST_SUMMARY();
    int any = 0;
    MPI_Allreduce(&rc, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    MPI_Finalize();
    return any;
}
