/* avx2.c — AVX2 + FMA kernels (8 lanes); bodies in simd_body.h. Compiled with
 * -mavx2 -mfma only; called only when the CPU reports AVX2 and FMA. */
#include "kernels.h"

#include <immintrin.h>

#define VF __m256
#define VI __m256i
#define W 8
#define SFX _avx2
#define V_LOAD(p) _mm256_loadu_ps(p)
#define V_STORE(p, v) _mm256_storeu_ps((p), (v))
#define V_SET1(x) _mm256_set1_ps(x)
#define V_ADD _mm256_add_ps
#define V_SUB _mm256_sub_ps
#define V_MUL _mm256_mul_ps
#define V_DIV _mm256_div_ps
#define V_FMA _mm256_fmadd_ps
#define V_MIN _mm256_min_ps
#define V_MAX _mm256_max_ps
#define V_RINT(x) _mm256_round_ps((x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define V_CVT_I _mm256_cvtps_epi32
#define V_I_SRAI1(v) _mm256_srai_epi32((v), 1)
#define V_I_SUB _mm256_sub_epi32
#define V_I_EXP2(n) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32((n), _mm256_set1_epi32(127)), 23))
#define V_SEL_GT(x, t, a, b) _mm256_blendv_ps((a), (b), _mm256_cmp_ps((x), (t), _CMP_GT_OQ))
#define V_SEL_LT(x, t, a, b) _mm256_blendv_ps((a), (b), _mm256_cmp_ps((x), (t), _CMP_LT_OQ))
#define V_NEG(x) _mm256_xor_ps((x), _mm256_set1_ps(-0.0f))
#define V_LOAD_BF16(p) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(const void *)(p))), 16))

#include "simd_body.h"

const dsmoe__kernel_table dsmoe__kernels_avx2 = {
    "avx2", k_sigmoid_avx2, k_softmax_avx2, k_bf16_to_f32_avx2, k_dot_bf16_avx2,
    k_swiglu_avx2, k_swiglu_backward_avx2,
};
