/*
 * moe_gemm.c — the MoE layer's product for an expert's few rows:
 *     C[i][r] = Σ_d X[i][d] · W[r][d]      i < n <= DSMOE__MOE_SKINNY_N, r0 <= r < r1,
 * W (R, D) stored as fp32 or bf16 in the checkpoint's row-major layout. An SGEMM
 * packs the whole weight matrix before it multiplies, which costs a quarter of its time
 * when an expert has a few dozen rows, and its SGEMV reads the weights once per row of
 * X. Here tiles of 4 weight rows stream from memory once and meet every row of X
 * (kept in L2) in 4 × 4 register tiles, in the dot-product form both operands share.
 *
 * Arithmetic (the same on every ISA, so the bits never depend on the CPU's vector
 * width): element d of a dot product goes to partial sum d mod 16, in increasing d,
 * as p = fma(w, x, p); the 16 partials are combined as p[j] += p[j+8], p[j] += p[j+4],
 * p[j] += p[j+2], p[0] += p[1]. A result depends only on its two rows, not on n, the
 * tiling or the thread count. Variants: AVX-512 (one register per 16 partials; the 16
 * dot products of a tile are reduced together by a transposing permute tree), AVX2
 * (two registers per 16 partials) and scalar C (fmaf; the specification, and the
 * build without x86 vector units), chosen with the kernel set: dsmoe_isa(),
 * DSMOE_FORCE_REF=1 selects the scalar code.
 */
#include "kernels/kernels.h"

#include <math.h>
#include <string.h>

#if (defined(__x86_64__) || defined(__i386__)) && defined(DSMOE_HAVE_AVX2) && defined(DSMOE_HAVE_AVX512)
#define MOE_X86 1
#include <immintrin.h>
#endif

#define MOE_INLINE static inline __attribute__((always_inline))

static float moe_bf16f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* p[j] += p[j+8], p[j] += p[j+4], p[j] += p[j+2], p[0] += p[1] */
static float moe_tree16(float *p) {
    for (int s = 8; s >= 1; s >>= 1)
        for (int j = 0; j < s; j++) p[j] = p[j] + p[j + s];
    return p[0];
}

/* ------------------------------------------------------------------ scalar -- */

void dsmoe__gemm_nt_ref(float *C, int64_t ldc, const float *const *X, int n, const void *W,
                         int bf16, int r0, int r1, int D) {
    for (int r = r0; r < r1; r++) {
        const float *wf = (const float *)W + (size_t)r * (size_t)D;
        const uint16_t *wb = (const uint16_t *)W + (size_t)r * (size_t)D;
        for (int i = 0; i < n; i++) {
            float p[16] = {0};
            const float *x = X[i];
            for (int d = 0; d < D; d++) p[d & 15] = fmaf(bf16 ? moe_bf16f(wb[d]) : wf[d], x[d], p[d & 15]);
            C[(size_t)i * (size_t)ldc + (size_t)r] = moe_tree16(p);
        }
    }
}

#if defined(MOE_X86)
/* ------------------------------------------------------------------ AVX-512 -- */

#define MOE_AVX512 __attribute__((target("avx512f,fma")))

/* 16 weights at p (fp32, or bf16 widened exactly); `tail` < 16 loads only the first
 * `tail` elements (the rest 0). */
MOE_INLINE MOE_AVX512 __m512 moe_ld16_w(const void *W, int bf16, size_t off, int tail) {
    if (bf16) {
        const uint16_t *p = (const uint16_t *)W + off;
        __m256i h;
        if (tail) {
            uint16_t buf[16] = {0};
            memcpy(buf, p, (size_t)tail * 2);
            h = _mm256_loadu_si256((const __m256i *)(const void *)buf);
        } else {
            h = _mm256_loadu_si256((const __m256i *)(const void *)p);
        }
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    const float *p = (const float *)W + off;
    return tail ? _mm512_maskz_loadu_ps((__mmask16)((1u << tail) - 1), p) : _mm512_loadu_ps(p);
}

/* The 16 dot products of a 4 × 4 tile, reduced together: level k adds, for every
 * accumulator, partial j and j + 2^(3-k) (the tree above), while permutes pack two
 * half-used vectors into one. Afterwards lane L holds accumulator bitrev4(L). */
MOE_INLINE MOE_AVX512 __m512 moe_reduce16(__m512 *v) {
    const __m512i l1 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    const __m512i l2 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
    const __m512i l3 = _mm512_setr_epi32(0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
    const __m512i l4 = _mm512_setr_epi32(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
    const __m512i h1 = _mm512_add_epi32(l1, _mm512_set1_epi32(8));
    const __m512i h2 = _mm512_add_epi32(l2, _mm512_set1_epi32(4));
    const __m512i h3 = _mm512_add_epi32(l3, _mm512_set1_epi32(2));
    const __m512i h4 = _mm512_add_epi32(l4, _mm512_set1_epi32(1));
    __m512 a[8], b[4], c[2];
    for (int m = 0; m < 8; m++)
        a[m] = _mm512_add_ps(_mm512_permutex2var_ps(v[2 * m], l1, v[2 * m + 1]),
                             _mm512_permutex2var_ps(v[2 * m], h1, v[2 * m + 1]));
    for (int m = 0; m < 4; m++)
        b[m] = _mm512_add_ps(_mm512_permutex2var_ps(a[2 * m], l2, a[2 * m + 1]),
                             _mm512_permutex2var_ps(a[2 * m], h2, a[2 * m + 1]));
    for (int m = 0; m < 2; m++)
        c[m] = _mm512_add_ps(_mm512_permutex2var_ps(b[2 * m], l3, b[2 * m + 1]),
                             _mm512_permutex2var_ps(b[2 * m], h3, b[2 * m + 1]));
    return _mm512_add_ps(_mm512_permutex2var_ps(c[0], l4, c[1]),
                         _mm512_permutex2var_ps(c[0], h4, c[1]));
}

/* One step of moe_tile512: 16 weights of each of its RB rows against XB rows of X. */
MOE_INLINE MOE_AVX512 void moe_step512(__m512 *acc, const void *W, const int BF,
                                       const size_t *wrow, const float *const *xrow, int d,
                                       const int RB, const int XB) {
    __m512 w[4], x[4];
#pragma GCC unroll 4
    for (int a = 0; a < RB; a++) w[a] = moe_ld16_w(W, BF, wrow[a] + (size_t)d, 0);
#pragma GCC unroll 4
    for (int b = 0; b < XB; b++) x[b] = _mm512_loadu_ps(xrow[b] + d);
#pragma GCC unroll 4
    for (int a = 0; a < RB; a++)
#pragma GCC unroll 4
        for (int b = 0; b < XB; b++) acc[a * 4 + b] = _mm512_fmadd_ps(w[a], x[b], acc[a * 4 + b]);
}

/* A tile of RB weight rows × XB rows of X (compile-time sizes <= 4, and the weight
 * dtype BF a compile-time constant too, so that the loop carries no branch and its
 * row pointers stay in registers); accumulator k = 4a + b. Steps d0 <= d < d1 only:
 * a later part starts from the partial sums in `keep`, and a part that ends before
 * the last step leaves them there instead of reducing. */
MOE_INLINE MOE_AVX512 void moe_tile512(float *C, int64_t ldc, const float *const *X, const void *W,
                                       const int BF, int r, int D, const int RB, const int XB,
                                       const char *pf, __m512 *keep, int d0, int d1) {
    __m512 acc[16];
    for (int k = 0; k < 16; k++) acc[k] = d0 ? keep[k] : _mm512_setzero_ps();
    const int D16 = D & ~15, tail = D - D16;
    const size_t esz = BF ? 2 : 4, pstride = (size_t)D * esz;
    size_t wrow[4];
    const float *xrow[4];
    for (int a = 0; a < 4; a++) wrow[a] = (size_t)(r + (a < RB ? a : 0)) * (size_t)D;
    for (int b = 0; b < 4; b++) xrow[b] = X[b < XB ? b : 0];
    /* The loop is written twice so that neither copy tests pf on each step: the T = 32
     * layer then takes about 1% less time, the T = 512 one 2% (docs/benchmarks.md). */
    if (pf) { /* a later tile's weights, one line of each of its rows per step */
        for (int d = d0; d < d1; d += 16) {
            for (int a = 0; a < 4; a++) _mm_prefetch(pf + a * pstride + (size_t)d * esz, _MM_HINT_T0);
            moe_step512(acc, W, BF, wrow, xrow, d, RB, XB);
        }
    } else {
        for (int d = d0; d < d1; d += 16) moe_step512(acc, W, BF, wrow, xrow, d, RB, XB);
    }
    if (d1 < D16) {
        for (int k = 0; k < 16; k++) keep[k] = acc[k];
        return;
    }
    if (tail) {
        const __mmask16 m = (__mmask16)((1u << tail) - 1);
        __m512 w[4], x[4];
        for (int a = 0; a < RB; a++) w[a] = moe_ld16_w(W, BF, wrow[a] + (size_t)D16, tail);
        for (int b = 0; b < XB; b++) x[b] = _mm512_maskz_loadu_ps(m, xrow[b] + D16);
        for (int a = 0; a < RB; a++)
            for (int b = 0; b < XB; b++)
                acc[a * 4 + b] = _mm512_mask3_fmadd_ps(w[a], x[b], acc[a * 4 + b], m);
    }
    float out[16];
    _mm512_storeu_ps(out, moe_reduce16(acc));
    static const unsigned char bitrev4[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
    for (int L = 0; L < 16; L++) {
        const int k = bitrev4[L], a = k >> 2, b = k & 3;
        if (a < RB && b < XB) C[(size_t)b * (size_t)ldc + (size_t)(r + a)] = out[L];
    }
}

#define MOE_TILE512(RB_, XB_)                                                                      \
    moe_tile512(C + (size_t)i * ldc, ldc, X + i, W, BF, r, D, RB_, XB_, pf, keep + 4 * i, d0, d1)

/* Every tile of X against weight rows r..r+rb-1 for steps d0 <= d < d1 (`keep`: 16
 * partial sums per tile of X); the first tile of X prefetches pf. */
MOE_INLINE MOE_AVX512 void moe_tiles512(float *C, int64_t ldc, const float *const *X, int n,
                                        const void *W, const int BF, int r, int rb, int D,
                                        const char *pf0, __m512 *keep, int d0, int d1) {
    for (int i = 0; i < n; i += 4) {
        const int xb = n - i < 4 ? n - i : 4;
        const char *pf = i == 0 ? pf0 : NULL;
        switch (rb * 4 + xb - 5) {
        case 0: MOE_TILE512(1, 1); break;
        case 1: MOE_TILE512(1, 2); break;
        case 2: MOE_TILE512(1, 3); break;
        case 3: MOE_TILE512(1, 4); break;
        case 4: MOE_TILE512(2, 1); break;
        case 5: MOE_TILE512(2, 2); break;
        case 6: MOE_TILE512(2, 3); break;
        case 7: MOE_TILE512(2, 4); break;
        case 8: MOE_TILE512(3, 1); break;
        case 9: MOE_TILE512(3, 2); break;
        case 10: MOE_TILE512(3, 3); break;
        case 11: MOE_TILE512(3, 4); break;
        case 12: MOE_TILE512(4, 1); break;
        case 13: MOE_TILE512(4, 2); break;
        case 14: MOE_TILE512(4, 3); break;
        default: MOE_TILE512(4, 4); break;
        }
    }
}

/* Rows of X above which the steps of a weight tile go in parts of MOE_PART. */
#define MOE_WIDE_N 8
#define MOE_PART 1024

/* Tiles of 4 weight rows (streamed from memory once) against tiles of 4 rows of X.
 * While the first tile of X meets a weight tile, the weight tile after next is
 * prefetched, so that memory traffic overlaps the arithmetic instead of following it
 * (worth 10-15% from 4 rows of X up on the AMD EPYC (Zen 5) it was tuned on).
 * With more than MOE_WIDE_N rows of X the product is bound by the arithmetic, and a
 * weight tile is reused by every tile of X, from L1 as long as the two fit there
 * together: 4 rows each of D = 2048 floats (the gate and up products) or 2816 (a
 * shared expert's down product of Moonlight) do not, and then every load of both
 * comes from L2. So the steps go in parts of MOE_PART (32 KB of the two tiles), each
 * part through every tile of X, the partial sums waiting in `keep`: the shared
 * experts at T = 32 take 40% less time. The order of the sums, and so every bit, is
 * that of one pass. */
MOE_INLINE MOE_AVX512 void moe_gemm512_body(float *C, int64_t ldc, const float *const *X, int n,
                                            const void *W, const int BF, int r0, int r1, int D) {
    const size_t esz = BF ? 2 : 4;
    const int D16 = D & ~15, dc = n > MOE_WIDE_N ? MOE_PART : D16;
    __m512 keep[DSMOE__MOE_SKINNY_N / 4 * 16];
    for (int r = r0; r < r1; r += 4) {
        const int rb = r1 - r < 4 ? r1 - r : 4;
        const char *pf =
            r + 12 <= r1 ? (const char *)W + (size_t)(r + 8) * (size_t)D * esz : NULL;
        int d0 = 0;
        do {
            const int d1 = D16 - d0 > dc ? d0 + dc : D16;
            moe_tiles512(C, ldc, X, n, W, BF, r, rb, D, pf, keep, d0, d1);
            d0 = d1;
        } while (d0 < D16);
    }
}

MOE_AVX512 void dsmoe__gemm_nt_avx512(float *C, int64_t ldc, const float *const *X, int n,
                                       const void *W, int bf16, int r0, int r1, int D) {
    if (bf16)
        moe_gemm512_body(C, ldc, X, n, W, 1, r0, r1, D);
    else
        moe_gemm512_body(C, ldc, X, n, W, 0, r0, r1, D);
}

/* ------------------------------------------------------------------ AVX2 -- */

#define MOE_AVX2 __attribute__((target("avx2,fma")))

/* 8 weights (fp32, or bf16 widened); `cnt` < 8 loads the first cnt (rest 0). */
MOE_INLINE MOE_AVX2 __m256 moe_ld8_w(const void *W, int bf16, size_t off, int cnt) {
    if (bf16) {
        uint16_t buf[8] = {0};
        const uint16_t *p = (const uint16_t *)W + off;
        __m128i h;
        if (cnt < 8) {
            memcpy(buf, p, (size_t)cnt * 2);
            h = _mm_loadu_si128((const __m128i *)(const void *)buf);
        } else {
            h = _mm_loadu_si128((const __m128i *)(const void *)p);
        }
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    const float *p = (const float *)W + off;
    if (cnt < 8) {
        float buf[8] = {0};
        memcpy(buf, p, (size_t)cnt * 4);
        return _mm256_loadu_ps(buf);
    }
    return _mm256_loadu_ps(p);
}

MOE_INLINE MOE_AVX2 __m256 moe_ld8_x(const float *p, int cnt) {
    if (cnt < 8) {
        float buf[8] = {0};
        memcpy(buf, p, (size_t)cnt * 4);
        return _mm256_loadu_ps(buf);
    }
    return _mm256_loadu_ps(p);
}

/* lo holds partials 0..7, hi 8..15: the tree of moe_tree16. */
MOE_INLINE MOE_AVX2 float moe_reduce_lohi(__m256 lo, __m256 hi) {
    __m256 s = _mm256_add_ps(lo, hi);
    s = _mm256_add_ps(s, _mm256_permute2f128_ps(s, s, 1));
    s = _mm256_add_ps(s, _mm256_permute_ps(s, 0x4E));
    s = _mm256_add_ps(s, _mm256_permute_ps(s, 0xB1));
    return _mm256_cvtss_f32(s);
}

/* A tile of RB weight rows × XB rows of X (compile-time sizes <= 2 × 3; the dtype BF
 * is a compile-time constant too). */
MOE_INLINE MOE_AVX2 void moe_tile256(float *C, int64_t ldc, const float *const *X, const void *W,
                                     const int BF, int r, int D, const int RB, const int XB) {
    __m256 lo[6], hi[6];
    for (int k = 0; k < 6; k++) lo[k] = hi[k] = _mm256_setzero_ps();
    const int D16 = D & ~15, tail = D - D16;
    const size_t base = (size_t)r * (size_t)D;
    const float *xrow[3];
    for (int b = 0; b < 3; b++) xrow[b] = X[b < XB ? b : 0];
    for (int d = 0; d < D16; d += 16) {
#pragma GCC unroll 2
        for (int a = 0; a < RB; a++) {
            const __m256 wl = moe_ld8_w(W, BF, base + (size_t)a * D + d, 8);
            const __m256 wh = moe_ld8_w(W, BF, base + (size_t)a * D + d + 8, 8);
#pragma GCC unroll 3
            for (int b = 0; b < XB; b++) {
                lo[a * 3 + b] = _mm256_fmadd_ps(wl, _mm256_loadu_ps(xrow[b] + d), lo[a * 3 + b]);
                hi[a * 3 + b] = _mm256_fmadd_ps(wh, _mm256_loadu_ps(xrow[b] + d + 8), hi[a * 3 + b]);
            }
        }
    }
    if (tail) {
        /* lanes past the tail keep their value exactly (blend), as the scalar code */
        const int cl = tail < 8 ? tail : 8, ch = tail > 8 ? tail - 8 : 0;
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256 ml = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(cl), lane));
        const __m256 mh = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(ch), lane));
        for (int a = 0; a < RB; a++) {
            const __m256 wl = moe_ld8_w(W, BF, base + (size_t)a * D + D16, cl);
            const __m256 wh = ch ? moe_ld8_w(W, BF, base + (size_t)a * D + D16 + 8, ch) : _mm256_setzero_ps();
            for (int b = 0; b < XB; b++) {
                const __m256 xl = moe_ld8_x(xrow[b] + D16, cl);
                const __m256 xh = ch ? moe_ld8_x(xrow[b] + D16 + 8, ch) : _mm256_setzero_ps();
                lo[a * 3 + b] = _mm256_blendv_ps(lo[a * 3 + b], _mm256_fmadd_ps(wl, xl, lo[a * 3 + b]), ml);
                hi[a * 3 + b] = _mm256_blendv_ps(hi[a * 3 + b], _mm256_fmadd_ps(wh, xh, hi[a * 3 + b]), mh);
            }
        }
    }
    for (int a = 0; a < RB; a++)
        for (int b = 0; b < XB; b++)
            C[(size_t)b * (size_t)ldc + (size_t)(r + a)] = moe_reduce_lohi(lo[a * 3 + b], hi[a * 3 + b]);
}

#define MOE_TILE256(RB_, XB_) moe_tile256(C + (size_t)i * ldc, ldc, X + i, W, BF, r, D, RB_, XB_)

MOE_INLINE MOE_AVX2 void moe_gemm256_body(float *C, int64_t ldc, const float *const *X, int n,
                                          const void *W, const int BF, int r0, int r1, int D) {
    for (int r = r0; r < r1; r += 2) {
        const int rb = r1 - r < 2 ? r1 - r : 2;
        for (int i = 0; i < n; i += 3) {
            const int xb = n - i < 3 ? n - i : 3;
            switch (rb * 3 + xb - 4) {
            case 0: MOE_TILE256(1, 1); break;
            case 1: MOE_TILE256(1, 2); break;
            case 2: MOE_TILE256(1, 3); break;
            case 3: MOE_TILE256(2, 1); break;
            case 4: MOE_TILE256(2, 2); break;
            default: MOE_TILE256(2, 3); break;
            }
        }
    }
}

MOE_AVX2 void dsmoe__gemm_nt_avx2(float *C, int64_t ldc, const float *const *X, int n,
                                   const void *W, int bf16, int r0, int r1, int D) {
    if (bf16)
        moe_gemm256_body(C, ldc, X, n, W, 1, r0, r1, D);
    else
        moe_gemm256_body(C, ldc, X, n, W, 0, r0, r1, D);
}
#endif /* MOE_X86 */

/* ------------------------------------------------------------------ dispatch -- */

int dsmoe__moe_gemm_nt_isa(const char *isa, float *C, int64_t ldc, const float *const *X, int n,
                           const void *W, dsmoe_dtype wdt, int r0, int r1, int D) {
    const dsmoe__kernel_table *k = dsmoe__kernels_named(isa);
    if (!k || n < 0 || n > DSMOE__MOE_SKINNY_N) return 0; /* not built, not on this CPU */
    k->gemm_nt(C, ldc, X, n, W, wdt == DSMOE_DTYPE_BF16, r0, r1, D);
    return 1;
}

void dsmoe__moe_gemm_nt(float *C, int64_t ldc, const float *const *X, int n, const void *W,
                        dsmoe_dtype wdt, int r0, int r1, int D) {
    dsmoe__kernels()->gemm_nt(C, ldc, X, n, W, wdt == DSMOE_DTYPE_BF16, r0, r1, D);
}
