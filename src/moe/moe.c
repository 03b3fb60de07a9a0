/*
 * moe.c — the DeepSeekMoE layer (DeepSeek-V3 report eq. 12, SPEC-routing §2 step 9):
 * gate projection and routing (router.c), a stable counting-sort dispatch, routed
 * SwiGLU experts as products on gathered rows (moe_gemm.c's weight-streaming product,
 * or BLIS SGEMM), the weighted combine and the shared experts; the backward pass
 * (BLIS); checkpoint tensors in the Hugging Face names.
 *
 * Per expert e with gathered rows X (n, D):
 *   GU = X · W1ᵀ         W1 = [gate_proj; up_proj] (2F, D), GU = [G | U] (n, 2F)
 *   H  = silu(G) ⊙ U     (n, F)
 *   Y  = H · W2ᵀ         W2 = down_proj (D, F), Y (n, D)
 * and y_t = Σ_k w_tk · Y[slot(t,k)] (k ascending) + Y_shared[t].
 *
 * Backward (for each expert, rows r of the expert, dY_r = w_r · dy_t):
 *   dw_tk = dy_t · Y_r          dH = dY · W2        dGU = swiglu'(dH; G, U)
 *   dX = dGU · W1               dW2 += dYᵀ · H      dW1 += dGUᵀ · X
 *   du = router_backward(dw) + du_extra;   dWg += duᵀ · x;   dx += Σ_k dX_r + dX_shared + du · Wg
 *
 * Bit reproducibility: every parallel loop is over a task list whose boundaries depend
 * only on the routing (never on the thread count); each task calls single-threaded
 * BLIS (src/kernels/blas.h: no lock, so tasks overlap), moe_gemm.c or fixed-order loops,
 * and writes outputs no other task writes.
 */
#include "moe/moe_internal.h"
#include "kernels/kernels.h"

#include "kernels/blas.h"
#include <limits.h>
#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* Weight rows per block in the weight-gradient products and the bf16 conversion,
 * and per chunk of the matrix-vector (decode) path. */
#define MOE_WROW_BLOCK 256
/* Rows (or tokens) ahead that the gathers fetch (moe_prefetch_rows). */
#define MOE_PF_AHEAD 2
/* Rows ahead at which phase 0 of the backward fetches dy's token row. */
#define MOE_PF_ROWS 8
#define MOE_GEMV_CHUNK 512
_Static_assert(MOE_GEMV_CHUNK % 16 == 0, "decode chunks must start on a panel of the packed layout");

/* A unit of parallel work: expert e (E = the shared expert), rows [r0, r0 + n). */
typedef struct moe_task {
    int32_t e;
    int32_t n;
    int64_t r0;
    int64_t cost, idx; /* weight-gradient tasks: rows behind the task, place in the list */
} moe_task;

/* Workspace pointers, carved for max_T tokens and max_threads threads. */
typedef struct moe_ws {
    void *router;
    size_t router_size;
    int32_t *indices;  /* (T, K) */
    float *weights;    /* (T, K) */
    float *scores;     /* (T, E) */
    float *logits;     /* (T, E) */
    int64_t *counts;   /* (E) before drops */
    int64_t *kept;     /* (E) after drops */
    int64_t *offsets;  /* (E + 1) first slot row of each expert */
    int32_t *slot;     /* (T, K) slot row of (t, k), -1 if dropped */
    int32_t *row_tok;  /* (T·K) token of each slot row */
    moe_task *tasks;   /* routed and shared row-block tasks */
    moe_task *wtasks;  /* weight-row-block tasks (backward) / decode chunks */
    float *Xg;         /* (T·K, D) gathered inputs */
    float *GU;         /* (T·K, 2F) */
    float *H;          /* (T·K, F) */
    float *Ye;         /* (T·K, D) */
    float *GUs;        /* (T, 2Fs) shared */
    float *Hs;         /* (T, Fs) */
    float *Ys;         /* (T, D) */
    float *scratch;    /* (threads, MOE_WROW_BLOCK · max(D, Fs)) bf16 widening */
    size_t scratch_stride;
    /* train */
    float *dYe;        /* (T·K, D) */
    float *dH;         /* (T·K, F) */
    float *dGU;        /* (T·K, 2F) */
    float *dXg;        /* (T·K, D) */
    float *dHs;        /* (T, Fs) */
    float *dGUs;       /* (T, 2Fs) */
    float *dXs;        /* (T, D) */
    float *dlogits;    /* (T, E) */
    float *dweights;   /* (T, K) */
    float *dxtmp;      /* (T, D) */
} moe_ws;

struct dsmoe_moe {
    dsmoe_moe_config cfg;
    int32_t D, F, E, K, Fs;
    size_t esz;          /* bytes per stored weight element */
    int packed;          /* expert matrices in panels of 16 rows (DSMOE_MOE_LAYOUT_PACKED) */
    int32_t Fp, Fsp;     /* rows of gate_proj / up_proj as stored: F, Fs (padded to 16 if packed) */
    /* parameter layout, in elements */
    size_t off_gate;     /* (E, D) */
    size_t off_exp;      /* expert 0's W1 (gate_proj rows, then up_proj rows at Fp·D), then
                            its W2 (D, F) */
    size_t exp_w2;       /* offset of W2 inside an expert block */
    size_t exp_stride;   /* elements between experts */
    size_t off_sw1;      /* shared W1 (2Fs, D) */
    size_t off_sw2;      /* shared W2 (D, Fs) */
    size_t n_params;
    void *params;
    float *grads;
    float *bias;         /* (E) */
    int own_params, own_grads; /* 0: the caller's buffers (dsmoe_moe_create_with) */
    /* workspace: the layer's state (routing, and with train the activations the
     * backward needs) and the scratch (owned, or the caller's shared one) */
    char *state_mem;
    size_t state_size;
    char *retired_state; /* state replaced by dsmoe_moe_reserve, freed by the next forward */
    char *scratch_mem;   /* owned scratch, or NULL */
    void *ext_ws;        /* the caller's scratch, or NULL */
    size_t scratch_size; /* bytes the layer needs (owned: allocated) */
    size_t ext_ws_size;
    moe_ws ws;
    int64_t n_tasks, n_shared_tasks;
    /* last forward: 0 none, 1 routing and saved activations valid, 2 routing only (a
     * reserve moved the workspace since) */
    int have_fwd;
    dsmoe_moe_routing routing;
};

/* Test hooks (moe_internal.h): every allocation of a layer's memory counts, and the
 * n-th fails when dsmoe__moe_alloc_fail_at = n. */
int64_t dsmoe__moe_alloc_calls;
int64_t dsmoe__moe_alloc_fail_at;

static void *moe_alloc(size_t n) {
    int64_t c = __atomic_add_fetch(&dsmoe__moe_alloc_calls, 1, __ATOMIC_RELAXED);
    if (c == __atomic_load_n(&dsmoe__moe_alloc_fail_at, __ATOMIC_RELAXED)) return NULL;
    return dsmoe_malloc(n);
}

static size_t pad16(size_t n) { return (n + 15u) & ~(size_t)15u; }

static int moe_nthreads(const dsmoe_moe *m, int n_threads) {
    int nt = dsmoe__threads(n_threads);
    if (nt > m->cfg.n_threads) nt = m->cfg.n_threads;
    return nt < 1 ? 1 : nt;
}


static int moe_thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* ---------------------------------------------------------------- config -- */

void dsmoe_moe_config_default(dsmoe_moe_config *cfg) {
    if (!cfg) return;
    memset(cfg, 0, sizeof *cfg);
    dsmoe_router_preset("deepseek-v3", &cfg->router);
    cfg->weight_dtype = DSMOE_DTYPE_F32;
    cfg->max_tokens = 512;
}

dsmoe_status dsmoe_moe_preset(const char *name, dsmoe_moe_config *cfg) {
    if (!name || !cfg)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_moe_preset: NULL argument");
    static const struct { const char *name; int32_t D, F, ns; } presets[] = {
        {"deepseek-v3", 7168, 2048, 1},
        {"deepseek-v2", 5120, 1536, 2},
        {"moonlight", 2048, 1408, 2},
    };
    for (size_t i = 0; i < sizeof presets / sizeof presets[0]; i++) {
        if (strcmp(name, presets[i].name) != 0) continue;
        dsmoe_moe_config c;
        dsmoe_moe_config_default(&c);
        dsmoe_status st = dsmoe_router_preset(name, &c.router);
        if (st != DSMOE_OK) return st;
        c.hidden_size = presets[i].D;
        c.expert_size = presets[i].F;
        c.n_shared = presets[i].ns;
        *cfg = c;
        return DSMOE_OK;
    }
    return dsmoe__error(DSMOE_STATUS_NOT_FOUND,
                        "unknown MoE preset '%s' (known: deepseek-v3, deepseek-v2, moonlight)",
                        name);
}

dsmoe_status dsmoe_moe_config_validate(const dsmoe_moe_config *cfg) {
    if (!cfg) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "moe config: NULL");
    dsmoe_status st = dsmoe_router_config_validate(&cfg->router);
    if (st != DSMOE_OK) return st;
    if (cfg->hidden_size < 1 || cfg->hidden_size > (1 << 20))
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "moe config: hidden_size %d out of range 1..1048576",
                            (int)cfg->hidden_size);
    if (cfg->expert_size < 1 || cfg->expert_size > (1 << 20))
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "moe config: expert_size %d out of range 1..1048576",
                            (int)cfg->expert_size);
    if (cfg->n_shared < 0 || cfg->n_shared > 64)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "moe config: n_shared %d out of range 0..64", (int)cfg->n_shared);
    if (cfg->weight_dtype != DSMOE_DTYPE_F32 && cfg->weight_dtype != DSMOE_DTYPE_BF16)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "moe config: weight_dtype %s not supported (F32 or BF16)",
                            dsmoe_dtype_name(cfg->weight_dtype));
    if (cfg->train && cfg->weight_dtype != DSMOE_DTYPE_F32)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "moe config: train needs weight_dtype F32 (BF16 is inference only)");
    if (cfg->weight_layout != DSMOE_MOE_LAYOUT_CHECKPOINT &&
        cfg->weight_layout != DSMOE_MOE_LAYOUT_PACKED)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "moe config: weight_layout %d unknown (0 = checkpoint, 1 = packed)",
                            (int)cfg->weight_layout);
    if (cfg->train && cfg->weight_layout == DSMOE_MOE_LAYOUT_PACKED)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "moe config: train needs the checkpoint weight layout (packed is "
                            "inference only)");
    if (cfg->max_tokens < 1 || cfg->max_tokens > ((int64_t)1 << 31) / 256)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "moe config: max_tokens %lld out of range 1..8388608",
                            (long long)cfg->max_tokens);
    if (!(cfg->capacity_factor >= 0.0f) || !isfinite(cfg->capacity_factor))
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "moe config: capacity_factor %g must be finite and >= 0 (0 = no limit)",
                            (double)cfg->capacity_factor);
    return DSMOE_OK;
}

int dsmoe_moe_config_json(const dsmoe_moe_config *cfg, char *buf, size_t size) {
    char r[1024];
    dsmoe_router_config_json(&cfg->router, r, sizeof r);
    return snprintf(buf, size,
                    "{\"hidden_size\":%d,\"moe_intermediate_size\":%d,\"n_routed_experts\":%d,"
                    "\"num_experts_per_tok\":%d,\"n_shared_experts\":%d,\"weight_dtype\":\"%s\","
                    "\"capacity_factor\":%.9g,\"router\":%s}",
                    (int)cfg->hidden_size, (int)cfg->expert_size, (int)cfg->router.n_experts,
                    (int)cfg->router.top_k, (int)cfg->n_shared,
                    dsmoe_dtype_name(cfg->weight_dtype), (double)cfg->capacity_factor, r);
}

/* ---------------------------------------------------------------- create -- */

static int moe_sizes_ok(const dsmoe_moe_config *c) {
    /* every product below fits comfortably in size_t on a 64-bit build */
    double n = (double)c->router.n_experts * 3.0 * c->expert_size * c->hidden_size +
               (double)c->router.n_experts * c->hidden_size +
               3.0 * c->n_shared * c->expert_size * (double)c->hidden_size;
    return n < 1e15 && (double)2 * c->expert_size * c->n_shared < (double)INT_MAX;
}

/* Sizes and the parameter layout of a (valid) config; nothing allocated. */
static void moe_init_layout(dsmoe_moe *m, const dsmoe_moe_config *cfg) {
    m->cfg = *cfg;
    m->D = cfg->hidden_size;
    m->F = cfg->expert_size;
    m->E = cfg->router.n_experts;
    m->K = cfg->router.top_k;
    m->Fs = cfg->n_shared * cfg->expert_size;
    m->esz = dsmoe_dtype_size(cfg->weight_dtype);
    m->packed = cfg->weight_layout == DSMOE_MOE_LAYOUT_PACKED;
    m->Fp = m->packed ? (int32_t)pad16((size_t)m->F) : m->F;
    m->Fsp = m->packed ? (int32_t)pad16((size_t)m->Fs) : m->Fs;
    const size_t D = (size_t)m->D, F = (size_t)m->F, E = (size_t)m->E, Fs = (size_t)m->Fs;
    const size_t Dp = m->packed ? pad16(D) : D, Fp = (size_t)m->Fp, Fsp = (size_t)m->Fsp;
    m->off_gate = 0;
    m->off_exp = pad16(E * D);
    m->exp_w2 = pad16(2 * Fp * D);
    m->exp_stride = m->exp_w2 + pad16(Dp * F);
    m->off_sw1 = m->off_exp + E * m->exp_stride;
    m->off_sw2 = m->off_sw1 + pad16(2 * Fsp * D);
    m->n_params = m->off_sw2 + pad16(Dp * Fs);
}

/* Carves the workspace for T tokens and nt threads into the layer's state (what a
 * forward leaves for dsmoe_moe_last_routing and the backward: routing, dispatch, and
 * with train the activations) at sbase and the scratch (what another layer sharing it
 * may overwrite between calls) at xbase. NULL bases only measure. */
static void moe_ws_layout(const dsmoe_moe *m, int64_t T, int nt, char *sbase, char *xbase,
                          moe_ws *w, size_t *state_size, size_t *scratch_size) {
    size_t su = 0, xu = 0;
    const size_t D = (size_t)m->D, F = (size_t)m->F, E = (size_t)m->E, K = (size_t)m->K;
    const size_t Fs = (size_t)m->Fs, R = (size_t)T * K, Tz = (size_t)T;
    moe_ws tmp;
    if (!w) w = &tmp;
    memset(w, 0, sizeof *w);
#define CARVE_IN(state, ptr, type, count)                                          \
    do {                                                                           \
        size_t nb_ = dsmoe__align64((size_t)(count) * sizeof(type));               \
        char *b_ = (state) ? sbase : xbase;                                        \
        size_t *u_ = (state) ? &su : &xu;                                          \
        w->ptr = b_ ? (type *)(void *)(b_ + *u_) : NULL;                           \
        *u_ += nb_;                                                                \
    } while (0)
#define CARVE_S(ptr, type, count) CARVE_IN(1, ptr, type, count)
#define CARVE_X(ptr, type, count) CARVE_IN(0, ptr, type, count)
#define CARVE_A(ptr, type, count) CARVE_IN(m->cfg.train, ptr, type, count)
    dsmoe_dtype gd = m->cfg.weight_dtype;
    w->router_size = dsmoe_router_workspace_size(&m->cfg.router, T, m->D, gd, nt);
    w->router = xbase ? xbase + xu : NULL;
    xu += dsmoe__align64(w->router_size);
    CARVE_S(indices, int32_t, R);
    CARVE_S(weights, float, R);
    CARVE_S(scores, float, Tz * E);
    CARVE_S(logits, float, Tz * E);
    CARVE_S(counts, int64_t, E);
    CARVE_S(kept, int64_t, E);
    CARVE_S(offsets, int64_t, E + 1);
    CARVE_S(slot, int32_t, R);
    CARVE_S(row_tok, int32_t, R);
    size_t max_tasks = E + R / DSMOE_MOE_ROW_BLOCK + 2 + Tz / DSMOE_MOE_ROW_BLOCK + 2;
    CARVE_S(tasks, moe_task, max_tasks);
    /* weight-row tasks: per expert ceil(2F/B) + ceil(D/B), shared, gate; decode chunks */
    size_t wt = (E + 1) * ((2 * F + Fs * 2) / MOE_WROW_BLOCK + D / MOE_WROW_BLOCK + 4) +
                E / MOE_WROW_BLOCK + 2;
    size_t dec = (DSMOE_MOE_DECODE_MAX_T * (K + 1)) *
                 ((2 * (F > Fs ? F : Fs) + D) / MOE_GEMV_CHUNK + 4);
    CARVE_X(wtasks, moe_task, wt > dec ? wt : dec);
    CARVE_A(Xg, float, R * D);
    CARVE_A(GU, float, R * 2 * F);
    CARVE_A(H, float, R * F);
    CARVE_A(Ye, float, R * D);
    if (Fs) {
        CARVE_A(GUs, float, Tz * 2 * Fs);
        CARVE_A(Hs, float, Tz * Fs);
        CARVE_X(Ys, float, Tz * D);
    }
    if (m->cfg.weight_dtype == DSMOE_DTYPE_BF16) {
        size_t row = D > Fs ? D : Fs;
        if (F > row) row = F;
        w->scratch_stride = pad16((size_t)MOE_WROW_BLOCK * row);
        CARVE_X(scratch, float, w->scratch_stride * (size_t)nt);
    }
    if (m->cfg.train) {
        CARVE_X(dYe, float, R * D);
        CARVE_X(dH, float, R * F);
        CARVE_X(dGU, float, R * 2 * F);
        CARVE_X(dXg, float, R * D);
        if (Fs) {
            CARVE_X(dHs, float, Tz * Fs);
            CARVE_X(dGUs, float, Tz * 2 * Fs);
            CARVE_X(dXs, float, Tz * D);
        }
        CARVE_X(dlogits, float, Tz * E);
        CARVE_X(dweights, float, R);
        CARVE_X(dxtmp, float, Tz * D);
    }
#undef CARVE_A
#undef CARVE_X
#undef CARVE_S
#undef CARVE_IN
    if (state_size) *state_size = su;
    if (scratch_size) *scratch_size = xu;
}

static dsmoe_status moe_check_tokens(const char *fn, int64_t max_tokens, int32_t K) {
    if (max_tokens < 1 || max_tokens > ((int64_t)1 << 31) / 256)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "%s: max_tokens %lld out of range 1..8388608", fn,
                            (long long)max_tokens);
    if (max_tokens * K > INT32_MAX)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "%s: max_tokens·K = %lld exceeds 2^31 - 1", fn,
                            (long long)max_tokens * K);
    return DSMOE_OK;
}

size_t dsmoe_moe_param_count(const dsmoe_moe_config *cfg) {
    if (dsmoe_moe_config_validate(cfg) != DSMOE_OK) return 0;
    if (!moe_sizes_ok(cfg)) {
        dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, "moe config: layer too large (E·3·F·D parameters)");
        return 0;
    }
    dsmoe_moe m;
    memset(&m, 0, sizeof m);
    moe_init_layout(&m, cfg);
    return m.n_params;
}

size_t dsmoe_moe_workspace_size(const dsmoe_moe_config *cfg, int64_t max_tokens, int n_threads) {
    if (dsmoe_moe_config_validate(cfg) != DSMOE_OK) return 0;
    if (!moe_sizes_ok(cfg)) {
        dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, "moe config: layer too large (E·3·F·D parameters)");
        return 0;
    }
    if (moe_check_tokens("dsmoe_moe_workspace_size", max_tokens, cfg->router.top_k) != DSMOE_OK)
        return 0;
    dsmoe_moe m;
    memset(&m, 0, sizeof m);
    moe_init_layout(&m, cfg);
    size_t xs = 0;
    moe_ws_layout(&m, max_tokens, dsmoe__threads(n_threads), NULL, NULL, NULL, NULL, &xs);
    return xs;
}

dsmoe_status dsmoe_moe_reserve(dsmoe_moe *m, int64_t max_tokens, int n_threads) {
    if (!m) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_moe_reserve: NULL layer");
    dsmoe_status st = moe_check_tokens("dsmoe_moe_reserve", max_tokens, m->K);
    if (st != DSMOE_OK) return st;
    int nt = dsmoe__threads(n_threads);
    int64_t T = max_tokens > m->cfg.max_tokens ? max_tokens : m->cfg.max_tokens;
    if (m->state_mem && nt <= m->cfg.n_threads && T == m->cfg.max_tokens) return DSMOE_OK;
    if (nt < m->cfg.n_threads) nt = m->cfg.n_threads;
    size_t ss = 0, xs = 0;
    moe_ws_layout(m, T, nt, NULL, NULL, NULL, &ss, &xs);
    if (m->ext_ws && xs > m->ext_ws_size)
        return dsmoe__error(DSMOE_STATUS_WORKSPACE_TOO_SMALL,
                            "dsmoe_moe_reserve: the attached workspace has %zu bytes; %lld tokens "
                            "on %d threads need %zu (dsmoe_moe_workspace_size): attach a larger "
                            "one first",
                            m->ext_ws_size, (long long)T, nt, xs);
    char *smem = (char *)moe_alloc(ss);
    char *xmem = m->ext_ws ? NULL : (char *)moe_alloc(xs);
    if (!smem || (!m->ext_ws && !xmem)) {
        dsmoe_free(smem);
        dsmoe_free(xmem);
        return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY,
                            "moe workspace: %zu bytes for %lld tokens, %d threads", ss + xs,
                            (long long)T, nt);
    }
    /* the routing of the last forward stays readable (the pointers handed out by
     * dsmoe_moe_last_routing point into the old state) until the next forward */
    if (m->have_fwd == 1) {
        dsmoe_free(m->retired_state);
        m->retired_state = m->state_mem;
        m->have_fwd = 2;
    } else {
        dsmoe_free(m->state_mem);
    }
    m->state_mem = smem;
    m->state_size = ss;
    if (!m->ext_ws) {
        dsmoe_free(m->scratch_mem);
        m->scratch_mem = xmem;
    }
    m->scratch_size = xs;
    moe_ws_layout(m, T, nt, smem, m->ext_ws ? (char *)m->ext_ws : xmem, &m->ws, NULL, NULL);
    m->cfg.max_tokens = T;
    m->cfg.n_threads = nt;
    return DSMOE_OK;
}

static dsmoe_status moe_check_buffer(const void *p, size_t align, const char *what) {
    if (p && ((uintptr_t)p % align) != 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "dsmoe_moe_create_with: %s is not aligned to %zu bytes", what, align);
    return DSMOE_OK;
}

/* Zeroes p (n bytes) writing only the 4 KiB pieces that are not zero already: a caller's
 * fresh page allocation (e.g. a training model that holds only some experts, whose other
 * experts' pages must never become resident) stays untouched, as reading a page never
 * written maps no memory of its own. */
static void zero_untouched(void *p, size_t n) {
    unsigned char *c = (unsigned char *)p;
    for (size_t at = 0; at < n; at += 4096) {
        const size_t len = n - at < 4096 ? n - at : 4096;
        for (size_t i = 0; i < len; i++)
            if (c[at + i]) {
                memset(c + at, 0, len);
                break;
            }
    }
}

dsmoe_status dsmoe_moe_create_with(const dsmoe_moe_config *cfg, const dsmoe_moe_buffers *buf,
                                   dsmoe_moe **out) {
    if (!out) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_moe_create: NULL out");
    *out = NULL;
    dsmoe_status st = dsmoe_moe_config_validate(cfg);
    if (st != DSMOE_OK) return st;
    if (!moe_sizes_ok(cfg))
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "moe config: layer too large (E·3·F·D parameters)");
    dsmoe_moe_buffers b;
    memset(&b, 0, sizeof b);
    if (buf) b = *buf;
    const size_t esz = dsmoe_dtype_size(cfg->weight_dtype);
    if ((st = moe_check_buffer(b.params, 16 * esz, "params")) != DSMOE_OK) return st;
    if ((st = moe_check_buffer(b.grads, 64, "grads")) != DSMOE_OK) return st;
    if ((st = moe_check_buffer(b.workspace, 64, "workspace")) != DSMOE_OK) return st;
    if (b.grads && !cfg->train)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "dsmoe_moe_create_with: grads given but the config has train = 0");
    if (b.workspace) {
        st = moe_check_tokens("dsmoe_moe_create", cfg->max_tokens, cfg->router.top_k);
        if (st != DSMOE_OK) return st;
        size_t need = dsmoe_moe_workspace_size(cfg, cfg->max_tokens, cfg->n_threads);
        if (b.workspace_size < need)
            return dsmoe__error(DSMOE_STATUS_WORKSPACE_TOO_SMALL,
                                "dsmoe_moe_create_with: workspace of %zu bytes; the layer needs "
                                "%zu (dsmoe_moe_workspace_size)",
                                b.workspace_size, need);
    }
    (void)dsmoe__kernels(); /* resolves the kernel table before any parallel region */
    dsmoe_moe *m = (dsmoe_moe *)calloc(1, sizeof *m);
    if (!m) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "moe layer object");
    moe_init_layout(m, cfg);
    const size_t n_params = m->n_params, E = (size_t)m->E;
    m->own_params = b.params == NULL;
    m->own_grads = b.grads == NULL;
    m->params = b.params ? b.params : moe_alloc(n_params * m->esz);
    m->bias = (float *)moe_alloc(E * sizeof(float));
    if (cfg->train) m->grads = b.grads ? b.grads : (float *)moe_alloc(n_params * sizeof(float));
    if (!m->params || !m->bias || (cfg->train && !m->grads)) {
        dsmoe_moe_free(m);
        return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "moe parameters: %zu elements", n_params);
    }
    m->ext_ws = b.workspace;
    m->ext_ws_size = b.workspace_size;
    int nt = dsmoe__threads(cfg->n_threads);
    m->cfg.n_threads = 0;
    int64_t T = cfg->max_tokens;
    m->cfg.max_tokens = 0;
    st = dsmoe_moe_reserve(m, T, nt);
    if (st != DSMOE_OK) {
        dsmoe_moe_free(m); /* the caller's buffers untouched */
        return st;
    }
    zero_untouched(m->params, n_params * m->esz);
    memset(m->bias, 0, E * sizeof(float));
    if (m->grads) zero_untouched(m->grads, n_params * sizeof(float));
    *out = m;
    return DSMOE_OK;
}

dsmoe_status dsmoe_moe_create(const dsmoe_moe_config *cfg, dsmoe_moe **out) {
    return dsmoe_moe_create_with(cfg, NULL, out);
}

dsmoe_status dsmoe_moe_set_workspace(dsmoe_moe *m, void *ws, size_t size) {
    if (!m)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_moe_set_workspace: NULL layer");
    const int64_t T = m->cfg.max_tokens;
    const int nt = m->cfg.n_threads;
    size_t need = 0;
    moe_ws_layout(m, T, nt, NULL, NULL, NULL, NULL, &need);
    char *own = NULL;
    if (ws) {
        if ((uintptr_t)ws % 64 != 0)
            return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                                "dsmoe_moe_set_workspace: workspace is not aligned to 64 bytes");
        if (size < need)
            return dsmoe__error(DSMOE_STATUS_WORKSPACE_TOO_SMALL,
                                "dsmoe_moe_set_workspace: %zu bytes; the layer (max_tokens %lld, "
                                "%d threads) needs %zu (dsmoe_moe_workspace_size)",
                                size, (long long)T, nt, need);
    } else {
        if (!m->ext_ws) return DSMOE_OK; /* already owns its scratch */
        own = (char *)moe_alloc(need);
        if (!own)
            return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY,
                                "moe workspace: %zu bytes for %lld tokens, %d threads", need,
                                (long long)T, nt);
    }
    dsmoe_free(m->scratch_mem);
    m->scratch_mem = own;
    m->ext_ws = ws;
    m->ext_ws_size = ws ? size : 0;
    m->scratch_size = need;
    /* the state's carving does not change: the routing and saved activations survive */
    moe_ws_layout(m, T, nt, m->state_mem, ws ? (char *)ws : own, &m->ws, NULL, NULL);
    return DSMOE_OK;
}

void dsmoe_moe_free(dsmoe_moe *m) {
    if (!m) return;
    if (m->own_params) dsmoe_free(m->params);
    if (m->own_grads) dsmoe_free(m->grads);
    dsmoe_free(m->bias);
    dsmoe_free(m->state_mem);
    dsmoe_free(m->retired_state);
    dsmoe_free(m->scratch_mem);
    free(m);
}

const dsmoe_moe_config *dsmoe_moe_get_config(const dsmoe_moe *m) { return m ? &m->cfg : NULL; }

size_t dsmoe_moe_memory_size(const dsmoe_moe *m) {
    if (!m) return 0;
    return (m->own_params ? m->n_params * m->esz : 0) +
           (m->grads && m->own_grads ? m->n_params * sizeof(float) : 0) + m->state_size +
           (m->scratch_mem ? m->scratch_size : 0) + (size_t)m->E * sizeof(float) + sizeof *m;
}

/* ---------------------------------------------------------------- tensors -- */

int64_t dsmoe_moe_tensor_count(const dsmoe_moe *m) {
    if (!m) return 0;
    return 1 + (m->cfg.router.use_bias ? 1 : 0) + 3 * (int64_t)m->E + (m->Fs ? 3 : 0);
}

dsmoe_status dsmoe_moe_tensor_at(const dsmoe_moe *m, int64_t i, dsmoe_moe_tensor *out) {
    if (!m || !out)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_moe_tensor_at: NULL argument");
    int64_t n = dsmoe_moe_tensor_count(m);
    if (i < 0 || i >= n)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "dsmoe_moe_tensor_at: index %lld out of range 0..%lld", (long long)i,
                            (long long)n - 1);
    memset(out, 0, sizeof *out);
    const size_t D = (size_t)m->D, F = (size_t)m->F;
    size_t off = 0;
    out->dtype = m->cfg.weight_dtype;
    out->ndim = 2;
    out->trainable = 1;
    out->layout = DSMOE_MOE_LAYOUT_CHECKPOINT;
    if (i == 0) {
        snprintf(out->name, sizeof out->name, "gate.weight");
        out->shape[0] = m->E;
        out->shape[1] = m->D;
        off = m->off_gate;
    } else if (i == 1 && m->cfg.router.use_bias) {
        snprintf(out->name, sizeof out->name, "gate.e_score_correction_bias");
        out->dtype = DSMOE_DTYPE_F32;
        out->ndim = 1;
        out->shape[0] = m->E;
        out->data = m->bias;
        out->trainable = 0;
        return DSMOE_OK;
    } else {
        int64_t j = i - 1 - (m->cfg.router.use_bias ? 1 : 0);
        int64_t e = j / 3, part = j % 3;
        static const char *const parts[3] = {"gate_proj", "up_proj", "down_proj"};
        size_t f = F, base;
        if (e < m->E) {
            snprintf(out->name, sizeof out->name, "experts.%lld.%s.weight", (long long)e,
                     parts[part]);
            base = m->off_exp + (size_t)e * m->exp_stride;
            off = part == 0 ? base : part == 1 ? base + (size_t)m->Fp * D : base + m->exp_w2;
        } else {
            snprintf(out->name, sizeof out->name, "shared_experts.%s.weight", parts[part]);
            f = (size_t)m->Fs;
            off = part == 0   ? m->off_sw1
                  : part == 1 ? m->off_sw1 + (size_t)m->Fsp * D
                              : m->off_sw2;
        }
        out->shape[0] = part == 2 ? m->D : (int64_t)f;
        out->shape[1] = part == 2 ? (int64_t)f : m->D;
        if (m->packed) out->layout = DSMOE_MOE_LAYOUT_PACKED;
    }
    out->data = (char *)m->params + off * m->esz;
    out->grad = m->grads ? m->grads + off : NULL;
    return DSMOE_OK;
}

dsmoe_status dsmoe_moe_tensor_get(const dsmoe_moe *m, const char *name, dsmoe_moe_tensor *out) {
    if (!m || !name || !out)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_moe_tensor_get: NULL argument");
    int64_t n = dsmoe_moe_tensor_count(m);
    for (int64_t i = 0; i < n; i++) {
        dsmoe_moe_tensor t;
        dsmoe_moe_tensor_at(m, i, &t);
        if (strcmp(t.name, name) == 0) {
            *out = t;
            return DSMOE_OK;
        }
    }
    return dsmoe__error(DSMOE_STATUS_NOT_FOUND, "moe layer has no tensor '%s'", name);
}

/* Storage index of element j (row-major) of tensor view t. */
static size_t moe_elem(const dsmoe_moe_tensor *t, size_t j) {
    if (t->layout != DSMOE_MOE_LAYOUT_PACKED) return j;
    const size_t cols = (size_t)t->shape[1], r = j / cols, c = j % cols;
    return ((r / 16) * cols + c) * 16 + r % 16;
}

void dsmoe_moe_init_random(dsmoe_moe *m, uint64_t seed) {
    if (!m) return;
    dsmoe_rng s = {seed * 0x2545f4914f6cdd1dull + 0x632be59bd9b4e019ull};
    int64_t n = dsmoe_moe_tensor_count(m);
    for (int64_t i = 0; i < n; i++) {
        dsmoe_moe_tensor t;
        dsmoe_moe_tensor_at(m, i, &t);
        if (!t.trainable) continue;
        size_t cnt = (size_t)(t.shape[0] * t.shape[1]);
        float bound = 1.0f / sqrtf((float)t.shape[1]);
        for (size_t j = 0; j < cnt; j++) {
            float u = (float)((double)(dsmoe_rng_next(&s) >> 40) * 0x1.0p-24) * 2.0f - 1.0f;
            float v = u * bound;
            const size_t at = moe_elem(&t, j); /* the same values in either layout */
            if (t.dtype == DSMOE_DTYPE_F32)
                ((float *)t.data)[at] = v;
            else
                ((uint16_t *)t.data)[at] = dsmoe_f32_to_bf16(v);
        }
    }
    memset(m->bias, 0, (size_t)m->E * sizeof(float));
}

float *dsmoe_moe_params(dsmoe_moe *m, size_t *n) {
    if (!m || m->cfg.weight_dtype != DSMOE_DTYPE_F32 || m->packed) {
        if (n) *n = 0;
        return NULL;
    }
    if (n) *n = m->n_params;
    return (float *)m->params;
}

float *dsmoe_moe_grads(dsmoe_moe *m, size_t *n) {
    if (!m || !m->grads) {
        if (n) *n = 0;
        return NULL;
    }
    if (n) *n = m->n_params;
    return m->grads;
}

void dsmoe_moe_zero_grad(dsmoe_moe *m) {
    if (m && m->grads) memset(m->grads, 0, m->n_params * sizeof(float));
}

dsmoe_status dsmoe_moe_set_bias(dsmoe_moe *m, const float *bias) {
    if (!m || !bias)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_moe_set_bias: NULL argument");
    if (!m->cfg.router.use_bias)
        return dsmoe__error(DSMOE_STATUS_UNSUPPORTED,
                            "dsmoe_moe_set_bias: the layer's router has use_bias = 0");
    for (int32_t e = 0; e < m->E; e++)
        if (!isfinite(bias[e]))
            return dsmoe__error(DSMOE_STATUS_NON_FINITE,
                                "dsmoe_moe_set_bias: bias of expert %d is %g", (int)e,
                                (double)bias[e]);
    memcpy(m->bias, bias, (size_t)m->E * sizeof(float));
    return DSMOE_OK;
}

const float *dsmoe_moe_bias(const dsmoe_moe *m) {
    return m && m->cfg.router.use_bias ? m->bias : NULL;
}

const dsmoe_moe_routing *dsmoe_moe_last_routing(const dsmoe_moe *m) {
    return m && m->have_fwd ? &m->routing : NULL; /* have_fwd 2: routing only */
}

/* ---------------------------------------------------------------- kernels -- */

/* Weight matrix W (rows, cols) of expert e (e == E: shared): pointer to element 0. */
static const void *moe_w1(const dsmoe_moe *m, int32_t e) {
    size_t off = e < m->E ? m->off_exp + (size_t)e * m->exp_stride : m->off_sw1;
    return (const char *)m->params + off * m->esz;
}
static const void *moe_w2(const dsmoe_moe *m, int32_t e) {
    size_t off = e < m->E ? m->off_exp + (size_t)e * m->exp_stride + m->exp_w2 : m->off_sw2;
    return (const char *)m->params + off * m->esz;
}
static float *moe_dw1(const dsmoe_moe *m, int32_t e) {
    return m->grads + (e < m->E ? m->off_exp + (size_t)e * m->exp_stride : m->off_sw1);
}
static float *moe_dw2(const dsmoe_moe *m, int32_t e) {
    return m->grads +
           (e < m->E ? m->off_exp + (size_t)e * m->exp_stride + m->exp_w2 : m->off_sw2);
}

/* C (n, nout) [ldc] = A (n, k) · W(nout, k)ᵀ, W stored in the layer's dtype. BF16 is
 * widened in blocks of MOE_WROW_BLOCK rows into `scratch`. */
static void moe_matmul_wt(const dsmoe_moe *m, float *C, int ldc, const float *A, int n,
                          const void *W, int nout, int k, float *scratch) {
    if (n <= 0) return;
    if (m->cfg.weight_dtype == DSMOE_DTYPE_F32) {
        dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__TRANS, n, nout, k, 1.0f, A, k,
                    (const float *)W, k, 0.0f, C, ldc);
        return;
    }
    const dsmoe__kernel_table *kt = dsmoe__kernels();
    for (int r0 = 0; r0 < nout; r0 += MOE_WROW_BLOCK) {
        int nr = nout - r0 < MOE_WROW_BLOCK ? nout - r0 : MOE_WROW_BLOCK;
        kt->bf16_to_f32(scratch, (const uint16_t *)W + (size_t)r0 * k, (int64_t)nr * k);
        dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__TRANS, n, nr, k, 1.0f, A, k, scratch, k,
                    0.0f, C + r0, ldc);
    }
}

/* Rows up to which dsmoe__moe_gemm_nt beats SGEMM, by kernel set and weight type
 * (moe_internal.h). With AVX-512, one thread, CPU time, BLIS 0.9 SGEMM against the
 * streaming product on W1 and W2 of an expert: at D 256, F 128 SGEMM runs 0.73-0.80x as
 * fast at 64 rows, 0.99-1.02x at 128, 1.15-1.23x at 192-256; at D 2048, F 1408 0.60x at
 * 64, 0.87x at 128, 1.09x at 192, 1.20x at 256 (the streaming product holds 100-120
 * GFLOP/s from 48 rows on): 128 for BF16 weights, which SGEMM needs widened first. FP32
 * weights go to the small-product path (sgemm_small.c, 150-200 GFLOP/s from 16 rows)
 * from 17 rows: the default preset's MoE forward 27.7 -> 27.1 ms a step (4 of 4
 * alternating pairs). With AVX2 the streaming product wins up to 16 rows; the scalar
 * code only serves the matrix-vector (decode) path. Never below 16: decode and
 * speculative decoding compare the bits of up to DSMOE_MOE_DECODE_MAX_T tokens. */
int dsmoe__moe_skinny_max(dsmoe_dtype weight_dtype) {
    const char *k = dsmoe__kernels()->name;
    if (strcmp(k, "avx512") == 0) return weight_dtype == DSMOE_DTYPE_F32 ? 16 : 128;
    if (strcmp(k, "avx2") == 0) return 16;
    return DSMOE_MOE_DECODE_MAX_T;
}

/* C (n, nout) [ldc] = X (n, k) · W (nout, k)ᵀ: dsmoe__moe_gemm_nt in panels of
 * DSMOE__MOE_SKINNY_N rows when it is the faster product, else SGEMM. */
static void moe_product(const dsmoe_moe *m, float *C, int ldc, const float *X, int n,
                        const void *W, int nout, int k, float *scratch, int skinny_max) {
    if (n > skinny_max) {
        moe_matmul_wt(m, C, ldc, X, n, W, nout, k, scratch);
        return;
    }
    const float *rows[DSMOE__MOE_SKINNY_N];
    for (int p0 = 0; p0 < n; p0 += DSMOE__MOE_SKINNY_N) {
        const int np = n - p0 < DSMOE__MOE_SKINNY_N ? n - p0 : DSMOE__MOE_SKINNY_N;
        for (int i = 0; i < np; i++) rows[i] = X + (size_t)(p0 + i) * k;
        dsmoe__moe_gemm_nt(C + (size_t)p0 * ldc, ldc, rows, np, W, m->cfg.weight_dtype, 0, nout, k);
    }
}

/* The packed layout's product: C (n, rows r0..r1-1 of P) [ldc] = X (n, k) · Wᵀ, in
 * panels of DSMOE__MOE_SKINNY_N rows of X (r0 a multiple of 16). */
static void moe_product_pk(const dsmoe_moe *m, float *C, int ldc, const float *const *X, int n,
                           const void *P, int r0, int r1, int k) {
    for (int p0 = 0; p0 < n; p0 += DSMOE__MOE_SKINNY_N) {
        const int np = n - p0 < DSMOE__MOE_SKINNY_N ? n - p0 : DSMOE__MOE_SKINNY_N;
        dsmoe__moe_gemm_pk(C + (size_t)p0 * ldc, ldc, X + p0, np, P, m->cfg.weight_dtype, r0, r1, k);
    }
}

/* Packed W1 rows [r0, r1) of expert e (gate_proj's panels, then up_proj's from row fp):
 * GU columns [r0, r1) of the gate part and [r0 - fp, r1 - fp) of the up part. */
static void moe_w1_pk(const dsmoe_moe *m, int32_t e, float *GU, const float *const *X, int n,
                      int r0, int r1) {
    const int f = e < m->E ? m->F : m->Fs, fp = e < m->E ? m->Fp : m->Fsp, D = m->D;
    const char *w1 = (const char *)moe_w1(m, e);
    if (r0 < fp) moe_product_pk(m, GU, 2 * f, X, n, w1, r0, r1 < f ? r1 : f, D);
    if (r1 > fp) {
        const int u0 = r0 > fp ? r0 - fp : 0, u1 = r1 - fp < f ? r1 - fp : f;
        moe_product_pk(m, GU + f, 2 * f, X, n, w1 + (size_t)fp * (size_t)D * m->esz, u0, u1, D);
    }
}

/* One expert on n rows: GU = X·W1ᵀ, H = swiglu, Y = H·W2ᵀ. */
static void moe_expert_forward(const dsmoe_moe *m, int32_t e, const float *X, int n, float *GU,
                               float *H, float *Y, float *scratch) {
    const int D = m->D, f = e < m->E ? m->F : m->Fs;
    const int sk = dsmoe__moe_skinny_max(m->cfg.weight_dtype);
    const dsmoe__kernel_table *kt = dsmoe__kernels();
    if (m->packed) {
        const float *rows[DSMOE_MOE_ROW_BLOCK];
        for (int i = 0; i < n; i++) rows[i] = X + (size_t)i * D;
        moe_w1_pk(m, e, GU, rows, n, 0, 2 * (e < m->E ? m->Fp : m->Fsp));
    } else {
        moe_product(m, GU, 2 * f, X, n, moe_w1(m, e), 2 * f, D, scratch, sk);
    }
    for (int i = 0; i < n; i++)
        kt->swiglu(H + (size_t)i * f, GU + (size_t)i * 2 * f, GU + (size_t)i * 2 * f + f, f);
    if (m->packed) {
        const float *rows[DSMOE_MOE_ROW_BLOCK];
        for (int i = 0; i < n; i++) rows[i] = H + (size_t)i * f;
        moe_product_pk(m, Y, D, rows, n, moe_w2(m, e), 0, D, f);
    } else {
        moe_product(m, Y, D, H, n, moe_w2(m, e), D, f, scratch, sk);
    }
}

/* Rows of expert e in the routed buffers (e < E) or the shared buffers (e == E). */
static void moe_rows(const dsmoe_moe *m, int32_t e, int64_t r0, float **GU, float **H,
                     float **Y) {
    const moe_ws *w = &m->ws;
    if (e < m->E) {
        *GU = w->GU + (size_t)r0 * 2 * m->F;
        *H = w->H + (size_t)r0 * m->F;
        *Y = w->Ye + (size_t)r0 * m->D;
    } else {
        *GU = w->GUs + (size_t)r0 * 2 * m->Fs;
        *H = w->Hs + (size_t)r0 * m->Fs;
        *Y = w->Ys + (size_t)r0 * m->D;
    }
}

/* ---------------------------------------------------------------- dispatch -- */

int64_t dsmoe__moe_dispatch(int64_t *counts, int64_t *kept, int64_t *offsets, int32_t *slot,
                            int32_t *row_tok, const int32_t *indices,
                            int64_t T, int32_t K, int32_t E, int64_t capacity) {
    memset(counts, 0, (size_t)E * sizeof(int64_t));
    dsmoe__count_experts(counts, indices, T * K);
    int64_t dropped = 0;
    offsets[0] = 0;
    for (int32_t e = 0; e < E; e++) {
        int64_t c = counts[e];
        if (capacity >= 0 && c > capacity) {
            dropped += c - capacity;
            c = capacity;
        }
        offsets[e + 1] = offsets[e] + c;
        kept[e] = 0; /* fill cursor below; ends equal to the kept count */
    }
    for (int64_t t = 0; t < T; t++) {
        for (int32_t k = 0; k < K; k++) {
            int64_t i = t * K + k;
            int32_t e = indices[i];
            int64_t pos = offsets[e] + kept[e];
            if (pos >= offsets[e + 1]) {
                slot[i] = -1;
                continue;
            }
            kept[e]++;
            slot[i] = (int32_t)pos;
            row_tok[pos] = (int32_t)t;
        }
    }
    return dropped;
}

/* Costlier first, then the order listed. */
static int moe_wtask_cmp(const void *pa, const void *pb) {
    const moe_task *a = (const moe_task *)pa, *b = (const moe_task *)pb;
    if (a->cost != b->cost) return a->cost > b->cost ? -1 : 1;
    return (a->idx > b->idx) - (a->idx < b->idx);
}

/* Larger blocks first, then lower expert (a key no two partial blocks share). */
static int moe_task_cmp(const void *pa, const void *pb) {
    const moe_task *a = (const moe_task *)pa, *b = (const moe_task *)pb;
    if (a->n != b->n) return a->n > b->n ? -1 : 1;
    return (a->e > b->e) - (a->e < b->e);
}

/* Dispatch with the layer's capacity policy, then the row tasks. */
static void moe_dispatch(dsmoe_moe *m, int64_t T) {
    moe_ws *w = &m->ws;
    const int32_t E = m->E, K = m->K;
    int64_t cap = -1;
    if (m->cfg.capacity_factor > 0.0f && T > 0) {
        cap = (int64_t)ceil((double)m->cfg.capacity_factor * (double)T * K / E);
        if (cap < 1) cap = 1;
    }
    int64_t dropped = dsmoe__moe_dispatch(w->counts, w->kept, w->offsets, w->slot, w->row_tok,
                                          w->indices, T, K, E, cap);
    /* tasks: routed experts in fixed row blocks, then the shared expert's token blocks.
     * The routed blocks run largest first (each expert's full blocks, then the partial
     * ones by size), so that the threads' last tasks are small ones; each task writes
     * its own rows, so the order never changes a result. */
    int64_t nt = 0, npart = 0;
    for (int32_t e = 0; e < E; e++) {
        for (int64_t r = 0; r + DSMOE_MOE_ROW_BLOCK <= w->kept[e]; r += DSMOE_MOE_ROW_BLOCK) {
            w->tasks[nt].e = e;
            w->tasks[nt].r0 = w->offsets[e] + r;
            w->tasks[nt].n = DSMOE_MOE_ROW_BLOCK;
            nt++;
        }
    }
    for (int32_t e = 0; e < E; e++) {
        const int64_t n = w->kept[e] % DSMOE_MOE_ROW_BLOCK;
        if (n == 0) continue;
        w->tasks[nt + npart].e = e;
        w->tasks[nt + npart].r0 = w->offsets[e] + w->kept[e] - n;
        w->tasks[nt + npart].n = (int32_t)n;
        npart++;
    }
    qsort(w->tasks + nt, (size_t)npart, sizeof *w->tasks, moe_task_cmp);
    nt += npart;
    int64_t ns = 0;
    if (m->Fs) {
        for (int64_t t0 = 0; t0 < T; t0 += DSMOE_MOE_ROW_BLOCK) {
            int64_t n = T - t0 < DSMOE_MOE_ROW_BLOCK ? T - t0 : DSMOE_MOE_ROW_BLOCK;
            w->tasks[nt + ns].e = E;
            w->tasks[nt + ns].r0 = t0;
            w->tasks[nt + ns].n = (int32_t)n;
            ns++;
        }
    }
    m->n_tasks = nt;
    m->n_shared_tasks = ns;
    m->routing.n_dropped = dropped;
    m->routing.capacity = cap;
}

/* ---------------------------------------------------------------- forward -- */

/* Batched path: gather and run every row-block task. */
static void moe_forward_batched(dsmoe_moe *m, const float *x, int nt) {
    moe_ws *w = &m->ws;
    const int64_t ntask = m->n_tasks + m->n_shared_tasks;
    const size_t D = (size_t)m->D;
    (void)nt;
    /* The shared expert's token blocks, the largest tasks, are handed out first, so that
     * the many small routed tasks even out the threads' ends (the order of execution
     * never changes a result: each task writes its own rows). */
    const int64_t n_routed = m->n_tasks, n_first = m->n_shared_tasks;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t i = 0; i < ntask; i++) {
        const moe_task tk = w->tasks[i < n_first ? n_routed + i : i - n_first];
        float *scratch = w->scratch ? w->scratch + w->scratch_stride * (size_t)moe_thread_id() : NULL;
        float *GU, *H, *Y;
        moe_rows(m, tk.e, tk.r0, &GU, &H, &Y);
        const float *X;
        if (tk.e < m->E) {
            float *Xg = w->Xg + (size_t)tk.r0 * D;
            for (int r = 0; r < tk.n; r++) {
                if (r + MOE_PF_AHEAD < tk.n) { /* the rows are scattered: fetch ahead */
                    const char *nx = (const char *)(x + (size_t)w->row_tok[tk.r0 + r + MOE_PF_AHEAD] * D);
                    for (size_t b = 0; b < D * sizeof(float); b += 64) __builtin_prefetch(nx + b, 0, 3);
                }
                memcpy(Xg + (size_t)r * D, x + (size_t)w->row_tok[tk.r0 + r] * D,
                       D * sizeof(float));
            }
            X = Xg;
        } else {
            X = x + (size_t)tk.r0 * D;
        }
        moe_expert_forward(m, tk.e, X, tk.n, GU, H, Y, scratch);
    }
}

/* Decode path (T <= DSMOE_MOE_DECODE_MAX_T): no gather (except for training); every
 * active expert (and the shared one) streams its weights once for its n <= 8 rows with
 * dsmoe__moe_gemm_nt, in fixed chunks of weight rows so that threads share even one
 * expert. Phase 1: GU = X·W1ᵀ; SwiGLU; phase 2: Y = H·W2ᵀ. wtasks: e, r0 = weight row,
 * n = rows in the chunk. */
static void moe_decode_rows(const dsmoe_moe *m, int32_t e, const float *x, const float **X,
                            int *n) {
    const moe_ws *w = &m->ws;
    if (e < m->E) {
        int64_t o = w->offsets[e];
        *n = (int)w->kept[e];
        for (int i = 0; i < *n; i++) X[i] = x + (size_t)w->row_tok[o + i] * (size_t)m->D;
    } else {
        *n = (int)m->routing.T;
        for (int i = 0; i < *n; i++) X[i] = x + (size_t)i * (size_t)m->D;
    }
}

static int64_t moe_decode_tasks(dsmoe_moe *m, int phase) {
    moe_ws *w = &m->ws;
    int64_t nc = 0;
    for (int32_t e = 0; e <= m->E; e++) {
        if (e < m->E ? w->kept[e] == 0 : m->Fs == 0) continue;
        int rows = phase == 1 ? 2 * (e < m->E ? m->Fp : m->Fsp) : m->D;
        for (int c = 0; c < rows; c += MOE_GEMV_CHUNK) {
            w->wtasks[nc].e = e;
            w->wtasks[nc].r0 = c;
            w->wtasks[nc].n = rows - c < MOE_GEMV_CHUNK ? rows - c : MOE_GEMV_CHUNK;
            nc++;
        }
    }
    return nc;
}

static void moe_forward_decode(dsmoe_moe *m, const float *x, int64_t T, int nt) {
    moe_ws *w = &m->ws;
    const int D = m->D;
    (void)nt;
    const dsmoe__kernel_table *kt = dsmoe__kernels();
    const int64_t R = w->offsets[m->E];
    if (m->cfg.train)
        for (int64_t r = 0; r < R; r++)
            memcpy(w->Xg + (size_t)r * D, x + (size_t)w->row_tok[r] * D, (size_t)D * sizeof(float));
    int64_t nc = moe_decode_tasks(m, 1);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t i = 0; i < nc; i++) {
        const moe_task tk = w->wtasks[i];
        const float *X[DSMOE__MOE_SKINNY_N];
        int n;
        moe_decode_rows(m, tk.e, x, X, &n);
        float *GU, *H, *Y;
        moe_rows(m, tk.e, tk.e < m->E ? w->offsets[tk.e] : 0, &GU, &H, &Y);
        const int f = tk.e < m->E ? m->F : m->Fs;
        if (m->packed)
            moe_w1_pk(m, tk.e, GU, X, n, (int)tk.r0, (int)tk.r0 + tk.n);
        else
            dsmoe__moe_gemm_nt(GU, 2 * f, X, n, moe_w1(m, tk.e), m->cfg.weight_dtype, (int)tk.r0,
                               (int)tk.r0 + tk.n, D);
    }
    for (int64_t r = 0; r < R; r++)
        kt->swiglu(w->H + (size_t)r * m->F, w->GU + (size_t)r * 2 * m->F,
                   w->GU + (size_t)r * 2 * m->F + m->F, m->F);
    if (m->Fs)
        for (int64_t t = 0; t < T; t++)
            kt->swiglu(w->Hs + (size_t)t * m->Fs, w->GUs + (size_t)t * 2 * m->Fs,
                       w->GUs + (size_t)t * 2 * m->Fs + m->Fs, m->Fs);
    nc = moe_decode_tasks(m, 2);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t i = 0; i < nc; i++) {
        const moe_task tk = w->wtasks[i];
        const int32_t e = tk.e;
        const int f = e < m->E ? m->F : m->Fs;
        float *GU, *H, *Y;
        moe_rows(m, e, e < m->E ? w->offsets[e] : 0, &GU, &H, &Y);
        const int n = e < m->E ? (int)w->kept[e] : (int)T;
        const float *Hr[DSMOE__MOE_SKINNY_N];
        for (int j = 0; j < n; j++) Hr[j] = H + (size_t)j * f;
        if (m->packed)
            moe_product_pk(m, Y, D, Hr, n, moe_w2(m, e), (int)tk.r0, (int)tk.r0 + tk.n, f);
        else
            dsmoe__moe_gemm_nt(Y, D, Hr, n, moe_w2(m, e), m->cfg.weight_dtype, (int)tk.r0,
                               (int)tk.r0 + tk.n, f);
    }
}

/* y_t = Σ_k w_tk · Ye[slot(t,k)] (k ascending) + Ys_t, over independent tokens. */
/* Routed rows are gathered by token: each token's K rows lie anywhere in the
 * expert-sorted buffers, so every row began with a memory latency that no hardware
 * prefetcher foresees. The passes fetch the rows of the token MOE_PF_AHEAD ahead (and the
 * forward's gather, the row MOE_PF_AHEAD ahead). */
static inline void moe_prefetch_rows(const dsmoe_moe *m, const float *base, int64_t t) {
    const size_t D = (size_t)m->D;
    for (int32_t k = 0; k < m->K; k++) {
        const int32_t r = m->ws.slot[t * m->K + k];
        if (r < 0) continue;
        const char *row = (const char *)(base + (size_t)r * D);
        for (size_t b = 0; b < D * sizeof(float); b += 64) __builtin_prefetch(row + b, 0, 3);
    }
}

/* Output rows [t0, t1): y_t = Σ_k w_tk · Ye[slot(t, k)] (in k order, from +0) + Ys_t. */
DSMOE__CLONES static void moe_combine_rows(const dsmoe_moe *m, float *y, int64_t t0, int64_t t1,
                                           int64_t T) {
    const moe_ws *w = &m->ws;
    const size_t D = (size_t)m->D;
    const int32_t K = m->K;
    for (int64_t t = t0; t < t1; t++) {
        if (t + MOE_PF_AHEAD < T) moe_prefetch_rows(m, w->Ye, t + MOE_PF_AHEAD);
        float *yt = y + (size_t)t * D;
        for (size_t d = 0; d < D; d++) yt[d] = 0.0f;
        for (int32_t k = 0; k < K; k++) {
            int32_t r = w->slot[t * K + k];
            if (r < 0) continue;
            const float wk = w->weights[t * K + k];
            const float *ye = w->Ye + (size_t)r * D;
            for (size_t d = 0; d < D; d++) yt[d] = yt[d] + wk * ye[d];
        }
        if (m->Fs) {
            const float *ys = w->Ys + (size_t)t * D;
            for (size_t d = 0; d < D; d++) yt[d] = yt[d] + ys[d];
        }
    }
}

static void moe_combine(dsmoe_moe *m, float *y, int64_t T, int nt) {
    const int64_t nb = (T + DSMOE_MOE_ROW_BLOCK - 1) / DSMOE_MOE_ROW_BLOCK;
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t b = 0; b < nb; b++) {
        const int64_t t0 = b * DSMOE_MOE_ROW_BLOCK;
        moe_combine_rows(m, y, t0, T - t0 < DSMOE_MOE_ROW_BLOCK ? T : t0 + DSMOE_MOE_ROW_BLOCK, T);
    }
}

dsmoe_status dsmoe_moe_forward(dsmoe_moe *m, float *y, const float *x, int64_t T,
                               int n_threads) {
    if (!m) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_moe_forward: NULL layer");
    m->have_fwd = 0;
    dsmoe_free(m->retired_state); /* the routing before the last reserve; see moe.h */
    m->retired_state = NULL;
    if (T < 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_moe_forward: T = %lld < 0",
                            (long long)T);
    if (T > 0 && (!y || !x))
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "dsmoe_moe_forward: NULL %s", !y ? "y" : "x");
    if (T > m->cfg.max_tokens)
        return dsmoe__error(DSMOE_STATUS_WORKSPACE_TOO_SMALL,
                            "dsmoe_moe_forward: T = %lld exceeds the layer's max_tokens = %lld "
                            "(call dsmoe_moe_reserve)",
                            (long long)T, (long long)m->cfg.max_tokens);
    const int nt = moe_nthreads(m, n_threads);
    moe_ws *w = &m->ws;
    dsmoe_router_output ro;
    memset(&ro, 0, sizeof ro);
    ro.indices = w->indices;
    ro.weights = w->weights;
    ro.scores = w->scores;
    ro.logits = w->logits;
    if (T > 0) {
        dsmoe_status st = dsmoe_router_forward_hidden(
            &m->cfg.router, &ro, x, (const char *)m->params + m->off_gate * m->esz,
            m->cfg.weight_dtype, m->D, m->cfg.router.use_bias ? m->bias : NULL, T, w->router,
            w->router_size, nt);
        if (st != DSMOE_OK) return st;
    }
    moe_dispatch(m, T);
    m->routing.T = T;
    if (T > 0) {
        if (T <= DSMOE_MOE_DECODE_MAX_T)
            moe_forward_decode(m, x, T, nt);
        else
            moe_forward_batched(m, x, nt);
        moe_combine(m, y, T, nt);
    }
    m->routing.indices = w->indices;
    m->routing.weights = w->weights;
    m->routing.scores = w->scores;
    m->routing.logits = w->logits;
    m->routing.counts = w->counts;
    m->have_fwd = 1;
    return DSMOE_OK;
}

/* ---------------------------------------------------------------- backward -- */

/* Phase A for one row block: dH = dY·W2, dGU = swiglu'(dH), dX = dGU·W1. */
static void moe_expert_backward_rows(const dsmoe_moe *m, int32_t e, int n, const float *dY,
                                     const float *GU, float *dH, float *dGU, float *dX) {
    const int D = m->D, f = e < m->E ? m->F : m->Fs;
    const dsmoe__kernel_table *kt = dsmoe__kernels();
    dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__NOTRANS, n, f, D, 1.0f, dY, D,
                (const float *)moe_w2(m, e), f, 0.0f, dH, f);
    /* The kernel accumulates: each row is zeroed just before it, while it sits in L1
     * (one pass over dGU instead of a memset pass and then the kernel's). */
    for (int i = 0; i < n; i++) {
        const float *gu = GU + (size_t)i * 2 * f;
        float *dgu = dGU + (size_t)i * 2 * f;
        memset(dgu, 0, (size_t)2 * f * sizeof(float));
        kt->swiglu_backward(dgu, dgu + f, dH + (size_t)i * f, gu, gu + f, f);
    }
    dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__NOTRANS, n, D, 2 * f, 1.0f, dGU, 2 * f,
                (const float *)moe_w1(m, e), D, 0.0f, dX, D);
}

/* Rows [t0, t1) of dx += dxtmp + Σ_k dXg[slot(t, k)] (in k order) + dXs, the sum
 * gathered in dxtmp (which holds du·Wg). */
DSMOE__CLONES static void moe_dx_rows(const dsmoe_moe *m, float *dx, int64_t t0, int64_t t1,
                                      int64_t T) {
    const moe_ws *w = &m->ws;
    const size_t Dz = (size_t)m->D;
    const int32_t K = m->K;
    for (int64_t t = t0; t < t1; t++) {
        if (t + MOE_PF_AHEAD < T) moe_prefetch_rows(m, w->dXg, t + MOE_PF_AHEAD);
        float *acc = w->dxtmp + (size_t)t * Dz;
        for (int32_t k = 0; k < K; k++) {
            int32_t r = w->slot[t * K + k];
            if (r < 0) continue;
            const float *g = w->dXg + (size_t)r * Dz;
            for (size_t d = 0; d < Dz; d++) acc[d] = acc[d] + g[d];
        }
        if (m->Fs) {
            const float *g = w->dXs + (size_t)t * Dz;
            for (size_t d = 0; d < Dz; d++) acc[d] = acc[d] + g[d];
        }
        float *dxt = dx + (size_t)t * Dz;
        for (size_t d = 0; d < Dz; d++) dxt[d] = dxt[d] + acc[d];
    }
}

dsmoe_status dsmoe_moe_backward(dsmoe_moe *m, float *dx, const float *dy, const float *x,
                                const float *dlogits_extra, int64_t T, int n_threads) {
    if (!m) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_moe_backward: NULL layer");
    if (!m->cfg.train || !m->grads)
        return dsmoe__error(DSMOE_STATUS_UNSUPPORTED,
                            "dsmoe_moe_backward: the layer was created without train = 1");
    if (m->have_fwd != 1)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            m->have_fwd == 2
                                ? "dsmoe_moe_backward: dsmoe_moe_reserve grew the workspace after "
                                  "the last forward (its activations are gone): run the forward again"
                                : "dsmoe_moe_backward: no successful forward to differentiate");
    if (T != m->routing.T)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "dsmoe_moe_backward: T = %lld but the last forward had T = %lld",
                            (long long)T, (long long)m->routing.T);
    if (T == 0) return DSMOE_OK;
    if (!dy || !x)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_moe_backward: NULL %s",
                            !dy ? "dy" : "x");
    const int nt = moe_nthreads(m, n_threads);
    moe_ws *w = &m->ws;
    const int32_t E = m->E, K = m->K, D = m->D, F = m->F, Fs = m->Fs;
    const size_t Dz = (size_t)D;

    /* 0. dweights (dsmoe__dot16: 16 running sums, the EP layer's bits) and the scaled
     * output gradients of the routed rows, in the experts' row order: Ye is read and dYe
     * written in sequence and only dy's token rows are gathered (fetched ahead); in token
     * order the writes to dYe were the scattered ones. Dropped slots' dweights are 0. */
    for (int64_t i = 0; i < T * K; i++)
        if (w->slot[i] < 0) w->dweights[i] = 0.0f;
    const int64_t R = w->offsets[E];
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t r = 0; r < R; r++) {
        if (r + MOE_PF_ROWS < R) {
            const char *nx = (const char *)(dy + (size_t)w->row_tok[r + MOE_PF_ROWS] * Dz);
            for (size_t b = 0; b < Dz * sizeof(float); b += 64) __builtin_prefetch(nx + b, 0, 3);
        }
        const int64_t t = w->row_tok[r];
        const int32_t *sl = w->slot + t * K;
        int32_t k = 0;
        while (k < K - 1 && sl[k] != (int32_t)r) k++;
        const float wk = w->weights[t * K + k];
        const float *dyt = dy + (size_t)t * Dz;
        float *dye = w->dYe + (size_t)r * Dz;
        w->dweights[t * K + k] = dsmoe__dot16(dyt, w->Ye + (size_t)r * Dz, Dz);
        for (size_t d = 0; d < Dz; d++) dye[d] = wk * dyt[d];
    }
    /* 1. router: dlogits = router_backward(dweights) + extra */
    memset(w->dlogits, 0, (size_t)T * E * sizeof(float));
    dsmoe_status st = dsmoe_router_backward(&m->cfg.router, w->dlogits, w->dweights, w->indices,
                                            w->scores, T, nt);
    if (st != DSMOE_OK) return st;
    if (dlogits_extra) {
        const size_t n = (size_t)T * E;
        for (size_t i = 0; i < n; i++) w->dlogits[i] = w->dlogits[i] + dlogits_extra[i];
    }

    /* 2. phase A over row blocks: dH, dGU, dX */
    const int64_t ntask = m->n_tasks + m->n_shared_tasks;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t i = 0; i < ntask; i++) {
        const moe_task tk = w->tasks[i];
        if (tk.e < E) {
            size_t r0 = (size_t)tk.r0;
            moe_expert_backward_rows(m, tk.e, tk.n, w->dYe + r0 * Dz, w->GU + r0 * 2 * F,
                                     w->dH + r0 * F, w->dGU + r0 * 2 * F, w->dXg + r0 * Dz);
        } else {
            size_t t0 = (size_t)tk.r0;
            moe_expert_backward_rows(m, E, tk.n, dy + t0 * Dz, w->GUs + t0 * 2 * Fs,
                                     w->dHs + t0 * Fs, w->dGUs + t0 * 2 * Fs, w->dXs + t0 * Dz);
        }
    }

    /* 3. phase B over weight-row blocks: dW1 += dGUᵀ·X, dW2 += dYᵀ·H, dWg += duᵀ·x.
     * Task e: expert (or E: shared, E+1: gate); n: 0 = W1 rows, 1 = W2 rows. The shared
     * expert's tasks (over all T rows, the largest) are listed first so that the routed
     * ones even out the threads' ends; each task writes its own gradient rows, so the
     * order never changes a result. */
    int64_t nw = 0;
    for (int32_t j = 0; j <= E + 1; j++) {
        const int32_t e = j == 0 ? E : j <= E ? j - 1 : E + 1;
        int64_t rows1, rows2;
        if (e < E) {
            if (w->kept[e] == 0) continue;
            rows1 = 2 * (int64_t)F;
            rows2 = D;
        } else if (e == E) {
            if (!Fs) continue;
            rows1 = 2 * (int64_t)Fs;
            rows2 = D;
        } else {
            rows1 = E;
            rows2 = 0;
        }
        for (int64_t r = 0; r < rows1; r += MOE_WROW_BLOCK) {
            w->wtasks[nw].e = e;
            w->wtasks[nw].n = 0;
            w->wtasks[nw].r0 = r;
            nw++;
        }
        for (int64_t r = 0; r < rows2; r += MOE_WROW_BLOCK) {
            w->wtasks[nw].e = e;
            w->wtasks[nw].n = 1;
            w->wtasks[nw].r0 = r;
            nw++;
        }
    }
    /* Costlier tasks first (multiply-adds), ties in the order listed. */
    for (int64_t i = 0; i < nw; i++) {
        moe_task *q = &w->wtasks[i];
        const int64_t rows = q->e < E ? w->kept[q->e] : T;
        const int64_t f = q->e < E ? F : Fs, out = q->e > E ? E : q->n == 0 ? 2 * f : D;
        const int64_t nr = out - q->r0 < MOE_WROW_BLOCK ? out - q->r0 : MOE_WROW_BLOCK;
        q->cost = nr * (q->n == 0 || q->e > E ? D : f) * rows;
        q->idx = i;
    }
    qsort(w->wtasks, (size_t)nw, sizeof *w->wtasks, moe_wtask_cmp);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t i = 0; i < nw; i++) {
        const moe_task tk = w->wtasks[i];
        const int r0 = (int)tk.r0;
        if (tk.e == E + 1) {
            int nr = E - r0 < MOE_WROW_BLOCK ? E - r0 : MOE_WROW_BLOCK;
            dsmoe__sgemm(DSMOE__TRANS, DSMOE__NOTRANS, nr, D, (int)T, 1.0f,
                        w->dlogits + r0, E, x, D, 1.0f, m->grads + m->off_gate + (size_t)r0 * Dz,
                        D);
            continue;
        }
        const int32_t e = tk.e;
        const int f = e < E ? F : Fs;
        int n;
        const float *X, *dY, *H, *dGU;
        if (e < E) {
            size_t o = (size_t)w->offsets[e];
            n = (int)w->kept[e];
            X = w->Xg + o * Dz;
            dY = w->dYe + o * Dz;
            H = w->H + o * (size_t)F;
            dGU = w->dGU + o * 2 * (size_t)F;
        } else {
            n = (int)T;
            X = x;
            dY = dy;
            H = w->Hs;
            dGU = w->dGUs;
        }
        if (tk.n == 0) {
            int nr = 2 * f - r0 < MOE_WROW_BLOCK ? 2 * f - r0 : MOE_WROW_BLOCK;
            dsmoe__sgemm(DSMOE__TRANS, DSMOE__NOTRANS, nr, D, n, 1.0f, dGU + r0, 2 * f,
                        X, D, 1.0f, moe_dw1(m, e) + (size_t)r0 * Dz, D);
        } else {
            int nr = D - r0 < MOE_WROW_BLOCK ? D - r0 : MOE_WROW_BLOCK;
            dsmoe__sgemm(DSMOE__TRANS, DSMOE__NOTRANS, nr, f, n, 1.0f, dY + r0, D, H, f,
                        1.0f, moe_dw2(m, e) + (size_t)r0 * f, f);
        }
    }

    /* 4. dx += du·Wg + Σ_k dXg[slot(t,k)] + dXs, over token blocks */
    if (dx) {
        const float *Wg = (const float *)m->params + m->off_gate;
        const int64_t nb = (T + DSMOE_MOE_ROW_BLOCK - 1) / DSMOE_MOE_ROW_BLOCK;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
        for (int64_t b = 0; b < nb; b++) {
            int64_t t0 = b * DSMOE_MOE_ROW_BLOCK;
            int n = (int)(T - t0 < DSMOE_MOE_ROW_BLOCK ? T - t0 : DSMOE_MOE_ROW_BLOCK);
            float *tmp = w->dxtmp + (size_t)t0 * Dz;
            dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__NOTRANS, n, D, E, 1.0f,
                        w->dlogits + (size_t)t0 * E, E, Wg, D, 0.0f, tmp, D);
            moe_dx_rows(m, dx, t0, t0 + n, T);
        }
    }
    return DSMOE_OK;
}

/* ---------------------------------------------------------------- checkpoints -- */

static int moe_name(char *buf, size_t size, const char *prefix, const char *name) {
    int n = snprintf(buf, size, "%s%s", prefix ? prefix : "", name);
    return n >= 0 && (size_t)n < size;
}

dsmoe_status dsmoe__moe_load(dsmoe_moe *m, const dsmoe_safetensors *st, const char *prefix,
                             int checked) {
    if (!m || !st)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "dsmoe_moe_load_safetensors: NULL argument");
    /* pass 1: every tensor's presence, dtype, shape and values (moe_file.c) */
    if (!checked) {
        dsmoe_status s = dsmoe_moe_check_safetensors(&m->cfg, st, prefix);
        if (s != DSMOE_OK) return s;
    }
    const int64_t n = dsmoe_moe_tensor_count(m);
    char name[512];
    /* the packed layout converts each expert matrix through a row-major copy */
    void *tmp = NULL;
    if (m->packed) {
        const size_t f = (size_t)(m->F > m->Fs ? m->F : m->Fs);
        tmp = malloc(f * (size_t)m->D * m->esz);
        if (!tmp)
            return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY,
                                "dsmoe_moe_load_safetensors: %zu bytes to pack a matrix",
                                f * (size_t)m->D * m->esz);
    }
    /* pass 2: copy / convert */
    for (int64_t i = 0; i < n; i++) {
        dsmoe_moe_tensor t;
        dsmoe_moe_tensor_at(m, i, &t);
        moe_name(name, sizeof name, prefix, t.name);
        dsmoe_tensor_view v;
        dsmoe_safetensors_get(st, name, &v);
        size_t cnt = (size_t)t.shape[0] * (size_t)(t.ndim == 2 ? t.shape[1] : 1);
        void *out = t.data;
        if (t.layout == DSMOE_MOE_LAYOUT_PACKED) {
            if (!tmp) /* not reached: tmp exists whenever the layer is packed */
                return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "moe: packed tensor without a buffer");
            out = tmp;
        }
        if (t.dtype == DSMOE_DTYPE_F32) {
            dsmoe_status s = dsmoe_tensor_to_f32(&v, (float *)out);
            if (s != DSMOE_OK) { /* not reached: pass 1 checked dtype and shape */
                free(tmp);
                return s;
            }
        } else if (v.dtype == DSMOE_DTYPE_BF16) {
            memcpy(out, v.data, cnt * 2);
        } else {
            uint16_t *dst = (uint16_t *)out;
            const size_t es = dsmoe_dtype_size(v.dtype);
            for (size_t j = 0; j < cnt; j++) {
                float f;
                dsmoe_tensor_view one = v;
                one.ndim = 1;
                one.shape[0] = 1;
                one.data = (const char *)v.data + j * es;
                one.nbytes = es;
                dsmoe_tensor_to_f32(&one, &f);
                dst[j] = dsmoe_f32_to_bf16(f);
            }
        }
        if (out != t.data) dsmoe__moe_pack_rows(t.data, out, m->esz, t.shape[0], t.shape[1]);
    }
    free(tmp);
    dsmoe_clear_error();
    m->have_fwd = 0;
    return DSMOE_OK;
}

dsmoe_status dsmoe_moe_load_safetensors(dsmoe_moe *m, const dsmoe_safetensors *st,
                                        const char *prefix) {
    return dsmoe__moe_load(m, st, prefix, 0);
}

/* Adds the layer's tensors and its config to wr. The packed layout is written in the
 * checkpoint layout through row-major copies, kept in copies[i] (NULL: refused). */
static dsmoe_status moe_write(const dsmoe_moe *m, dsmoe_safetensors_writer *wr,
                              const char *prefix, void **copies) {
    if (!m || !wr)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_moe_write: NULL argument");
    if (m->packed && !copies)
        return dsmoe__error(DSMOE_STATUS_UNSUPPORTED,
                            "dsmoe_moe_write: a packed layer's tensors need row-major copies "
                            "that the writer cannot own; use dsmoe_moe_save or a checkpoint-"
                            "layout layer");
    const size_t plen = prefix ? strlen(prefix) : 0;
    if (plen > 400)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_moe_write: prefix too long");
    char json[2048], ver[16], key[600], nm[512];
    dsmoe_moe_config_json(&m->cfg, json, sizeof json);
    snprintf(ver, sizeof ver, "%d", DSMOE_MOE_FORMAT_VERSION);
    dsmoe__moe_config_key(key, sizeof key, prefix);
    dsmoe_status s = dsmoe_safetensors_writer_set_metadata(wr, "format", "pt");
    if (s == DSMOE_OK) s = dsmoe_safetensors_writer_set_metadata(wr, "dsmoe.format_version", ver);
    if (s == DSMOE_OK) s = dsmoe_safetensors_writer_set_metadata(wr, key, json);
    const int64_t n = dsmoe_moe_tensor_count(m);
    for (int64_t i = 0; i < n && s == DSMOE_OK; i++) {
        dsmoe_moe_tensor t;
        dsmoe_moe_tensor_at(m, i, &t);
        moe_name(nm, sizeof nm, prefix, t.name);
        const void *data = t.data;
        if (t.layout == DSMOE_MOE_LAYOUT_PACKED) {
            const size_t bytes = (size_t)t.shape[0] * (size_t)t.shape[1] * m->esz;
            copies[i] = malloc(bytes);
            if (!copies[i])
                return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY,
                                    "dsmoe_moe_save: %zu bytes to unpack '%s'", bytes, t.name);
            dsmoe__moe_unpack_rows(copies[i], t.data, m->esz, t.shape[0], t.shape[1]);
            data = copies[i];
        }
        s = dsmoe_safetensors_writer_add(wr, nm, t.dtype, t.ndim, t.shape, data);
    }
    return s;
}

dsmoe_status dsmoe_moe_write(const dsmoe_moe *m, dsmoe_safetensors_writer *wr,
                             const char *prefix) {
    return moe_write(m, wr, prefix, NULL);
}

dsmoe_status dsmoe_moe_save(const dsmoe_moe *m, const char *path, const char *prefix) {
    if (!m || !path)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_moe_save: NULL argument");
    const int64_t n = dsmoe_moe_tensor_count(m);
    void **copies = (void **)calloc((size_t)n, sizeof(void *));
    if (!copies) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "dsmoe_moe_save: copies");
    dsmoe_safetensors_writer *wr = NULL;
    dsmoe_status s = dsmoe_safetensors_writer_create(&wr);
    if (s == DSMOE_OK) s = moe_write(m, wr, prefix, copies);
    if (s == DSMOE_OK) s = dsmoe_safetensors_writer_save(wr, path);
    dsmoe_safetensors_writer_free(wr);
    for (int64_t i = 0; i < n; i++) free(copies[i]);
    free(copies);
    return s;
}
