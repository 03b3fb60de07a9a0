/*
 * sgemm_small.c — the products too small for BLIS's packing (blas.c chooses):
 *     C (M, N) [ldc] = op(A) (M, K) · op(B) (K, N)        (add = 0)
 *     C (M, N) [ldc] = C + op(A) · op(B)                   (add = 1)
 * row-major, for one block of K <= DSMOE__SGEMM_SMALL_KMAX. Nothing is allocated and
 * nothing is packed, except a transposed op(B) panel of at most KMAX × 32 floats (64 KB)
 * on the calling thread's stack: tiles of MR rows of C by one or two vectors of columns
 * stay in registers while k runs, op(A)'s elements broadcast from where they are stored.
 *
 * Arithmetic (the same on every ISA, and BLIS's: blas.c relies on it): each element of
 * the block's product is one fma chain over k in increasing order starting from +0,
 * acc = fma(a_ik, b_kj, acc); then C = acc (add = 0) or C = C + acc (add = 1). A
 * result depends only on its row of op(A) and column of op(B), never on M, N, the
 * tiling or the thread count. Variants: AVX-512 (8 rows × 32 columns), AVX2 (6 × 16)
 * and scalar C (fmaf; the specification), chosen with the kernel set: DSMOE_FORCE_REF=1
 * selects the scalar code. Column tails use masked loads and stores (nothing past the
 * last column is read or written); row tails use the same kernel with fewer rows.
 */
#include "kernels/kernels.h"

#include <math.h>
#include <string.h>

#if (defined(__x86_64__) || defined(__i386__)) && defined(DSMOE_HAVE_AVX2) && defined(DSMOE_HAVE_AVX512)
#define SG_X86 1
#include <immintrin.h>
#endif

#define SG_INLINE static inline __attribute__((always_inline))

/* ------------------------------------------------------------------ scalar -- */

void dsmoe__sgemm_small_ref(int ta, int tb, int M, int N, int K, const float *A, int lda,
                            const float *B, int ldb, int add, float *C, int ldc) {
    const size_t ai = ta ? 1 : (size_t)lda, ak = ta ? (size_t)lda : 1;
    const size_t bk = tb ? 1 : (size_t)ldb, bj = tb ? (size_t)ldb : 1;
    for (int i = 0; i < M; i++) {
        for (int j = 0; j < N; j++) {
            float acc = 0.0f;
            for (int k = 0; k < K; k++)
                acc = fmaf(A[(size_t)i * ai + (size_t)k * ak], B[(size_t)k * bk + (size_t)j * bj], acc);
            float *c = &C[(size_t)i * (size_t)ldc + (size_t)j];
            *c = add ? *c + acc : acc;
        }
    }
}

/* op(B)'s columns j0 .. j0 + nj (< w) of rows 0 .. K as a K × w panel (zeros past nj),
 * for op(B) = B^T (B stored N × K). */
SG_INLINE void sg_pack_bt(float *P, int w, const float *B, int ldb, int j0, int nj, int K) {
    for (int k = 0; k < K; k++) {
        float *p = P + (size_t)k * (size_t)w;
        for (int j = 0; j < nj; j++) p[j] = B[(size_t)(j0 + j) * (size_t)ldb + (size_t)k];
        for (int j = nj; j < w; j++) p[j] = 0.0f;
    }
}

#if defined(SG_X86)
/* ------------------------------------------------------------------ AVX-512 -- */

/* prfchw: prefetchw, on every CPU with AVX-512F */
#define SG_AVX512 __attribute__((target("avx512f,fma,prfchw")))

/* mr (<= 8) rows from i of C, nv (1, 2) vectors of columns with masks m0, m1; op(B)'s
 * row k at Bp + k·ldbp (masked lanes never read). With pfa (op(A) = A, rows at ai), the
 * next tile's rows of A at An are fetched into the cache as k passes over them: one line
 * of each of its 8 rows every 16 k. */
SG_INLINE SG_AVX512 void sg512_tile(const int mr, const int nv, const int pfa, const float *A,
                                    size_t ai, size_t ak, const float *Bp, size_t ldbp, int K,
                                    float *C, int ldc, __mmask16 m0, __mmask16 m1, int add,
                                    const float *An) {
    __m512 c0[8], c1[8];
    for (int r = 0; r < mr; r++) c0[r] = c1[r] = _mm512_setzero_ps();
    for (int k = 0; k < K; k++) {
        if (pfa && (k & 15) == 0)
            for (int r = 0; r < 8; r++)
                _mm_prefetch((const char *)(An + (size_t)r * ai + k), _MM_HINT_T0);
        const float *b = Bp + (size_t)k * ldbp;
        const __m512 b0 = _mm512_maskz_loadu_ps(m0, b);
        const __m512 b1 = nv == 2 ? _mm512_maskz_loadu_ps(m1, b + 16) : b0;
        const float *a = A + (size_t)k * ak;
        for (int r = 0; r < mr; r++) {
            const __m512 x = _mm512_set1_ps(a[(size_t)r * ai]);
            c0[r] = _mm512_fmadd_ps(x, b0, c0[r]);
            if (nv == 2) c1[r] = _mm512_fmadd_ps(x, b1, c1[r]);
        }
    }
    for (int r = 0; r < mr; r++) {
        float *c = C + (size_t)r * (size_t)ldc;
        if (add) {
            c0[r] = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, c), c0[r]);
            if (nv == 2) c1[r] = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, c + 16), c1[r]);
        }
        _mm512_mask_storeu_ps(c, m0, c0[r]);
        if (nv == 2) _mm512_mask_storeu_ps(c + 16, m1, c1[r]);
    }
}

/* The 8 × 32 (nv 2) or 8 × 48 (nv 3) tile with every column present: unmasked loads, and
 * op(A)'s 8 rows addressed from two pointers and three strides, so that the loop's
 * addresses stay in registers (sg512_tile's eight row offsets and two masks were reloaded
 * from the stack at every k). 48 columns: a product that wide (the attention's n + r) in
 * one panel, where a 32-column panel and a 16-column one ran the second at half the rate.
 * The same fma chains as sg512_tile. pfa 1: the next tile's rows of A (at An) into the
 * cache as with sg512_tile; pfa 2 (op(A) = A^T, whose k-th row of the tile is 8 floats of a
 * row of A): the next line of each of those rows, which the next tile starts on. */
#define SG512_ROW(r, row)                                                                       \
    do {                                                                                        \
        const __m512 x = _mm512_set1_ps(row);                                                   \
        c0[r] = _mm512_fmadd_ps(x, b0, c0[r]);                                                  \
        c1[r] = _mm512_fmadd_ps(x, b1, c1[r]);                                                  \
        if (nv == 3) c2[r] = _mm512_fmadd_ps(x, b2, c2[r]);                                     \
    } while (0)

SG_INLINE SG_AVX512 void sg512_tile_full(const int nv, const int pfa, const float *A, size_t ai,
                                         size_t ak, const float *Bp, size_t ldbp, int K, float *C,
                                         int ldc, int add, const float *An) {
    __m512 c0[8], c1[8], c2[8];
    for (int r = 0; r < 8; r++) c0[r] = c1[r] = c2[r] = _mm512_setzero_ps();
    const size_t a2 = 2 * ai, a3 = 3 * ai;
    const float *p = A, *q = A + 4 * ai, *b = Bp;
    for (int k = 0; k < K; k++) {
        if (pfa == 1 && (k & 15) == 0)
            for (int r = 0; r < 8; r++)
                _mm_prefetch((const char *)(An + (size_t)r * ai + k), _MM_HINT_T0);
        if (pfa == 2) _mm_prefetch((const char *)(p + 16), _MM_HINT_T0);
        const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
        const __m512 b2 = nv == 3 ? _mm512_loadu_ps(b + 32) : b1;
        SG512_ROW(0, p[0]);
        SG512_ROW(1, p[ai]);
        SG512_ROW(2, p[a2]);
        SG512_ROW(3, p[a3]);
        SG512_ROW(4, q[0]);
        SG512_ROW(5, q[ai]);
        SG512_ROW(6, q[a2]);
        SG512_ROW(7, q[a3]);
        p += ak, q += ak, b += ldbp;
    }
    for (int r = 0; r < 8; r++) {
        float *c = C + (size_t)r * (size_t)ldc;
        if (add) {
            c0[r] = _mm512_add_ps(_mm512_loadu_ps(c), c0[r]);
            c1[r] = _mm512_add_ps(_mm512_loadu_ps(c + 16), c1[r]);
            if (nv == 3) c2[r] = _mm512_add_ps(_mm512_loadu_ps(c + 32), c2[r]);
        }
        _mm512_storeu_ps(c, c0[r]);
        _mm512_storeu_ps(c + 16, c1[r]);
        if (nv == 3) _mm512_storeu_ps(c + 32, c2[r]);
    }
}

/* Rows r[0..16) transposed in registers: afterwards r[c] holds column c. */
SG_INLINE SG_AVX512 void sg512_transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]),
                      c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
            t[8 * i + j + 4] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
    }
}

/* sg_pack_bt for w = 32 in blocks of 16 × 16 transposed in registers (the same panel:
 * columns past nj are 0; the second half only when nj > 16). */
SG_INLINE SG_AVX512 void sg512_pack_bt(float *P, const float *B, int ldb, int j0, int nj, int K) {
    for (int jh = 0; jh < nj; jh += 16) {
        const int rows = nj - jh < 16 ? nj - jh : 16;
        const float *b = B + (size_t)(j0 + jh) * (size_t)ldb;
        for (int k0 = 0; k0 < K; k0 += 16) {
            const int kk = K - k0 < 16 ? K - k0 : 16;
            const __mmask16 m = (__mmask16)(kk == 16 ? 0xFFFFu : (1u << kk) - 1u);
            __m512 r[16];
            for (int j = 0; j < 16; j++) {
                const float *bj = b + (size_t)j * (size_t)ldb + k0;
                if (j < rows && k0 + 64 < K) _mm_prefetch((const char *)(bj + 64), _MM_HINT_T0);
                r[j] = j < rows ? _mm512_maskz_loadu_ps(m, bj) : _mm512_setzero_ps();
            }
            sg512_transpose16(r);
            for (int q = 0; q < kk; q++) _mm512_storeu_ps(P + (size_t)(k0 + q) * 32 + jh, r[q]);
        }
    }
}

#define SG512_ROWS(nv)                                                                          \
    switch (mr) {                                                                               \
    case 8:                                                                                     \
        if (an) sg512_tile(8, nv, 1, a, ai, ak, Bp, ldbp, K, c, ldc, m0, m1, add, an);          \
        else sg512_tile(8, nv, 0, a, ai, ak, Bp, ldbp, K, c, ldc, m0, m1, add, an);             \
        break;                                                                                  \
    case 7: sg512_tile(7, nv, 0, a, ai, ak, Bp, ldbp, K, c, ldc, m0, m1, add, an); break;       \
    case 6: sg512_tile(6, nv, 0, a, ai, ak, Bp, ldbp, K, c, ldc, m0, m1, add, an); break;       \
    case 5: sg512_tile(5, nv, 0, a, ai, ak, Bp, ldbp, K, c, ldc, m0, m1, add, an); break;       \
    case 4: sg512_tile(4, nv, 0, a, ai, ak, Bp, ldbp, K, c, ldc, m0, m1, add, an); break;       \
    case 3: sg512_tile(3, nv, 0, a, ai, ak, Bp, ldbp, K, c, ldc, m0, m1, add, an); break;       \
    case 2: sg512_tile(2, nv, 0, a, ai, ak, Bp, ldbp, K, c, ldc, m0, m1, add, an); break;       \
    default: sg512_tile(1, nv, 0, a, ai, ak, Bp, ldbp, K, c, ldc, m0, m1, add, an); break;      \
    }

/* Lines [l0, l1) of the next panel of op(B) (columns j0 .. j0 + nj) into the cache: for
 * op(B) = B^T (B stored N × K) its nj rows of K floats, line by line (lines per row lr);
 * else its K rows of nj floats (one or two lines each). */
SG_INLINE SG_AVX512 void sg512_prefetch_panel(int tb, const float *B, int ldb, int j0, int nj,
                                              int K, int l0, int l1) {
    const int lr = tb ? (K + 15) / 16 : (nj > 16 ? 2 : 1);
    for (int l = l0; l < l1; l++) {
        const int row = l / lr, q = l - row * lr;
        const float *p = tb ? B + (size_t)(j0 + row) * (size_t)ldb + (size_t)q * 16
                            : B + (size_t)row * (size_t)ldb + (size_t)j0 + (size_t)q * 16;
        _mm_prefetch((const char *)p, _MM_HINT_T0);
    }
}

SG_AVX512 void dsmoe__sgemm_small_avx512(int ta, int tb, int M, int N, int K, const float *A,
                                         int lda, const float *B, int ldb, int add, float *C,
                                         int ldc) {
    float P[DSMOE__SGEMM_SMALL_KMAX * 32] __attribute__((aligned(64)));
    const size_t ai = ta ? 1 : (size_t)lda, ak = ta ? (size_t)lda : 1;
    if (!tb && N == 48 && M >= 8 && (!(ta && M > 64) || K * 48 <= DSMOE__SGEMM_SMALL_KMAX * 32)) {
        /* one panel of 48 columns: 8-row tiles of three vectors, the rows past the
         * last full tile as a 32-column and a 16-column tile; with op(A) = A^T, B to a
         * contiguous copy as below */
        const float *Bq = B;
        size_t ldq = (size_t)ldb;
        if (ta && M > 64) {
            for (int k = 0; k < K; k++)
                for (int v = 0; v < 3; v++)
                    _mm512_store_ps(P + (size_t)k * 48 + 16 * v,
                                    _mm512_loadu_ps(B + (size_t)k * (size_t)ldb + 16 * v));
            Bq = P, ldq = 48;
        }
        const int M8 = M & ~7;
        for (int i0 = 0; i0 < M8; i0 += 8) {
            float *c = C + (size_t)i0 * (size_t)ldc;
            if (i0 + 8 < M)
                for (int r = 0; r < 8 && i0 + 8 + r < M; r++) {
                    const float *cr = c + (size_t)(8 + r) * (size_t)ldc;
                    _mm_prefetch((const char *)cr, _MM_HINT_ET0);
                    _mm_prefetch((const char *)(cr + 32), _MM_HINT_ET0);
                }
            if (!ta && i0 + 16 <= M)
                sg512_tile_full(3, 1, A + (size_t)i0 * ai, ai, ak, Bq, ldq, K, c, ldc, add,
                                  A + (size_t)(i0 + 8) * ai);
            else if (ta && (i0 & 15) == 8 && i0 + 8 < M)
                sg512_tile_full(3, 2, A + (size_t)i0 * ai, ai, ak, Bq, ldq, K, c, ldc, add, A);
            else
                sg512_tile_full(3, 0, A + (size_t)i0 * ai, ai, ak, Bq, ldq, K, c, ldc, add, A);
        }
        if (M8 < M) {
            const int mr = M - M8;
            const float *a = A + (size_t)M8 * ai, *an = NULL;
            const size_t ldbp = ldq;
            const __mmask16 m0 = 0xFFFFu, m1 = 0xFFFFu;
            float *c = C + (size_t)M8 * (size_t)ldc;
            {
                const float *Bp = Bq;
                SG512_ROWS(2)
            }
            {
                const float *Bp = Bq + 32;
                c += 32;
                SG512_ROWS(1)
            }
        }
        return;
    }
    for (int j0 = 0; j0 < N; j0 += 32) {
        const int nj = N - j0 < 32 ? N - j0 : 32;
        const int nv = nj > 16 ? 2 : 1;
        const __mmask16 m0 = (__mmask16)(nj >= 16 ? 0xFFFFu : (1u << nj) - 1u);
        const __mmask16 m1 = (__mmask16)(nj >= 32 ? 0xFFFFu : nj > 16 ? (1u << (nj - 16)) - 1u : 0u);
        const float *Bp;
        size_t ldbp;
        if (tb) {
            sg512_pack_bt(P, B, ldb, j0, nj, K);
            Bp = P, ldbp = 32;
        } else if (ta && M > 64) {
            /* op(A) = A^T reads 8 floats of a row of A per k: B's panel is read once per
             * tile of rows, so it goes to a contiguous copy (rows of B a power of two
             * apart map to a few sets of the L1 cache) */
            for (int k = 0; k < K; k++) {
                const float *b = B + (size_t)k * (size_t)ldb + j0;
                if (j0 == 0) /* the first tile's line of A's row k, which nothing fetched */
                    _mm_prefetch((const char *)(A + (size_t)k * (size_t)lda), _MM_HINT_T0);
                _mm512_store_ps(P + (size_t)k * 32, _mm512_maskz_loadu_ps(m0, b));
                if (nv == 2)
                    _mm512_store_ps(P + (size_t)k * 32 + 16, _mm512_maskz_loadu_ps(m1, b + 16));
            }
            Bp = P, ldbp = 32;
        } else {
            Bp = B + j0, ldbp = (size_t)ldb;
        }
        /* What the next tiles will read first, fetched while this one computes: the
         * next panel of op(B), spread over this panel's tiles; the next tile's rows of C
         * (for writing); in the first panel, the next tile's rows of A. A product's
         * operands are mostly not in the cache when it starts (in a training step they
         * were last touched a layer ago); without this, a 256 × 256 × 256 product ran
         * at 60% of its in-cache speed there. */
        const int jn = j0 + 32, njn = N - jn < 32 ? N - jn : 32;
        const int nlines = jn < N ? (tb ? njn * ((K + 15) / 16) : K * (njn > 16 ? 2 : 1)) : 0;
        const int ntiles = (M + 7) / 8;
        for (int i0 = 0, t = 0; i0 < M; i0 += 8, t++) {
            const int mr = M - i0 < 8 ? M - i0 : 8;
            const float *a = A + (size_t)i0 * ai;
            float *c = C + (size_t)i0 * (size_t)ldc + (size_t)j0;
            if (nlines)
                sg512_prefetch_panel(tb, B, ldb, jn, njn, K, (int)((int64_t)nlines * t / ntiles),
                                     (int)((int64_t)nlines * (t + 1) / ntiles));
            const float *an = NULL;
            if (i0 + 8 < M) {
                const int mn = M - i0 - 8 < 8 ? M - i0 - 8 : 8;
                for (int r = 0; r < mn; r++) {
                    const float *cr = c + (size_t)(8 + r) * (size_t)ldc;
                    _mm_prefetch((const char *)cr, _MM_HINT_ET0);
                    if (nv == 2) _mm_prefetch((const char *)(cr + 16), _MM_HINT_ET0);
                }
                if (!ta && j0 == 0 && mn == 8) an = a + (size_t)8 * ai;
            }
            if (mr == 8 && nj == 32) {
                if (an) sg512_tile_full(2, 1, a, ai, ak, Bp, ldbp, K, c, ldc, add, an);
                else if (ta && (i0 & 15) == 8 && i0 + 8 < M) /* the next tile: new lines */
                    sg512_tile_full(2, 2, a, ai, ak, Bp, ldbp, K, c, ldc, add, an);
                else sg512_tile_full(2, 0, a, ai, ak, Bp, ldbp, K, c, ldc, add, an);
            } else if (nv == 2) {
                SG512_ROWS(2)
            } else {
                SG512_ROWS(1)
            }
        }
    }
}

/* --------------------------------------------------------------------- AVX2 -- */

#define SG_AVX2 __attribute__((target("avx2,fma")))

SG_INLINE SG_AVX2 __m256i sg_mask8(int n) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx);
}

/* mr (<= 6) rows, nv (1, 2) vectors of 8 columns with lane masks k0, k1. */
SG_INLINE SG_AVX2 void sg256_tile(const int mr, const int nv, const float *A, size_t ai,
                                  size_t ak, const float *Bp, size_t ldbp, int K, float *C,
                                  int ldc, __m256i k0, __m256i k1, int add) {
    __m256 c0[6], c1[6];
    for (int r = 0; r < mr; r++) c0[r] = c1[r] = _mm256_setzero_ps();
    for (int k = 0; k < K; k++) {
        const float *b = Bp + (size_t)k * ldbp;
        const __m256 b0 = _mm256_maskload_ps(b, k0);
        const __m256 b1 = nv == 2 ? _mm256_maskload_ps(b + 8, k1) : b0;
        const float *a = A + (size_t)k * ak;
        for (int r = 0; r < mr; r++) {
            const __m256 x = _mm256_broadcast_ss(&a[(size_t)r * ai]);
            c0[r] = _mm256_fmadd_ps(x, b0, c0[r]);
            if (nv == 2) c1[r] = _mm256_fmadd_ps(x, b1, c1[r]);
        }
    }
    for (int r = 0; r < mr; r++) {
        float *c = C + (size_t)r * (size_t)ldc;
        if (add) {
            c0[r] = _mm256_add_ps(_mm256_maskload_ps(c, k0), c0[r]);
            if (nv == 2) c1[r] = _mm256_add_ps(_mm256_maskload_ps(c + 8, k1), c1[r]);
        }
        _mm256_maskstore_ps(c, k0, c0[r]);
        if (nv == 2) _mm256_maskstore_ps(c + 8, k1, c1[r]);
    }
}

#define SG256_ROWS(nv)                                                                          \
    switch (mr) {                                                                               \
    case 6: sg256_tile(6, nv, a, ai, ak, Bp, ldbp, K, c, ldc, k0, k1, add); break;              \
    case 5: sg256_tile(5, nv, a, ai, ak, Bp, ldbp, K, c, ldc, k0, k1, add); break;              \
    case 4: sg256_tile(4, nv, a, ai, ak, Bp, ldbp, K, c, ldc, k0, k1, add); break;              \
    case 3: sg256_tile(3, nv, a, ai, ak, Bp, ldbp, K, c, ldc, k0, k1, add); break;              \
    case 2: sg256_tile(2, nv, a, ai, ak, Bp, ldbp, K, c, ldc, k0, k1, add); break;              \
    default: sg256_tile(1, nv, a, ai, ak, Bp, ldbp, K, c, ldc, k0, k1, add); break;             \
    }

SG_AVX2 void dsmoe__sgemm_small_avx2(int ta, int tb, int M, int N, int K, const float *A, int lda,
                                     const float *B, int ldb, int add, float *C, int ldc) {
    float P[DSMOE__SGEMM_SMALL_KMAX * 16] __attribute__((aligned(32)));
    const size_t ai = ta ? 1 : (size_t)lda, ak = ta ? (size_t)lda : 1;
    for (int j0 = 0; j0 < N; j0 += 16) {
        const int nj = N - j0 < 16 ? N - j0 : 16;
        const int nv = nj > 8 ? 2 : 1;
        const __m256i k0 = sg_mask8(nj), k1 = sg_mask8(nj - 8);
        const float *Bp;
        size_t ldbp;
        if (tb) {
            sg_pack_bt(P, 16, B, ldb, j0, nj, K);
            Bp = P, ldbp = 16;
        } else {
            Bp = B + j0, ldbp = (size_t)ldb;
        }
        for (int i0 = 0; i0 < M; i0 += 6) {
            const int mr = M - i0 < 6 ? M - i0 : 6;
            const float *a = A + (size_t)i0 * ai;
            float *c = C + (size_t)i0 * (size_t)ldc + (size_t)j0;
            if (nv == 2) {
                SG256_ROWS(2)
            } else {
                SG256_ROWS(1)
            }
        }
    }
}
#endif /* SG_X86 */
