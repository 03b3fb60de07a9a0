/*
 * test_model_forward.c — dsmoe_model (open, cache, forward) on every golden model
 * directory listed in tests/golden/model/MANIFEST (read at run time): the logits of a
 * whole prompt against the fp64 reference (tests/ref/model_ref.py), the naive and the
 * absorbed attention against it and against each other, token-by-token decoding and
 * chunked prompts against one forward, a prompt continued by decoding, truncation and
 * redo, 1 against 2 threads (same bits), LOGITS_LAST, widen_f32 against the stored
 * dtypes, and every error path leaving the cache and the logits as they were.
 */
#include "model_testutil.h"

#include <math.h>

/* fp32 against fp64, relative to the array's scale (max |ref|, at least 1), as
 * test_model_golden: logits there come within 3e-7 of their scale; bound 2e-5. */
#define REL 2e-5

/* Two fp32 results of the same math (different association or chunking). */
static int close_f(const char *what, const float *got, const float *want, int64_t n, double rel) {
    double *w = (double *)calloc((size_t)(n > 0 ? n : 1), sizeof *w);
    for (int64_t i = 0; i < n; i++) w[i] = want[i];
    int ok = mt_close_to(what, got, w, n, rel);
    free(w);
    return ok;
}

static void dir_of(char *buf, size_t cap, const char *name) { snprintf(buf, cap, "%s%s", MT_GOLDEN, name); }

static dsmoe_model *open_model(const char *dir, int nt, int max_tokens, int widen) {
    dsmoe_model_options o;
    dsmoe_model_options_default(&o);
    o.n_threads = nt;
    o.max_tokens = max_tokens;
    o.widen_f32 = widen;
    dsmoe_model *m = NULL;
    ASSERT_OK(dsmoe_model_open(dir, &o, &m));
    return m;
}

/* A whole sequence in one call (flags) from an empty cache into logits (T, V). */
static void run_all(dsmoe_model *m, const int32_t *tok, int64_t T, float *logits, unsigned flags) {
    dsmoe_model_cache *k = NULL;
    ASSERT_OK(dsmoe_model_cache_create(m, T, &k));
    if (!k) return;
    ASSERT_OK(dsmoe_model_forward(m, k, tok, T, logits, flags));
    ASSERT_EQ_INT(dsmoe_model_cache_length(k), T);
    dsmoe_model_cache_free(k);
}

/* Token by token (absorbed, LOGITS_LAST) into logits (T, V). */
static void run_decode(dsmoe_model *m, const int32_t *tok, int64_t T, float *logits) {
    const int64_t V = dsmoe_model_get_config(m)->vocab_size;
    dsmoe_model_cache *k = NULL;
    ASSERT_OK(dsmoe_model_cache_create(m, T, &k));
    if (!k) return;
    for (int64_t t = 0; t < T; t++) {
        ASSERT_OK(dsmoe_model_forward(m, k, tok + t, 1, logits + t * V,
                                      DSMOE_MODEL_ATTN_ABSORBED | DSMOE_MODEL_LOGITS_LAST));
        ASSERT_EQ_INT(dsmoe_model_cache_length(k), t + 1);
    }
    dsmoe_model_cache_free(k);
}

/* A longer sequence than the golden prompt (positions past YaRN's original length):
 * the golden tokens, then ids from a fixed generator. */
#define LONG_T 40

static void check_case(const char *name) {
    char dir[512], path[700];
    dir_of(dir, sizeof dir, name);
    int64_t T, n;
    snprintf(path, sizeof path, "%s/tokens.npy", dir);
    double *tokd = mt_npy64(path, &T);
    snprintf(path, sizeof path, "%s/logits.npy", dir);
    double *ref = mt_npy64(path, &n);
    dsmoe_model *m = open_model(dir, 1, 0, 0);
    dsmoe_model *m2 = open_model(dir, 2, 0, 0);
    if (!tokd || !ref || !m || !m2) goto done;
    {
        const dsmoe_model_config *c = dsmoe_model_get_config(m);
        const int64_t V = c->vocab_size;
        ASSERT_EQ_INT(n, T * V);
        int32_t tok[LONG_T];
        tl_seed(7);
        for (int64_t t = 0; t < LONG_T; t++) tok[t] = t < T ? (int32_t)tokd[t] : (int32_t)(tl_next() % (uint64_t)V);
        const size_t LB = (size_t)(LONG_T * V) * sizeof(float);
        float *a = (float *)malloc(LB), *b = (float *)malloc(LB), *d = (float *)malloc(LB);
        char what[160];

        /* the prompt in one call: automatic (naive), forced naive, forced absorbed */
        snprintf(what, sizeof what, "%s: logits (one call)", name);
        run_all(m, tok, T, a, 0);
        mt_close_to(what, a, ref, T * V, REL);
        run_all(m, tok, T, b, DSMOE_MODEL_ATTN_NAIVE);
        tl_same_bits("automatic = naive for T > 4", a, b, T * V);
        snprintf(what, sizeof what, "%s: logits (absorbed)", name);
        run_all(m, tok, T, d, DSMOE_MODEL_ATTN_ABSORBED);
        mt_close_to(what, d, ref, T * V, REL);

        /* the long sequence: naive in one call against absorbed, decoding, chunks */
        run_all(m, tok, LONG_T, a, DSMOE_MODEL_ATTN_NAIVE);
        mt_close_to(what, a, ref, T * V, REL);
        run_all(m, tok, LONG_T, b, DSMOE_MODEL_ATTN_ABSORBED);
        snprintf(what, sizeof what, "%s: absorbed vs naive, %d tokens", name, LONG_T);
        close_f(what, b, a, LONG_T * V, REL);
        run_decode(m, tok, LONG_T, d);
        snprintf(what, sizeof what, "%s: token-by-token decoding vs one forward", name);
        close_f(what, d, a, LONG_T * V, REL);
        for (int mt = 2; mt <= 3; mt++) {
            dsmoe_model *mc = open_model(dir, 1, mt, 0);
            if (!mc) continue;
            for (int f = 0; f < 2; f++) {
                unsigned fl = f ? DSMOE_MODEL_ATTN_ABSORBED : DSMOE_MODEL_ATTN_NAIVE;
                run_all(mc, tok, LONG_T, b, fl);
                snprintf(what, sizeof what, "%s: chunks of %d (%s) vs one call", name, mt,
                         f ? "absorbed" : "naive");
                close_f(what, b, a, LONG_T * V, REL);
            }
            dsmoe_model_free(mc);
        }

        /* a prompt, then decoding; truncation and redo give the same bits */
        dsmoe_model_cache *k = NULL;
        ASSERT_OK(dsmoe_model_cache_create(m, LONG_T, &k));
        if (k) {
            const int64_t P = LONG_T - 6;
            ASSERT_OK(dsmoe_model_forward(m, k, tok, P, b, 0));
            for (int64_t t = P; t < LONG_T; t++)
                ASSERT_OK(dsmoe_model_forward(m, k, tok + t, 1, b + t * V, 0));
            snprintf(what, sizeof what, "%s: prompt then decoding vs one forward", name);
            close_f(what, b, a, LONG_T * V, REL);
            ASSERT_OK(dsmoe_model_cache_truncate(k, P - 3));
            ASSERT_EQ_INT(dsmoe_model_cache_length(k), P - 3);
            ASSERT_OK(dsmoe_model_forward(m, k, tok + P - 3, 3, d + (P - 3) * V, DSMOE_MODEL_ATTN_NAIVE));
            for (int64_t t = P; t < LONG_T; t++)
                ASSERT_OK(dsmoe_model_forward(m, k, tok + t, 1, d + t * V, 0));
            ASSERT_OK(dsmoe_model_cache_truncate(k, P - 3));
            ASSERT_OK(dsmoe_model_forward(m, k, tok + P - 3, 3, b + (P - 3) * V, DSMOE_MODEL_ATTN_NAIVE));
            for (int64_t t = P; t < LONG_T; t++)
                ASSERT_OK(dsmoe_model_forward(m, k, tok + t, 1, b + t * V, 0));
            tl_same_bits("truncate and redo", b + (P - 3) * V, d + (P - 3) * V, (LONG_T - P + 3) * V);
            /* a new sequence in the same cache */
            ASSERT_OK(dsmoe_model_cache_truncate(k, 0));
            ASSERT_OK(dsmoe_model_forward(m, k, tok, LONG_T, d, DSMOE_MODEL_ATTN_NAIVE));
            tl_same_bits("truncate to 0 and redo", d, a, LONG_T * V);
            /* LOGITS_LAST: the last row of the same call */
            ASSERT_OK(dsmoe_model_cache_truncate(k, 0));
            ASSERT_OK(dsmoe_model_forward(m, k, tok, LONG_T, d, DSMOE_MODEL_ATTN_NAIVE | DSMOE_MODEL_LOGITS_LAST));
            snprintf(what, sizeof what, "%s: LOGITS_LAST = the last row", name);
            close_f(what, d, a + (LONG_T - 1) * V, V, 1e-6); /* the head on 1 row, not T */
            /* logits NULL: the cache still advances, to the same state */
            ASSERT_OK(dsmoe_model_cache_truncate(k, 0));
            ASSERT_OK(dsmoe_model_forward(m, k, tok, LONG_T - 1, b, DSMOE_MODEL_ATTN_NAIVE));
            ASSERT_OK(dsmoe_model_forward(m, k, tok + LONG_T - 1, 1, b + (LONG_T - 1) * V, 0));
            ASSERT_OK(dsmoe_model_cache_truncate(k, 0));
            ASSERT_OK(dsmoe_model_forward(m, k, tok, LONG_T - 1, NULL, DSMOE_MODEL_ATTN_NAIVE));
            ASSERT_EQ_INT(dsmoe_model_cache_length(k), LONG_T - 1);
            ASSERT_OK(dsmoe_model_forward(m, k, tok + LONG_T - 1, 1, d, 0));
            tl_same_bits("no logits, then decoding", d, b + (LONG_T - 1) * V, V);
            dsmoe_model_cache_free(k);
        }

        /* 1 and 2 threads: the same bits, both paths and decoding */
        run_all(m2, tok, LONG_T, b, DSMOE_MODEL_ATTN_NAIVE);
        tl_same_bits("naive, 2 threads = 1 thread", b, a, LONG_T * V);
        run_all(m, tok, LONG_T, a, DSMOE_MODEL_ATTN_ABSORBED);
        run_all(m2, tok, LONG_T, b, DSMOE_MODEL_ATTN_ABSORBED);
        tl_same_bits("absorbed, 2 threads = 1 thread", b, a, LONG_T * V);
        run_decode(m, tok, LONG_T, a);
        run_decode(m2, tok, LONG_T, b);
        tl_same_bits("decoding, 2 threads = 1 thread", b, a, LONG_T * V);
        dsmoe_model *m3 = open_model(dir, 3, 16, 0); /* more threads than some cases have heads */
        dsmoe_model *m1 = open_model(dir, 1, 16, 0);
        if (m3 && m1) {
            run_all(m1, tok, LONG_T, a, 0);
            run_all(m3, tok, LONG_T, b, 0);
            tl_same_bits("chunks of 16, 3 threads = 1 thread", b, a, LONG_T * V);
        }
        dsmoe_model_free(m3);
        dsmoe_model_free(m1);

        /* every weight widened at open: the same model within rounding */
        dsmoe_model *mw = open_model(dir, 2, 0, 1);
        if (mw) {
            run_all(mw, tok, T, b, 0);
            snprintf(what, sizeof what, "%s: widen_f32 logits", name);
            mt_close_to(what, b, ref, T * V, REL);
            dsmoe_model_free(mw);
        }
        free(a);
        free(b);
        free(d);
    }
done:
    dsmoe_model_free(m);
    dsmoe_model_free(m2);
    free(tokd);
    free(ref);
}

static void test_manifest_cases(void) {
    size_t len;
    char *list = mt_read(MT_GOLDEN "MANIFEST", &len);
    ASSERT_TRUE(list != NULL);
    if (!list) return;
    int cases = 0;
    for (char *s = strtok(list, "\n"); s; s = strtok(NULL, "\n")) {
        if (!s[0] || s[0] == '#') continue;
        fprintf(stderr, "  case %s\n", s);
        check_case(s);
        cases++;
    }
    ASSERT_TRUE(cases >= 4);
    free(list);
}

/* The model object's accessors and the cache's bookkeeping. */
/* A prompt longer than two blocks of 64 queries (v3_dense_moe allows 512 positions): the
 * naive form in one call against the absorbed form, against token-by-token decoding, and
 * against a prompt continued after a cached prefix that is not a multiple of 64. */
static void test_long_prompt(void) {
    char dir[512];
    dir_of(dir, sizeof dir, "v3_dense_moe");
    dsmoe_model *m = NULL;
    ASSERT_OK(dsmoe_model_open(dir, NULL, &m));
    if (!m) return;
    const int64_t T = 150, V = dsmoe_model_get_config(m)->vocab_size;
    int32_t tok[150];
    tl_seed(17);
    for (int64_t t = 0; t < T; t++) tok[t] = (int32_t)(tl_next() % (uint64_t)V);
    float *a = (float *)malloc((size_t)(T * V) * sizeof(float)), *b = (float *)malloc((size_t)(T * V) * sizeof(float));
    dsmoe_model_cache *k = NULL;
    ASSERT_OK(dsmoe_model_cache_create(m, T, &k));
    if (k) {
        ASSERT_OK(dsmoe_model_forward(m, k, tok, T, a, DSMOE_MODEL_ATTN_NAIVE));
        ASSERT_OK(dsmoe_model_cache_truncate(k, 0));
        ASSERT_OK(dsmoe_model_forward(m, k, tok, T, b, DSMOE_MODEL_ATTN_ABSORBED));
        close_f("150 tokens: naive = absorbed", a, b, T * V, REL);
        ASSERT_OK(dsmoe_model_cache_truncate(k, 0));
        for (int64_t t = 0; t < T; t++) ASSERT_OK(dsmoe_model_forward(m, k, tok + t, 1, b + t * V, 0));
        close_f("150 tokens: naive = decoding", a, b, T * V, REL);
        ASSERT_OK(dsmoe_model_cache_truncate(k, 0));
        ASSERT_OK(dsmoe_model_forward(m, k, tok, 37, b, DSMOE_MODEL_ATTN_NAIVE));
        ASSERT_OK(dsmoe_model_forward(m, k, tok + 37, T - 37, b + 37 * V, DSMOE_MODEL_ATTN_NAIVE));
        close_f("150 tokens: 37 then 113 (naive)", a, b, T * V, REL);
    }
    dsmoe_model_cache_free(k);
    dsmoe_model_free(m);
    free(a);
    free(b);
}

static void test_accessors(void) {
    char dir[512];
    dir_of(dir, sizeof dir, "v3_yarn_q");
    dsmoe_model_options o;
    dsmoe_model_options_default(&o);
    ASSERT_EQ_INT(o.n_threads, 0);
    ASSERT_EQ_INT(o.max_tokens, 256);
    ASSERT_EQ_INT(o.widen_f32, 0);
    dsmoe_model *m = NULL;
    ASSERT_OK(dsmoe_model_open(dir, NULL, &m));
    if (!m) return;
    dsmoe_model_config c;
    ASSERT_OK(dsmoe_model_config_from_dir(dir, &c));
    ASSERT_TRUE(memcmp(dsmoe_model_get_config(m), &c, sizeof c) == 0);
    const dsmoe_model_files *mf = dsmoe_model_get_files(m);
    ASSERT_TRUE(mf != NULL);
    ASSERT_EQ_INT(dsmoe_model_files_shard_count(mf), 1);
    ASSERT_EQ_INT(dsmoe_model_files_mtp_depths(mf), 1); /* stored, not used */
    dsmoe_model_cache *k = NULL;
    ASSERT_OK(dsmoe_model_cache_create(m, 10, &k));
    ASSERT_EQ_INT(dsmoe_model_cache_capacity(k), 10);
    ASSERT_EQ_INT(dsmoe_model_cache_length(k), 0);
    ASSERT_OK(dsmoe_model_cache_truncate(k, 0));
    ASSERT_STATUS(dsmoe_model_cache_truncate(k, 1), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_model_cache_truncate(k, -1), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_model_cache_truncate(NULL, 0), DSMOE_STATUS_INVALID_ARGUMENT);
    dsmoe_model_cache_free(k);
    dsmoe_model_cache *bad = (dsmoe_model_cache *)&c;
    ASSERT_STATUS(dsmoe_model_cache_create(m, 0, &bad), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(bad == NULL);
    ASSERT_STATUS(dsmoe_model_cache_create(m, c.max_position_embeddings + 1, &bad),
                  DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "max_position_embeddings") != NULL);
    ASSERT_OK(dsmoe_model_cache_create(m, c.max_position_embeddings, &k));
    dsmoe_model_cache_free(k);
    ASSERT_STATUS(dsmoe_model_cache_create(NULL, 4, &k), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_model_cache_create(m, 4, NULL), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_EQ_INT(dsmoe_model_cache_length(NULL), 0);
    ASSERT_TRUE(dsmoe_model_get_config(NULL) == NULL);
    ASSERT_TRUE(dsmoe_model_get_files(NULL) == NULL);
    dsmoe_model_free(m);
    dsmoe_model_free(NULL);
    dsmoe_model_cache_free(NULL);
    dsmoe_model_options_default(NULL);

    /* open errors: *out NULL */
    dsmoe_model *bm = (dsmoe_model *)&c;
    ASSERT_STATUS(dsmoe_model_open(NULL, NULL, &bm), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(bm == NULL);
    ASSERT_STATUS(dsmoe_model_open(dir, NULL, NULL), DSMOE_STATUS_INVALID_ARGUMENT);
    bm = (dsmoe_model *)&c;
    ASSERT_TRUE(dsmoe_model_open(MT_GOLDEN "no_such_model", NULL, &bm) != DSMOE_OK);
    ASSERT_TRUE(bm == NULL);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "no_such_model") != NULL);
    bm = (dsmoe_model *)&c;
    ASSERT_STATUS(dsmoe_model_open(MT_GOLDEN "fp8_noscale", NULL, &bm), DSMOE_STATUS_NOT_FOUND);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "_scale_inv") != NULL);
    ASSERT_TRUE(bm == NULL);
}

/* Every refused call leaves the cache and the logits as they were. */
static void test_forward_errors(void) {
    char dir[512];
    dir_of(dir, sizeof dir, "v2_glg_sharded");
    dsmoe_model *m = open_model(dir, 1, 0, 0), *m2 = open_model(dir, 1, 0, 0);
    if (!m || !m2) goto out;
    {
        const int32_t V = dsmoe_model_get_config(m)->vocab_size;
        dsmoe_model_cache *k = NULL, *k2 = NULL;
        ASSERT_OK(dsmoe_model_cache_create(m, 6, &k));
        ASSERT_OK(dsmoe_model_cache_create(m2, 6, &k2));
        if (!k || !k2) goto out2;
        int32_t tok[8] = {1, 2, 3, 4, 5, 6, 7, 8};
        float *lg = (float *)malloc((size_t)(8 * V) * sizeof(float));
        float *snap = (float *)malloc((size_t)(8 * V) * sizeof(float));
        ASSERT_OK(dsmoe_model_forward(m, k, tok, 2, lg, 0));
        for (int64_t i = 0; i < 8 * V; i++) lg[i] = (float)i * 0.25f - 3.0f;
        memcpy(snap, lg, (size_t)(8 * V) * sizeof(float));
#define UNCHANGED()                                                                            \
    do {                                                                                       \
        ASSERT_EQ_INT(dsmoe_model_cache_length(k), 2);                                         \
        ASSERT_TRUE(memcmp(lg, snap, (size_t)(8 * V) * sizeof(float)) == 0);                   \
    } while (0)
        tok[2] = V; /* a bad id after good ones */
        ASSERT_STATUS(dsmoe_model_forward(m, k, tok, 4, lg, 0), DSMOE_STATUS_INVALID_ARGUMENT);
        char want[64];
        snprintf(want, sizeof want, "token 2 is %d", (int)V);
        ASSERT_TRUE(strstr(dsmoe_last_error(), want) != NULL);
        UNCHANGED();
        tok[2] = -1;
        ASSERT_STATUS(dsmoe_model_forward(m, k, tok, 4, lg, DSMOE_MODEL_ATTN_ABSORBED),
                      DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_TRUE(strstr(dsmoe_last_error(), "token 2 is -1") != NULL);
        UNCHANGED();
        tok[2] = 3;
        /* capacity: 2 held + 5 > 6 */
        ASSERT_STATUS(dsmoe_model_forward(m, k, tok, 5, lg, 0), DSMOE_STATUS_WORKSPACE_TOO_SMALL);
        ASSERT_TRUE(strstr(dsmoe_last_error(), "2 of 6") != NULL);
        UNCHANGED();
        /* flags */
        ASSERT_STATUS(dsmoe_model_forward(m, k, tok, 1, lg, 8u), DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_TRUE(strstr(dsmoe_last_error(), "unknown flags") != NULL);
        UNCHANGED();
        ASSERT_STATUS(dsmoe_model_forward(m, k, tok, 1, lg,
                                          DSMOE_MODEL_ATTN_NAIVE | DSMOE_MODEL_ATTN_ABSORBED),
                      DSMOE_STATUS_INVALID_ARGUMENT);
        UNCHANGED();
        /* NULL, T < 1, a cache of another model */
        ASSERT_STATUS(dsmoe_model_forward(NULL, k, tok, 1, lg, 0), DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_STATUS(dsmoe_model_forward(m, NULL, tok, 1, lg, 0), DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_STATUS(dsmoe_model_forward(m, k, NULL, 1, lg, 0), DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_STATUS(dsmoe_model_forward(m, k, tok, 0, lg, 0), DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_STATUS(dsmoe_model_forward(m, k2, tok, 1, lg, 0), DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_TRUE(strstr(dsmoe_last_error(), "another model") != NULL);
        ASSERT_EQ_INT(dsmoe_model_cache_length(k2), 0);
        UNCHANGED();
        /* still usable: exactly full */
        ASSERT_OK(dsmoe_model_forward(m, k, tok + 2, 4, lg, 0));
        ASSERT_EQ_INT(dsmoe_model_cache_length(k), 6);
        ASSERT_STATUS(dsmoe_model_forward(m, k, tok, 1, lg, 0), DSMOE_STATUS_WORKSPACE_TOO_SMALL);
#undef UNCHANGED
        free(lg);
        free(snap);
    out2:
        dsmoe_model_cache_free(k);
        dsmoe_model_cache_free(k2);
    }
out:
    dsmoe_model_free(m);
    dsmoe_model_free(m2);
}

/* The header's data_offsets of tensor `name` in safetensors text (begin, end). */
static int st_offsets(const char *buf, size_t len, const char *name, uint64_t *b, uint64_t *e) {
    uint64_t hl;
    memcpy(&hl, buf, 8);
    if (hl + 8 > len) return 0;
    char key[200];
    snprintf(key, sizeof key, "\"%s\"", name);
    const char *at = strstr(buf + 8, key);
    if (!at) return 0;
    at = strstr(at, "\"data_offsets\"");
    if (!at) return 0;
    unsigned long long x, y;
    if (sscanf(at, "\"data_offsets\" : [ %llu , %llu ]", &x, &y) != 2 &&
        sscanf(at, "\"data_offsets\":[%llu,%llu]", &x, &y) != 2)
        return 0;
    *b = 8 + hl + x;
    *e = 8 + hl + y;
    return 1;
}

/* Weights so large that layer 0's hidden state overflows: NON_FINITE naming the layer,
 * the cache back at its length. v3_yarn_q is F32: the FFN input norm of its layer 0
 * (dense) is set to 1e30 (finite weights, so open accepts them; gate · up overflows). */
static void test_non_finite(void) {
    char tmp[512], from[700], to[700];
    mt_scratch(tmp, sizeof tmp, "model_forward_overflow");
    const char *files[] = {"config.json", "model.safetensors"};
    for (int i = 0; i < 2; i++) {
        snprintf(from, sizeof from, "%sv3_yarn_q/%s", MT_GOLDEN, files[i]);
        snprintf(to, sizeof to, "%s/%s", tmp, files[i]);
        ASSERT_TRUE(mt_copy(from, to));
    }
    size_t len;
    char *st = mt_read(to, &len);
    uint64_t b = 0, e = 0;
    ASSERT_TRUE(st && st_offsets(st, len, "model.layers.0.post_attention_layernorm.weight", &b, &e));
    if (!st || e == 0) {
        free(st);
        return;
    }
    for (uint64_t p = b; p + 4 <= e; p += 4) {
        float big = 1e30f;
        memcpy(st + p, &big, 4);
    }
    ASSERT_TRUE(mt_write(to, st, len));
    free(st);
    dsmoe_model *m = open_model(tmp, 1, 2, 0);
    if (!m) return;
    dsmoe_model_cache *k = NULL;
    ASSERT_OK(dsmoe_model_cache_create(m, 16, &k));
    int32_t tok[5] = {1, 2, 3, 4, 5};
    const int32_t V = dsmoe_model_get_config(m)->vocab_size;
    float lg[5 * 64];
    ASSERT_TRUE(V <= 64);
    for (int f = 0; f < 2; f++) {
        ASSERT_STATUS(dsmoe_model_forward(m, k, tok, 5, lg, f ? DSMOE_MODEL_ATTN_ABSORBED : 0),
                      DSMOE_STATUS_NON_FINITE);
        ASSERT_TRUE(strstr(dsmoe_last_error(), "layer 0") != NULL);
        ASSERT_EQ_INT(dsmoe_model_cache_length(k), 0);
    }
    dsmoe_model_cache_free(k);
    dsmoe_model_free(m);
}

/* A copy of golden case `name` in DSMOE_TMP/<tag> with element 3 of tensor `tensor`
 * (esz bytes per element) overwritten by `bits`; the path into dir. */
static int poisoned_copy(char *dir, size_t cap, const char *name, const char *tag,
                         const char *tensor, size_t esz, uint32_t bits) {
    static const char *const files[] = {"config.json", "model.safetensors",
                                        "model.safetensors.index.json",
                                        "model-00001-of-00003.safetensors",
                                        "model-00002-of-00003.safetensors",
                                        "model-00003-of-00003.safetensors"};
    char from[700], to[700];
    mt_scratch(dir, cap, tag);
    int patched = 0;
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        size_t len;
        snprintf(from, sizeof from, "%s%s/%s", MT_GOLDEN, name, files[i]);
        snprintf(to, sizeof to, "%s/%s", dir, files[i]);
        char *t = mt_read(from, &len);
        if (!t) continue;
        uint64_t b, e;
        if (i > 0 && strcmp(files[i], "model.safetensors.index.json") != 0 &&
            st_offsets(t, len, tensor, &b, &e) && b + 4 * esz <= e) {
            memcpy(t + b + 3 * esz, &bits, esz); /* little-endian: the low esz bytes */
            patched = 1;
        }
        ASSERT_TRUE(mt_write(to, t, len));
        free(t);
    }
    ASSERT_TRUE(patched);
    return patched;
}

/* A NaN weight anywhere is NON_FINITE at open, naming the tensor, whichever way the
 * tensor is held (stored operand, fp32 vector, F32 or BF16 MoE layer, widened). */
static void test_open_non_finite(void) {
    static const struct {
        const char *name, *tensor;
        size_t esz;
        uint32_t nan;
    } cases[] = {
        {"v3_yarn_q", "model.layers.1.self_attn.o_proj.weight", 4, 0x7fc00000u},
        {"v3_yarn_q", "model.layers.0.input_layernorm.weight", 4, 0x7f800000u},
        {"v3_yarn_q", "model.layers.2.mlp.experts.5.up_proj.weight", 4, 0xff800000u},
        {"v3_yarn_q", "lm_head.weight", 4, 0x7fc00000u},
        {"v2_glg_sharded", "model.layers.0.self_attn.q_proj.weight", 2, 0x7fc0u},
        {"v2_glg_sharded", "model.layers.2.mlp.experts.1.down_proj.weight", 2, 0xff80u},
        {"v2_glg_sharded", "model.layers.1.mlp.gate.weight", 2, 0x7f80u},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char dir[512];
        if (!poisoned_copy(dir, sizeof dir, cases[i].name, "model_forward_nan", cases[i].tensor,
                           cases[i].esz, cases[i].nan))
            continue;
        for (int widen = 0; widen < 2; widen++) {
            dsmoe_model_options o;
            dsmoe_model_options_default(&o);
            o.n_threads = 1;
            o.widen_f32 = widen;
            dsmoe_model *m = (dsmoe_model *)dir;
            ASSERT_STATUS(dsmoe_model_open(dir, &o, &m), DSMOE_STATUS_NON_FINITE);
            ASSERT_TRUE(m == NULL);
            if (!strstr(dsmoe_last_error(), cases[i].tensor))
                TL_FAIL("%s: message '%s' does not name it", cases[i].tensor, dsmoe_last_error());
        }
    }
}

int main(void) {
    RUN(test_accessors);
    RUN(test_long_prompt);
    RUN(test_forward_errors);
    RUN(test_non_finite);
    RUN(test_open_non_finite);
    RUN(test_manifest_cases);
    return TEST_SUMMARY();
}
