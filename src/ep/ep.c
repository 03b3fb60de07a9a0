/*
 * ep.c — expert parallelism over MPI (dsmoe/ep.h): routing on each rank, counts and
 * rows exchanged with MPI_Alltoall / MPI_Alltoallv, the rank's experts run on the rows
 * they received, outputs returned and combined by the token's rank; backward through
 * the same exchange.
 *
 * Bit-identity with the single-process layer (moe.c) rests on making its calls:
 *  - the rows an expert receives, concatenated in source-rank order, are its rows of
 *    the global batch in (token, k) order (ranks hold consecutive slices of it), so the
 *    stable counting sort by expert gives moe.c's dispatch, its row blocks of
 *    DSMOE_MOE_ROW_BLOCK and its products (the weight-streaming product up to the
 *    kernel set's row limit, SGEMM above, as moe.c's moe_product);
 *  - the combine adds w_k·Y_k in k order then the shared output, as moe_combine;
 *  - the per-token dense parts (shared experts, the gate's input gradient) take the
 *    product path the single process takes for the global block of 256 tokens the
 *    token lies in; the router sees at least DSMOE__SMALL_T + 1 rows whenever the
 *    global batch does (padding rows otherwise), so that it uses the same projection.
 * The backward: dY_r = w_r·dy_t on the expert's rank (the same product as moe.c's),
 * row blocks and weight-row blocks as moe.c's, input gradients summed by the token's
 * rank in k order.
 */
#include "dsmoe/ep.h"

#include "core/internal.h"
#include "kernels/blas.h"
#include "kernels/kernels.h"
#include "moe/moe_internal.h"

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

_Static_assert(sizeof(int) == 4, "MPI_INT carries int32 assignment records");

/* The router's own constants (router.c): tokens up to which the projection is one
 * matrix-vector product per token, and moe.c's weight-row block. */
#define EP_ROUTER_SMALL_T 8
#define EP_WROW_BLOCK 256
#define EP_MSG 480

/* A unit of parallel work: local expert e (or -1: the shared expert), rows [r0, r0+n),
 * and whether the product is SGEMM (moe.c's choice for the global block). */
typedef struct ep_task {
    int32_t e;
    int32_t n;
    int64_t r0;
    int32_t sgemm;
} ep_task;

/* A growable buffer (64-byte aligned). */
typedef struct ep_buf {
    void *p;
    size_t size;
} ep_buf;

struct dsmoe_ep {
    MPI_Comm comm;
    int rank, R;
    dsmoe_moe *moe;
    dsmoe_moe_config cfg;
    int32_t D, F, Fs, E, K;
    int32_t *bounds;    /* (R + 1) */
    int32_t *owner;     /* (E) rank of each expert */
    int32_t e0, ne;     /* this rank's experts */
    /* parameters (into the layer) */
    const float *Wg;
    float *dWg;
    const float **w1, **w2;     /* (ne) local experts */
    float **dw1, **dw2;
    const float *sw1, *sw2;
    float *dsw1, *dsw2;
    int train;
    unsigned flags;     /* DSMOE_EP_* of dsmoe_ep_create_flags */
    /* owner side, T tokens */
    int64_t T, Tg, g0;
    ep_buf xpad, rws, indices, weights, scores, logits, counts, gcounts;
    ep_buf asg_pos, srow_tok, xsend, msend, yret, GUs, Hs, Ys;
    ep_buf dweights, dlogits, dysend, dxret, dxtmp, dHs, dGUs, dXs;
    /* expert side */
    int64_t n_rows, n_asg;
    ep_buf xrecv, mrecv, slot, eoff, ecnt, Xg, GU, H, Ye, ysend;
    ep_buf dyrecv, dYe, dH, dGU, dXg, dxsend, tasks, wtasks;
    int64_t n_tasks;
    /* exchange counts (R each): rows, assignments, and their displacements */
    int *s_rows, *s_asg, *r_rows, *r_asg;
    int *sc, *sd, *rc, *rd; /* scratch counts / displacements for one Alltoallv */
    int64_t *s_rows_off, *s_asg_off, *r_rows_off, *r_asg_off;
    int have_fwd;
    dsmoe_moe_routing routing;
    dsmoe_ep_rank_stats *stats;
    int64_t *statbuf; /* (R, 9) gathered figures */
    dsmoe_ep_stats gstats;
    int have_stats;
    double cpu_s; /* expert products' CPU time in the last forward */
};

/* ---------------------------------------------------------------- helpers -- */

static double ep_cpu_seconds(void) {
    struct timespec ts;
    if (clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts) != 0) return 0.0;
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int ep_grow(ep_buf *b, size_t n) {
    if (n <= b->size) return 1;
    size_t want = n + n / 4 + 64;
    void *p = dsmoe_malloc(want);
    if (!p) return 0;
    dsmoe_free(b->p);
    b->p = p;
    b->size = want;
    return 1;
}

static void ep_release(ep_buf *b) {
    dsmoe_free(b->p);
    b->p = NULL;
    b->size = 0;
}

static int ep_nthreads(const dsmoe_ep *ep, int n_threads) {
    int nt = dsmoe__threads(n_threads);
    int cap = ep->cfg.n_threads > 0 ? ep->cfg.n_threads : nt;
    if (nt > cap) nt = cap;
    return nt < 1 ? 1 : nt;
}

dsmoe_status dsmoe_ep_agree(MPI_Comm comm, dsmoe_status st) {
    int rank = 0, R = 1;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &R);
    int mine = st != DSMOE_OK ? rank : R, first = R;
    MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm);
    if (first == R) return DSMOE_OK;
    char msg[EP_MSG];
    int code = (int)st;
    memset(msg, 0, sizeof msg);
    if (rank == first) snprintf(msg, sizeof msg, "%s", dsmoe_last_error());
    MPI_Bcast(&code, 1, MPI_INT, first, comm);
    MPI_Bcast(msg, EP_MSG, MPI_CHAR, first, comm);
    msg[EP_MSG - 1] = '\0';
    return dsmoe__error((dsmoe_status)code, "rank %d: %s", first, msg);
}

/* FNV-1a over bytes. */
static uint64_t ep_hash(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = (const unsigned char *)p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

/* Compares a value across ranks: returns the lowest rank whose value differs from
 * rank 0's, or -1 if all agree. */
static int ep_first_differing(dsmoe_ep *ep, uint64_t v) {
    uint64_t *all = (uint64_t *)(void *)ep->statbuf; /* R * 9 int64 of room */
    int bad = -1;
    MPI_Allgather(&v, 1, MPI_UINT64_T, all, 1, MPI_UINT64_T, ep->comm);
    for (int r = 1; r < ep->R && bad < 0; r++)
        if (all[r] != all[0]) bad = r;
    return bad;
}

/* ---------------------------------------------------------------- create -- */

void dsmoe_ep_free(dsmoe_ep *ep) {
    if (!ep) return;
    ep_buf *bufs[] = {&ep->xpad, &ep->rws, &ep->indices, &ep->weights, &ep->scores, &ep->logits,
                      &ep->counts, &ep->gcounts, &ep->asg_pos, &ep->srow_tok, &ep->xsend,
                      &ep->msend, &ep->yret, &ep->GUs, &ep->Hs, &ep->Ys, &ep->dweights,
                      &ep->dlogits, &ep->dysend, &ep->dxret, &ep->dxtmp, &ep->dHs, &ep->dGUs,
                      &ep->dXs, &ep->xrecv, &ep->mrecv, &ep->slot, &ep->eoff, &ep->ecnt, &ep->Xg,
                      &ep->GU, &ep->H, &ep->Ye, &ep->ysend, &ep->dyrecv, &ep->dYe, &ep->dH,
                      &ep->dGU, &ep->dXg, &ep->dxsend, &ep->tasks, &ep->wtasks};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) ep_release(bufs[i]);
    free(ep->bounds);
    free(ep->owner);
    free((void *)ep->w1);
    free((void *)ep->w2);
    free(ep->dw1);
    free(ep->dw2);
    free(ep->s_rows);
    free(ep->s_rows_off);
    free(ep->stats);
    free(ep->statbuf);
    if (ep->comm != MPI_COMM_NULL) MPI_Comm_free(&ep->comm);
    free(ep);
}

static dsmoe_status ep_tensor(const dsmoe_moe *moe, const char *name, const float **w, float **g) {
    dsmoe_moe_tensor t;
    dsmoe_status st = dsmoe_moe_tensor_get(moe, name, &t);
    if (st != DSMOE_OK) return st;
    *w = (const float *)t.data;
    if (g) *g = t.grad;
    return DSMOE_OK;
}

/* Local checks of the layer and bounds (no communication). */
static dsmoe_status ep_setup(dsmoe_ep *ep, const int32_t *bounds) {
    const dsmoe_moe_config *c = &ep->cfg;
    if (c->weight_dtype != DSMOE_DTYPE_F32 || c->weight_layout != DSMOE_MOE_LAYOUT_CHECKPOINT)
        return dsmoe__error(DSMOE_STATUS_UNSUPPORTED,
                            "dsmoe_ep_create: expert parallelism needs F32 weights in the "
                            "checkpoint layout");
    if (c->capacity_factor > 0.0f)
        return dsmoe__error(DSMOE_STATUS_UNSUPPORTED,
                            "dsmoe_ep_create: capacity_factor %g is not supported with expert "
                            "parallelism (use 0)", (double)c->capacity_factor);
    const int R = ep->R;
    ep->E = c->router.n_experts;
    ep->K = c->router.top_k;
    ep->D = c->hidden_size;
    ep->F = c->expert_size;
    ep->Fs = c->n_shared * c->expert_size;
    ep->train = c->train;
    ep->bounds = (int32_t *)malloc((size_t)(R + 1) * sizeof(int32_t));
    ep->owner = (int32_t *)malloc((size_t)ep->E * sizeof(int32_t));
    ep->s_rows = (int *)calloc((size_t)R * 8, sizeof(int));
    ep->s_rows_off = (int64_t *)calloc((size_t)R * 4 + 4, sizeof(int64_t));
    ep->stats = (dsmoe_ep_rank_stats *)calloc((size_t)R, sizeof(dsmoe_ep_rank_stats));
    ep->statbuf = (int64_t *)calloc((size_t)R * 9, sizeof(int64_t));
    if (!ep->bounds || !ep->owner || !ep->s_rows || !ep->s_rows_off || !ep->stats || !ep->statbuf)
        return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "dsmoe_ep_create: out of memory");
    ep->s_asg = ep->s_rows + R;
    ep->r_rows = ep->s_rows + 2 * R;
    ep->r_asg = ep->s_rows + 3 * R;
    ep->sc = ep->s_rows + 4 * R;
    ep->sd = ep->s_rows + 5 * R;
    ep->rc = ep->s_rows + 6 * R;
    ep->rd = ep->s_rows + 7 * R;
    ep->s_asg_off = ep->s_rows_off + (R + 1);
    ep->r_rows_off = ep->s_rows_off + 2 * (R + 1);
    ep->r_asg_off = ep->s_rows_off + 3 * (R + 1);
    if (bounds) {
        if (bounds[0] != 0 || bounds[R] != ep->E)
            return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                                "dsmoe_ep_create: bounds must run from 0 to E = %d (got %d .. %d)",
                                (int)ep->E, (int)bounds[0], (int)bounds[R]);
        for (int r = 0; r < R; r++)
            if (bounds[r + 1] < bounds[r])
                return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                                    "dsmoe_ep_create: bounds[%d] = %d < bounds[%d] = %d", r + 1,
                                    (int)bounds[r + 1], r, (int)bounds[r]);
        memcpy(ep->bounds, bounds, (size_t)(R + 1) * sizeof(int32_t));
    } else {
        for (int r = 0; r <= R; r++) ep->bounds[r] = (int32_t)((int64_t)r * ep->E / R);
    }
    for (int r = 0; r < R; r++)
        for (int32_t e = ep->bounds[r]; e < ep->bounds[r + 1]; e++) ep->owner[e] = r;
    ep->e0 = ep->bounds[ep->rank];
    ep->ne = ep->bounds[ep->rank + 1] - ep->e0;
    size_t nl = (size_t)(ep->ne > 0 ? ep->ne : 1);
    ep->w1 = (const float **)calloc(nl, sizeof(float *));
    ep->w2 = (const float **)calloc(nl, sizeof(float *));
    ep->dw1 = (float **)calloc(nl, sizeof(float *));
    ep->dw2 = (float **)calloc(nl, sizeof(float *));
    if (!ep->w1 || !ep->w2 || !ep->dw1 || !ep->dw2)
        return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "dsmoe_ep_create: out of memory");
    dsmoe_status st = ep_tensor(ep->moe, "gate.weight", &ep->Wg, &ep->dWg);
    if (st != DSMOE_OK) return st;
    char name[96];
    for (int32_t i = 0; i < ep->ne; i++) {
        const float *up;
        snprintf(name, sizeof name, "experts.%d.gate_proj.weight", (int)(ep->e0 + i));
        if ((st = ep_tensor(ep->moe, name, &ep->w1[i], &ep->dw1[i])) != DSMOE_OK) return st;
        snprintf(name, sizeof name, "experts.%d.up_proj.weight", (int)(ep->e0 + i));
        if ((st = ep_tensor(ep->moe, name, &up, NULL)) != DSMOE_OK) return st;
        if (up != ep->w1[i] + (size_t)ep->F * (size_t)ep->D)
            return dsmoe__error(DSMOE_STATUS_INTERNAL,
                                "dsmoe_ep_create: expert %d's up_proj does not follow its gate_proj",
                                (int)(ep->e0 + i));
        snprintf(name, sizeof name, "experts.%d.down_proj.weight", (int)(ep->e0 + i));
        if ((st = ep_tensor(ep->moe, name, &ep->w2[i], &ep->dw2[i])) != DSMOE_OK) return st;
    }
    if (ep->Fs) {
        const float *up;
        if ((st = ep_tensor(ep->moe, "shared_experts.gate_proj.weight", &ep->sw1, &ep->dsw1)) != DSMOE_OK ||
            (st = ep_tensor(ep->moe, "shared_experts.up_proj.weight", &up, NULL)) != DSMOE_OK ||
            (st = ep_tensor(ep->moe, "shared_experts.down_proj.weight", &ep->sw2, &ep->dsw2)) != DSMOE_OK)
            return st;
        if (up != ep->sw1 + (size_t)ep->Fs * (size_t)ep->D)
            return dsmoe__error(DSMOE_STATUS_INTERNAL,
                                "dsmoe_ep_create: the shared up_proj does not follow its gate_proj");
    }
    if (!ep_grow(&ep->gcounts, (size_t)ep->E * sizeof(int64_t)) ||
        !ep_grow(&ep->counts, (size_t)ep->E * sizeof(int64_t)) ||
        !ep_grow(&ep->ecnt, nl * sizeof(int64_t)) || !ep_grow(&ep->eoff, (nl + 1) * sizeof(int64_t)))
        return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "dsmoe_ep_create: out of memory");
    return DSMOE_OK;
}

/* Hash of the config as JSON (runtime fields cleared) and the bounds. */
static uint64_t ep_config_hash(const dsmoe_ep *ep) {
    dsmoe_moe_config c = ep->cfg;
    c.max_tokens = 1;
    c.n_threads = 1;
    char js[2048];
    dsmoe_moe_config_json(&c, js, sizeof js);
    uint64_t h = ep_hash(0xcbf29ce484222325ull, js, strlen(js));
    h = ep_hash(h, &c.train, sizeof c.train);
    return ep_hash(h, ep->bounds, (size_t)(ep->R + 1) * sizeof(int32_t));
}

/* Hash of every weight and the bias (with DSMOE_EP_SHARDED, of the replicated ones: the
 * gate, the bias and the shared experts). */
static uint64_t ep_weight_hash(const dsmoe_ep *ep) {
    uint64_t h = 0xcbf29ce484222325ull;
    int64_t n = dsmoe_moe_tensor_count(ep->moe);
    for (int64_t i = 0; i < n; i++) {
        dsmoe_moe_tensor t;
        if (dsmoe_moe_tensor_at(ep->moe, i, &t) != DSMOE_OK) continue;
        if ((ep->flags & DSMOE_EP_SHARDED) && strncmp(t.name, "experts.", 8) == 0) continue;
        h = ep_hash(h, t.data, (size_t)(t.shape[0] * (t.ndim > 1 ? t.shape[1] : 1)) * 4u);
    }
    return h;
}

dsmoe_status dsmoe_ep_create(MPI_Comm comm, dsmoe_moe *moe, const int32_t *bounds,
                             dsmoe_ep **out) {
    return dsmoe_ep_create_flags(comm, moe, bounds, 0, out);
}

dsmoe_status dsmoe_ep_create_flags(MPI_Comm comm, dsmoe_moe *moe, const int32_t *bounds,
                                   unsigned flags, dsmoe_ep **out) {
    if (out) *out = NULL;
    if (comm == MPI_COMM_NULL)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_ep_create: MPI_COMM_NULL");
    dsmoe_ep *ep = (dsmoe_ep *)calloc(1, sizeof *ep);
    if (!ep) /* still agree with the others, on the communicator given */
        return dsmoe_ep_agree(comm, dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY,
                                                 "dsmoe_ep_create: out of memory"));
    dsmoe_status st = DSMOE_OK;
    ep->comm = MPI_COMM_NULL;
    MPI_Comm_dup(comm, &ep->comm);
    MPI_Comm_rank(ep->comm, &ep->rank);
    MPI_Comm_size(ep->comm, &ep->R);
    ep->flags = flags;
    if (!moe || !out)
        st = dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_ep_create: NULL %s",
                          !moe ? "layer" : "out");
    else if (flags & ~(unsigned)DSMOE_EP_SHARDED)
        st = dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_ep_create: unknown flags %#x",
                          flags);
    if (st == DSMOE_OK) {
        ep->moe = moe;
        ep->cfg = *dsmoe_moe_get_config(moe);
        st = ep_setup(ep, bounds);
    }
    st = dsmoe_ep_agree(ep->comm, st);
    if (st == DSMOE_OK) {
        int bad = ep_first_differing(ep, ep_config_hash(ep));
        if (bad >= 0)
            st = dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                              "dsmoe_ep_create: the layer config (or the expert bounds) of rank "
                              "%d differs from rank 0's: every rank must load the same layer",
                              bad);
    }
    if (st == DSMOE_OK) {
        int bad = ep_first_differing(ep, ep_weight_hash(ep));
        if (bad >= 0)
            st = dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                              "dsmoe_ep_create: the weights or bias of rank %d differ from rank "
                              "0's: every rank must load the same layer", bad);
    }
    if (st != DSMOE_OK || !out) {
        dsmoe_ep_free(ep);
        return st;
    }
    *out = ep;
    return DSMOE_OK;
}

int dsmoe_ep_rank(const dsmoe_ep *ep) { return ep ? ep->rank : -1; }
int dsmoe_ep_size(const dsmoe_ep *ep) { return ep ? ep->R : 0; }
void dsmoe_ep_experts(const dsmoe_ep *ep, int r, int32_t *first, int32_t *last) {
    if (!ep || r < 0 || r >= ep->R) return;
    if (first) *first = ep->bounds[r];
    if (last) *last = ep->bounds[r + 1] - 1;
}
const dsmoe_moe_routing *dsmoe_ep_last_routing(const dsmoe_ep *ep) {
    return ep && ep->have_fwd ? &ep->routing : NULL;
}
const int64_t *dsmoe_ep_global_counts(const dsmoe_ep *ep) {
    return ep && ep->have_fwd ? (const int64_t *)ep->gcounts.p : NULL;
}

static int ep_allreduce_i64(int64_t *values, int64_t n, void *user) {
    const dsmoe_ep *ep = (const dsmoe_ep *)user;
    if (n > INT_MAX) return 1;
    return MPI_Allreduce(MPI_IN_PLACE, values, (int)n, MPI_INT64_T, MPI_SUM, ep->comm) !=
           MPI_SUCCESS;
}
void dsmoe_ep_attach_balancer(dsmoe_ep *ep, dsmoe_balancer *b) {
    if (ep && b) dsmoe_balancer_set_allreduce(b, ep_allreduce_i64, ep);
}

/* ---------------------------------------------------------------- products -- */

/* C (n, nout) [ldc] = X (n, k) · W (nout, k)ᵀ as moe.c's moe_product decides. */
static void ep_product(float *C, int ldc, const float *X, int n, const float *W, int nout, int k,
                       int sgemm) {
    if (n <= 0) return;
    if (sgemm) {
        dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__TRANS, n, nout, k, 1.0f, X, k, W, k, 0.0f, C, ldc);
        return;
    }
    const float *rows[DSMOE__MOE_SKINNY_N];
    for (int p0 = 0; p0 < n; p0 += DSMOE__MOE_SKINNY_N) {
        const int np = n - p0 < DSMOE__MOE_SKINNY_N ? n - p0 : DSMOE__MOE_SKINNY_N;
        for (int i = 0; i < np; i++) rows[i] = X + (size_t)(p0 + i) * (size_t)k;
        dsmoe__moe_gemm_nt(C + (size_t)p0 * (size_t)ldc, ldc, rows, np, W, DSMOE_DTYPE_F32, 0,
                           nout, k);
    }
}

static void ep_expert_forward(const float *W1, const float *W2, int D, int f, const float *X,
                              int n, float *GU, float *H, float *Y, int sgemm) {
    const dsmoe__kernel_table *kt = dsmoe__kernels();
    ep_product(GU, 2 * f, X, n, W1, 2 * f, D, sgemm);
    for (int i = 0; i < n; i++)
        kt->swiglu(H + (size_t)i * f, GU + (size_t)i * 2 * f, GU + (size_t)i * 2 * f + f, f);
    ep_product(Y, D, H, n, W2, D, f, sgemm);
}

/* moe.c's moe_expert_backward_rows. */
static void ep_expert_backward_rows(const float *W1, const float *W2, int D, int f, int n,
                                    const float *dY, const float *GU, float *dH, float *dGU,
                                    float *dX) {
    const dsmoe__kernel_table *kt = dsmoe__kernels();
    dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__NOTRANS, n, f, D, 1.0f, dY, D, W2, f, 0.0f, dH, f);
    memset(dGU, 0, (size_t)n * 2 * (size_t)f * sizeof(float));
    for (int i = 0; i < n; i++) {
        const float *gu = GU + (size_t)i * 2 * f;
        float *dgu = dGU + (size_t)i * 2 * f;
        kt->swiglu_backward(dgu, dgu + f, dH + (size_t)i * f, gu, gu + f, f);
    }
    dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__NOTRANS, n, D, 2 * f, 1.0f, dGU, 2 * f, W1, D, 0.0f, dX, D);
}

/* ---------------------------------------------------------------- forward -- */

/* Alltoallv of `unit`-element records: per rank counts (records) and offsets. */
static void ep_alltoallv(dsmoe_ep *ep, const void *sbuf, const int *scnt, const int64_t *soff,
                         void *rbuf, const int *rcnt, const int64_t *roff, int unit,
                         MPI_Datatype type) {
    for (int r = 0; r < ep->R; r++) {
        ep->sc[r] = scnt[r] * unit;
        ep->sd[r] = (int)(soff[r] * unit);
        ep->rc[r] = rcnt[r] * unit;
        ep->rd[r] = (int)(roff[r] * unit);
    }
    MPI_Alltoallv(sbuf, ep->sc, ep->sd, type, rbuf, ep->rc, ep->rd, type, ep->comm);
}

/* Global 256-token blocks: the product path of the single process for global block b. */
static int ep_block_sgemm(const dsmoe_ep *ep, int64_t b, int skinny) {
    if (ep->Tg <= DSMOE_MOE_DECODE_MAX_T) return 0;
    int64_t n = ep->Tg - b * DSMOE_MOE_ROW_BLOCK;
    if (n > DSMOE_MOE_ROW_BLOCK) n = DSMOE_MOE_ROW_BLOCK;
    return n > skinny;
}

/* Buffers of the owner side for T tokens (routing padded to Tr rows). */
static int ep_grow_owner(dsmoe_ep *ep, int64_t T, int64_t Tr, int nt) {
    const size_t D = (size_t)ep->D, E = (size_t)ep->E, K = (size_t)ep->K, Fs = (size_t)ep->Fs;
    const size_t TK = (size_t)T * K, Tz = (size_t)T, Trz = (size_t)Tr;
    int ok = ep_grow(&ep->rws, dsmoe_router_workspace_size(&ep->cfg.router, Tr, ep->D,
                                                           DSMOE_DTYPE_F32, nt)) &&
             ep_grow(&ep->xpad, (size_t)(EP_ROUTER_SMALL_T + 1) * D * 4) &&
             ep_grow(&ep->indices, Trz * K * 4) && ep_grow(&ep->weights, Trz * K * 4) &&
             ep_grow(&ep->scores, Trz * E * 4) && ep_grow(&ep->logits, Trz * E * 4) &&
             ep_grow(&ep->asg_pos, TK * 8 + 8) && ep_grow(&ep->srow_tok, TK * 4 + 4) &&
             ep_grow(&ep->xsend, TK * D * 4 + 4) && ep_grow(&ep->msend, TK * 12 + 12) &&
             ep_grow(&ep->yret, TK * D * 4 + 4);
    if (ok && Fs)
        ok = ep_grow(&ep->GUs, Tz * 2 * Fs * 4 + 4) && ep_grow(&ep->Hs, Tz * Fs * 4 + 4) &&
             ep_grow(&ep->Ys, Tz * D * 4 + 4);
    if (ok && ep->train) {
        ok = ep_grow(&ep->dweights, TK * 4 + 4) && ep_grow(&ep->dlogits, Tz * E * 4 + 4) &&
             ep_grow(&ep->dysend, TK * D * 4 + 4) && ep_grow(&ep->dxret, TK * D * 4 + 4) &&
             ep_grow(&ep->dxtmp, Tz * D * 4 + 4);
        if (ok && Fs)
            ok = ep_grow(&ep->dHs, Tz * Fs * 4 + 4) && ep_grow(&ep->dGUs, Tz * 2 * Fs * 4 + 4) &&
                 ep_grow(&ep->dXs, Tz * D * 4 + 4);
    }
    return ok;
}

/* Buffers of the expert side for n_rows token rows and A assignments. */
static int ep_grow_expert(dsmoe_ep *ep, int64_t n_rows, int64_t A) {
    const size_t D = (size_t)ep->D, F = (size_t)ep->F, Az = (size_t)A, N = (size_t)n_rows;
    size_t max_tasks = Az / DSMOE_MOE_ROW_BLOCK + (size_t)ep->ne + 4;
    size_t max_wtasks = (size_t)(ep->ne + 1) * ((2 * F + D) / EP_WROW_BLOCK + 2);
    int ok = ep_grow(&ep->xrecv, N * D * 4 + 4) && ep_grow(&ep->mrecv, Az * 12 + 12) &&
             ep_grow(&ep->slot, Az * 8 + 8) && ep_grow(&ep->Xg, Az * D * 4 + 4) &&
             ep_grow(&ep->GU, Az * 2 * F * 4 + 4) && ep_grow(&ep->H, Az * F * 4 + 4) &&
             ep_grow(&ep->Ye, Az * D * 4 + 4) && ep_grow(&ep->ysend, Az * D * 4 + 4) &&
             ep_grow(&ep->tasks, max_tasks * sizeof(ep_task)) &&
             ep_grow(&ep->wtasks, max_wtasks * sizeof(ep_task));
    if (ok && ep->train)
        ok = ep_grow(&ep->dyrecv, N * D * 4 + 4) && ep_grow(&ep->dYe, Az * D * 4 + 4) &&
             ep_grow(&ep->dH, Az * F * 4 + 4) && ep_grow(&ep->dGU, Az * 2 * F * 4 + 4) &&
             ep_grow(&ep->dXg, Az * D * 4 + 4) && ep_grow(&ep->dxsend, Az * D * 4 + 4);
    return ok;
}

/* Shared experts on the local tokens, in the intersections with the global blocks. */
static void ep_shared_forward(dsmoe_ep *ep, const float *x, int nt) {
    if (!ep->Fs || ep->T == 0) return;
    const int D = ep->D, fs = ep->Fs, sk = dsmoe__moe_skinny_max(DSMOE_DTYPE_F32);
    const int64_t b0 = ep->g0 / DSMOE_MOE_ROW_BLOCK,
                  b1 = (ep->g0 + ep->T - 1) / DSMOE_MOE_ROW_BLOCK;
    float *GUs = (float *)ep->GUs.p, *Hs = (float *)ep->Hs.p, *Ys = (float *)ep->Ys.p;
    (void)nt;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t b = b0; b <= b1; b++) {
        int64_t lo = b * DSMOE_MOE_ROW_BLOCK, hi = lo + DSMOE_MOE_ROW_BLOCK;
        if (lo < ep->g0) lo = ep->g0;
        if (hi > ep->g0 + ep->T) hi = ep->g0 + ep->T;
        const size_t t0 = (size_t)(lo - ep->g0);
        ep_expert_forward(ep->sw1, ep->sw2, D, fs, x + t0 * (size_t)D, (int)(hi - lo),
                          GUs + t0 * 2 * (size_t)fs, Hs + t0 * (size_t)fs, Ys + t0 * (size_t)D,
                          ep_block_sgemm(ep, b, sk));
    }
}

dsmoe_status dsmoe_ep_forward(dsmoe_ep *ep, float *y, const float *x, int64_t T, int n_threads) {
    if (!ep) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_ep_forward: NULL ep");
    ep->have_fwd = 0;
    ep->have_stats = 0;
    const int R = ep->R, nt = ep_nthreads(ep, n_threads);
    const int32_t D = ep->D, E = ep->E, K = ep->K;
    const size_t Dz = (size_t)D;
    dsmoe_status st = DSMOE_OK;
    if (T < 0)
        st = dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_ep_forward: T = %lld < 0",
                          (long long)T);
    else if (T > 0 && (!y || !x))
        st = dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_ep_forward: NULL %s",
                          !y ? "y" : "x");
    else if (T > (int64_t)INT_MAX / (K > 0 ? K : 1) / (D > 3 ? D : 3))
        st = dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                          "dsmoe_ep_forward: T = %lld tokens of %d floats exceed MPI's int counts",
                          (long long)T, (int)D);
    /* 1. the global batch: every rank's T (-1 for a rank that failed its checks) */
    int64_t Tmine = st == DSMOE_OK ? T : -1, Tall_sum = 0, Tbefore = 0;
    int64_t *Tall = (int64_t *)ep->s_rows_off; /* R + 1 scratch values, rewritten below */
    MPI_Allgather(&Tmine, 1, MPI_INT64_T, Tall, 1, MPI_INT64_T, ep->comm);
    int any_bad = 0;
    for (int r = 0; r < R; r++) {
        if (Tall[r] < 0) any_bad = 1;
        if (r < ep->rank) Tbefore += Tall[r] < 0 ? 0 : Tall[r];
        Tall_sum += Tall[r] < 0 ? 0 : Tall[r];
    }
    if (any_bad) return dsmoe_ep_agree(ep->comm, st == DSMOE_OK ? DSMOE_OK : st);
    ep->T = T;
    ep->Tg = Tall_sum;
    ep->g0 = Tbefore;
    /* 2. route (padded to the single process's projection path) */
    const int64_t Tr = (ep->Tg > EP_ROUTER_SMALL_T && T > 0 && T <= EP_ROUTER_SMALL_T)
                           ? EP_ROUTER_SMALL_T + 1 : T;
    if (!ep_grow_owner(ep, T, Tr, nt))
        st = dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "dsmoe_ep_forward: out of memory for %lld tokens",
                          (long long)T);
    int32_t *idx = (int32_t *)ep->indices.p;
    float *wts = (float *)ep->weights.p;
    if (st == DSMOE_OK && T > 0 && x) {
        const float *xr = x;
        if (Tr != T) {
            float *xp = (float *)ep->xpad.p;
            memset(xp, 0, (size_t)Tr * Dz * 4);
            memcpy(xp, x, (size_t)T * Dz * 4);
            xr = xp;
        }
        dsmoe_router_output ro;
        memset(&ro, 0, sizeof ro);
        ro.indices = idx;
        ro.weights = wts;
        ro.scores = (float *)ep->scores.p;
        ro.logits = (float *)ep->logits.p;
        st = dsmoe_router_forward_hidden(&ep->cfg.router, &ro, xr, ep->Wg, DSMOE_DTYPE_F32, D,
                                         ep->cfg.router.use_bias ? dsmoe_moe_bias(ep->moe) : NULL,
                                         Tr, ep->rws.p, ep->rws.size, nt);
    }
    st = dsmoe_ep_agree(ep->comm, st);
    if (st != DSMOE_OK) return st;
    if (T > 0 && (!x || !y)) return DSMOE_STATUS_INTERNAL; /* refused above, on every rank */
    int64_t *counts = (int64_t *)ep->counts.p;
    memset(counts, 0, (size_t)E * sizeof(int64_t));
    dsmoe__count_experts(counts, idx, T * K);

    /* 3. per destination: token rows (once per token and rank) and assignments */
    int *last = ep->sc; /* last token seen per destination */
    for (int q = 0; q < R; q++) {
        ep->s_rows[q] = 0;
        ep->s_asg[q] = 0;
        last[q] = -1;
    }
    int64_t reached = 0, remote_asg = 0;
    for (int64_t t = 0; t < T; t++)
        for (int32_t k = 0; k < K; k++) {
            int q = ep->owner[idx[t * K + k]];
            if (last[q] != (int)t) {
                last[q] = (int)t;
                ep->s_rows[q]++;
                reached++;
            }
            ep->s_asg[q]++;
            if (q != ep->rank) remote_asg++;
        }
    ep->s_rows_off[0] = ep->s_asg_off[0] = 0;
    for (int q = 0; q < R; q++) {
        ep->s_rows_off[q + 1] = ep->s_rows_off[q] + ep->s_rows[q];
        ep->s_asg_off[q + 1] = ep->s_asg_off[q] + ep->s_asg[q];
    }
    {
        int *rowpos = ep->sd, *asgpos = ep->rc;
        for (int q = 0; q < R; q++) {
            last[q] = -1;
            rowpos[q] = (int)ep->s_rows_off[q];
            asgpos[q] = (int)ep->s_asg_off[q];
        }
        float *xs = (float *)ep->xsend.p;
        int32_t *ms = (int32_t *)ep->msend.p, *srow_tok = (int32_t *)ep->srow_tok.p;
        int64_t *asg_pos = (int64_t *)ep->asg_pos.p;
        for (int64_t t = 0; t < T; t++)
            for (int32_t k = 0; k < K; k++) {
                const int32_t e = idx[t * K + k];
                const int q = ep->owner[e];
                if (last[q] != (int)t) {
                    last[q] = (int)t;
                    srow_tok[rowpos[q]] = (int32_t)t;
                    memcpy(xs + (size_t)rowpos[q] * Dz, x + (size_t)t * Dz, Dz * 4);
                    rowpos[q]++;
                }
                const int a = asgpos[q]++;
                ms[3 * a] = rowpos[q] - 1 - (int)ep->s_rows_off[q];
                ms[3 * a + 1] = e;
                memcpy(&ms[3 * a + 2], &wts[t * K + k], 4);
                asg_pos[t * K + k] = a;
            }
    }
    /* 4. counts exchange, then the rows and the assignments */
    MPI_Alltoall(ep->s_rows, 1, MPI_INT, ep->r_rows, 1, MPI_INT, ep->comm);
    MPI_Alltoall(ep->s_asg, 1, MPI_INT, ep->r_asg, 1, MPI_INT, ep->comm);
    ep->r_rows_off[0] = ep->r_asg_off[0] = 0;
    for (int q = 0; q < R; q++) {
        ep->r_rows_off[q + 1] = ep->r_rows_off[q] + ep->r_rows[q];
        ep->r_asg_off[q + 1] = ep->r_asg_off[q] + ep->r_asg[q];
    }
    ep->n_rows = ep->r_rows_off[R];
    ep->n_asg = ep->r_asg_off[R];
    st = DSMOE_OK;
    if (ep->n_rows > INT_MAX / D || ep->n_asg > INT_MAX / (D > 3 ? D : 3))
        st = dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                          "dsmoe_ep_forward: rank %d would receive %lld rows of %d floats, over "
                          "MPI's int counts (use fewer tokens per step)",
                          ep->rank, (long long)ep->n_asg, (int)D);
    else if (!ep_grow_expert(ep, ep->n_rows, ep->n_asg))
        st = dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY,
                          "dsmoe_ep_forward: out of memory for %lld received rows",
                          (long long)ep->n_asg);
    st = dsmoe_ep_agree(ep->comm, st);
    if (st != DSMOE_OK) return st;
    ep_alltoallv(ep, ep->xsend.p, ep->s_rows, ep->s_rows_off, ep->xrecv.p, ep->r_rows,
                 ep->r_rows_off, D, MPI_FLOAT);
    ep_alltoallv(ep, ep->msend.p, ep->s_asg, ep->s_asg_off, ep->mrecv.p, ep->r_asg,
                 ep->r_asg_off, 3, MPI_INT);

    /* 5. the rank's experts: stable counting sort by expert of the received
     * assignments (source rank, token, k order = global order), row blocks */
    const int32_t *mr = (const int32_t *)ep->mrecv.p;
    int64_t *ecnt = (int64_t *)ep->ecnt.p, *eoff = (int64_t *)ep->eoff.p;
    int64_t *slot = (int64_t *)ep->slot.p;
    for (int32_t i = 0; i < ep->ne; i++) ecnt[i] = 0;
    for (int64_t j = 0; j < ep->n_asg; j++) ecnt[mr[3 * j + 1] - ep->e0]++;
    eoff[0] = 0;
    for (int32_t i = 0; i < ep->ne; i++) eoff[i + 1] = eoff[i] + ecnt[i];
    for (int32_t i = 0; i < ep->ne; i++) ecnt[i] = 0;
    {
        int src = 0;
        float *Xg = (float *)ep->Xg.p;
        const float *xr = (const float *)ep->xrecv.p;
        for (int64_t j = 0; j < ep->n_asg; j++) {
            while (j >= ep->r_asg_off[src + 1]) src++;
            const int32_t le = mr[3 * j + 1] - ep->e0;
            const int64_t s = eoff[le] + ecnt[le]++;
            slot[j] = s;
            const int64_t row = ep->r_rows_off[src] + mr[3 * j];
            memcpy(Xg + (size_t)s * Dz, xr + (size_t)row * Dz, Dz * 4);
        }
    }
    ep_task *tasks = (ep_task *)ep->tasks.p;
    const int sk = dsmoe__moe_skinny_max(DSMOE_DTYPE_F32);
    int64_t ntask = 0;
    for (int32_t i = 0; i < ep->ne; i++)
        for (int64_t r = 0; r < ecnt[i]; r += DSMOE_MOE_ROW_BLOCK) {
            int64_t n = ecnt[i] - r < DSMOE_MOE_ROW_BLOCK ? ecnt[i] - r : DSMOE_MOE_ROW_BLOCK;
            tasks[ntask].e = i;
            tasks[ntask].r0 = eoff[i] + r;
            tasks[ntask].n = (int32_t)n;
            tasks[ntask].sgemm = n > sk;
            ntask++;
        }
    ep->n_tasks = ntask;
    const double cpu0 = ep_cpu_seconds();
    {
        const int F = ep->F;
        float *Xg = (float *)ep->Xg.p, *GU = (float *)ep->GU.p, *H = (float *)ep->H.p,
              *Ye = (float *)ep->Ye.p;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
        for (int64_t i = 0; i < ntask; i++) {
            const ep_task tk = tasks[i];
            const size_t r0 = (size_t)tk.r0;
            ep_expert_forward(ep->w1[tk.e], ep->w2[tk.e], D, F, Xg + r0 * Dz, tk.n,
                              GU + r0 * 2 * (size_t)F, H + r0 * (size_t)F, Ye + r0 * Dz, tk.sgemm);
        }
        ep->cpu_s = ep_cpu_seconds() - cpu0;
        float *ys = (float *)ep->ysend.p;
        for (int64_t j = 0; j < ep->n_asg; j++)
            memcpy(ys + (size_t)j * Dz, Ye + (size_t)slot[j] * Dz, Dz * 4);
    }
    /* the shared experts overlap nothing: run them before the combine exchange */
    ep_shared_forward(ep, x, nt);
    /* 6. combine: outputs back to the tokens' ranks, w_k·y_k in k order + shared */
    ep_alltoallv(ep, ep->ysend.p, ep->r_asg, ep->r_asg_off, ep->yret.p, ep->s_asg,
                 ep->s_asg_off, D, MPI_FLOAT);
    {
        const float *yr = (const float *)ep->yret.p, *Ys = (const float *)ep->Ys.p;
        const int64_t *asg_pos = (const int64_t *)ep->asg_pos.p;
        const int has_shared = ep->Fs > 0;
#pragma omp parallel for schedule(static) num_threads(nt)
        for (int64_t t = 0; t < T; t++) {
            float *yt = y + (size_t)t * Dz;
            for (size_t d = 0; d < Dz; d++) yt[d] = 0.0f;
            for (int32_t k = 0; k < K; k++) {
                const float wk = wts[t * K + k];
                const float *ye = yr + (size_t)asg_pos[t * K + k] * Dz;
                for (size_t d = 0; d < Dz; d++) yt[d] = yt[d] + wk * ye[d];
            }
            if (has_shared) {
                const float *ys = Ys + (size_t)t * Dz;
                for (size_t d = 0; d < Dz; d++) yt[d] = yt[d] + ys[d];
            }
        }
    }
    /* 7. global counts and the step's figures */
    memcpy(ep->gcounts.p, counts, (size_t)E * sizeof(int64_t));
    MPI_Allreduce(MPI_IN_PLACE, ep->gcounts.p, E, MPI_INT64_T, MPI_SUM, ep->comm);
    {
        const int64_t rowb = (int64_t)Dz * 4, asgb = 12;
        int64_t mine[9];
        int64_t self_rows_s = ep->s_rows[ep->rank], self_asg_s = ep->s_asg[ep->rank];
        int64_t self_rows_r = ep->r_rows[ep->rank], self_asg_r = ep->r_asg[ep->rank];
        int64_t rows_s = ep->s_rows_off[R] - self_rows_s, asg_s = ep->s_asg_off[R] - self_asg_s;
        int64_t rows_r = ep->n_rows - self_rows_r, asg_r = ep->n_asg - self_asg_r;
        int64_t disp_s = rows_s * rowb + asg_s * asgb;
        mine[0] = T;
        mine[1] = ep->n_rows;
        mine[2] = ep->n_asg;
        mine[3] = disp_s + asg_r * rowb;                 /* dispatch out + combine out */
        mine[4] = rows_r * rowb + asg_r * asgb + asg_s * rowb;
        mine[5] = disp_s;
        mine[6] = reached;
        mine[7] = remote_asg;
        memcpy(&mine[8], &ep->cpu_s, sizeof(double));
        int64_t *all = ep->statbuf;
        MPI_Allgather(mine, 9, MPI_INT64_T, all, 9, MPI_INT64_T, ep->comm);
        {
            int64_t tot_asg = 0, max_asg = 0, tot_reached = 0, bytes = 0;
            double max_cpu = 0.0;
            for (int r = 0; r < R; r++) {
                const int64_t *v = all + (size_t)r * 9;
                dsmoe_ep_rank_stats *s = &ep->stats[r];
                s->first_expert = ep->bounds[r];
                s->last_expert = ep->bounds[r + 1] - 1;
                s->tokens = v[0];
                s->tokens_in = v[1];
                s->assignments_in = v[2];
                s->bytes_sent = v[3];
                s->bytes_received = v[4];
                s->dispatch_bytes_sent = v[5];
                s->ranks_reached = v[6];
                s->remote_assignments = v[7];
                memcpy(&s->expert_cpu_s, &v[8], sizeof(double));
                if (s->expert_cpu_s > max_cpu) max_cpu = s->expert_cpu_s;
                tot_asg += v[2];
                if (v[2] > max_asg) max_asg = v[2];
                tot_reached += v[6];
                bytes += v[3];
            }
            ep->gstats.ranks = R;
            ep->gstats.tokens = ep->Tg;
            ep->gstats.mean_ranks_per_token = ep->Tg ? (double)tot_reached / (double)ep->Tg : 0.0;
            ep->gstats.busiest_load_ratio =
                tot_asg ? (double)max_asg / ((double)tot_asg / (double)R) : 0.0;
            ep->gstats.bytes_total = bytes;
            ep->gstats.max_expert_cpu_s = max_cpu;
            ep->gstats.per_rank = ep->stats;
            ep->have_stats = 1;
        }
    }
    ep->routing.T = T;
    ep->routing.indices = idx;
    ep->routing.weights = wts;
    ep->routing.scores = (const float *)ep->scores.p;
    ep->routing.logits = (const float *)ep->logits.p;
    ep->routing.counts = counts;
    ep->routing.n_dropped = 0;
    ep->routing.capacity = -1;
    ep->have_fwd = 1;
    return DSMOE_OK;
}

/* ---------------------------------------------------------------- backward -- */

dsmoe_status dsmoe_ep_backward(dsmoe_ep *ep, float *dx, const float *dy, const float *x,
                               const float *dlogits_extra, int64_t T, int n_threads) {
    if (!ep) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_ep_backward: NULL ep");
    dsmoe_status st = DSMOE_OK;
    if (!ep->train || !ep->dWg)
        st = dsmoe__error(DSMOE_STATUS_UNSUPPORTED,
                          "dsmoe_ep_backward: the layer was created without train = 1");
    else if (!ep->have_fwd)
        st = dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                          "dsmoe_ep_backward: no successful forward to differentiate");
    else if (T != ep->T)
        st = dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                          "dsmoe_ep_backward: T = %lld but the last forward had T = %lld",
                          (long long)T, (long long)ep->T);
    else if (T > 0 && (!dy || !x))
        st = dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_ep_backward: NULL %s",
                          !dy ? "dy" : "x");
    st = dsmoe_ep_agree(ep->comm, st);
    if (st != DSMOE_OK) return st;
    if (T > 0 && (!dy || !x)) return DSMOE_STATUS_INTERNAL; /* refused above, on every rank */
    const int nt = ep_nthreads(ep, n_threads);
    const int32_t D = ep->D, E = ep->E, K = ep->K, F = ep->F, Fs = ep->Fs;
    const size_t Dz = (size_t)D;
    const float *yr = (const float *)ep->yret.p;
    const int64_t *asg_pos = (const int64_t *)ep->asg_pos.p;
    float *dweights = (float *)ep->dweights.p;

    /* 0. dweights = dy·Y (owner), dy rows out as the dispatch went */
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t t = 0; t < T; t++) {
        const float *dyt = dy + (size_t)t * Dz;
        for (int32_t k = 0; k < K; k++) {
            dweights[t * K + k] = dsmoe__dot16(dyt, yr + (size_t)asg_pos[t * K + k] * Dz, Dz);
        }
    }
    {
        const int32_t *srow_tok = (const int32_t *)ep->srow_tok.p;
        float *ds = (float *)ep->dysend.p;
        const int64_t nrows = ep->s_rows_off[ep->R];
        for (int64_t r = 0; r < nrows; r++)
            memcpy(ds + (size_t)r * Dz, dy + (size_t)srow_tok[r] * Dz, Dz * 4);
    }
    ep_alltoallv(ep, ep->dysend.p, ep->s_rows, ep->s_rows_off, ep->dyrecv.p, ep->r_rows,
                 ep->r_rows_off, D, MPI_FLOAT);

    /* 1. expert side: dY = w·dy per assignment, phase A per row block, phase B weights */
    {
        const int32_t *mr = (const int32_t *)ep->mrecv.p;
        const int64_t *slot = (const int64_t *)ep->slot.p;
        const float *dyr = (const float *)ep->dyrecv.p;
        float *dYe = (float *)ep->dYe.p;
        int src = 0;
        for (int64_t j = 0; j < ep->n_asg; j++) {
            while (j >= ep->r_asg_off[src + 1]) src++;
            float wk;
            memcpy(&wk, &mr[3 * j + 2], 4);
            const float *g = dyr + (size_t)(ep->r_rows_off[src] + mr[3 * j]) * Dz;
            float *o = dYe + (size_t)slot[j] * Dz;
            for (size_t d = 0; d < Dz; d++) o[d] = wk * g[d];
        }
        const ep_task *tasks = (const ep_task *)ep->tasks.p;
        float *GU = (float *)ep->GU.p, *dH = (float *)ep->dH.p, *dGU = (float *)ep->dGU.p,
              *dXg = (float *)ep->dXg.p;
        const int64_t ntask = ep->n_tasks;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
        for (int64_t i = 0; i < ntask; i++) {
            const ep_task tk = tasks[i];
            const size_t r0 = (size_t)tk.r0;
            ep_expert_backward_rows(ep->w1[tk.e], ep->w2[tk.e], D, F, tk.n, dYe + r0 * Dz,
                                    GU + r0 * 2 * (size_t)F, dH + r0 * (size_t)F,
                                    dGU + r0 * 2 * (size_t)F, dXg + r0 * Dz);
        }
        /* phase B: task e (local expert), n = 0: W1 rows, 1: W2 rows */
        ep_task *wt = (ep_task *)ep->wtasks.p;
        const int64_t *ecnt = (const int64_t *)ep->ecnt.p, *eoff = (const int64_t *)ep->eoff.p;
        int64_t nw = 0;
        for (int32_t e = 0; e < ep->ne; e++) {
            if (ecnt[e] == 0) continue;
            for (int64_t r = 0; r < 2 * (int64_t)F; r += EP_WROW_BLOCK)
                wt[nw++] = (ep_task){e, 0, r, 0};
            for (int64_t r = 0; r < D; r += EP_WROW_BLOCK) wt[nw++] = (ep_task){e, 1, r, 0};
        }
        const float *Xg = (const float *)ep->Xg.p, *H = (const float *)ep->H.p;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
        for (int64_t i = 0; i < nw; i++) {
            const ep_task tk = wt[i];
            const int r0 = (int)tk.r0, e = tk.e, n = (int)ecnt[e];
            const size_t o = (size_t)eoff[e];
            if (tk.n == 0) {
                int nr = 2 * F - r0 < EP_WROW_BLOCK ? 2 * F - r0 : EP_WROW_BLOCK;
                dsmoe__sgemm(DSMOE__TRANS, DSMOE__NOTRANS, nr, D, n, 1.0f,
                             dGU + o * 2 * (size_t)F + r0, 2 * F, Xg + o * Dz, D, 1.0f,
                             ep->dw1[e] + (size_t)r0 * Dz, D);
            } else {
                int nr = D - r0 < EP_WROW_BLOCK ? D - r0 : EP_WROW_BLOCK;
                dsmoe__sgemm(DSMOE__TRANS, DSMOE__NOTRANS, nr, F, n, 1.0f, dYe + o * Dz + r0, D,
                             H + o * (size_t)F, F, 1.0f, ep->dw2[e] + (size_t)r0 * (size_t)F, F);
            }
        }
        float *xs = (float *)ep->dxsend.p;
        for (int64_t j = 0; j < ep->n_asg; j++)
            memcpy(xs + (size_t)j * Dz, dXg + (size_t)slot[j] * Dz, Dz * 4);
    }

    /* 2. owner: router backward, shared experts (phase A per global block part) */
    float *dlogits = (float *)ep->dlogits.p;
    if (T > 0) {
        memset(dlogits, 0, (size_t)T * E * sizeof(float));
        st = dsmoe_router_backward(&ep->cfg.router, dlogits, dweights,
                                   (const int32_t *)ep->indices.p, (const float *)ep->scores.p, T,
                                   nt);
        if (st == DSMOE_OK && dlogits_extra) {
            const size_t n = (size_t)T * E;
            for (size_t i = 0; i < n; i++) dlogits[i] = dlogits[i] + dlogits_extra[i];
        }
    }
    const int64_t b0 = ep->g0 / DSMOE_MOE_ROW_BLOCK,
                  b1 = T > 0 ? (ep->g0 + T - 1) / DSMOE_MOE_ROW_BLOCK : b0 - 1;
    if (st == DSMOE_OK && Fs && T > 0) {
        float *GUs = (float *)ep->GUs.p, *dHs = (float *)ep->dHs.p, *dGUs = (float *)ep->dGUs.p,
              *dXs = (float *)ep->dXs.p;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
        for (int64_t b = b0; b <= b1; b++) {
            int64_t lo = b * DSMOE_MOE_ROW_BLOCK, hi = lo + DSMOE_MOE_ROW_BLOCK;
            if (lo < ep->g0) lo = ep->g0;
            if (hi > ep->g0 + T) hi = ep->g0 + T;
            const size_t t0 = (size_t)(lo - ep->g0);
            ep_expert_backward_rows(ep->sw1, ep->sw2, D, Fs, (int)(hi - lo), dy + t0 * Dz,
                                    GUs + t0 * 2 * (size_t)Fs, dHs + t0 * (size_t)Fs,
                                    dGUs + t0 * 2 * (size_t)Fs, dXs + t0 * Dz);
        }
        /* this rank's part of the shared weight gradients, then the gate's */
        const int n1 = (2 * Fs + EP_WROW_BLOCK - 1) / EP_WROW_BLOCK,
                  n2 = (D + EP_WROW_BLOCK - 1) / EP_WROW_BLOCK;
        const float *Hs = (const float *)ep->Hs.p;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
        for (int i = 0; i < n1 + n2; i++) {
            if (i < n1) {
                int r0 = i * EP_WROW_BLOCK, nr = 2 * Fs - r0 < EP_WROW_BLOCK ? 2 * Fs - r0 : EP_WROW_BLOCK;
                dsmoe__sgemm(DSMOE__TRANS, DSMOE__NOTRANS, nr, D, (int)T, 1.0f, dGUs + r0, 2 * Fs,
                             x, D, 1.0f, ep->dsw1 + (size_t)r0 * Dz, D);
            } else {
                int r0 = (i - n1) * EP_WROW_BLOCK, nr = D - r0 < EP_WROW_BLOCK ? D - r0 : EP_WROW_BLOCK;
                dsmoe__sgemm(DSMOE__TRANS, DSMOE__NOTRANS, nr, Fs, (int)T, 1.0f, dy + r0, D, Hs,
                             Fs, 1.0f, ep->dsw2 + (size_t)r0 * (size_t)Fs, Fs);
            }
        }
    }
    if (st == DSMOE_OK && T > 0) {
        const int ng = (E + EP_WROW_BLOCK - 1) / EP_WROW_BLOCK;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
        for (int i = 0; i < ng; i++) {
            int r0 = i * EP_WROW_BLOCK, nr = E - r0 < EP_WROW_BLOCK ? E - r0 : EP_WROW_BLOCK;
            dsmoe__sgemm(DSMOE__TRANS, DSMOE__NOTRANS, nr, D, (int)T, 1.0f, dlogits + r0, E, x, D,
                         1.0f, ep->dWg + (size_t)r0 * Dz, D);
        }
    }
    /* 3. the experts' input gradients come back as the combine did */
    ep_alltoallv(ep, ep->dxsend.p, ep->r_asg, ep->r_asg_off, ep->dxret.p, ep->s_asg,
                 ep->s_asg_off, D, MPI_FLOAT);
    st = dsmoe_ep_agree(ep->comm, st);
    if (st != DSMOE_OK) return st;
    if (dx && T > 0) {
        const float *dxr = (const float *)ep->dxret.p, *dXs = (const float *)ep->dXs.p;
        float *dxtmp = (float *)ep->dxtmp.p;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
        for (int64_t b = b0; b <= b1; b++) {
            int64_t lo = b * DSMOE_MOE_ROW_BLOCK, hi = lo + DSMOE_MOE_ROW_BLOCK;
            if (lo < ep->g0) lo = ep->g0;
            if (hi > ep->g0 + T) hi = ep->g0 + T;
            const int64_t t0 = lo - ep->g0;
            const int n = (int)(hi - lo);
            dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__NOTRANS, n, D, E, 1.0f,
                         dlogits + (size_t)t0 * (size_t)E, E, ep->Wg, D, 0.0f,
                         dxtmp + (size_t)t0 * Dz, D);
            for (int64_t t = t0; t < t0 + n; t++) {
                float *acc = dxtmp + (size_t)t * Dz;
                for (int32_t k = 0; k < K; k++) {
                    const float *g = dxr + (size_t)asg_pos[t * K + k] * Dz;
                    for (size_t d = 0; d < Dz; d++) acc[d] = acc[d] + g[d];
                }
                if (Fs) {
                    const float *g = dXs + (size_t)t * Dz;
                    for (size_t d = 0; d < Dz; d++) acc[d] = acc[d] + g[d];
                }
                float *dxt = dx + (size_t)t * Dz;
                for (size_t d = 0; d < Dz; d++) dxt[d] = dxt[d] + acc[d];
            }
        }
    }
    return DSMOE_OK;
}

dsmoe_status dsmoe_ep_allreduce_grads(dsmoe_ep *ep) {
    if (!ep) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_ep_allreduce_grads: NULL ep");
    dsmoe_status st = ep->train && ep->dWg
                          ? DSMOE_OK
                          : dsmoe__error(DSMOE_STATUS_UNSUPPORTED,
                                         "dsmoe_ep_allreduce_grads: the layer has no gradients");
    st = dsmoe_ep_agree(ep->comm, st);
    if (st != DSMOE_OK) return st;
    float *bufs[3] = {ep->dWg, ep->dsw1, ep->dsw2};
    size_t ns[3] = {(size_t)ep->E * (size_t)ep->D, 2 * (size_t)ep->Fs * (size_t)ep->D,
                    (size_t)ep->D * (size_t)ep->Fs};
    for (int i = 0; i < 3; i++) {
        if (!bufs[i]) continue;
        for (size_t o = 0; o < ns[i]; o += (size_t)1 << 28) {
            size_t n = ns[i] - o < ((size_t)1 << 28) ? ns[i] - o : ((size_t)1 << 28);
            MPI_Allreduce(MPI_IN_PLACE, bufs[i] + o, (int)n, MPI_FLOAT, MPI_SUM, ep->comm);
        }
    }
    return DSMOE_OK;
}

/* ---------------------------------------------------------------- stats -- */

dsmoe_status dsmoe_ep_get_stats(const dsmoe_ep *ep, dsmoe_ep_stats *out) {
    if (!ep || !out) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_ep_get_stats: NULL");
    if (!ep->have_stats)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "dsmoe_ep_get_stats: no forward has run yet");
    *out = ep->gstats;
    return DSMOE_OK;
}

dsmoe_status dsmoe_ep_stats_write_json(const dsmoe_ep_stats *st, const char *path) {
    if (!st || !path || !st->per_rank)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_ep_stats_write_json: NULL");
    FILE *f = fopen(path, "w");
    if (!f) return dsmoe__error(DSMOE_STATUS_IO, "cannot write '%s'", path);
    fprintf(f, "{\"ranks\": %d, \"tokens\": %lld, \"mean_ranks_per_token\": %.6f, "
               "\"busiest_load_ratio\": %.6f, \"bytes_total\": %lld, \"max_expert_cpu_s\": %.6f, "
               "\"per_rank\": [",
            (int)st->ranks, (long long)st->tokens, st->mean_ranks_per_token,
            st->busiest_load_ratio, (long long)st->bytes_total, st->max_expert_cpu_s);
    for (int r = 0; r < st->ranks; r++) {
        const dsmoe_ep_rank_stats *s = &st->per_rank[r];
        fprintf(f, "%s{\"rank\": %d, \"experts\": [%d, %d], \"tokens\": %lld, \"tokens_in\": %lld, "
                   "\"assignments_in\": %lld, \"bytes_sent\": %lld, \"bytes_received\": %lld, "
                   "\"dispatch_bytes_sent\": %lld, \"remote_assignments\": %lld, \"expert_cpu_s\": %.6f}",
                r ? ", " : "", r, (int)s->first_expert, (int)s->last_expert, (long long)s->tokens,
                (long long)s->tokens_in, (long long)s->assignments_in, (long long)s->bytes_sent,
                (long long)s->bytes_received, (long long)s->dispatch_bytes_sent,
                (long long)s->remote_assignments, s->expert_cpu_s);
    }
    fprintf(f, "]}\n");
    if (fclose(f) != 0) return dsmoe__error(DSMOE_STATUS_IO, "cannot write '%s'", path);
    return DSMOE_OK;
}
