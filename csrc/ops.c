#include "ops.h"

#include <math.h>

#include "exp8.h"
#include "quants.h"
#include "simd.h"

// four partial sums: one chain of dependent adds would wait on each add
static float rms_scale(const float *x, int64_t n, float eps) {
    double ss[4] = {0.0, 0.0, 0.0, 0.0};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int k = 0; k < 4; k++) ss[k] += (double)x[i + k] * x[i + k];
    for (; i < n; i++) ss[0] += (double)x[i] * x[i];
    return (float)(1.0 / sqrt((ss[0] + ss[1] + ss[2] + ss[3]) / (double)n + (double)eps));
}

void ops_rms_norm(const float *x, const float *w, float *y, int64_t n_rows, int64_t n,
                  float eps) {
    for (int64_t r = 0; r < n_rows; r++) {
        const float *xr = x + r * n;
        float *yr = y + r * n;
        const float scale = rms_scale(xr, n, eps);
        for (int64_t i = 0; i < n; i++) yr[i] = xr[i] * scale * w[i];
    }
}

void ops_rope(float *x, int64_t n_tokens, int64_t n_heads, int64_t head_dim, const float *cos,
              const float *sin, int neox, const float *w, float eps) {
    const int64_t half = head_dim / 2;
    for (int64_t t = 0; t < n_tokens; t++) {
        const float *c = cos + t * half, *s = sin + t * half;
        for (int64_t h = 0; h < n_heads; h++) {
            float *xr = x + (t * n_heads + h) * head_dim;
            if (w) ops_rms_norm(xr, w, xr, 1, head_dim, eps);
            for (int64_t i = 0; i < half; i++) {
                float *pa = neox ? xr + i : xr + 2 * i, *pb = neox ? xr + i + half : xr + 2 * i + 1;
                const float a = *pa, b = *pb;
                *pa = a * c[i] - b * s[i];
                *pb = a * s[i] + b * c[i];
            }
        }
    }
}

void ops_silu_mul(float *g, const float *u, int64_t n) {
    for (int64_t i = 0; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

// tanh(y) = 1 - 2 / (e^2y + 1) by one expf (libm's tanhf costs about four
// times as much; a decode step of Gemma 3 270M takes ~37k), and by exp8 on
// eight at a time, sign(y) (1 - e^-2|y|) / (1 + e^-2|y|), with AVX2; both
// have an absolute error ~1e-7, give exactly +-1 far out and keep NaN. A
// row's values go through the same path whatever the other rows (the
// vector loop covers the same part of every row).
static float tanh_by_exp(float y) { return 1.0f - 2.0f / (expf(2.0f * y) + 1.0f); }

#define GELU_C 0.7978845608f   // sqrt(2 / pi)
#define GELU_C3 (0.7978845608f * 0.044715f)

#ifdef KVC_X86
#define AVX2 TARGET_AVX2 __attribute__((always_inline)) static inline

AVX2 __m256 tanh8(__m256 y) {
    const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
    const __m256 e = exp8(_mm256_mul_ps(_mm256_set1_ps(-2.0f), _mm256_andnot_ps(sign, y)));
    const __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
    return _mm256_or_ps(t, _mm256_and_ps(sign, y));
}

// the first n - n % 8 values of a row; returns how many it did
TARGET_AVX2
static int64_t gelu_mul_avx2(float *g, const float *u, int64_t n) {
    const __m256 c = _mm256_set1_ps(GELU_C), c3 = _mm256_set1_ps(GELU_C3);
    const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 y = _mm256_mul_ps(x, _mm256_add_ps(c, _mm256_mul_ps(c3, _mm256_mul_ps(x, x))));
        const __m256 r = _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, tanh8(y)));
        _mm256_storeu_ps(g + i, _mm256_mul_ps(r, _mm256_loadu_ps(u + i)));
    }
    return i;
}

TARGET_AVX2
static int64_t softcap_avx2(float *x, int64_t n, float cap) {
    const __m256 c = _mm256_set1_ps(cap);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(x + i, _mm256_mul_ps(c, tanh8(_mm256_div_ps(_mm256_loadu_ps(x + i), c))));
    return i;
}
#endif

void ops_gelu_tanh_mul(float *g, const float *u, int64_t n_rows, int64_t n) {
    const int simd = kvc_simd_path() != KVC_SIMD_PORTABLE;
    for (int64_t r = 0; r < n_rows; r++) {
        float *gr = g + r * n;
        const float *ur = u + r * n;
        int64_t i = 0;
#ifdef KVC_X86
        if (simd) i = gelu_mul_avx2(gr, ur, n);
#endif
        for (; i < n; i++) {
            const float x = gr[i];
            gr[i] = 0.5f * x * (1.0f + tanh_by_exp(x * (GELU_C + GELU_C3 * x * x))) * ur[i];
        }
    }
    (void)simd;
}

void ops_add(float *x, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

void ops_softcap(float *x, int64_t n_rows, int64_t n, float cap) {
    const int simd = kvc_simd_path() != KVC_SIMD_PORTABLE;
    for (int64_t r = 0; r < n_rows; r++) {
        float *xr = x + r * n;
        int64_t i = 0;
#ifdef KVC_X86
        if (simd) i = softcap_avx2(xr, n, cap);
#endif
        for (; i < n; i++) xr[i] = cap * tanh_by_exp(xr[i] / cap);
    }
    (void)simd;
}
