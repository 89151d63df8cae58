// y = x W^T for weights kept in their GGUF type, over a pool of threads that
// split the output rows.
#ifndef KVCELLS_MATMUL_H
#define KVCELLS_MATMUL_H

#include <stdint.h>

// cffi-begin
#define MATMUL_OK 0
#define MATMUL_EINVAL -1
#define MATMUL_ENOMEM -2
#define MATMUL_MAX_THREADS 64

// w: n_out rows of quant_row_bytes(type, n_in) bytes, row_stride bytes
// apart; x: n tokens of n_in floats; y: n tokens of n_out floats.
// n_threads is capped at MATMUL_MAX_THREADS. Returns MATMUL_OK, or an error
// with y untouched.
int matmul(int type, const uint8_t *w, int64_t row_stride, int64_t n_out,
           int64_t n_in, const float *x, int64_t n, float *y, int n_threads);

// out[k] = row ids[k] of w (n_rows rows) as n_in floats.
int matmul_dequantize_rows(int type, const uint8_t *w, int64_t row_stride,
                           int64_t n_rows, int64_t n_in, const int64_t *ids,
                           int64_t n_ids, float *out);

int matmul_simd_supported(void);   // the CPU has AVX2, FMA and F16C
// Use the AVX2 kernels when supported (on != 0) or the portable ones. The
// default is on unless the environment sets KVCELLS_NO_SIMD=1.
void matmul_set_simd(int on);
int matmul_simd_enabled(void);
// cffi-end

#endif
