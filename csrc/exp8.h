// e^x on eight floats with AVX2+FMA (the softmax of kv.c, the GELU of ops.c).
#ifndef KVCELLS_EXP8_H
#define KVCELLS_EXP8_H

#include "simd.h"

#ifdef KVC_X86

// e^x for x <= 0 (a softmax's shifted scores): 2^n e^f with n = round(x / ln 2),
// |f| <= ln 2 / 2, e^f by its Taylor series to f^6 (relative error < 2e-7);
// x below -87 gives about 1e-38 instead of 0, NaN stays NaN
TARGET_AVX2 __attribute__((always_inline))
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);  // ln 2, high bits
    f = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), f);      // and the rest
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}
#endif

#endif
