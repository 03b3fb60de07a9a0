/*
 * sample.c — the next token from a row of logits (dsmoe generate).
 *
 *   greedy (temperature <= 0)  argmax, the lowest id among equal logits
 *   sampling                   p_i ∝ exp((l_i − max l) / temperature), restricted to the
 *                              nucleus: the smallest set of most likely tokens (ties
 *                              broken by the lower id) whose probability reaches top_p
 *                              (Holtzman et al., 2020); one uniform u of the rng picks
 *                              the first kept token whose running sum exceeds u · S,
 *                              S the kept tokens' sum
 *
 * Weights are exp in double stored as float; sums run in double. The nucleus comes
 * off a binary max-heap of (weight, id) built in the caller's scratch: building it is
 * O(V), each kept token costs one pop (O(log V)), so the usual small nucleus of a large
 * vocabulary is cheap, and top_p = 1 skips the heap. −Inf logits weigh 0 and are never
 * drawn; a NaN or +Inf logit, or a row without a finite one, is an error.
 */
#include "model/model_internal.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>

/* Sets the last error "dsmoe_sample: <STATUS>: <detail>" (the return value cannot carry
 * the status) and returns -1. */
static int32_t fail(dsmoe_status status, const char *fmt, ...) DSMOE__PRINTF(2, 3);
static int32_t fail(dsmoe_status status, const char *fmt, ...) {
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    dsmoe__error(status, "dsmoe_sample: %s: %s", dsmoe_status_name(status), msg);
    return -1;
}

/* a before b in the nucleus order: larger weight first, then the lower id. */
static int heap_before(const float *w, const float *id, int32_t a, int32_t b) {
    return w[a] > w[b] || (w[a] == w[b] && id[a] < id[b]);
}

static void heap_sift_down(float *w, float *id, int32_t i, int32_t n) {
    for (;;) {
        int32_t l = 2 * i + 1, r = l + 1, top = i;
        if (l < n && heap_before(w, id, l, top)) top = l;
        if (r < n && heap_before(w, id, r, top)) top = r;
        if (top == i) return;
        float tw = w[i], ti = id[i];
        w[i] = w[top];
        id[i] = id[top];
        w[top] = tw;
        id[top] = ti;
        i = top;
    }
}

int32_t dsmoe_sample(const float *logits, int32_t V, float temperature, float top_p,
                     dsmoe_rng *rng, float *scratch) {
    if (!logits || V < 1 || V > (1 << 24))
        return fail(DSMOE_STATUS_INVALID_ARGUMENT, "%s",
                    !logits ? "NULL logits" : "V must be in 1..2^24");
    if (!(top_p > 0.0f && top_p <= 1.0f))
        return fail(DSMOE_STATUS_INVALID_ARGUMENT, "top_p must be in (0, 1], found %g",
                    (double)top_p);
    if (isnan(temperature) || isinf(temperature))
        return fail(DSMOE_STATUS_INVALID_ARGUMENT, "temperature must be finite, found %g",
                    (double)temperature);
    int32_t best = -1;
    for (int32_t i = 0; i < V; i++) {
        float x = logits[i];
        if (isnan(x) || x == INFINITY)
            return fail(DSMOE_STATUS_NON_FINITE, "logit %d is %s", (int)i, isnan(x) ? "NaN" : "+Inf");
        if (x != -INFINITY && (best < 0 || x > logits[best])) best = i;
    }
    if (best < 0) return fail(DSMOE_STATUS_NON_FINITE, "every one of the %d logits is -Inf", (int)V);
    if (temperature <= 0.0f) return best;
    if (!rng || !scratch)
        return fail(DSMOE_STATUS_INVALID_ARGUMENT, "NULL %s (needed when temperature > 0)",
                    !rng ? "rng" : "scratch");
    const double m = logits[best], inv_t = 1.0 / (double)temperature;
    float *w = scratch, *id = scratch + V; /* ids < 2^24 are exact in a float */
    double total = 0.0;
    for (int32_t i = 0; i < V; i++) {
        w[i] = logits[i] == -INFINITY ? 0.0f : (float)exp(((double)logits[i] - m) * inv_t);
        id[i] = (float)i;
        total += w[i];
    }
    const double u = dsmoe_rng_uniform(rng);
    if (top_p >= 1.0f) {
        /* Every token kept, in id order. */
        const double target = u * total;
        double run = 0.0;
        int32_t last = best;
        for (int32_t i = 0; i < V; i++) {
            if (w[i] == 0.0f) continue;
            run += w[i];
            last = i;
            if (target < run) return i;
        }
        return last; /* u · total rounded up to total */
    }
    /* The nucleus: pop the heap until the kept weight reaches top_p of the total; popped
     * entries go to the back of the arrays, in nucleus order from V − 1 down. */
    for (int32_t i = V / 2 - 1; i >= 0; i--) heap_sift_down(w, id, i, V);
    const double need = (double)top_p * total;
    double kept = 0.0;
    int32_t n = V;
    while (n > 0 && kept < need) {
        float tw = w[0], ti = id[0];
        n--;
        w[0] = w[n];
        id[0] = id[n];
        w[n] = tw;
        id[n] = ti;
        heap_sift_down(w, id, 0, n);
        if (tw == 0.0f) { /* only zero weights left: the rounding of `need` */
            n++;
            break;
        }
        kept += tw;
    }
    const double target = u * kept;
    double run = 0.0;
    for (int32_t k = V - 1; k >= n; k--) {
        run += w[k];
        if (target < run) return (int32_t)id[k];
    }
    return (int32_t)id[n]; /* u · kept rounded up to kept: the last kept token */
}
