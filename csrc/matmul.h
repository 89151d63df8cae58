// y = x W^T for weights kept in their GGUF type, on the thread pool's
// workers, which split the output rows.
#ifndef KVCELLS_MATMUL_H
#define KVCELLS_MATMUL_H

#include <stdint.h>

#include "status.h"

// cffi-begin
// w: n_out rows of quant_row_bytes(type, n_in) bytes, row_stride bytes
// apart; x: n tokens of n_in floats; y: n tokens of n_out floats.
// n_threads is capped at KVC_MAX_THREADS. On an error y is untouched.
kvc_status matmul(int type, const uint8_t *w, int64_t row_stride, int64_t n_out,
                  int64_t n_in, const float *x, int64_t n, float *y, int n_threads);

// out[k] = row ids[k] of w (n_rows rows) as n_in floats.
kvc_status matmul_dequantize_rows(int type, const uint8_t *w, int64_t row_stride,
                                  int64_t n_rows, int64_t n_in, const int64_t *ids,
                                  int64_t n_ids, float *out);

// The read rate the weights of a matmul are measured against: reads n_bytes
// (a multiple of 64) at p on n_threads threads, handed out in chunks as
// matmul hands out rows and read ahead as its kernels read; *sum_out = the sum of its 64-bit little-endian
// words modulo 2^64 (so the reads cannot be skipped, and can be checked).
kvc_status matmul_read_probe(const uint8_t *p, int64_t n_bytes, int n_threads,
                             uint64_t *sum_out);
// cffi-end

#endif
