#include <math.h>

#include "ops.h"

static float rms_scale(const float *x, int64_t n, float eps) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    return (float)(1.0 / sqrt(ss / (double)n + (double)eps));
}

kvc_status ops_rms_norm(const float *x, const float *w, float *y, int64_t n_rows, int64_t n,
                        float eps) {
    if (n_rows < 0 || n < 1)
        return kvc_fail(KVC_EINVAL, "rms_norm: %lld rows of %lld values", (long long)n_rows,
                        (long long)n);
    for (int64_t r = 0; r < n_rows; r++) {
        const float *xr = x + r * n;
        float *yr = y + r * n;
        float scale = rms_scale(xr, n, eps);
        for (int64_t i = 0; i < n; i++) yr[i] = xr[i] * scale * w[i];
    }
    return KVC_OK;
}

kvc_status ops_rms_norm_rope_neox(const float *x, const float *w, const float *cos,
                                  const float *sin, float *y, int64_t n_tokens, int64_t n_heads,
                                  int64_t head_dim, float eps) {
    if (n_tokens < 0 || n_heads < 0 || head_dim < 2 || head_dim % 2)
        return kvc_fail(KVC_EINVAL, "rms_norm_rope_neox: %lld tokens, %lld heads of %lld values",
                        (long long)n_tokens, (long long)n_heads, (long long)head_dim);
    int64_t half = head_dim / 2;
    for (int64_t t = 0; t < n_tokens; t++) {
        const float *c = cos + t * half, *s = sin + t * half;
        for (int64_t h = 0; h < n_heads; h++) {
            const float *xr = x + (t * n_heads + h) * head_dim;
            float *yr = y + (t * n_heads + h) * head_dim;
            float scale = rms_scale(xr, head_dim, eps);
            for (int64_t i = 0; i < half; i++) {
                float a = xr[i] * scale * w[i];
                float b = xr[i + half] * scale * w[i + half];
                yr[i] = a * c[i] - b * s[i];
                yr[i + half] = a * s[i] + b * c[i];
            }
        }
    }
    return KVC_OK;
}
