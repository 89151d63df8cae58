#include <math.h>

#include "ops.h"

int ops_rms_norm(const float *x, const float *w, float *y, int64_t n_rows, int64_t n,
                 float eps) {
    if (n_rows < 0 || n < 1) return -1;
    for (int64_t r = 0; r < n_rows; r++) {
        const float *xr = x + r * n;
        float *yr = y + r * n;
        double ss = 0.0;
        for (int64_t i = 0; i < n; i++) ss += (double)xr[i] * xr[i];
        float scale = (float)(1.0 / sqrt(ss / (double)n + (double)eps));
        for (int64_t i = 0; i < n; i++) yr[i] = xr[i] * scale * w[i];
    }
    return 0;
}
