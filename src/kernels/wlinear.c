/*
 * wlinear.c — y = x · Wᵀ with W kept as stored (see wlinear.h).
 *
 * Two paths, chosen by T alone (so the choice never depends on the thread count):
 *
 *   T < DSMOE__WLINEAR_PANEL_T ("decode", memory-bound): W is streamed once. A tile of R
 *   rows of W is widened 16 columns at a time in registers (bf16: a 16-bit shift; f16:
 *   vcvtph2ps; fp8: bit placement times 2^120, times the block scale) and multiplied into
 *   R · N accumulators for a group of N <= 4 tokens; the groups of tokens reuse the tile
 *   from the cache. Each result is the "16-lane" sum: column k goes to lane k mod 16 as
 *   acc = fma(w, x, acc) in increasing k (the last, partial chunk padded with w = x = 0),
 *   and the 16 lanes are combined as p[j] += p[j+8], p[j+4], p[j+2], p[0] += p[1]. The
 *   scalar reference (DSMOE_FORCE_REF=1) performs the same operations, so the AVX-512
 *   kernel and the reference give identical bits; the order depends on the shapes only.
 *
 *   T >= DSMOE__WLINEAR_PANEL_T ("prompt", compute-bound): W is cut into panels of
 *   wl_panel_rows(cols) rows; a thread widens a panel into its scratch and calls SGEMM
 *   (BLIS, one thread) on it. Panels are handed out dynamically; each output element
 *   belongs to one panel, and SGEMM's result depends only on its arguments, so the
 *   bits do not depend on the thread count. BLIS's summation order differs from the
 *   16-lane order, so the two paths agree within fp32 rounding, not bit for bit.
 */
#include "kernels/wlinear.h"

#include "kernels/blas.h"
#include "kernels/kernels.h"

#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if (defined(__x86_64__) || defined(__i386__)) && defined(DSMOE_HAVE_AVX512)
#define WL_X86 1
#include <immintrin.h>
#endif

#define WL_INLINE static inline __attribute__((always_inline))

/* ----------------------------------------------------------- conversions -- */

static float bf16_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Exact; NaNs come out quiet with their payload (as vcvtph2ps gives them). */
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
        u = s | 0x7f800000u | (m << 13) | (m ? 0x400000u : 0u);
    } else {
        u = s | ((e + 112) << 23) | (m << 13);
    }
    return bits_f32(u);
}

/* E4M3 "fn": no infinities; S.1111.111 is NaN (quiet, with the sign bit). */
static float f8_f32(uint8_t b) {
    int e = (b >> 3) & 0xf, m = b & 7;
    if (e == 0xf && m == 7) return bits_f32((b & 0x80u ? 0x80000000u : 0u) | 0x7fc00000u);
    float v = e == 0 ? ldexpf((float)m, -9) : ldexpf((float)(8 + m), e - 10);
    return (b & 0x80) ? -v : v;
}

/* The scale of element (r, k) of an F8E4M3 matrix. */
static float f8_scale(const dsmoe__wmat *W, int64_t r, int64_t k) {
    const int64_t nbc = (W->cols + W->bc - 1) / W->bc;
    float s;
    memcpy(&s, (const char *)W->scale + (size_t)((r / W->br) * nbc + k / W->bc) * 4, 4);
    return s;
}

/* Columns [k0, k1) of row r widened into d (scalar; the specification). */
static void widen_ref(float *d, const dsmoe__wmat *W, int64_t r, int64_t k0, int64_t k1) {
    const int64_t C = W->cols;
    const char *row = (const char *)W->data;
    switch (W->type) {
    case DSMOE__WT_F32:
        memcpy(d, row + (size_t)(r * C + k0) * 4, (size_t)(k1 - k0) * 4);
        break;
    case DSMOE__WT_BF16:
    case DSMOE__WT_F16:
        for (int64_t k = k0; k < k1; k++) {
            uint16_t h;
            memcpy(&h, row + (size_t)(r * C + k) * 2, 2);
            d[k - k0] = W->type == DSMOE__WT_BF16 ? bf16_f32(h) : f16_f32(h);
        }
        break;
    case DSMOE__WT_F8E4M3:
        for (int64_t k = k0; k < k1; k++)
            d[k - k0] = f8_f32((uint8_t)row[r * C + k]) * f8_scale(W, r, k);
        break;
    }
}

/* The 16-lane combination (see the top of the file). */
static float lanes16_sum(float p[16]) {
    for (int j = 0; j < 8; j++) p[j] += p[j + 8];
    for (int j = 0; j < 4; j++) p[j] += p[j + 4];
    for (int j = 0; j < 2; j++) p[j] += p[j + 2];
    return p[0] + p[1];
}

/* ------------------------------------------------- decode path, scalar -- */

/* Rows [o0, o1) for all T tokens, 16-lane order; one row at a time. */
static void decode_ref(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t T,
                       const dsmoe__wmat *W, int64_t o0, int64_t o1) {
    const int64_t C = W->cols;
    for (int64_t o = o0; o < o1; o++) {
        for (int64_t t = 0; t < T; t++) {
            const float *xr = x + t * ldx;
            float acc[16] = {0};
            for (int64_t k = 0; k < C; k += 16) {
                const int64_t n = C - k < 16 ? C - k : 16;
                float w[16] = {0}, xv[16] = {0};
                widen_ref(w, W, o, k, k + n);
                memcpy(xv, xr + k, (size_t)n * sizeof(float));
                for (int l = 0; l < 16; l++) acc[l] = fmaf(w[l], xv[l], acc[l]);
            }
            y[t * ldy + o] = lanes16_sum(acc);
        }
    }
}

#if defined(WL_X86)
/* ------------------------------------------------ decode path, AVX-512 -- */

#define WL512 __attribute__((target("avx512f,avx2,fma,f16c")))

WL_INLINE WL512 float hsum512(__m512 a) {
    const __m256 lo = _mm512_castps512_ps256(a),
                 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
    const __m256 s8 = _mm256_add_ps(lo, hi);
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    const __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    return _mm_cvtss_f32(s1);
}

/* 16 fp8 bytes widened (without the scale): through f16 as in f8_fast, NaN patterns
 * made quiet NaNs with their sign. */
WL_INLINE WL512 __m512 f8_16(__m128i bytes) {
    const __m256i h = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(bytes), 7),
                                       _mm256_set1_epi16((short)0xbf80));
    __m512 v = _mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(0x1p8f));
    const __m512i b = _mm512_cvtepu8_epi32(bytes);
    const __mmask16 nan = _mm512_cmpeq_epi32_mask(_mm512_and_si512(b, _mm512_set1_epi32(0x7f)), _mm512_set1_epi32(0x7f));
    const __m512i sgn = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24);
    const __m512 qnan = _mm512_castsi512_ps(_mm512_or_si512(_mm512_set1_epi32(0x7fc00000), sgn));
    return _mm512_mask_blend_ps(nan, v, qnan);
}

/* The scales of columns k .. k+15 of row r (one block or two). */
WL_INLINE WL512 __m512 f8_scale16(const dsmoe__wmat *W, const char *srow, int64_t k) {
    const int64_t b0 = k / W->bc;
    if ((k + 15) / W->bc == b0) {
        float s;
        memcpy(&s, srow + (size_t)b0 * 4, 4);
        return _mm512_set1_ps(s);
    }
    float s[16];
    for (int l = 0; l < 16; l++) memcpy(&s[l], srow + (size_t)((k + l) / W->bc) * 4, 4);
    return _mm512_loadu_ps(s);
}

/* 16 weights of row `row` (byte pointer) at column k, widened; full chunk. */
WL_INLINE WL512 __m512 ld_w(const char *row, int64_t k, const int TY) {
    switch (TY) {
    case DSMOE__WT_F32: return _mm512_loadu_ps((const float *)(const void *)(row + k * 4));
    case DSMOE__WT_BF16:
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(const void *)(row + k * 2))), 16));
    case DSMOE__WT_F16: return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)(row + k * 2)));
    default: return f8_16(_mm_loadu_si128((const __m128i *)(const void *)(row + k)));
    }
}

/* 16 fp8 bytes times a scale given as a = scale · 2^8 (MODE 1; exact whenever that is
 * finite, |scale| < 2^120) or as a = 2^8, b = scale (MODE 2). The sign-extended byte
 * shifted left by 7 and masked is an f16 with the sign, exponent and mantissa in place
 * and an exponent short by 8 (fp8 subnormals land on f16 subnormals); vcvtph2ps makes
 * it an fp32 normal number, so no multiplication sees a subnormal operand (which costs
 * a microcode assist on some CPUs). The NaN pattern is not handled here (the caller
 * checks for it). */
WL_INLINE WL512 __m512 f8_fast(__m128i bytes, __m512 a, __m512 b, const int MODE) {
    const __m256i h = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(bytes), 7),
                                       _mm256_set1_epi16((short)0xbf80));
    const __m512 f = _mm512_mul_ps(_mm512_cvtph_ps(h), a);
    return MODE == 2 ? _mm512_mul_ps(f, b) : f;
}

/* Full 16-column chunks from k0 to k1 (multiples of 16) of a tile of R rows × N tokens,
 * accumulated into acc. MODE 0: widened as stored (fp8: the scale looked up per chunk);
 * MODE 1 / 2: fp8 with one scale per row over [k0, k1) (sa, sb: see f8_fast). */
WL_INLINE WL512 void chunks512(__m512 *acc, const char *const *rows, const char *const *srow,
                               const float *const *xr, const dsmoe__wmat *W, int64_t k0,
                               int64_t k1, const __m512 *sa, const __m512 *sb, const int TY,
                               const int R, const int N, const int MODE) {
    for (int64_t k = k0; k < k1; k += 16) {
        __m512 w[8];
        if (MODE == 0) {
            for (int r = 0; r < R; r++) {
                w[r] = ld_w(rows[r], k, TY);
                if (TY == DSMOE__WT_F8E4M3) w[r] = _mm512_mul_ps(w[r], f8_scale16(W, srow[r], k));
            }
        } else {
            /* a NaN byte (S.1111.111) is the only one whose double is 0xFE (mod 256),
             * the largest even byte: one test for the R rows */
            __m128i by[8], hi = _mm_setzero_si128();
            for (int r = 0; r < R; r++) {
                by[r] = _mm_loadu_si128((const __m128i *)(const void *)(rows[r] + k));
                hi = _mm_max_epu8(hi, _mm_add_epi8(by[r], by[r]));
            }
            if (__builtin_expect(_mm_movemask_epi8(_mm_cmpeq_epi8(hi, _mm_set1_epi8((char)0xfe))) != 0, 0)) {
                for (int r = 0; r < R; r++) w[r] = _mm512_mul_ps(f8_16(by[r]), f8_scale16(W, srow[r], k));
            } else {
                for (int r = 0; r < R; r++) w[r] = f8_fast(by[r], sa[r], sb[r], MODE);
            }
        }
        for (int t = 0; t < N; t++) {
            const __m512 xv = _mm512_loadu_ps(xr[t] + k);
            for (int r = 0; r < R; r++) acc[r * N + t] = _mm512_fmadd_ps(w[r], xv, acc[r * N + t]);
        }
    }
}

/* A tile of R rows (from o) × N tokens (from t0): 16-lane sums over all columns. */
WL_INLINE WL512 void tile512(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t t0,
                             const dsmoe__wmat *W, int64_t o, const int TY, const int R,
                             const int N) {
    const int64_t C = W->cols, Cf = C / 16 * 16;
    const int esz = TY == DSMOE__WT_F32 ? 4 : TY == DSMOE__WT_F8E4M3 ? 1 : 2;
    const char *rows[8], *srow[8];
    const float *xr[4];
    __m512 acc[32];
    for (int r = 0; r < R; r++) {
        rows[r] = (const char *)W->data + (size_t)((o + r) * C) * (size_t)esz;
        srow[r] = NULL;
        if (TY == DSMOE__WT_F8E4M3)
            srow[r] = (const char *)W->scale + (size_t)(((o + r) / W->br) * ((C + W->bc - 1) / W->bc)) * 4;
    }
    for (int t = 0; t < N; t++) xr[t] = x + (t0 + t) * ldx;
    for (int j = 0; j < R * N; j++) acc[j] = _mm512_setzero_ps();
    if (TY == DSMOE__WT_F8E4M3 && W->bc % 16 == 0) {
        /* blocks of bc columns: one scale per row in each */
        for (int64_t k0 = 0, b = 0; k0 < Cf; k0 += W->bc, b++) {
            const int64_t k1 = k0 + W->bc < Cf ? k0 + W->bc : Cf;
            __m512 sa[8], sb[8];
            int slow = 0;
            for (int r = 0; r < R; r++) {
                float sc;
                memcpy(&sc, srow[r] + (size_t)b * 4, 4);
                slow |= !(fabsf(sc) < 0x1p120f) && isfinite(sc);
                sa[r] = _mm512_set1_ps(sc * 0x1p8f);
                sb[r] = _mm512_set1_ps(sc);
            }
            if (slow) {
                for (int r = 0; r < R; r++) sa[r] = _mm512_set1_ps(0x1p8f);
                chunks512(acc, rows, srow, xr, W, k0, k1, sa, sb, TY, R, N, 2);
            } else {
                chunks512(acc, rows, srow, xr, W, k0, k1, sa, sb, TY, R, N, 1);
            }
        }
    } else {
        chunks512(acc, rows, srow, xr, W, 0, Cf, NULL, NULL, TY, R, N, 0);
    }
    if (Cf < C) {
        const int n = (int)(C - Cf);
        const __mmask16 m = (__mmask16)((1u << n) - 1u);
        __m512 w[8];
        for (int r = 0; r < R; r++) {
            float buf[16] = {0};
            widen_ref(buf, W, o + r, Cf, C);
            w[r] = _mm512_loadu_ps(buf);
        }
        for (int t = 0; t < N; t++) {
            const __m512 xv = _mm512_maskz_loadu_ps(m, xr[t] + Cf);
            for (int r = 0; r < R; r++) acc[r * N + t] = _mm512_fmadd_ps(w[r], xv, acc[r * N + t]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < N; t++) y[(t0 + t) * ldy + o + r] = hsum512(acc[r * N + t]);
}

#define WL_TILE(R_, N_) tile512(y, ldy, x, ldx, t, W, o, TY, R_, N_)

/* Rows [o0, o1), all T tokens: tiles of R rows, the tokens in groups of up to 4. */
WL_INLINE WL512 void decode512_ty(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t T,
                                  const dsmoe__wmat *W, int64_t o0, int64_t o1, const int TY) {
    int64_t o = o0;
    const int R = T == 1 ? 8 : T == 2 ? 6 : 4;
    for (; o + R <= o1; o += R) {
        for (int64_t t = 0; t < T; t += 4) {
            switch (T - t < 4 ? T - t : 4) {
            case 1:
                if (R == 8)
                    WL_TILE(8, 1);
                else
                    WL_TILE(4, 1);
                break;
            case 2:
                if (R == 6)
                    WL_TILE(6, 2);
                else
                    WL_TILE(4, 2);
                break;
            case 3: WL_TILE(4, 3); break;
            default: WL_TILE(4, 4); break;
            }
        }
    }
    for (; o < o1; o++)
        for (int64_t t = 0; t < T; t += 4) {
            switch (T - t < 4 ? T - t : 4) {
            case 1: WL_TILE(1, 1); break;
            case 2: WL_TILE(1, 2); break;
            case 3: WL_TILE(1, 3); break;
            default: WL_TILE(1, 4); break;
            }
        }
}

WL512 static void decode512(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t T,
                            const dsmoe__wmat *W, int64_t o0, int64_t o1) {
    switch (W->type) {
    case DSMOE__WT_F32: decode512_ty(y, ldy, x, ldx, T, W, o0, o1, DSMOE__WT_F32); break;
    case DSMOE__WT_BF16: decode512_ty(y, ldy, x, ldx, T, W, o0, o1, DSMOE__WT_BF16); break;
    case DSMOE__WT_F16: decode512_ty(y, ldy, x, ldx, T, W, o0, o1, DSMOE__WT_F16); break;
    case DSMOE__WT_F8E4M3: decode512_ty(y, ldy, x, ldx, T, W, o0, o1, DSMOE__WT_F8E4M3); break;
    }
}

/* Row r widened into d (all columns). */
WL_INLINE WL512 void widen512_ty(float *d, const dsmoe__wmat *W, int64_t r, const int TY) {
    const int64_t C = W->cols;
    const int esz = TY == DSMOE__WT_F32 ? 4 : TY == DSMOE__WT_F8E4M3 ? 1 : 2;
    const char *row = (const char *)W->data + (size_t)(r * C) * (size_t)esz;
    const char *srow = TY == DSMOE__WT_F8E4M3
                           ? (const char *)W->scale + (size_t)((r / W->br) * ((C + W->bc - 1) / W->bc)) * 4
                           : NULL;
    int64_t k = 0;
    for (; k + 16 <= C; k += 16) {
        __m512 w = ld_w(row, k, TY);
        if (TY == DSMOE__WT_F8E4M3) w = _mm512_mul_ps(w, f8_scale16(W, srow, k));
        _mm512_storeu_ps(d + k, w);
    }
    if (k < C) widen_ref(d + k, W, r, k, C);
}

WL512 static void widen512(float *d, const dsmoe__wmat *W, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        float *dr = d + (r - r0) * W->cols;
        switch (W->type) {
        case DSMOE__WT_F32: widen512_ty(dr, W, r, DSMOE__WT_F32); break;
        case DSMOE__WT_BF16: widen512_ty(dr, W, r, DSMOE__WT_BF16); break;
        case DSMOE__WT_F16: widen512_ty(dr, W, r, DSMOE__WT_F16); break;
        case DSMOE__WT_F8E4M3: widen512_ty(dr, W, r, DSMOE__WT_F8E4M3); break;
        }
    }
}
#endif /* WL_X86 */

/* --------------------------------------------------------------- dispatch -- */

/* 1: the AVX-512 kernels; 0: the scalar reference (DSMOE_FORCE_REF, dsmoe_set_isa, or
 * no AVX-512). */
static int use_avx512(void) {
#if defined(WL_X86)
    return strcmp(dsmoe__kernels()->name, "avx512") == 0;
#else
    return 0;
#endif
}

static void widen_rows(float *dst, const dsmoe__wmat *W, int64_t r0, int64_t r1, int simd) {
#if defined(WL_X86)
    if (simd) {
        widen512(dst, W, r0, r1);
        return;
    }
#endif
    (void)simd;
    for (int64_t r = r0; r < r1; r++) widen_ref(dst + (r - r0) * W->cols, W, r, 0, W->cols);
}

void dsmoe__wmat_widen(float *dst, const dsmoe__wmat *W, int64_t r0, int64_t r1) {
    widen_rows(dst, W, r0, r1, use_avx512());
}

/* Rows of W per panel of the prompt path: about DSMOE__WLINEAR_PANEL_BYTES of fp32, a
 * multiple of 16 in [16, 512]; a function of cols only. */
static int64_t wl_panel_rows(int64_t cols) {
    int64_t r = (int64_t)DSMOE__WLINEAR_PANEL_BYTES / (4 * (cols > 0 ? cols : 1)) / 16 * 16;
    return r < 16 ? 16 : r > 512 ? 512 : r;
}

size_t dsmoe__wlinear_scratch(int64_t max_cols, int64_t max_T) {
    if (max_cols <= 0 || max_T < DSMOE__WLINEAR_PANEL_T) return 0;
    /* wl_panel_rows(c) · c is at most this for every c <= max_cols */
    size_t a = (size_t)DSMOE__WLINEAR_PANEL_BYTES, b = (size_t)512 * 4 * (size_t)max_cols,
           c = (size_t)16 * 4 * (size_t)max_cols;
    size_t s = a < b ? a : b;
    return dsmoe__align64(s > c ? s : c);
}

void dsmoe__wlinear(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t T,
                    const dsmoe__wmat *W, int n_threads, void *scratch) {
    const int64_t R = W->rows, C = W->cols;
    if (T <= 0 || R <= 0) return;
    const int simd = use_avx512();
    const int nt = n_threads > 1 ? n_threads : 1;
    if (C <= 0) {
        for (int64_t t = 0; t < T; t++) memset(y + t * ldy, 0, (size_t)R * sizeof(float));
        return;
    }
    if (T < DSMOE__WLINEAR_PANEL_T) {
        /* contiguous row ranges (multiples of 8 rows), one per thread: the result of an
         * element does not depend on the range it falls in */
#pragma omp parallel num_threads(nt) if (nt > 1)
        {
            int id = 0, n = 1;
#ifdef _OPENMP
            id = omp_get_thread_num();
            n = omp_get_num_threads();
#endif
            const int64_t blocks = (R + 7) / 8;
            int64_t o0 = blocks * id / n * 8, o1 = blocks * (id + 1) / n * 8;
            if (o1 > R) o1 = R;
            if (o0 < o1) {
#if defined(WL_X86)
                if (simd)
                    decode512(y, ldy, x, ldx, T, W, o0, o1);
                else
#endif
                    decode_ref(y, ldy, x, ldx, T, W, o0, o1);
            }
        }
        return;
    }
    const size_t per = dsmoe__wlinear_scratch(C, T);
    const int64_t pr = wl_panel_rows(C), np = (R + pr - 1) / pr;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (nt > 1)
    for (int64_t p = 0; p < np; p++) {
        int id = 0;
#ifdef _OPENMP
        id = omp_get_thread_num();
#endif
        float *buf = (float *)(void *)((char *)scratch + per * (size_t)id);
        const int64_t r0 = p * pr, r1 = r0 + pr < R ? r0 + pr : R;
        widen_rows(buf, W, r0, r1, simd);
        dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__TRANS, (int)T, (int)(r1 - r0), (int)C, 1.0f, x, (int)ldx, buf,
                     (int)C, 0.0f, y + r0, (int)ldy);
    }
}
