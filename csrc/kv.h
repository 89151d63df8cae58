#ifndef KVCELLS_KV_H
#define KVCELLS_KV_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

// Attention over K/V rows stored by cell (cells x n_head_kv x head_dim, one
// row of bytes per cell, in one of the K/V element types of quants.h: F32,
// F16, Q8_0, Q4_0).

// cffi-begin
// For each token t, attends the cells cells[lo[t]], ..., cells[hi[t] - 1]:
// out[t, h] = softmax_j(scale * q[t, h] . K[cell_j, h / g]) . V[cell_j, h / g]
// with g = n_head / n_head_kv. q and out are float32 (n_tokens, n_head,
// head_dim); k and v hold n_rows rows. A token that sees no cell gets zeros;
// a query row with a NaN or infinity (or a non-finite scale) gets NaN.
// Runs on up to n_threads threads of the pool.
kvc_status kv_attend(int type_k, const uint8_t *k, int type_v, const uint8_t *v,
                     int64_t n_rows, int n_head_kv, int head_dim,
                     const int32_t *cells, int64_t n_list,
                     int n_tokens, const int32_t *lo, const int32_t *hi,
                     const float *q, int n_head, float scale, float *out,
                     int n_threads);

// Writes row i of x (n rows of n_values floats) into row cells[i] of rows
// (n_rows rows of n_values values of `type`), converted to that type.
kvc_status kv_store(int type, uint8_t *rows, int64_t n_rows, int64_t n_values,
                    const int32_t *cells, int64_t n, const float *x);

// Re-rotates K rows after a position shift: row cells[i] of each of the
// n_layers arrays rows[l] (n_rows rows of n_head x head_dim values of `type`)
// turns by delta[i] positions, RoPE pair p by the angle
// delta * freq_scale * base^(-2p / head_dim), the pairs (x[p], x[p + d/2])
// when neox, else (x[2p], x[2p + 1]). Quantised rows are widened, rotated
// and quantised again. Cells with delta 0 are left as they are.
kvc_status kv_rope_shift(int type, uint8_t *const *rows, int n_layers, int64_t n_rows,
                         int n_head, int head_dim, const int32_t *cells, const int32_t *delta,
                         int64_t n, double base, double freq_scale, int neox);

// kv_attend cuts the cell list at multiples of KV_SEGMENT (segments, the
// units threads share) and of 32 (chunks); a token's bits depend only on its
// own cells and where those cuts fall among them. A caller that puts the
// cell of position p at an index equal to p modulo KV_SEGMENT (padding with
// entries no range covers) gets the same bits for a token in any ubatch: a
// token decoded alone gets the bits it gets inside a prompt.
#define KV_SEGMENT 2048
// cffi-end

// Memory kv_attend_in keeps from one call to the next: it grows to what a
// call needs and stays; kv_arena_free gives it back. Zero it to start.
typedef struct {
    void *p;
    size_t cap;
} kv_arena;
void kv_arena_free(kv_arena *a);

// kv_attend with its working memory in the arena a (kv_attend makes one per call).
kvc_status kv_attend_in(kv_arena *a, int type_k, const uint8_t *k, int type_v,
                        const uint8_t *v, int64_t n_rows, int n_head_kv, int head_dim,
                        const int32_t *cells, int64_t n_list,
                        int n_tokens, const int32_t *lo, const int32_t *hi,
                        const float *q, int n_head, float scale, float *out,
                        int n_threads);

// kv_attend's argument checks alone (block.c checks before it writes K/V).
kvc_status kv_check_attend(int type_k, const uint8_t *k, int type_v, const uint8_t *v,
                           int64_t n_rows, int n_head_kv, int head_dim,
                           const int32_t *cells, int64_t n_list, int n_tokens,
                           const int32_t *lo, const int32_t *hi, const float *q, int n_head,
                           const float *out);

#endif
