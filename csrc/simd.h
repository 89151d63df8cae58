// The x86 vector instructions of the kernels, and the target attribute a
// function needs to use them. Built with KVC_SIMD_EMULATED (a test build,
// KVCELLS_SIMD_EMULATED=1) every intrinsic comes from SIMDe's portable C
// instead, so every path runs, slowly, on any x86 CPU: the AVX-512 and VNNI
// kernels are tested on machines without them.
#ifndef KVCELLS_SIMD_H
#define KVCELLS_SIMD_H

#if defined(__x86_64__)
#define KVC_X86 1
#ifdef KVC_SIMD_EMULATED
#define SIMDE_ENABLE_NATIVE_ALIASES
#define SIMDE_NO_INLINE   // calls, not inlined bodies: the build takes seconds, not minutes
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>
#include <simde/x86/fma.h>
#define TARGET_AVX2
#define TARGET_AVXVNNI
#define TARGET_AVX512
#define IN_REGISTER(v)
// AVX-VNNI's VEX form computes what AVX512-VL's EVEX form does
#define _mm256_dpbusd_avx_epi32 _mm256_dpbusd_epi32
// what SIMDe 0.7.4 lacks or names wrongly
#define _cvtsh_ss(h) _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)))
#define _MM_FROUND_NO_EXC SIMDE_MM_FROUND_NO_EXC
#define __mmask64 simde__mmask64
#undef _mm512_madd_epi16
#define _mm512_madd_epi16(a, b) simde_mm512_madd_epi16(a, b)
static inline __m512 _mm512_cvtepi32_ps(__m512i a) {
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_cvtepi32_ps(_mm512_castsi512_si256(a))),
                              _mm256_cvtepi32_ps(_mm512_extracti64x4_epi64(a, 1)), 1);
}
static inline __m512 _mm512_cvtph_ps(__m256i a) {
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_cvtph_ps(_mm256_castsi256_si128(a))),
                              _mm256_cvtph_ps(_mm256_extracti128_si256(a, 1)), 1);
}
static inline __m512i _mm512_cvtepi8_epi32(__m128i a) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_cvtepi8_epi32(a)),
                              _mm256_cvtepi8_epi32(_mm_srli_si128(a, 8)), 1);
}
static inline __m512i _mm512_cvtepi16_epi32(__m256i a) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(a))),
                              _mm256_cvtepi16_epi32(_mm256_extracti128_si256(a, 1)), 1);
}
// SIMDe's gives a, not 0, where b is 0
#undef _mm256_sign_epi8
static inline __m256i _mm256_sign_epi8(__m256i a, __m256i b) {
    const __m256i zero = _mm256_setzero_si256();
    const __m256i signed_a = _mm256_blendv_epi8(a, _mm256_sub_epi8(zero, a), _mm256_cmpgt_epi8(zero, b));
    return _mm256_andnot_si256(_mm256_cmpeq_epi8(b, zero), signed_a);
}
#define _mm512_extractf32x8_ps(a, i) _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), i))
#else
#include <immintrin.h>
// v stays in a register here: GCC otherwise reorders a chain of adds into
// v so that it stores each product to the stack and adds them later
#define IN_REGISTER(v) __asm__("" : "+x"(v))
#define TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TARGET_AVXVNNI __attribute__((target("avx2,fma,f16c,avxvnni")))
#define TARGET_AVX512 \
    __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#endif
#endif

#endif
