/* avx512.c — AVX-512F kernels (16 lanes); bodies in simd_body.h. Compiled with
 * -mavx512f -mfma only; called only when the CPU reports AVX-512F. */
#include "kernels.h"

#include <immintrin.h>

#define VF __m512
#define VI __m512i
#define W 16
#define SFX _avx512
#define V_LOAD(p) _mm512_loadu_ps(p)
#define V_STORE(p, v) _mm512_storeu_ps((p), (v))
#define V_SET1(x) _mm512_set1_ps(x)
#define V_ADD _mm512_add_ps
#define V_SUB _mm512_sub_ps
#define V_MUL _mm512_mul_ps
#define V_DIV _mm512_div_ps
#define V_FMA _mm512_fmadd_ps
#define V_MIN _mm512_min_ps
#define V_MAX _mm512_max_ps
#define V_RINT(x) _mm512_roundscale_ps((x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define V_CVT_I _mm512_cvtps_epi32
#define V_I_SRAI1(v) _mm512_srai_epi32((v), 1)
#define V_I_SUB _mm512_sub_epi32
#define V_I_EXP2(n) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32((n), _mm512_set1_epi32(127)), 23))
#define V_SEL_GT(x, t, a, b) _mm512_mask_blend_ps(_mm512_cmp_ps_mask((x), (t), _CMP_GT_OQ), (a), (b))
#define V_SEL_LT(x, t, a, b) _mm512_mask_blend_ps(_mm512_cmp_ps_mask((x), (t), _CMP_LT_OQ), (a), (b))
#define V_NEG(x) _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000u)))
#define V_LOAD_BF16(p) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(const void *)(p))), 16))

#include "simd_body.h"

const dsmoe__kernel_table dsmoe__kernels_avx512 = {
    "avx512", k_sigmoid_avx512, k_softmax_avx512, k_bf16_to_f32_avx512, k_dot_bf16_avx512,
    k_swiglu_avx512, k_swiglu_backward_avx512,
};
