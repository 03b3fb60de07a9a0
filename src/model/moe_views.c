/*
 * moe_views.c — a model's MoE layer run straight from the stored weights (memory-mapped
 * views of any dtype: F32, BF16, F16, F8_E4M3 with block scales), for layers whose
 * experts the dsmoe_moe layer cannot hold as stored (it keeps F32 or BF16 copies).
 *
 *   logits = x · gateᵀ (fp32) → the router (dsmoe_router_forward: the same routing as
 *   the MoE layer) → tokens sorted by expert (counting sort, token order kept) → for each
 *   expert with tokens: gather its rows, down(silu(gate x) ⊙ up x) through wlinear →
 *   shared experts on every token → y[t] = shared[t] + Σ_k w[t,k] · out[t,k], k in order.
 *
 * Threads take whole experts (largest first); each expert's products run on one thread
 * into its own rows, so the result does not depend on the thread count. The shared
 * experts run with all threads over rows. No allocation: the workspace is carved.
 */
#include "model/model_internal.h"

#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct views_sizes {
    int64_t T, D, F, Fs, E, K;
    size_t router_ws, wl;
} views_sizes;

static views_sizes sizes_of(const dsmoe_model_config *c, const dsmoe_router_config *rc, int64_t T,
                            int nt) {
    views_sizes z;
    z.T = T;
    z.D = c->hidden_size;
    z.F = c->moe_intermediate_size;
    z.Fs = (int64_t)c->n_shared_experts * z.F;
    z.E = c->n_routed_experts;
    z.K = c->num_experts_per_tok;
    z.router_ws = dsmoe_router_workspace_size(rc, T, 0, DSMOE_DTYPE_F32, nt);
    int64_t cols = z.D > z.F ? z.D : z.F;
    if (z.Fs > cols) cols = z.Fs;
    z.wl = dsmoe__wlinear_scratch(cols, T);
    return z;
}

/* Per-thread part: gathered rows (T, D), gate and up (T, F) each, expert output rows
 * (T, D), and a wlinear scratch. */
static size_t per_thread(const views_sizes *z) {
    return dsmoe__align64((size_t)(z->T * z->D) * 4) * 2 + dsmoe__align64((size_t)(z->T * z->F) * 4) * 2 +
           z->wl;
}

size_t dsmoe__moe_views_workspace(const dsmoe_model_config *c, const dsmoe_router_config *rc,
                                  int64_t T, int nt) {
    if (nt < 1) nt = 1;
    views_sizes z = sizes_of(c, rc, T, nt);
    size_t s = dsmoe__align64((size_t)(T * z.E) * 4)         /* logits */
               + dsmoe__align64((size_t)(T * z.K) * 4) * 2   /* indices, weights */
               + dsmoe__align64(z.router_ws)                 /* router */
               + dsmoe__align64((size_t)(z.E + 1) * 8) * 2   /* expert offsets, fill */
               + dsmoe__align64((size_t)(T * z.K) * 4)       /* slots sorted by expert */
               + dsmoe__align64((size_t)z.E * 4)             /* experts, largest first */
               + dsmoe__align64((size_t)(T * z.K * z.D) * 4) /* every slot's output */
               + dsmoe__align64((size_t)(T * z.D) * 4)       /* shared output */
               + dsmoe__align64((size_t)(2 * T * z.Fs) * 4)  /* shared gate, up */
               + (size_t)nt * z.wl                           /* wlinear, all threads */
               + (size_t)nt * per_thread(&z);
    return s;
}

/* down(silu(gate x) ⊙ up x) for n rows of x (stride D) into out (n, D). */
static void swiglu_rows(float *out, const float *x, int64_t n, const dsmoe__wmat *g,
                        const dsmoe__wmat *u, const dsmoe__wmat *d, float *hg, float *hu,
                        int64_t F, int64_t D, int nt, void *wl) {
    dsmoe__wlinear(hg, F, x, D, n, g, nt, wl);
    dsmoe__wlinear(hu, F, x, D, n, u, nt, wl);
    for (int64_t i = 0; i < n * F; i++) hg[i] = hg[i] / (1.0f + expf(-hg[i])) * hu[i];
    dsmoe__wlinear(out, D, hg, F, n, d, nt, wl);
}

dsmoe_status dsmoe__moe_views_forward(const dsmoe__moe_views *v, const dsmoe_model_config *c,
                                      const dsmoe_router_config *rc, float *y, const float *x,
                                      int64_t T, int nt, void *ws, size_t ws_size) {
    if (nt < 1) nt = 1;
    if (ws_size < dsmoe__moe_views_workspace(c, rc, T, nt))
        return dsmoe__error(DSMOE_STATUS_WORKSPACE_TOO_SMALL, "MoE (stored weights): workspace too small");
    views_sizes z = sizes_of(c, rc, T, nt);
    const int64_t D = z.D, F = z.F, Fs = z.Fs, E = z.E, K = z.K;
    dsmoe__carver cv = {(char *)ws, ws_size, 0};
    float *logits = (float *)dsmoe__carve(&cv, (size_t)(T * E) * 4);
    int32_t *idx = (int32_t *)dsmoe__carve(&cv, (size_t)(T * K) * 4);
    float *wts = (float *)dsmoe__carve(&cv, (size_t)(T * K) * 4);
    void *rws = dsmoe__carve(&cv, z.router_ws);
    int64_t *off = (int64_t *)dsmoe__carve(&cv, (size_t)(E + 1) * 8);
    int64_t *fill = (int64_t *)dsmoe__carve(&cv, (size_t)(E + 1) * 8);
    int32_t *slots = (int32_t *)dsmoe__carve(&cv, (size_t)(T * K) * 4);
    int32_t *order = (int32_t *)dsmoe__carve(&cv, (size_t)E * 4);
    float *out = (float *)dsmoe__carve(&cv, (size_t)(T * K * D) * 4);
    float *sh = (float *)dsmoe__carve(&cv, (size_t)(T * D) * 4);
    float *shh = (float *)dsmoe__carve(&cv, (size_t)(2 * T * Fs) * 4);
    char *wl_all = (char *)dsmoe__carve(&cv, (size_t)nt * z.wl);
    char *thr = (char *)dsmoe__carve(&cv, (size_t)nt * per_thread(&z));

    /* Route. */
    dsmoe__wlinear(logits, E, x, D, T, &v->gate, nt, wl_all);
    dsmoe_router_output ro = {idx, wts, NULL, NULL, NULL};
    dsmoe_status s = dsmoe_router_forward(rc, &ro, logits, v->bias, T, rws, z.router_ws, nt);
    if (s != DSMOE_OK) return s;

    /* Slots (t, k) sorted by expert, token order kept within an expert. */
    memset(off, 0, (size_t)(E + 1) * 8);
    for (int64_t i = 0; i < T * K; i++) off[idx[i] + 1]++;
    for (int64_t e = 0; e < E; e++) off[e + 1] += off[e];
    int64_t ne = 0;
    memcpy(fill, off, (size_t)E * 8);
    for (int64_t i = 0; i < T * K; i++) slots[fill[idx[i]]++] = (int32_t)i;
    for (int64_t e = 0; e < E; e++)
        if (off[e + 1] > off[e]) order[ne++] = (int32_t)e;
    /* largest first (stable: lower id first among equal counts) */
    for (int64_t i = 1; i < ne; i++) {
        int32_t e = order[i];
        int64_t n = off[e + 1] - off[e], j = i;
        while (j > 0 && off[order[j - 1] + 1] - off[order[j - 1]] < n) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = e;
    }

    /* Routed experts, one thread each. */
    const size_t pt = per_thread(&z);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (nt > 1 && ne > 1)
    for (int64_t q = 0; q < ne; q++) {
        int id = 0;
#ifdef _OPENMP
        id = omp_get_thread_num();
#endif
        char *base = thr + pt * (size_t)id;
        float *xe = (float *)(void *)base;
        float *oe = (float *)(void *)(base + dsmoe__align64((size_t)(T * D) * 4));
        float *hg = (float *)(void *)(base + dsmoe__align64((size_t)(T * D) * 4) * 2);
        float *hu = (float *)(void *)((char *)hg + dsmoe__align64((size_t)(T * F) * 4));
        void *wl = (char *)hu + dsmoe__align64((size_t)(T * F) * 4);
        const int32_t e = order[q];
        const int64_t n = off[e + 1] - off[e];
        const int32_t *sl = slots + off[e];
        for (int64_t r = 0; r < n; r++)
            memcpy(xe + r * D, x + (int64_t)(sl[r] / K) * D, (size_t)D * 4);
        swiglu_rows(oe, xe, n, &v->experts[3 * e], &v->experts[3 * e + 1], &v->experts[3 * e + 2],
                    hg, hu, F, D, 1, wl);
        for (int64_t r = 0; r < n; r++) memcpy(out + (int64_t)sl[r] * D, oe + r * D, (size_t)D * 4);
    }

    /* Shared experts on every token, all threads over rows. */
    if (Fs > 0)
        swiglu_rows(sh, x, T, &v->shared[0], &v->shared[1], &v->shared[2], shh, shh + T * Fs, Fs, D,
                    nt, wl_all);
    /* Combine in k order. */
    for (int64_t t = 0; t < T; t++) {
        float *yr = y + t * D;
        if (Fs > 0) memcpy(yr, sh + t * D, (size_t)D * 4);
        else memset(yr, 0, (size_t)D * 4);
        for (int64_t k = 0; k < K; k++) {
            const float w = wts[t * K + k], *o = out + (t * K + k) * D;
            for (int64_t i = 0; i < D; i++) yr[i] += w * o[i];
        }
    }
    return DSMOE_OK;
}
