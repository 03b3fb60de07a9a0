/*
 * mtp_spec.c — speculative decoding with the MTP depths (dsmoe_model_spec, model.h):
 * drafts from the depths, one verify forward of the main model per step, acceptance
 * by sampling from the main model's logits, truncation of the rejected positions.
 *
 * State between steps (m: the last produced token's position, t_m = tok[m]):
 *   main cache      positions 0 .. m − 1
 *   hid[0][j]       the main model's final-norm state of position j < m
 *   depth k cache   positions 0 .. com[k] − 1, com[k] = max(0, m − k + 1): the positions
 *                   j whose input token t_{j+k} has been produced (j + k <= m)
 *   hid[k][j]       depth k's output h^k_j for j < com[k] (the next depth's input)
 * A step drafts d_k = argmax of depth k's logits at position m − 1 after running it at
 * positions com[k] .. m − 1 (the token inputs past m are the drafts d_1 .. d_{k−1},
 * written into tok[m + 1 ..]), then truncates depth k back to com[k]; verifies
 * tok[m .. m + N] in one main forward; accepts; truncates the main cache.
 * Only public model calls: the same bits as any other use of them.
 */
#include "model/model_internal.h"

#include <stdlib.h>
#include <string.h>

struct dsmoe_model_spec {
    dsmoe_model *m;
    int32_t N;                  /* drafts per step */
    int64_t cap;                /* positions */
    int64_t pos;                /* m; -1 when no sequence */
    int32_t V, D;
    dsmoe_model_cache *main;
    dsmoe_model_cache *depth[DSMOE_MODEL_SPEC_MAX_DRAFT]; /* virtual depth k at k − 1 */
    float *hid[DSMOE_MODEL_SPEC_MAX_DRAFT];               /* (cap, D): h^0 .. h^{N−1} */
    int32_t *tok;               /* (cap + N + 1) token history, drafts past pos */
    float *logits;              /* (N + 1, V) */
    float *scratch;             /* (2 V) sampling */
    dsmoe_model_spec_stats st;
    int32_t drafts[DSMOE_MODEL_SPEC_MAX_DRAFT], n_drafts; /* the last step's */
};

void dsmoe_model_spec_free(dsmoe_model_spec *s) {
    if (!s) return;
    dsmoe_model_cache_free(s->main);
    for (int k = 0; k < DSMOE_MODEL_SPEC_MAX_DRAFT; k++) {
        dsmoe_model_cache_free(s->depth[k]);
        dsmoe_free(s->hid[k]);
    }
    free(s->tok);
    dsmoe_free(s->logits);
    free(s->scratch);
    free(s);
}

dsmoe_status dsmoe_model_spec_create(dsmoe_model *m, int32_t n_draft, int64_t capacity,
                                     dsmoe_model_spec **out) {
    if (out) *out = NULL;
    if (!m || !out)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_model_spec_create: NULL argument");
    const int32_t Dm = dsmoe_model_mtp_depths(m);
    if (Dm < 1)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "dsmoe_model_spec_create: the model has no MTP depths loaded (%d "
                            "stored; open it with dsmoe_model_options.mtp = 1)",
                            (int)dsmoe_model_files_mtp_depths(dsmoe_model_get_files(m)));
    if (n_draft < 1 || n_draft > DSMOE_MODEL_SPEC_MAX_DRAFT)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "dsmoe_model_spec_create: n_draft %d outside 1 .. %d", (int)n_draft,
                            DSMOE_MODEL_SPEC_MAX_DRAFT);
    const dsmoe_model_config *c = dsmoe_model_get_config(m);
    dsmoe_model_spec *s = (dsmoe_model_spec *)calloc(1, sizeof *s);
    if (!s) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "dsmoe_model_spec_create");
    s->m = m;
    s->N = n_draft;
    s->cap = capacity;
    s->pos = -1;
    s->V = c->vocab_size;
    s->D = c->hidden_size;
    dsmoe_status st = dsmoe_model_cache_create(m, capacity, &s->main);
    for (int32_t k = 1; k <= n_draft && st == DSMOE_OK; k++)
        st = dsmoe_model_mtp_cache_create(m, k < Dm ? k : Dm, capacity, &s->depth[k - 1]);
    if (st != DSMOE_OK) {
        dsmoe_model_spec_free(s);
        return dsmoe__error(st, "dsmoe_model_spec_create: %s", dsmoe_last_error());
    }
    size_t hn = 0;
    if (!dsmoe__mul_size((size_t)capacity, (size_t)s->D * sizeof(float), &hn)) hn = 0;
    for (int32_t k = 0; k < n_draft && hn; k++) s->hid[k] = (float *)dsmoe_malloc(hn);
    s->tok = (int32_t *)malloc((size_t)(capacity + n_draft + 1) * sizeof *s->tok);
    s->logits = (float *)dsmoe_malloc((size_t)(n_draft + 1) * (size_t)s->V * sizeof(float));
    s->scratch = (float *)malloc(2 * (size_t)s->V * sizeof(float));
    int ok = hn && s->tok && s->logits && s->scratch;
    for (int32_t k = 0; k < n_draft; k++) ok = ok && s->hid[k];
    if (!ok) {
        dsmoe_model_spec_free(s);
        return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY,
                            "dsmoe_model_spec_create: %d hidden-state arrays of %lld x %d floats",
                            (int)n_draft, (long long)capacity, (int)c->hidden_size);
    }
    *out = s;
    return DSMOE_OK;
}

/* The status of a failed dsmoe_sample (its message names it). */
static dsmoe_status sample_status(void) {
    return strstr(dsmoe_last_error(), "NON_FINITE") ? DSMOE_STATUS_NON_FINITE
                                                    : DSMOE_STATUS_INVALID_ARGUMENT;
}

/* Forgets the sequence after a failure (the caches may hold partial positions). */
static dsmoe_status fail(dsmoe_model_spec *s, dsmoe_status st) {
    s->pos = -1;
    return st;
}

dsmoe_status dsmoe_model_spec_prefill(dsmoe_model_spec *s, const int32_t *prompt, int64_t P,
                                      float temperature, float top_p, dsmoe_rng *rng,
                                      int32_t *first) {
    if (!s || !prompt || !first)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_model_spec_prefill: NULL argument");
    s->pos = -1;
    memset(&s->st, 0, sizeof s->st);
    s->n_drafts = 0;
    dsmoe_model_cache_truncate(s->main, 0);
    for (int32_t k = 0; k < s->N; k++) dsmoe_model_cache_truncate(s->depth[k], 0);
    if (P < 1 || P > s->cap)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "dsmoe_model_spec_prefill: the prompt has %lld tokens; 1 .. %lld "
                            "(the capacity) fit", (long long)P, (long long)s->cap);
    dsmoe_status st = dsmoe_model_forward_hidden(s->m, s->main, prompt, P, s->logits, s->hid[0],
                                                 DSMOE_MODEL_LOGITS_LAST);
    if (st != DSMOE_OK) return fail(s, st);
    const int32_t t = dsmoe_sample(s->logits, s->V, temperature, top_p, rng, s->scratch);
    if (t < 0) return fail(s, sample_status());
    memcpy(s->tok, prompt, (size_t)P * sizeof *s->tok);
    s->tok[P] = t;
    s->pos = P;
    *first = t;
    return DSMOE_OK;
}

/* The largest logit's id (the lowest among equal ones), as greedy dsmoe_sample. */
static int32_t argmax(const float *x, int32_t V) {
    int32_t b = 0;
    for (int32_t i = 1; i < V; i++)
        if (x[i] > x[b]) b = i;
    return b;
}

dsmoe_status dsmoe_model_spec_step(dsmoe_model_spec *s, float temperature, float top_p,
                                   dsmoe_rng *rng, int32_t *out, int32_t *n_out) {
    if (!s || !out || !n_out)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_model_spec_step: NULL argument");
    if (s->pos < 0)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "dsmoe_model_spec_step: no sequence (call dsmoe_model_spec_prefill)");
    const int64_t m = s->pos, D = s->D;
    if (m >= s->cap)
        return dsmoe__error(DSMOE_STATUS_WORKSPACE_TOO_SMALL,
                            "dsmoe_model_spec_step: all %lld positions are used", (long long)s->cap);
    /* drafts this step: the verify pass needs positions m .. m + N */
    int32_t N = s->N;
    if ((int64_t)N > s->cap - m - 1) N = (int32_t)(s->cap - m - 1);
    dsmoe_status st;
    for (int32_t k = 1; k <= N; k++) {
        dsmoe_model_cache *dc = s->depth[k - 1];
        const int64_t from = dsmoe_model_cache_length(dc), cnt = m - from;
        /* positions from .. m − 1, inputs h^{k−1} and t_{j+k} (drafts past m) */
        st = dsmoe_model_forward_mtp(s->m, dc, s->hid[k - 1] + from * D, s->tok + from + k, cnt,
                                     k < s->N ? s->hid[k] + from * D : NULL, s->logits,
                                     DSMOE_MODEL_LOGITS_LAST);
        if (st != DSMOE_OK) return fail(s, st);
        s->tok[m + k] = s->drafts[k - 1] = argmax(s->logits, s->V);
        const int64_t com = m - k + 1 > 0 ? m - k + 1 : 0;
        dsmoe_model_cache_truncate(dc, com);
    }
    s->n_drafts = N;
    /* verify t_m, d_1 .. d_N in one forward, absorbed: each position's logits are the
     * bits of a one-token forward */
    st = dsmoe_model_forward_hidden(s->m, s->main, s->tok + m, N + 1, s->logits, s->hid[0] + m * D,
                                    DSMOE_MODEL_ATTN_ABSORBED);
    if (st != DSMOE_OK) return fail(s, st);
    int32_t a = 0;
    for (;; a++) {
        const int32_t t = dsmoe_sample(s->logits + (int64_t)a * s->V, s->V, temperature, top_p, rng,
                                       s->scratch);
        if (t < 0) return fail(s, sample_status());
        out[a] = t;
        if (a < N) s->st.drafted[a]++;
        if (a == N || t != s->tok[m + a + 1]) {
            s->tok[m + a + 1] = t;
            break;
        }
        s->st.accepted[a]++;
    }
    /* positions m .. m + a hold t_m, d_1 .. d_a; the rest were rejected */
    dsmoe_model_cache_truncate(s->main, m + a + 1);
    s->pos = m + a + 1;
    s->st.passes++;
    s->st.produced += a + 1;
    *n_out = a + 1;
    return DSMOE_OK;
}

const dsmoe_model_spec_stats *dsmoe_model_spec_get_stats(const dsmoe_model_spec *s) {
    return s ? &s->st : NULL;
}

const int32_t *dsmoe_model_spec_drafts(const dsmoe_model_spec *s, int32_t *n) {
    if (n) *n = s ? s->n_drafts : 0;
    return s ? s->drafts : NULL;
}

dsmoe_model_cache *dsmoe_model_spec_cache(dsmoe_model_spec *s) { return s ? s->main : NULL; }
