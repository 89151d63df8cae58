// GGUF weight block formats: row sizes, dequantisation, and the dot products
// of a quantised weight row with activations.
//
// Quantised weights are multiplied with activations quantised per block of 32
// to int8 (act_q8 below), so the inner loops are integer multiply-adds; F16,
// BF16 and F32 weights are multiplied with the f32 activations directly.
// Each kernel exists twice: portable C (the reference) and AVX2+FMA+F16C.
#ifndef KVCELLS_QUANTS_H
#define KVCELLS_QUANTS_H

#include <stddef.h>
#include <stdint.h>

// cffi-begin
// Type ids are ggml's (gguf.GGMLQuantizationType).
#define QUANT_F32 0
#define QUANT_F16 1
#define QUANT_Q4_0 2
#define QUANT_Q4_1 3
#define QUANT_Q5_0 6
#define QUANT_Q5_1 7
#define QUANT_Q8_0 8
#define QUANT_Q4_K 12
#define QUANT_Q5_K 13
#define QUANT_Q6_K 14
#define QUANT_BF16 30

// Bytes of one row of n values, or 0 when the type is unknown or n is not a
// positive multiple of the type's block size.
size_t quant_row_bytes(int type, int64_t n);
// cffi-end

// Activations of one token quantised per block of 32: x[i] ~ d[i/32] * q[i];
// s[b] = d[b] * (sum of q over block b), for the weight types with an offset.
typedef struct {
    int8_t *q;
    float *d;
    float *s;
} act_q8;

int quant_is_integer(int type);   // 1: dot with act_q8; 0: dot with f32 x
// n % 32 == 0; both paths give identical blocks (round to nearest even).
void quant_act_q8(const float *x, int64_t n, act_q8 a, int simd);

void quant_dequantize_row(int type, const uint8_t *row, float *out, int64_t n);

// One weight row (n values) times nt <= DOT_MAX_TOKENS tokens x[0..nt):
// out[t * out_stride] = row . x[t].
#define DOT_MAX_TOKENS 4
typedef void (*dot_q8_fn)(int type, const uint8_t *row, const act_q8 *x, int nt,
                          int64_t n, float *out, int64_t out_stride);
// One weight row (n values) times one token.
typedef float (*dot_f32_fn)(int type, const uint8_t *row, const float *x, int64_t n);

dot_q8_fn quant_dot_q8(int type, int simd);
dot_f32_fn quant_dot_f32(int type, int simd);

#endif
