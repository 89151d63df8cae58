#ifndef KVCELLS_OPS_H
#define KVCELLS_OPS_H

#include <stdint.h>

#include "status.h"

// Small fused element-wise ops of the forward pass, one row at a time (so a
// row's result never depends on the other rows of its batch).

// cffi-begin
// y[r, i] = x[r, i] / sqrt(mean_i(x[r, :]^2) + eps) * w[i] for n_rows rows
// of n floats; y may be x. KVC_EINVAL on n_rows < 0 or n < 1.
kvc_status ops_rms_norm(const float *x, const float *w, float *y, int64_t n_rows, int64_t n,
                        float eps);
// Gemma's Q/K path: each head row of x (n_tokens, n_heads, head_dim) RMS-
// normed with w (head_dim), then NEOX-rotated: pair (i, i + head_dim/2)
// turns by the angle whose cos/sin are cos[t, i], sin[t, i] (float32
// (n_tokens, head_dim/2)). y may not overlap x. KVC_EINVAL on bad sizes.
kvc_status ops_rms_norm_rope_neox(const float *x, const float *w, const float *cos,
                                  const float *sin, float *y, int64_t n_tokens, int64_t n_heads,
                                  int64_t head_dim, float eps);
// cffi-end

#endif
