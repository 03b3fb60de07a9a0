/*
 * wlinear.c — y = x · Wᵀ with W kept as stored (see wlinear.h). Reference version:
 * each output row of W is widened into the thread's scratch and dotted with every
 * token; threads take fixed blocks of output rows.
 */
#include "kernels/wlinear.h"

#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static float bf16_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static float f16_f32(uint16_t h) {
    uint32_t s = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 0x1f, m = h & 0x3ff, u;
    if (e == 0) {
        if (m == 0) {
            u = s;
        } else { /* subnormal: m · 2^-24 */
            float f = ldexpf((float)m, -24);
            return (h >> 15) ? -f : f;
        }
    } else if (e == 31) {
        u = s | 0x7f800000u | (m << 13);
    } else {
        u = s | ((e + 112) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static float f8_f32(uint8_t b) {
    int s = b >> 7, e = (b >> 3) & 0xf, m = b & 7;
    float v;
    if (e == 0xf && m == 7) return NAN;
    if (e == 0)
        v = ldexpf((float)m, -9);
    else
        v = ldexpf((float)(8 + m), e - 10);
    return s ? -v : v;
}

void dsmoe__wmat_widen(float *dst, const dsmoe__wmat *W, int64_t r0, int64_t r1) {
    const int64_t C = W->cols;
    for (int64_t r = r0; r < r1; r++) {
        float *d = dst + (r - r0) * C;
        const char *row = (const char *)W->data;
        switch (W->type) {
        case DSMOE__WT_F32:
            memcpy(d, row + (size_t)(r * C) * 4, (size_t)C * 4);
            break;
        case DSMOE__WT_BF16:
        case DSMOE__WT_F16:
            for (int64_t k = 0; k < C; k++) {
                uint16_t h;
                memcpy(&h, row + (size_t)(r * C + k) * 2, 2);
                d[k] = W->type == DSMOE__WT_BF16 ? bf16_f32(h) : f16_f32(h);
            }
            break;
        case DSMOE__WT_F8E4M3: {
            const int64_t nbc = (C + W->bc - 1) / W->bc;
            for (int64_t k = 0; k < C; k++) {
                float s;
                memcpy(&s, (const char *)W->scale + (size_t)((r / W->br) * nbc + k / W->bc) * 4, 4);
                d[k] = f8_f32((uint8_t)row[r * C + k]) * s;
            }
            break;
        }
        }
    }
}

size_t dsmoe__wlinear_scratch(int64_t max_cols, int64_t max_T) {
    (void)max_T;
    return dsmoe__align64((size_t)(max_cols > 0 ? max_cols : 0) * sizeof(float));
}

void dsmoe__wlinear(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t T,
                    const dsmoe__wmat *W, int n_threads, void *scratch) {
    const int64_t R = W->rows, C = W->cols;
    const size_t per = dsmoe__wlinear_scratch(C, T);
    int nt = n_threads > 1 ? n_threads : 1;
    const int64_t blk = 16, nb = (R + blk - 1) / blk;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t b = 0; b < nb; b++) {
#ifdef _OPENMP
        float *wrow = (float *)((char *)scratch + per * (size_t)omp_get_thread_num());
#else
        float *wrow = (float *)scratch;
#endif
        for (int64_t o = b * blk; o < R && o < (b + 1) * blk; o++) {
            dsmoe__wmat_widen(wrow, W, o, o + 1);
            for (int64_t t = 0; t < T; t++) {
                const float *xr = x + t * ldx;
                float acc = 0.0f;
                for (int64_t k = 0; k < C; k++) acc += xr[k] * wrow[k];
                y[t * ldy + o] = acc;
            }
        }
    }
}
