#ifndef KVCELLS_OPS_H
#define KVCELLS_OPS_H

#include <stdint.h>

// The element-wise ops of a transformer block (block.c), one row at a time
// (so a row's result never depends on the other rows of its batch). The
// callers check the sizes.

// y[r, i] = x[r, i] / sqrt(mean_i(x[r, :]^2) + eps) * w[i] for n_rows rows
// of n floats; y may be x.
void ops_rms_norm(const float *x, const float *w, float *y, int64_t n_rows, int64_t n,
                  float eps);
// RoPE in place on x (n_tokens, n_heads, head_dim): pair i of a head turns by
// the angle whose cos/sin are cos[t, i], sin[t, i] ((n_tokens, head_dim/2)),
// the pairs (x[i], x[i + d/2]) when neox, else (x[2i], x[2i + 1]). When w is
// not NULL each head row is first RMS-normed with w (head_dim), as Gemma's
// Q/K norms.
void ops_rope(float *x, int64_t n_tokens, int64_t n_heads, int64_t head_dim, const float *cos,
              const float *sin, int neox, const float *w, float eps);
// g[i] = silu(g[i]) * u[i], silu(x) = x / (1 + e^-x)
void ops_silu_mul(float *g, const float *u, int64_t n);
// g[i] = gelu(g[i]) * u[i], gelu(x) = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))),
// for n_rows rows of n
void ops_gelu_tanh_mul(float *g, const float *u, int64_t n_rows, int64_t n);
// x[i] += y[i]
void ops_add(float *x, const float *y, int64_t n);
// x[i] = cap * tanh(x[i] / cap) for n_rows rows of n
void ops_softcap(float *x, int64_t n_rows, int64_t n, float cap);

#endif
