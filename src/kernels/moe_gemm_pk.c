/*
 * moe_gemm_pk.c — the MoE layer's product on weights in the packed layout
 * (DSMOE_MOE_LAYOUT_PACKED, inference only):
 *     C[i][r] = Σ_k X[i][k] · W[r][k]      i < n <= DSMOE__MOE_SKINNY_N, r0 <= r < r1,
 * where W (R, K) is stored in panels of 16 rows: element (r, k) at
 *     P[((r / 16) · K + k) · 16 + r % 16]         (rows padded with zeros to a multiple of 16),
 * fp32 or bf16. A panel is one sequential stream of K · 64 bytes (fp32) whose step k holds
 * the 16 weights of column k, so the product is a sum of outer products: a tile of V
 * panels × N rows of X keeps N · V vectors of 16 results in registers; each step loads V
 * weight vectors, broadcasts N elements of X and issues N · V FMAs. Against the
 * dot-product form on the checkpoint layout (moe_gemm.c) it makes no vector loads of X
 * and its V streams run long: on the AMD EPYC (Zen 5) it was tuned on, one thread
 * streams the weights at 31-37 GB/s instead of 19-28 from 2 to 6 rows of X, and reaches
 * 175-190 GFLOP/s instead of 125-150 from 24 to 48 rows (docs/benchmarks.md).
 *
 * Arithmetic (the same on every ISA, so the bits never depend on the CPU's vector
 * width): each result is one chain acc = fma(W[r][k], X[i][k], acc) over k = 0, 1, ...,
 * K - 1 from acc = 0. A result depends only on its two rows, not on n, the tiling or the
 * thread count. Variants: AVX-512, AVX2 and scalar C (fmaf; the specification, and the
 * build without x86 vector units).
 */
#include "kernels/kernels.h"

#include <math.h>
#include <string.h>

#if (defined(__x86_64__) || defined(__i386__)) && defined(DSMOE_HAVE_AVX2) && defined(DSMOE_HAVE_AVX512)
#define PK_X86 1
#include <immintrin.h>
#endif

#define PK_INLINE static inline __attribute__((always_inline))

/* ------------------------------------------------------------------ scalar -- */

void dsmoe__gemm_pk_ref(float *C, int64_t ldc, const float *const *X, int n, const void *P,
                        int bf16, int r0, int r1, int K) {
    for (int r = r0; r < r1; r++) {
        const size_t base = (size_t)(r / 16) * (size_t)K * 16u + (size_t)(r % 16);
        for (int i = 0; i < n; i++) {
            float acc = 0.0f;
            const float *x = X[i];
            for (int k = 0; k < K; k++) {
                const size_t o = base + (size_t)k * 16u;
                float w;
                if (bf16) {
                    const uint32_t u = (uint32_t)((const uint16_t *)P)[o] << 16;
                    memcpy(&w, &u, 4);
                } else {
                    w = ((const float *)P)[o];
                }
                acc = fmaf(w, x[k], acc);
            }
            C[(size_t)i * (size_t)ldc + (size_t)r] = acc;
        }
    }
}

#if defined(PK_X86)
/* ------------------------------------------------------------------ AVX-512 -- */

#define PK_AVX512 __attribute__((target("avx512f,fma")))

PK_INLINE PK_AVX512 __m512 pk_ld16(const char *p, const int BF) {
    if (BF) {
        const __m256i h = _mm256_loadu_si256((const __m256i *)(const void *)p);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)(const void *)p);
}

/* A tile of V panels (from panel p) × N rows of X (compile-time sizes, N · V <= 24, the
 * weight dtype BF a compile-time constant); results r >= r1 are not stored. */
PK_INLINE PK_AVX512 void pk_tile512(float *C, int64_t ldc, const float *const *X, const void *P,
                                    const int BF, int p, int K, const int N, const int V,
                                    int r1) {
    __m512 acc[24];
    for (int j = 0; j < N * V; j++) acc[j] = _mm512_setzero_ps();
    const size_t step = BF ? 32u : 64u; /* bytes of one step of a panel */
    const char *pw[16];
    for (int v = 0; v < V; v++) pw[v] = (const char *)P + (size_t)(p + v) * (size_t)K * step;
    const float *x[8];
    for (int i = 0; i < N; i++) x[i] = X[i];
    for (int k = 0; k < K; k++) {
        __m512 w[16];
#pragma GCC unroll 16
        for (int v = 0; v < V; v++) w[v] = pk_ld16(pw[v] + (size_t)k * step, BF);
#pragma GCC unroll 8
        for (int i = 0; i < N; i++) {
            const __m512 b = _mm512_set1_ps(x[i][k]);
#pragma GCC unroll 16
            for (int v = 0; v < V; v++) acc[i * V + v] = _mm512_fmadd_ps(w[v], b, acc[i * V + v]);
        }
    }
    for (int v = 0; v < V; v++) {
        const int c = (p + v) * 16, cnt = r1 - c < 16 ? r1 - c : 16;
        const __mmask16 m = (__mmask16)((1u << cnt) - 1u);
        for (int i = 0; i < N; i++) {
            float *dst = C + (size_t)i * (size_t)ldc + (size_t)c;
            if (cnt == 16)
                _mm512_storeu_ps(dst, acc[i * V + v]);
            else
                _mm512_mask_storeu_ps(dst, m, acc[i * V + v]);
        }
    }
}

/* Each tile shape is its own function: inlined into one body, the shapes left GCC
 * short of registers for the stream pointers, and the loops reloaded them from the
 * stack on every step (10-15% slower). */
typedef void (*pk_tile_fn)(float *, int64_t, const float *const *, const void *, int, int, int);
#define PK_FN512(BF_, N_, V_)                                                                     \
    __attribute__((noinline)) PK_AVX512 static void pk512_##BF_##_##N_##_##V_(                    \
        float *C, int64_t ldc, const float *const *X, const void *P, int p, int K, int r1) {      \
        pk_tile512(C, ldc, X, P, BF_, p, K, N_, V_, r1);                                           \
    }
#define PK_FNS512(BF_)                                                                             \
    PK_FN512(BF_, 1, 4) PK_FN512(BF_, 2, 4) PK_FN512(BF_, 3, 4) PK_FN512(BF_, 4, 4)             \
    PK_FN512(BF_, 5, 4) PK_FN512(BF_, 6, 4) PK_FN512(BF_, 7, 3) PK_FN512(BF_, 8, 3)               \
    PK_FN512(BF_, 1, 3) PK_FN512(BF_, 2, 3) PK_FN512(BF_, 3, 3) PK_FN512(BF_, 4, 3)               \
    PK_FN512(BF_, 5, 3) PK_FN512(BF_, 6, 3) PK_FN512(BF_, 1, 1) PK_FN512(BF_, 2, 1)               \
    PK_FN512(BF_, 3, 1) PK_FN512(BF_, 4, 1) PK_FN512(BF_, 5, 1) PK_FN512(BF_, 6, 1)               \
    PK_FN512(BF_, 7, 1) PK_FN512(BF_, 8, 1)
PK_FNS512(0)
PK_FNS512(1)
/* [bf16][rows of X]: the widest tile for up to 8 rows, tiles of 3 panels, of 1 panel */
/* 4 panels up to 6 rows: 6, 8 or 12 were 2-15% slower at 1-4 rows (docs/benchmarks.md) */
static const int pk512_vwide[9] = {0, 4, 4, 4, 4, 4, 4, 3, 3};
#define PK_ROW512(BF_, V1_, V2_, V3_, V4_, V5_, V6_)                                               \
    {NULL, pk512_##BF_##_1_##V1_, pk512_##BF_##_2_##V2_, pk512_##BF_##_3_##V3_,                    \
     pk512_##BF_##_4_##V4_, pk512_##BF_##_5_##V5_, pk512_##BF_##_6_##V6_, pk512_##BF_##_7_3,       \
     pk512_##BF_##_8_3}
static const pk_tile_fn pk512_wide[2][9] = {PK_ROW512(0, 4, 4, 4, 4, 4, 4),
                                            PK_ROW512(1, 4, 4, 4, 4, 4, 4)};
static const pk_tile_fn pk512_three[2][9] = {PK_ROW512(0, 3, 3, 3, 3, 3, 3),
                                             PK_ROW512(1, 3, 3, 3, 3, 3, 3)};
static const pk_tile_fn pk512_one[2][9] = {
    {NULL, pk512_0_1_1, pk512_0_2_1, pk512_0_3_1, pk512_0_4_1, pk512_0_5_1, pk512_0_6_1,
     pk512_0_7_1, pk512_0_8_1},
    {NULL, pk512_1_1_1, pk512_1_2_1, pk512_1_3_1, pk512_1_4_1, pk512_1_5_1, pk512_1_6_1,
     pk512_1_7_1, pk512_1_8_1}};

/* Up to 8 rows of X: one pass over the weights, in tiles of 4 panels (3 from 7 rows, so
 * that the accumulators fit). More rows: tiles of 3 panels (up to 384 KB of weights, which then stay in L2),
 * each met by every group of 8 rows of X. Leftover panels go one at a time. */
PK_AVX512 void dsmoe__gemm_pk_avx512(float *C, int64_t ldc, const float *const *X, int n,
                                     const void *P, int bf16, int r0, int r1, int K) {
    const int p1 = (r1 + 15) / 16, b = bf16 ? 1 : 0;
    int p = r0 / 16;
    if (n <= 8) {
        const int V = pk512_vwide[n];
        for (; p + V <= p1; p += V) pk512_wide[b][n](C, ldc, X, P, p, K, r1);
        for (; p < p1; p++) pk512_one[b][n](C, ldc, X, P, p, K, r1);
        return;
    }
    for (; p + 3 <= p1; p += 3)
        for (int i = 0; i < n; i += 8)
            pk512_three[b][n - i < 8 ? n - i : 8](C + (size_t)i * (size_t)ldc, ldc, X + i, P, p, K, r1);
    for (; p < p1; p++)
        for (int i = 0; i < n; i += 8)
            pk512_one[b][n - i < 8 ? n - i : 8](C + (size_t)i * (size_t)ldc, ldc, X + i, P, p, K, r1);
}
/* ------------------------------------------------------------------ AVX2 -- */

#define PK_AVX2 __attribute__((target("avx2,fma")))

PK_INLINE PK_AVX2 __m256 pk_ld8(const void *P, const int BF, size_t off) {
    if (BF) {
        const __m128i h = _mm_loadu_si128((const __m128i *)(const void *)((const uint16_t *)P + off));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float *)P + off);
}

/* A panel is two vectors of 8 (lo: rows 0-7 of the panel, hi: 8-15); N · V <= 6. */
PK_INLINE PK_AVX2 void pk_tile256(float *C, int64_t ldc, const float *const *X, const void *P,
                                  const int BF, int p, int K, const int N, const int V, int r1) {
    __m256 lo[6], hi[6];
    for (int j = 0; j < N * V; j++) lo[j] = hi[j] = _mm256_setzero_ps();
    size_t off[4];
    for (int v = 0; v < V; v++) off[v] = (size_t)(p + v) * (size_t)K * 16u;
    for (int k = 0; k < K; k++) {
        __m256 wl[4], wh[4];
#pragma GCC unroll 4
        for (int v = 0; v < V; v++) {
            wl[v] = pk_ld8(P, BF, off[v] + (size_t)k * 16u);
            wh[v] = pk_ld8(P, BF, off[v] + (size_t)k * 16u + 8u);
        }
#pragma GCC unroll 4
        for (int i = 0; i < N; i++) {
            const __m256 b = _mm256_set1_ps(X[i][k]);
#pragma GCC unroll 4
            for (int v = 0; v < V; v++) {
                lo[i * V + v] = _mm256_fmadd_ps(wl[v], b, lo[i * V + v]);
                hi[i * V + v] = _mm256_fmadd_ps(wh[v], b, hi[i * V + v]);
            }
        }
    }
    for (int v = 0; v < V; v++) {
        const int c = (p + v) * 16, cnt = r1 - c < 16 ? r1 - c : 16;
        for (int i = 0; i < N; i++) {
            float *dst = C + (size_t)i * (size_t)ldc + (size_t)c;
            if (cnt == 16) {
                _mm256_storeu_ps(dst, lo[i * V + v]);
                _mm256_storeu_ps(dst + 8, hi[i * V + v]);
            } else {
                float buf[16];
                _mm256_storeu_ps(buf, lo[i * V + v]);
                _mm256_storeu_ps(buf + 8, hi[i * V + v]);
                memcpy(dst, buf, (size_t)cnt * sizeof(float));
            }
        }
    }
}

#define PK_T256(N_, V_) pk_tile256(C + (size_t)i * (size_t)ldc, ldc, X + i, P, BF, p, K, N_, V_, r1)

PK_INLINE PK_AVX2 void pk_body256(float *C, int64_t ldc, const float *const *X, int n,
                                  const void *P, const int BF, int r0, int r1, int K) {
    const int p0 = r0 / 16, p1 = (r1 + 15) / 16;
    int p = p0;
    if (n <= 3) {
        const int V = n == 1 ? 4 : n == 2 ? 3 : 2, i = 0;
        for (; p + V <= p1; p += V) {
            if (n == 1)
                PK_T256(1, 4);
            else if (n == 2)
                PK_T256(2, 3);
            else
                PK_T256(3, 2);
        }
    }
    for (; p < p1; p++)
        for (int i = 0; i < n; i += 4) {
            switch (n - i < 4 ? n - i : 4) {
            case 1: PK_T256(1, 1); break;
            case 2: PK_T256(2, 1); break;
            case 3: PK_T256(3, 1); break;
            default: PK_T256(4, 1); break;
            }
        }
}

PK_AVX2 void dsmoe__gemm_pk_avx2(float *C, int64_t ldc, const float *const *X, int n,
                                 const void *P, int bf16, int r0, int r1, int K) {
    if (bf16)
        pk_body256(C, ldc, X, n, P, 1, r0, r1, K);
    else
        pk_body256(C, ldc, X, n, P, 0, r0, r1, K);
}
#endif /* PK_X86 */

/* ------------------------------------------------------------------ dispatch -- */

void dsmoe__moe_pack_rows(void *P, const void *W, size_t esz, int64_t R, int64_t K) {
    const int64_t rp = (R + 15) / 16 * 16;
    for (int64_t r = 0; r < rp; r++)
        for (int64_t k = 0; k < K; k++) {
            char *dst = (char *)P + (size_t)(((r / 16) * K + k) * 16 + r % 16) * esz;
            if (r < R)
                memcpy(dst, (const char *)W + (size_t)(r * K + k) * esz, esz);
            else
                memset(dst, 0, esz);
        }
}

void dsmoe__moe_unpack_rows(void *W, const void *P, size_t esz, int64_t R, int64_t K) {
    for (int64_t r = 0; r < R; r++)
        for (int64_t k = 0; k < K; k++)
            memcpy((char *)W + (size_t)(r * K + k) * esz,
                   (const char *)P + (size_t)(((r / 16) * K + k) * 16 + r % 16) * esz, esz);
}

int dsmoe__moe_gemm_pk_isa(const char *isa, float *C, int64_t ldc, const float *const *X, int n,
                           const void *P, dsmoe_dtype wdt, int r0, int r1, int K) {
    const dsmoe__kernel_table *k = dsmoe__kernels_named(isa);
    if (!k || n < 0 || n > DSMOE__MOE_SKINNY_N || r0 % 16 != 0) return 0;
    if (n > 0 && r1 > r0) k->gemm_pk(C, ldc, X, n, P, wdt == DSMOE_DTYPE_BF16, r0, r1, K);
    return 1;
}

void dsmoe__moe_gemm_pk(float *C, int64_t ldc, const float *const *X, int n, const void *P,
                        dsmoe_dtype wdt, int r0, int r1, int K) {
    if (n <= 0 || r1 <= r0) return;
    dsmoe__kernels()->gemm_pk(C, ldc, X, n, P, wdt == DSMOE_DTYPE_BF16, r0, r1, K);
}
