/*
 * test_model_mtp.c — the MTP depths at inference and speculative decoding
 * (dsmoe_model_forward_hidden, dsmoe_model_forward_mtp, dsmoe_model_spec):
 *   - the depths' logits against the fp64 reference (tests/ref/model_ref.py forward_mtp,
 *     golden mtp_logits.npy of v3_yarn_q, one depth, and v3_mtp2, two depths);
 *   - a depth fed token by token against one call; 1 against 2 threads (same bits);
 *     forward with and without the hidden states (same bits);
 *   - speculative decoding: greedy and sampled output identical to plain decoding (one
 *     forward per token, the same rng) on the golden models and on a model with random
 *     MTP weights written here, for prompts and lengths that cross 64 positions (the
 *     attention's query block), any number of drafts (more than the stored depths too);
 *     after it the main cache gives the next logits of plain decoding to the bit;
 *     statistics consistent; 1 against 2 threads the same tokens and statistics;
 *   - errors: no MTP depths, bad n_draft, caches of the wrong kind, a non-finite hidden
 *     state, no prefill, a full cache.
 */
#include "model_testutil.h"

#include "dsmoe/train.h"

#include <math.h>

#define REL 2e-5

static void dir_of(char *buf, size_t cap, const char *name) { snprintf(buf, cap, "%s%s", MT_GOLDEN, name); }

static dsmoe_model *open_mtp(const char *dir, int nt, int max_tokens, int mtp) {
    dsmoe_model_options o;
    dsmoe_model_options_default(&o);
    o.n_threads = nt;
    o.max_tokens = max_tokens;
    o.mtp = mtp;
    dsmoe_model *m = NULL;
    ASSERT_OK(dsmoe_model_open(dir, &o, &m));
    return m;
}

/* The depths' logits of a whole sequence: main forward with hidden states, then depth
 * k at positions 0 .. T − k − 1 on h^{k−1} and tokens k ..; out[k − 1] (T − k, V). */
static void mtp_all(dsmoe_model *m, const int32_t *tok, int64_t T, float **out) {
    const dsmoe_model_config *c = dsmoe_model_get_config(m);
    const int64_t D = c->hidden_size, V = c->vocab_size;
    const int32_t Dm = dsmoe_model_mtp_depths(m);
    float *h = (float *)malloc((size_t)(T * D) * sizeof(float));
    float *h2 = (float *)malloc((size_t)(T * D) * sizeof(float));
    float *lg = (float *)malloc((size_t)(T * V) * sizeof(float));
    dsmoe_model_cache *k = NULL;
    ASSERT_OK(dsmoe_model_cache_create(m, T, &k));
    ASSERT_OK(dsmoe_model_forward_hidden(m, k, tok, T, lg, h, 0));
    dsmoe_model_cache_free(k);
    for (int32_t d = 1; d <= Dm; d++) {
        ASSERT_OK(dsmoe_model_mtp_cache_create(m, d, T, &k));
        ASSERT_EQ_INT(dsmoe_model_cache_mtp_depth(k), d);
        ASSERT_OK(dsmoe_model_forward_mtp(m, k, h, tok + d, T - d, h2, out[d - 1], 0));
        ASSERT_EQ_INT(dsmoe_model_cache_length(k), T - d);
        dsmoe_model_cache_free(k);
        float *t = h;
        h = h2;
        h2 = t;
    }
    free(h);
    free(h2);
    free(lg);
}

static void check_mtp_golden(const char *name, int32_t want_depths) {
    char dir[512], path[700];
    dir_of(dir, sizeof dir, name);
    int64_t T, n, nl;
    snprintf(path, sizeof path, "%s/tokens.npy", dir);
    double *tokd = mt_npy64(path, &T);
    snprintf(path, sizeof path, "%s/mtp_logits.npy", dir);
    double *ref = mt_npy64(path, &n);
    snprintf(path, sizeof path, "%s/logits.npy", dir);
    double *main_ref = mt_npy64(path, &nl);
    dsmoe_model *m = open_mtp(dir, 1, 0, 1), *m2 = open_mtp(dir, 2, 0, 1),
                *m3 = open_mtp(dir, 1, 3, 1);
    if (!tokd || !ref || !main_ref || !m || !m2 || !m3) goto done;
    {
        const dsmoe_model_config *c = dsmoe_model_get_config(m);
        const int64_t V = c->vocab_size, D = c->hidden_size;
        const int32_t Dm = dsmoe_model_mtp_depths(m);
        ASSERT_EQ_INT(Dm, want_depths);
        ASSERT_EQ_INT(n, Dm * (T - Dm) * V);
        int32_t tok[64];
        for (int64_t t = 0; t < T; t++) tok[t] = (int32_t)tokd[t];
        float *got[2] = {NULL, NULL}, *got2[2] = {NULL, NULL}, *got3[2] = {NULL, NULL};
        for (int32_t d = 0; d < Dm; d++) {
            got[d] = (float *)malloc((size_t)(T * V) * sizeof(float));
            got2[d] = (float *)malloc((size_t)(T * V) * sizeof(float));
            got3[d] = (float *)malloc((size_t)(T * V) * sizeof(float));
        }
        mtp_all(m, tok, T, got);
        mtp_all(m2, tok, T, got2); /* 2 threads: the same bits */
        mtp_all(m3, tok, T, got3); /* chunks of 3 positions: within rounding */
        for (int32_t d = 0; d < Dm; d++) {
            char what[64];
            snprintf(what, sizeof what, "%s depth %d", name, (int)d + 1);
            mt_close_to(what, got[d], ref + (int64_t)d * (T - Dm) * V, (T - Dm) * V, REL);
            mt_close_to(what, got3[d], ref + (int64_t)d * (T - Dm) * V, (T - Dm) * V, REL);
            tl_checks++;
            if (!tl_same_bits(what, got[d], got2[d], (T - d - 1) * V)) TL_FAIL("threads");
        }
        /* the main logits too (v3_mtp2 is not in the MANIFEST of test_model_golden) */
        float *lg = (float *)malloc((size_t)(T * V) * sizeof(float));
        float *lg2 = (float *)malloc((size_t)(T * V) * sizeof(float));
        float *h = (float *)malloc((size_t)(T * D) * sizeof(float));
        dsmoe_model_cache *k = NULL;
        ASSERT_OK(dsmoe_model_cache_create(m, T, &k));
        ASSERT_OK(dsmoe_model_forward(m, k, tok, T, lg, 0));
        mt_close_to(name, lg, main_ref, T * V, REL);
        /* with the hidden states: the same logits, bit for bit, and the states are the
         * head's input (their norm times ... checked through the depth logits above) */
        ASSERT_OK(dsmoe_model_cache_truncate(k, 0));
        ASSERT_OK(dsmoe_model_forward_hidden(m, k, tok, T, lg2, h, 0));
        tl_checks++;
        if (!tl_same_bits("forward_hidden logits", lg2, lg, T * V)) TL_FAIL("hidden changes logits");
        ASSERT_OK(dsmoe_model_cache_truncate(k, 0));
        ASSERT_OK(dsmoe_model_forward_hidden(m, k, tok, T, lg2, h, DSMOE_MODEL_LOGITS_LAST));
        ASSERT_OK(dsmoe_model_cache_truncate(k, 0));
        ASSERT_OK(dsmoe_model_forward(m, k, tok, T, lg, DSMOE_MODEL_LOGITS_LAST));
        tl_checks++;
        if (!tl_same_bits("forward_hidden LOGITS_LAST", lg2, lg, V)) TL_FAIL("hidden changes logits");
        dsmoe_model_cache_free(k);
        /* depth 1 token by token (absorbed) against the whole call: fp32 rounding */
        dsmoe_model_cache *d1 = NULL;
        ASSERT_OK(dsmoe_model_cache_create(m, T, &k));
        ASSERT_OK(dsmoe_model_forward_hidden(m, k, tok, T, NULL, h, 0));
        ASSERT_OK(dsmoe_model_mtp_cache_create(m, 1, T, &d1));
        for (int64_t t = 0; t + 1 < T; t++)
            ASSERT_OK(dsmoe_model_forward_mtp(m, d1, h + t * D, tok + t + 1, 1, NULL, lg + t * V,
                                              DSMOE_MODEL_LOGITS_LAST | DSMOE_MODEL_ATTN_ABSORBED));
        mt_close_to("depth 1 token by token", lg, ref, (T - Dm) * V, REL);
        dsmoe_model_cache_free(d1);
        dsmoe_model_cache_free(k);
        free(lg);
        free(lg2);
        free(h);
        for (int32_t d = 0; d < Dm; d++) {
            free(got[d]);
            free(got2[d]);
            free(got3[d]);
        }
    }
done:
    dsmoe_model_free(m);
    dsmoe_model_free(m2);
    dsmoe_model_free(m3);
    free(tokd);
    free(ref);
    free(main_ref);
}

static void test_mtp_logits_golden(void) {
    check_mtp_golden("v3_yarn_q", 1);
    check_mtp_golden("v3_mtp2", 2);
}

/* ------------------------------------------------------ speculative decoding -- */

/* A prompt of P ids from a fixed generator. */
static void make_prompt(int32_t *p, int64_t P, int32_t V, uint64_t seed) {
    dsmoe_rng r;
    dsmoe_rng_seed(&r, seed);
    for (int64_t i = 0; i < P; i++) p[i] = (int32_t)(dsmoe_rng_next(&r) % (uint64_t)V);
}

/* Plain decoding as dsmoe generate does it: the prompt in one forward (AUTO, last
 * logits), then one forward per token; G tokens into out; the cache is returned (it
 * holds P + G − 1 positions). */
static dsmoe_model_cache *plain(dsmoe_model *m, const int32_t *prompt, int64_t P, int64_t G,
                                float temp, uint64_t seed, int32_t *out) {
    const int32_t V = dsmoe_model_get_config(m)->vocab_size;
    float *lg = (float *)malloc((size_t)V * sizeof(float)), *scr = (float *)malloc(2 * (size_t)V * sizeof(float));
    dsmoe_rng r;
    dsmoe_rng_seed(&r, seed);
    dsmoe_model_cache *k = NULL;
    ASSERT_OK(dsmoe_model_cache_create(m, P + G, &k));
    ASSERT_OK(dsmoe_model_forward(m, k, prompt, P, lg, DSMOE_MODEL_LOGITS_LAST));
    for (int64_t g = 0; g < G; g++) {
        out[g] = dsmoe_sample(lg, V, temp, 0.9f, &r, scr);
        if (g + 1 < G) ASSERT_OK(dsmoe_model_forward(m, k, &out[g], 1, lg, DSMOE_MODEL_LOGITS_LAST));
    }
    free(lg);
    free(scr);
    return k;
}

/* Speculative decoding of at least G tokens (all it produced into out, count returned). */
static int64_t spec(dsmoe_model *m, int32_t N, int64_t cap, const int32_t *prompt, int64_t P,
                    int64_t G, float temp, uint64_t seed, int32_t *out, dsmoe_model_spec **sp) {
    dsmoe_rng r;
    dsmoe_rng_seed(&r, seed);
    dsmoe_model_spec *s = NULL;
    ASSERT_OK(dsmoe_model_spec_create(m, N, cap, &s));
    if (!s) return 0;
    int64_t n = 0;
    ASSERT_OK(dsmoe_model_spec_prefill(s, prompt, P, temp, 0.9f, &r, &out[n++]));
    while (n < G) {
        int32_t k = 0;
        dsmoe_status st = dsmoe_model_spec_step(s, temp, 0.9f, &r, out + n, &k);
        if (st != DSMOE_OK) {
            TL_FAIL("step at %lld: %s", (long long)n, dsmoe_last_error());
            break;
        }
        if (k < 1 || k > N + 1) TL_FAIL("step produced %d tokens", (int)k);
        n += k;
    }
    *sp = s;
    return n;
}

/* Spec and plain decoding agree token for token (greedy or sampled), the statistics add
 * up, and the next logits from spec's main cache are plain decoding's, bit for bit. */
static void check_spec_prompt(dsmoe_model *m, int32_t N, const int32_t *prompt, int64_t P,
                              int64_t G, float temp, uint64_t seed,
                              dsmoe_model_spec_stats *stats_out) {
    const int32_t V = dsmoe_model_get_config(m)->vocab_size;
    int32_t *a = (int32_t *)malloc((size_t)(G + 16) * sizeof(int32_t));
    int32_t *b = (int32_t *)malloc((size_t)(G + 16) * sizeof(int32_t));
    dsmoe_model_spec *s = NULL;
    const int64_t n = spec(m, N, P + G + N, prompt, P, G, temp, seed, a, &s);
    dsmoe_model_cache *k = plain(m, prompt, P, n, temp, seed, b);
    int same = 1;
    for (int64_t i = 0; i < n && same; i++)
        if (a[i] != b[i]) {
            TL_FAIL("N %d P %lld temp %g: token %lld is %d, plain decoding %d", (int)N, (long long)P,
                    (double)temp, (long long)i, (int)a[i], (int)b[i]);
            same = 0;
        }
    tl_checks++;
    if (s && k) {
        dsmoe_model_cache *sk = dsmoe_model_spec_cache(s);
        ASSERT_EQ_INT(dsmoe_model_cache_length(sk), P + n - 1);
        ASSERT_EQ_INT(dsmoe_model_cache_length(k), P + n - 1);
        /* the next token on both caches: the same logits */
        float *l1 = (float *)malloc((size_t)V * sizeof(float)), *l2 = (float *)malloc((size_t)V * sizeof(float));
        ASSERT_OK(dsmoe_model_forward(m, sk, &a[n - 1], 1, l1, DSMOE_MODEL_LOGITS_LAST));
        ASSERT_OK(dsmoe_model_forward(m, k, &b[n - 1], 1, l2, DSMOE_MODEL_LOGITS_LAST));
        tl_checks++;
        if (!tl_same_bits("next logits after spec", l1, l2, V)) TL_FAIL("caches differ");
        free(l1);
        free(l2);
        const dsmoe_model_spec_stats *st = dsmoe_model_spec_get_stats(s);
        int64_t acc = 0;
        for (int32_t d = 0; d < N; d++) {
            acc += st->accepted[d];
            ASSERT_TRUE(st->accepted[d] <= st->drafted[d]);
            if (d > 0) ASSERT_TRUE(st->accepted[d] <= st->accepted[d - 1]);
            if (d > 0) ASSERT_TRUE(st->drafted[d] <= st->accepted[d - 1]);
        }
        ASSERT_EQ_INT(st->produced, n - 1);
        ASSERT_EQ_INT(st->produced, st->passes + acc);
        ASSERT_EQ_INT(st->drafted[0], st->passes);
        if (stats_out) *stats_out = *st;
    }
    dsmoe_model_spec_free(s);
    dsmoe_model_cache_free(k);
    free(a);
    free(b);
}

/* check_spec_prompt on a prompt of P ids drawn from seed. */
static void check_spec(dsmoe_model *m, int32_t N, int64_t P, int64_t G, float temp, uint64_t seed,
                       dsmoe_model_spec_stats *stats_out) {
    int32_t *prompt = (int32_t *)malloc((size_t)P * sizeof(int32_t));
    make_prompt(prompt, P, dsmoe_model_get_config(m)->vocab_size, seed);
    check_spec_prompt(m, N, prompt, P, G, temp, seed, stats_out);
    free(prompt);
}

/* The drafts of every step against drafts computed from scratch (the main model and the
 * depth chain over the whole sequence so far, fresh caches): what the depth caches
 * kept between steps is what a recomputation gives. Argmax against argmax, skipping
 * near ties of the recomputation (top two within 1e-4). */
static void check_drafts(dsmoe_model *m, int32_t N, int64_t P, int64_t steps, uint64_t seed) {
    const dsmoe_model_config *c = dsmoe_model_get_config(m);
    const int32_t V = c->vocab_size, Dm = dsmoe_model_mtp_depths(m);
    const int64_t D = c->hidden_size, cap = P + steps * (N + 1) + N + 1;
    int32_t *seq = (int32_t *)malloc((size_t)(cap + N + 1) * sizeof(int32_t));
    float *h = (float *)malloc((size_t)(cap * D) * sizeof(float));
    float *h2 = (float *)malloc((size_t)(cap * D) * sizeof(float));
    float *lg = (float *)malloc((size_t)V * sizeof(float));
    make_prompt(seq, P, V, seed);
    dsmoe_model_spec *s = NULL;
    ASSERT_OK(dsmoe_model_spec_create(m, N, cap, &s));
    if (!s) goto done;
    ASSERT_OK(dsmoe_model_spec_prefill(s, seq, P, 0.0f, 1.0f, NULL, &seq[P]));
    int64_t len = P + 1, compared = 0;
    for (int64_t step = 0; step < steps; step++) {
        const int64_t mpos = len - 1; /* t_m = seq[mpos] */
        int32_t want[DSMOE_MODEL_SPEC_MAX_DRAFT];
        int ok[DSMOE_MODEL_SPEC_MAX_DRAFT];
        dsmoe_model_cache *k = NULL;
        ASSERT_OK(dsmoe_model_cache_create(m, mpos, &k));
        ASSERT_OK(dsmoe_model_forward_hidden(m, k, seq, mpos, NULL, h, 0));
        dsmoe_model_cache_free(k);
        for (int32_t d = 1; d <= N; d++) {
            ASSERT_OK(dsmoe_model_mtp_cache_create(m, d < Dm ? d : Dm, mpos, &k));
            /* positions 0 .. m − 1, tokens d .. m − 1 + d (drafts past m) */
            ASSERT_OK(dsmoe_model_forward_mtp(m, k, h, seq + d, mpos, h2, lg, DSMOE_MODEL_LOGITS_LAST));
            dsmoe_model_cache_free(k);
            int32_t b = 0, b2 = -1;
            for (int32_t v = 1; v < V; v++)
                if (lg[v] > lg[b]) b = v;
            for (int32_t v = 0; v < V; v++)
                if (v != b && (b2 < 0 || lg[v] > lg[b2])) b2 = v;
            want[d - 1] = b;
            ok[d - 1] = lg[b] - lg[b2] > 1e-4f;
            seq[mpos + d] = b;
            float *t = h;
            h = h2;
            h2 = t;
        }
        int32_t out[DSMOE_MODEL_SPEC_MAX_DRAFT + 1], n = 0, nd = 0;
        ASSERT_OK(dsmoe_model_spec_step(s, 0.0f, 1.0f, NULL, out, &n));
        const int32_t *dr = dsmoe_model_spec_drafts(s, &nd);
        ASSERT_EQ_INT(nd, N);
        for (int32_t d = 0; d < nd && d < N; d++)
            if (ok[d]) {
                compared++;
                if (dr[d] != want[d])
                    TL_FAIL("step %lld: draft %d is %d, recomputed %d", (long long)step, (int)d + 1,
                            (int)dr[d], (int)want[d]);
                /* a draft stands in the sequence until the recomputation of the next one */
                if (dr[d] != want[d]) break;
            }
        for (int32_t i = 0; i < n; i++) seq[len + i] = out[i];
        len += n;
    }
    ASSERT_TRUE(compared >= steps);
done:
    dsmoe_model_spec_free(s);
    free(seq);
    free(h);
    free(h2);
    free(lg);
}

static void test_spec_golden_greedy(void) {
    char dir[512];
    dir_of(dir, sizeof dir, "v3_yarn_q"); /* one depth, 64 positions */
    dsmoe_model *m = open_mtp(dir, 1, 0, 1);
    if (m) {
        check_spec(m, 1, 1, 40, 0.0f, 1, NULL);
        check_spec(m, 1, 9, 50, 0.0f, 2, NULL);
        check_spec(m, 2, 5, 55, 0.0f, 3, NULL); /* depth 2 reuses depth 1's weights */
        check_spec(m, 3, 2, 40, 0.0f, 4, NULL);
    }
    dsmoe_model_free(m);
    dir_of(dir, sizeof dir, "v3_mtp2"); /* two depths, 256 positions */
    m = open_mtp(dir, 1, 0, 1);
    if (m) {
        check_spec(m, 1, 3, 80, 0.0f, 5, NULL);
        check_spec(m, 2, 70, 90, 0.0f, 6, NULL); /* a prompt past 64 positions */
        check_spec(m, 2, 1, 130, 0.0f, 7, NULL);
        check_spec(m, 4, 60, 20, 0.0f, 8, NULL); /* decoding across position 64 */
        check_spec(m, DSMOE_MODEL_SPEC_MAX_DRAFT, 4, 70, 0.0f, 9, NULL);
        check_drafts(m, 3, 5, 30, 10);
    }
    dsmoe_model_free(m);
}

/* Sampled: the same tokens as plain sampling with the same seed. */
static void test_spec_golden_sampled(void) {
    char dir[512];
    dir_of(dir, sizeof dir, "v3_mtp2");
    dsmoe_model *m = open_mtp(dir, 1, 0, 1);
    if (m) {
        check_spec(m, 1, 5, 60, 0.8f, 11, NULL);
        check_spec(m, 2, 66, 40, 1.0f, 12, NULL);
        check_spec(m, 3, 2, 70, 0.5f, 13, NULL);
    }
    dsmoe_model_free(m);
}

/* 1 and 2 threads: the same tokens and statistics. */
static void test_spec_threads(void) {
    char dir[512];
    dir_of(dir, sizeof dir, "v3_mtp2");
    dsmoe_model *m1 = open_mtp(dir, 1, 0, 1), *m2 = open_mtp(dir, 2, 0, 1);
    if (m1 && m2) {
        int32_t prompt[20], a[120], b[120];
        make_prompt(prompt, 20, dsmoe_model_get_config(m1)->vocab_size, 21);
        dsmoe_model_spec *s1 = NULL, *s2 = NULL;
        int64_t n1 = spec(m1, 2, 140, prompt, 20, 100, 0.0f, 1, a, &s1);
        int64_t n2 = spec(m2, 2, 140, prompt, 20, 100, 0.0f, 1, b, &s2);
        ASSERT_EQ_INT(n1, n2);
        for (int64_t i = 0; i < n1 && i < n2; i++) ASSERT_EQ_INT(a[i], b[i]);
        if (s1 && s2)
            ASSERT_TRUE(memcmp(dsmoe_model_spec_get_stats(s1), dsmoe_model_spec_get_stats(s2),
                               sizeof(dsmoe_model_spec_stats)) == 0);
        dsmoe_model_spec_free(s1);
        dsmoe_model_spec_free(s2);
    }
    dsmoe_model_free(m1);
    dsmoe_model_free(m2);
}

/* v3_mtp2 with its MTP layers replaced by random F32 weights (main model as stored). */
static const char *random_mtp_model(char *dir, size_t cap) {
    char src[512], path[700];
    mt_scratch(dir, cap, "mtp_random_model");
    dir_of(src, sizeof src, "v3_mtp2");
    snprintf(path, sizeof path, "%s/config.json", src);
    char to[700];
    snprintf(to, sizeof to, "%s/config.json", dir);
    if (!mt_copy(path, to)) TL_FAIL("copy config");
    snprintf(path, sizeof path, "%s/model.safetensors", src);
    dsmoe_safetensors *st = NULL;
    dsmoe_safetensors_writer *w = NULL;
    ASSERT_OK(dsmoe_safetensors_open(path, &st));
    ASSERT_OK(dsmoe_safetensors_writer_create(&w));
    if (!st || !w) return NULL;
    const int64_t n = dsmoe_safetensors_count(st);
    float **bufs = (float **)calloc((size_t)n, sizeof *bufs);
    dsmoe_rng r;
    dsmoe_rng_seed(&r, 99);
    for (int64_t i = 0; i < n; i++) {
        dsmoe_tensor_view v;
        ASSERT_OK(dsmoe_safetensors_at(st, i, &v));
        if (strncmp(v.name, "model.layers.2.", 15) != 0 && strncmp(v.name, "model.layers.3.", 15) != 0) {
            ASSERT_OK(dsmoe_safetensors_writer_add(w, v.name, v.dtype, v.ndim, v.shape, v.data));
            continue;
        }
        int64_t cnt = v.shape[0] * (v.ndim == 2 ? v.shape[1] : 1);
        bufs[i] = (float *)malloc((size_t)cnt * sizeof(float));
        const double sc = v.ndim == 2 ? 1.5 / sqrt((double)v.shape[1]) : 0.0;
        for (int64_t j = 0; j < cnt; j++) {
            double u = dsmoe_rng_uniform(&r) * 2 - 1;
            bufs[i][j] = (float)(v.ndim == 2 ? u * sc * (strstr(v.name, "embed") ? 1.0 * sqrt((double)v.shape[1]) : 1.0)
                                             : 1.0 + 0.2 * u);
        }
        ASSERT_OK(dsmoe_safetensors_writer_add(w, v.name, DSMOE_DTYPE_F32, v.ndim, v.shape, bufs[i]));
    }
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    ASSERT_OK(dsmoe_safetensors_writer_save(w, path));
    dsmoe_safetensors_writer_free(w);
    dsmoe_safetensors_close(st);
    for (int64_t i = 0; i < n; i++) free(bufs[i]);
    free(bufs);
    return dir;
}

static void test_spec_random_mtp(void) {
    char dir[512];
    if (!random_mtp_model(dir, sizeof dir)) return;
    dsmoe_model *m = open_mtp(dir, 1, 0, 1);
    if (m) {
        ASSERT_EQ_INT(dsmoe_model_mtp_depths(m), 2);
        dsmoe_model_spec_stats st;
        memset(&st, 0, sizeof st);
        check_spec(m, 2, 6, 120, 0.0f, 31, &st);
        /* random drafts: low acceptance, yet the output was plain decoding's */
        fprintf(stderr, "random MTP weights: %lld passes, depth 1 accepted %lld of %lld\n",
                (long long)st.passes, (long long)st.accepted[0], (long long)st.drafted[0]);
        ASSERT_TRUE(st.accepted[0] < st.drafted[0]);
        check_spec(m, 3, 65, 40, 0.7f, 32, NULL);
        check_drafts(m, 3, 4, 40, 33);
    }
    dsmoe_model_free(m);
}

/* ------------------------------------------------------- a trained model -- */
/* The tiny preset with two MTP depths trained (the training model of train.h, AdamW) on
 * a byte cycle of period 13 from random offsets: every token fixes the next ones, so the
 * depths learn to draft and speculative decoding accepts most drafts. The checkpoint is
 * written as a model directory (config.json, every tensor F32 under its HF name). */
#define CYCLE 13
static const int32_t cycle[CYCLE] = {'d', 's', 'm', 'o', 'e', ' ', 'M', 'T', 'P', '!', '\n', '#', '7'};

static const char *trained_model(char *dir, size_t cap, double *train_mtp, int32_t *seq, int64_t T) {
    mt_scratch(dir, cap, "mtp_trained_model");
    dsmoe_model_config cfg;
    ASSERT_OK(dsmoe_model_config_preset("tiny", &cfg));
    cfg.num_nextn_predict_layers = 2;
    dsmoe_train_model_options o;
    dsmoe_train_model_options_default(&o);
    o.batch = 4;
    o.seq_len = (int32_t)T;
    o.n_threads = 1;
    dsmoe_train_model *tm = NULL;
    ASSERT_OK(dsmoe_train_model_create(&cfg, &o, &tm));
    if (!tm) return NULL;
    dsmoe_adamw_config ac;
    dsmoe_adamw_config_default(&ac);
    ac.lr = 1e-2f;
    ac.weight_decay = 0;
    ac.warmup_steps = 10;
    ac.total_steps = 150;
    size_t np = 0;
    float *p = dsmoe_train_model_params(tm, &np), *g = dsmoe_train_model_grads(tm, &np);
    float *mom = (float *)calloc(np, sizeof(float)), *var = (float *)calloc(np, sizeof(float));
    int32_t *batch = (int32_t *)malloc((size_t)(4 * (T + 1)) * sizeof(int32_t));
    dsmoe_rng r;
    dsmoe_rng_seed(&r, 5);
    dsmoe_train_loss loss = {0, 0, 0, 0};
    for (int64_t step = 1; step <= ac.total_steps; step++) {
        for (int b = 0; b < 4; b++) {
            int64_t off = (int64_t)(dsmoe_rng_next(&r) % CYCLE);
            for (int64_t t = 0; t <= T; t++) batch[b * (T + 1) + t] = cycle[(off + t) % CYCLE];
        }
        ASSERT_OK(dsmoe_train_model_loss(tm, batch, &loss, 0));
        ASSERT_OK(dsmoe_train_model_backward(tm));
        const float cf = dsmoe_adamw_clip_factor(&ac, sqrt(dsmoe_sum_squares(g, (int64_t)np, 1)));
        dsmoe_adamw_update(&ac, p, mom, var, g, (int64_t)np, step, dsmoe_adamw_lr(&ac, step), 0.0,
                           cf, 1);
    }
    fprintf(stderr, "trained tiny model: ce %.4f, mtp %.4f after %lld steps\n", loss.ce, loss.mtp,
            (long long)ac.total_steps);
    /* the training model's MTP loss on one sequence (batch row 0 = seq), for comparison */
    for (int b = 0; b < 4; b++)
        for (int64_t t = 0; t <= T; t++) batch[b * (T + 1) + t] = seq[t];
    ASSERT_OK(dsmoe_train_model_loss(tm, batch, &loss, 0));
    *train_mtp = loss.mtp;
    /* the checkpoint */
    ASSERT_OK(dsmoe_model_config_write(&cfg, dir));
    dsmoe_safetensors_writer *w = NULL;
    ASSERT_OK(dsmoe_safetensors_writer_create(&w));
    for (int64_t i = 0; w && i < dsmoe_train_model_tensor_count(tm); i++) {
        dsmoe_train_tensor t;
        ASSERT_OK(dsmoe_train_model_tensor(tm, i, &t));
        ASSERT_OK(dsmoe_safetensors_writer_add(w, t.spec.name, DSMOE_DTYPE_F32, t.spec.ndim,
                                               t.spec.shape, t.data));
    }
    char path[700];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    ASSERT_OK(dsmoe_safetensors_writer_save(w, path));
    dsmoe_safetensors_writer_free(w);
    dsmoe_train_model_free(tm);
    free(mom);
    free(var);
    free(batch);
    return dir;
}

/* Mean −log softmax(logits_i)[target_i] over n rows, in double. */
static double mean_ce(const float *lg, const int32_t *target, int64_t n, int32_t V) {
    double s = 0;
    for (int64_t i = 0; i < n; i++) {
        const float *l = lg + i * V;
        int32_t b = 0;
        for (int32_t v = 1; v < V; v++)
            if (l[v] > l[b]) b = v;
        const double mx = l[b];
        double z = 1.0; /* exp(0) of the largest, then the others */
        for (int32_t v = 0; v < V; v++)
            if (v != b) z += exp(l[v] - mx);
        s += log(z) + mx - l[target[i]];
    }
    return s / (double)n;
}

static void test_spec_trained(void) {
    char dir[512];
    enum { T = 24 };
    int32_t seq[T + 1], prompt[8];
    make_prompt(seq, T + 1, 256, 77); /* bytes off the cycle: a loss of several nats */
    for (int t = 0; t < 8; t++) prompt[t] = cycle[(t + 4) % CYCLE];
    double train_mtp = 0;
    if (!trained_model(dir, sizeof dir, &train_mtp, seq, T)) return;
    dsmoe_model *m = open_mtp(dir, 1, 0, 1);
    if (!m) return;
    ASSERT_EQ_INT(dsmoe_model_mtp_depths(m), 2);
    /* inference's depths give training's MTP loss: the same math */
    const int32_t V = dsmoe_model_get_config(m)->vocab_size;
    float *lg[2];
    lg[0] = (float *)malloc((size_t)(T * V) * sizeof(float));
    lg[1] = (float *)malloc((size_t)(T * V) * sizeof(float));
    mtp_all(m, seq, T, lg);
    const double ce = 0.5 * (mean_ce(lg[0], seq + 2, T - 1, V) + mean_ce(lg[1], seq + 3, T - 2, V));
    fprintf(stderr, "MTP loss: training %.9f, inference %.9f\n", train_mtp, ce);
    ASSERT_TRUE(train_mtp > 1.0);
    ASSERT_NEAR(ce, train_mtp, 1e-5 * train_mtp);
    free(lg[0]);
    free(lg[1]);
    /* speculative decoding on the learnt cycle: most drafts accepted, plain's output */
    dsmoe_model_spec_stats st;
    memset(&st, 0, sizeof st);
    check_spec_prompt(m, 2, prompt, 6, 90, 0.0f, 1, &st);
    fprintf(stderr, "trained: %lld passes for %lld tokens; depth 1 accepted %lld of %lld, depth 2 "
            "%lld of %lld\n", (long long)st.passes, (long long)st.produced, (long long)st.accepted[0],
            (long long)st.drafted[0], (long long)st.accepted[1], (long long)st.drafted[1]);
    ASSERT_TRUE(st.accepted[0] * 10 >= st.drafted[0] * 8);
    ASSERT_TRUE(st.accepted[1] >= 1);
    check_spec_prompt(m, 3, prompt, 3, 100, 0.0f, 2, NULL);
    check_spec_prompt(m, 2, prompt, 8, 60, 0.6f, 3, NULL);
    check_spec_prompt(m, 1, seq, 20, 60, 0.0f, 4, NULL); /* off the cycle */
    check_drafts(m, 2, 10, 30, 5);
    dsmoe_model_free(m);
}

/* ------------------------------------------------------------------ errors -- */

static void test_errors(void) {
    char dir[512];
    dir_of(dir, sizeof dir, "v3_yarn_q");
    dsmoe_model *m0 = open_mtp(dir, 1, 0, 0), *m = open_mtp(dir, 1, 0, 1);
    dir_of(dir, sizeof dir, "v3_yarn_q_nomtp");
    dsmoe_model *mn = open_mtp(dir, 1, 0, 1);
    if (!m0 || !m || !mn) goto done;
    {
        dsmoe_model_spec *s = NULL;
        dsmoe_model_cache *k = NULL, *d = NULL;
        ASSERT_EQ_INT(dsmoe_model_mtp_depths(m0), 0);
        ASSERT_EQ_INT(dsmoe_model_mtp_depths(mn), 0);
        ASSERT_EQ_INT(dsmoe_model_mtp_depths(NULL), 0);
        ASSERT_STATUS(dsmoe_model_spec_create(m0, 1, 20, &s), DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_TRUE(strstr(dsmoe_last_error(), "no MTP depths") != NULL);
        ASSERT_TRUE(strstr(dsmoe_last_error(), "1 stored") != NULL);
        ASSERT_STATUS(dsmoe_model_spec_create(mn, 1, 20, &s), DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_TRUE(strstr(dsmoe_last_error(), "0 stored") != NULL);
        ASSERT_STATUS(dsmoe_model_spec_create(m, 0, 20, &s), DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_TRUE(strstr(dsmoe_last_error(), "n_draft 0") != NULL);
        ASSERT_STATUS(dsmoe_model_spec_create(m, DSMOE_MODEL_SPEC_MAX_DRAFT + 1, 20, &s),
                      DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_STATUS(dsmoe_model_spec_create(m, 1, 0, &s), DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_STATUS(dsmoe_model_spec_create(m, 1, 65, &s), DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_TRUE(s == NULL);
        ASSERT_STATUS(dsmoe_model_mtp_cache_create(m, 2, 8, &d), DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_STATUS(dsmoe_model_mtp_cache_create(m, 0, 8, &d), DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_STATUS(dsmoe_model_mtp_cache_create(m0, 1, 8, &d), DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_TRUE(strstr(dsmoe_last_error(), "dsmoe_model_options.mtp") != NULL);
        ASSERT_OK(dsmoe_model_cache_create(m, 8, &k));
        ASSERT_OK(dsmoe_model_mtp_cache_create(m, 1, 8, &d));
        const int64_t D = dsmoe_model_get_config(m)->hidden_size, V = dsmoe_model_get_config(m)->vocab_size;
        float *h = (float *)calloc((size_t)(4 * D), sizeof(float));
        float *lg = (float *)malloc((size_t)(4 * V) * sizeof(float));
        int32_t tok[4] = {1, 2, 3, 4};
        /* caches of the wrong kind or model */
        ASSERT_STATUS(dsmoe_model_forward(m, d, tok, 1, lg, 0), DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_TRUE(strstr(dsmoe_last_error(), "MTP depth 1") != NULL);
        ASSERT_STATUS(dsmoe_model_forward_mtp(m, k, h, tok, 1, NULL, lg, 0),
                      DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_STATUS(dsmoe_model_forward_mtp(mn, d, h, tok, 1, NULL, lg, 0),
                      DSMOE_STATUS_INVALID_ARGUMENT);
        /* bad inputs leave the cache as it was */
        ASSERT_STATUS(dsmoe_model_forward_mtp(m, d, h, tok, 0, NULL, lg, 0),
                      DSMOE_STATUS_INVALID_ARGUMENT);
        h[2 * D + 3] = NAN;
        ASSERT_STATUS(dsmoe_model_forward_mtp(m, d, h, tok, 4, NULL, lg, 0),
                      DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_TRUE(strstr(dsmoe_last_error(), "hidden[2][3]") != NULL);
        h[2 * D + 3] = 0.5f;
        tok[1] = (int32_t)V;
        ASSERT_STATUS(dsmoe_model_forward_mtp(m, d, h, tok, 4, NULL, lg, 0),
                      DSMOE_STATUS_INVALID_ARGUMENT);
        tok[1] = 2;
        ASSERT_STATUS(dsmoe_model_forward_mtp(m, d, h, tok, 4, NULL, lg, 16u),
                      DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_STATUS(dsmoe_model_forward_mtp(m, d, NULL, tok, 4, NULL, lg, 0),
                      DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_EQ_INT(dsmoe_model_cache_length(d), 0);
        ASSERT_OK(dsmoe_model_forward_mtp(m, d, h, tok, 4, NULL, lg, 0));
        ASSERT_OK(dsmoe_model_forward_mtp(m, d, h, tok, 4, NULL, NULL, 0));
        ASSERT_STATUS(dsmoe_model_forward_mtp(m, d, h, tok, 1, NULL, lg, 0),
                      DSMOE_STATUS_WORKSPACE_TOO_SMALL);
        ASSERT_EQ_INT(dsmoe_model_cache_length(d), 8);
        /* spec: no prefill, then a full cache */
        ASSERT_OK(dsmoe_model_spec_create(m, 2, 6, &s));
        int32_t out[3], n = 0, first = -1;
        ASSERT_STATUS(dsmoe_model_spec_step(s, 0.0f, 1.0f, NULL, out, &n), DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_STATUS(dsmoe_model_spec_prefill(s, tok, 7, 0.0f, 1.0f, NULL, &first),
                      DSMOE_STATUS_INVALID_ARGUMENT);
        ASSERT_OK(dsmoe_model_spec_prefill(s, tok, 4, 0.0f, 1.0f, NULL, &first));
        ASSERT_TRUE(first >= 0 && first < V);
        int64_t total = 0;
        for (int i = 0; i < 6; i++) {
            dsmoe_status st = dsmoe_model_spec_step(s, 0.0f, 1.0f, NULL, out, &n);
            if (st == DSMOE_STATUS_WORKSPACE_TOO_SMALL) break;
            ASSERT_OK(st);
            total += n;
        }
        /* 4 prompt positions + every produced token but the last = 6 */
        ASSERT_EQ_INT(total, 2);
        ASSERT_EQ_INT(dsmoe_model_cache_length(dsmoe_model_spec_cache(s)), 6);
        ASSERT_STATUS(dsmoe_model_spec_step(s, 0.0f, 1.0f, NULL, out, &n),
                      DSMOE_STATUS_WORKSPACE_TOO_SMALL);
        dsmoe_model_spec_free(s);
        dsmoe_model_spec_free(NULL);
        ASSERT_TRUE(dsmoe_model_spec_get_stats(NULL) == NULL);
        dsmoe_model_cache_free(k);
        dsmoe_model_cache_free(d);
        free(h);
        free(lg);
    }
done:
    dsmoe_model_free(m0);
    dsmoe_model_free(m);
    dsmoe_model_free(mn);
}

int main(void) {
    RUN(test_mtp_logits_golden);
    RUN(test_spec_golden_greedy);
    RUN(test_spec_golden_sampled);
    RUN(test_spec_threads);
    RUN(test_spec_random_mtp);
    RUN(test_spec_trained);
    RUN(test_errors);
    return TEST_SUMMARY();
}
