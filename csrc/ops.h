#ifndef KVCELLS_OPS_H
#define KVCELLS_OPS_H

#include <stdint.h>

// Small fused element-wise ops of the forward pass, one row at a time (so a
// row's result never depends on the other rows of its batch).

// cffi-begin
// y[r, i] = x[r, i] / sqrt(mean_i(x[r, :]^2) + eps) * w[i] for n_rows rows
// of n floats; y may be x. Returns 0, or -1 on n_rows < 0 or n < 1.
int ops_rms_norm(const float *x, const float *w, float *y, int64_t n_rows, int64_t n,
                 float eps);
// cffi-end

#endif
