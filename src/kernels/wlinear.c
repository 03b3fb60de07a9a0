/*
 * wlinear.c — y = x · Wᵀ with W kept as stored (see wlinear.h).
 *
 * One kernel (AVX-512; AVX2 and the scalar reference give the same bits): a tile of R rows
 * of W is widened 16 columns at a time in registers (bf16: a 16-bit shift; f16:
 * vcvtph2ps; fp8: through f16 (32 bytes at a time with AVX-512BW), times the block
 * scale) and multiplied into R · N
 * accumulators for a group of N tokens (R = 8, N = 1 for one token; 6 × 2 for two;
 * else 4 rows × groups of 6 tokens), the groups reusing the tile from the cache. Each
 * result is the "16-lane" sum: column k goes to lane k mod 16 as acc = fma(w, x, acc) in
 * increasing k (the last, partial chunk padded with w = x = 0), and the 16 lanes are
 * combined as p[j] += p[j+8], p[j+4], p[j+2], p[0] += p[1]. So the bits depend on the
 * shapes of W only: not on T, the tiling, the ISA or the thread count.
 *
 *   T < DSMOE__WLINEAR_PANEL_T (decode, memory-bound): one contiguous range of rows
 *   per thread, W streamed once.
 *   T >= DSMOE__WLINEAR_PANEL_T (prompt, compute-bound): blocks of WL_RB rows handed
 *   out dynamically, each over the tokens in blocks that keep x's rows in the L2
 *   cache. On one Zen 5 core this runs bf16 weights at T = 256 faster than BLIS SGEMM
 *   on the same weights already widened to fp32 (bench/bench_wlinear.c), so the
 *   AVX-512 build widens no panels.
 *   Without AVX-512 (AVX2 or the reference; the AVX2 kernel holds each 16-lane
 *   vector as two of 8 lanes, in tiles of at most 4 rows × 1 token or 2 × 2), T >=
 *   DSMOE__WLINEAR_PANEL_T: panels of wl_panel_rows(cols) rows
 *   are widened into the thread's scratch and multiplied by SGEMM (BLIS, one thread),
 *   handed out dynamically; BLIS's order differs from the 16-lane order (within fp32
 *   rounding), and its result depends only on its arguments, so the bits still do not
 *   depend on the thread count.
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

/* Rows of W per work item of the compute-bound AVX-512 path (a multiple of 4). */
#define WL_RB 48

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

#define WL512 __attribute__((target("avx512f,avx512bw,avx2,fma,f16c")))

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
    if (k + 16 <= (b0 + 1) * W->bc) {
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
    int64_t k = k0;
    if (MODE != 0) {
        /* fp8, two chunks at a time: 32 bytes of a row widened to f16 in one vector */
        for (; k + 32 <= k1; k += 32) {
            __m256i by[8], hi = _mm256_setzero_si256();
            for (int r = 0; r < R; r++) {
                by[r] = _mm256_loadu_si256((const __m256i *)(const void *)(rows[r] + k));
                hi = _mm256_max_epu8(hi, _mm256_add_epi8(by[r], by[r]));
            }
            if (__builtin_expect(_mm256_movemask_epi8(_mm256_cmpeq_epi8(hi, _mm256_set1_epi8((char)0xfe))) != 0, 0))
                break; /* a NaN: the chunks one at a time from here */
            __m512 w0[8], w1[8];
            for (int r = 0; r < R; r++) {
                const __m512i h = _mm512_and_si512(_mm512_slli_epi16(_mm512_cvtepi8_epi16(by[r]), 7),
                                                   _mm512_set1_epi16((short)0xbf80));
                w0[r] = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(h)), sa[r]);
                w1[r] = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)), sa[r]);
                if (MODE == 2) {
                    w0[r] = _mm512_mul_ps(w0[r], sb[r]);
                    w1[r] = _mm512_mul_ps(w1[r], sb[r]);
                }
            }
            for (int t = 0; t < N; t++) {
                const __m512 xv = _mm512_loadu_ps(xr[t] + k);
                for (int r = 0; r < R; r++) acc[r * N + t] = _mm512_fmadd_ps(w0[r], xv, acc[r * N + t]);
            }
            for (int t = 0; t < N; t++) {
                const __m512 xv = _mm512_loadu_ps(xr[t] + k + 16);
                for (int r = 0; r < R; r++) acc[r * N + t] = _mm512_fmadd_ps(w1[r], xv, acc[r * N + t]);
            }
        }
    }
    for (; k < k1; k += 16) {
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
    const float *xr[8];
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

#ifndef WL_NG
#define WL_NG 6
#endif
#define WL_TILE(R_, N_) tile512(y, ldy, x, ldx, t, W, o, TY, R_, N_)

/* Rows [o0, o1), all T tokens: tiles of R rows, the tokens in groups of up to 4. */
WL_INLINE WL512 void decode512_ty(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t T,
                                  const dsmoe__wmat *W, int64_t o0, int64_t o1, const int TY) {
    int64_t o = o0;
    /* rows per tile: 8 for one token, 6 for two, else 4 (tokens in groups of 6) */
    const int R = T == 1 ? 8 : T == 2 ? 6 : 4;
    for (; o + R <= o1; o += R) {
        int64_t t = 0;
        if (R == 8) {
            WL_TILE(8, 1);
            continue;
        }
        if (R == 6) {
            WL_TILE(6, 2);
            continue;
        }
        for (; t + WL_NG <= T; t += WL_NG) WL_TILE(4, WL_NG);
        switch (T - t) {
        case 0: break;
        case 1: WL_TILE(4, 1); break;
        case 2: WL_TILE(4, 2); break;
        case 3: WL_TILE(4, 3); break;
        case 4: WL_TILE(4, 4); break;
        default: WL_TILE(4, 5); break;
        }
    }
    for (; o < o1; o++) {
        int64_t t = 0;
        for (; t + 4 <= T; t += 4) WL_TILE(1, 4);
        switch (T - t) {
        case 0: break;
        case 1: WL_TILE(1, 1); break;
        case 2: WL_TILE(1, 2); break;
        default: WL_TILE(1, 3); break;
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

/* -------------------------------------------------- decode path, AVX2 -- */
/* The same 16-lane arithmetic with each 16-lane vector held as two of 8 lanes (lo:
 * lanes 0-7, hi: 8-15), so the bits equal the AVX-512 kernel's and the reference's.
 * Sixteen registers: tiles of 4 rows for one token, else 2 rows × 2 tokens; fp8 scales
 * are looked up per chunk. */

#define WL256 __attribute__((target("avx2,fma,f16c")))

typedef struct wl_v16 {
    __m256 lo, hi;
} wl_v16;

WL_INLINE WL256 wl_v16 v16_fma(wl_v16 a, wl_v16 b, wl_v16 c) {
    wl_v16 r = {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
    return r;
}

WL_INLINE WL256 float hsum256(wl_v16 a) {
    const __m256 s8 = _mm256_add_ps(a.lo, a.hi);
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    const __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    return _mm_cvtss_f32(s1);
}

/* 8 fp8 bytes (the low half of b8) widened, NaN patterns made quiet NaNs with their sign. */
WL_INLINE WL256 __m256 f8_8(__m128i b8) {
    const __m128i h = _mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(b8), 7), _mm_set1_epi16((short)0xbf80));
    const __m256 v = _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(0x1p8f));
    const __m256i b = _mm256_cvtepu8_epi32(b8);
    const __m256i nan = _mm256_cmpeq_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7f)), _mm256_set1_epi32(0x7f));
    const __m256i sgn = _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x80)), 24);
    const __m256 qnan = _mm256_castsi256_ps(_mm256_or_si256(_mm256_set1_epi32(0x7fc00000), sgn));
    return _mm256_blendv_ps(v, qnan, _mm256_castsi256_ps(nan));
}

WL_INLINE WL256 __m256 bf16_8(const char *p) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(const void *)p)), 16));
}

/* 16 weights of row `row` at column k, widened (fp8: times the scales of row srow). */
WL_INLINE WL256 wl_v16 ld_w256(const dsmoe__wmat *W, const char *row, const char *srow, int64_t k,
                               const int TY) {
    wl_v16 r;
    switch (TY) {
    case DSMOE__WT_F32:
        r.lo = _mm256_loadu_ps((const float *)(const void *)(row + k * 4));
        r.hi = _mm256_loadu_ps((const float *)(const void *)(row + k * 4 + 32));
        break;
    case DSMOE__WT_BF16:
        r.lo = bf16_8(row + k * 2);
        r.hi = bf16_8(row + k * 2 + 16);
        break;
    case DSMOE__WT_F16:
        r.lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(row + k * 2)));
        r.hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(row + k * 2 + 16)));
        break;
    default: {
        const __m128i b = _mm_loadu_si128((const __m128i *)(const void *)(row + k));
        const int64_t b0 = k / W->bc;
        __m256 slo, shi;
        if (k + 16 <= (b0 + 1) * W->bc) {
            float s0;
            memcpy(&s0, srow + (size_t)b0 * 4, 4);
            slo = shi = _mm256_set1_ps(s0);
        } else {
            float s[16];
            for (int l = 0; l < 16; l++) memcpy(&s[l], srow + (size_t)((k + l) / W->bc) * 4, 4);
            slo = _mm256_loadu_ps(s);
            shi = _mm256_loadu_ps(s + 8);
        }
        r.lo = _mm256_mul_ps(f8_8(b), slo);
        r.hi = _mm256_mul_ps(f8_8(_mm_unpackhi_epi64(b, b)), shi);
        break;
    }
    }
    return r;
}

WL_INLINE WL256 void tile256(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t t0,
                             const dsmoe__wmat *W, int64_t o, const int TY, const int R,
                             const int N) {
    const int64_t C = W->cols, Cf = C / 16 * 16;
    const int esz = TY == DSMOE__WT_F32 ? 4 : TY == DSMOE__WT_F8E4M3 ? 1 : 2;
    const char *rows[4], *srow[4];
    const float *xr[2];
    wl_v16 acc[4];
    for (int r = 0; r < R; r++) {
        rows[r] = (const char *)W->data + (size_t)((o + r) * C) * (size_t)esz;
        srow[r] = NULL;
        if (TY == DSMOE__WT_F8E4M3)
            srow[r] = (const char *)W->scale + (size_t)(((o + r) / W->br) * ((C + W->bc - 1) / W->bc)) * 4;
    }
    for (int t = 0; t < N; t++) xr[t] = x + (t0 + t) * ldx;
    for (int j = 0; j < R * N; j++) acc[j].lo = acc[j].hi = _mm256_setzero_ps();
    for (int64_t k = 0; k < Cf; k += 16) {
        wl_v16 w[4];
        for (int r = 0; r < R; r++) w[r] = ld_w256(W, rows[r], srow[r], k, TY);
        for (int t = 0; t < N; t++) {
            const wl_v16 xv = {_mm256_loadu_ps(xr[t] + k), _mm256_loadu_ps(xr[t] + k + 8)};
            for (int r = 0; r < R; r++) acc[r * N + t] = v16_fma(w[r], xv, acc[r * N + t]);
        }
    }
    if (Cf < C) {
        const int n = (int)(C - Cf);
        wl_v16 w[4];
        for (int r = 0; r < R; r++) {
            float buf[16] = {0};
            widen_ref(buf, W, o + r, Cf, C);
            w[r].lo = _mm256_loadu_ps(buf);
            w[r].hi = _mm256_loadu_ps(buf + 8);
        }
        for (int t = 0; t < N; t++) {
            float xb[16] = {0};
            memcpy(xb, xr[t] + Cf, (size_t)n * sizeof(float));
            const wl_v16 xv = {_mm256_loadu_ps(xb), _mm256_loadu_ps(xb + 8)};
            for (int r = 0; r < R; r++) acc[r * N + t] = v16_fma(w[r], xv, acc[r * N + t]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < N; t++) y[(t0 + t) * ldy + o + r] = hsum256(acc[r * N + t]);
}

#define WL_TILE256(R_, N_) tile256(y, ldy, x, ldx, t, W, o, TY, R_, N_)

WL_INLINE WL256 void decode256_ty(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t T,
                                  const dsmoe__wmat *W, int64_t o0, int64_t o1, const int TY) {
    int64_t o = o0;
    const int R = T == 1 ? 4 : 2;
    for (; o + R <= o1; o += R) {
        int64_t t = 0;
        if (R == 4) {
            WL_TILE256(4, 1);
            continue;
        }
        for (; t + 2 <= T; t += 2) WL_TILE256(2, 2);
        if (t < T) WL_TILE256(2, 1);
    }
    for (; o < o1; o++) {
        int64_t t = 0;
        for (; t + 2 <= T; t += 2) WL_TILE256(1, 2);
        if (t < T) WL_TILE256(1, 1);
    }
}

WL256 static void decode256(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t T,
                            const dsmoe__wmat *W, int64_t o0, int64_t o1) {
    switch (W->type) {
    case DSMOE__WT_F32: decode256_ty(y, ldy, x, ldx, T, W, o0, o1, DSMOE__WT_F32); break;
    case DSMOE__WT_BF16: decode256_ty(y, ldy, x, ldx, T, W, o0, o1, DSMOE__WT_BF16); break;
    case DSMOE__WT_F16: decode256_ty(y, ldy, x, ldx, T, W, o0, o1, DSMOE__WT_F16); break;
    case DSMOE__WT_F8E4M3: decode256_ty(y, ldy, x, ldx, T, W, o0, o1, DSMOE__WT_F8E4M3); break;
    }
}

WL_INLINE WL256 void widen256_ty(float *d, const dsmoe__wmat *W, int64_t r, const int TY) {
    const int64_t C = W->cols;
    const int esz = TY == DSMOE__WT_F32 ? 4 : TY == DSMOE__WT_F8E4M3 ? 1 : 2;
    const char *row = (const char *)W->data + (size_t)(r * C) * (size_t)esz;
    const char *srow = TY == DSMOE__WT_F8E4M3
                           ? (const char *)W->scale + (size_t)((r / W->br) * ((C + W->bc - 1) / W->bc)) * 4
                           : NULL;
    int64_t k = 0;
    for (; k + 16 <= C; k += 16) {
        const wl_v16 w = ld_w256(W, row, srow, k, TY);
        _mm256_storeu_ps(d + k, w.lo);
        _mm256_storeu_ps(d + k + 8, w.hi);
    }
    if (k < C) widen_ref(d + k, W, r, k, C);
}

WL256 static void widen256(float *d, const dsmoe__wmat *W, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        float *dr = d + (r - r0) * W->cols;
        switch (W->type) {
        case DSMOE__WT_F32: widen256_ty(dr, W, r, DSMOE__WT_F32); break;
        case DSMOE__WT_BF16: widen256_ty(dr, W, r, DSMOE__WT_BF16); break;
        case DSMOE__WT_F16: widen256_ty(dr, W, r, DSMOE__WT_F16); break;
        case DSMOE__WT_F8E4M3: widen256_ty(dr, W, r, DSMOE__WT_F8E4M3); break;
        }
    }
}
#endif /* WL_X86 */

/* --------------------------------------------------------------- dispatch -- */

/* The kernel set: 2 AVX-512, 1 AVX2, 0 the scalar reference (DSMOE_FORCE_REF,
 * dsmoe_set_isa, or neither ISA). */
static int wl_isa(void) {
#if defined(WL_X86)
    /* the AVX-512 kernel also uses AVX-512BW; a CPU without it gets the AVX2 kernel
     * (the same bits) */
    static int bw = -1;
    if (bw < 0) {
        __builtin_cpu_init();
        bw = __builtin_cpu_supports("avx512bw") ? 1 : 0;
    }
    const char *n = dsmoe__kernels()->name;
    return strcmp(n, "avx512") == 0 ? (bw ? 2 : 1) : strcmp(n, "avx2") == 0 ? 1 : 0;
#else
    return 0;
#endif
}

static void widen_rows(float *dst, const dsmoe__wmat *W, int64_t r0, int64_t r1, int isa) {
#if defined(WL_X86)
    if (isa == 2) {
        widen512(dst, W, r0, r1);
        return;
    }
    if (isa == 1) {
        widen256(dst, W, r0, r1);
        return;
    }
#endif
    (void)isa;
    for (int64_t r = r0; r < r1; r++) widen_ref(dst + (r - r0) * W->cols, W, r, 0, W->cols);
}

void dsmoe__wmat_widen(float *dst, const dsmoe__wmat *W, int64_t r0, int64_t r1) {
    widen_rows(dst, W, r0, r1, wl_isa());
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
    const int isa = wl_isa();
    const int nt = n_threads > 1 ? n_threads : 1;
    (void)nt; /* unused without OpenMP */
    if (C <= 0) {
        for (int64_t t = 0; t < T; t++) memset(y + t * ldy, 0, (size_t)R * sizeof(float));
        return;
    }
    if (T < DSMOE__WLINEAR_PANEL_T || (isa != 2 && !scratch)) {
        /* memory-bound (or no scratch for panels: the same kernel then, slower for
         * large T without AVX-512, with the bits of the AVX-512 path): contiguous row ranges (multiples of 24 rows), one per thread; the
         * result of an element does not depend on the range it falls in */
#pragma omp parallel num_threads(nt) if (nt > 1)
        {
            int id = 0, n = 1;
#ifdef _OPENMP
            id = omp_get_thread_num();
            n = omp_get_num_threads();
#endif
            const int64_t blocks = (R + 23) / 24;
            int64_t o0 = blocks * id / n * 24, o1 = blocks * (id + 1) / n * 24;
            if (o1 > R) o1 = R;
            if (o0 < o1) {
#if defined(WL_X86)
                if (isa == 2)
                    decode512(y, ldy, x, ldx, T, W, o0, o1);
                else if (isa == 1)
                    decode256(y, ldy, x, ldx, T, W, o0, o1);
                else
#endif
                    decode_ref(y, ldy, x, ldx, T, W, o0, o1);
            }
        }
        return;
    }
#if defined(WL_X86)
    if (isa == 2) {
        /* compute-bound: the same kernel on blocks of WL_RB rows handed out dynamically,
         * each over the tokens in blocks of tb (so that a block of x stays in the L2
         * cache while the block of W rows stays there too) */
        const int64_t nb = (R + WL_RB - 1) / WL_RB;
        int64_t tb = (int64_t)(512 * 1024) / (4 * C) / 6 * 6;
        tb = tb < 6 ? 6 : tb > 96 ? 96 : tb;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (nt > 1)
        for (int64_t b = 0; b < nb; b++) {
            const int64_t o0 = b * WL_RB, o1 = o0 + WL_RB < R ? o0 + WL_RB : R;
            for (int64_t t0 = 0; t0 < T; t0 += tb)
                decode512(y + t0 * ldy, ldy, x + t0 * ldx, ldx, T - t0 < tb ? T - t0 : tb, W, o0, o1);
        }
        return;
    }
#endif
    /* without AVX-512: panels widened into scratch, BLIS SGEMM on each */
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
        widen_rows(buf, W, r0, r1, isa);
        dsmoe__sgemm(DSMOE__NOTRANS, DSMOE__TRANS, (int)T, (int)(r1 - r0), (int)C, 1.0f, x, (int)ldx, buf,
                     (int)C, 0.0f, y + r0, (int)ldy);
    }
}
