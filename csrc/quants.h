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

// Activations of a group of nt (1, 4 or ACT_GROUP = 8) tokens quantised per block of
// 32 and interleaved by block, so a kernel reads the group's block g from
// one place: token t has x[32g + i] ~ d[g*nt + t] * q[32(g*nt + t) + i] and
// s[g*nt + t] = d * (sum of those q), for the weight types with an offset.
#define ACT_GROUP 8
typedef struct {
    int8_t *q;
    float *d;
    float *s;
    int nt;
} act_q8;

int quant_is_integer(int type);   // 1: dot with act_q8; 0: dot with f32 x
// Quantises x (n values, n % 32 == 0) as token t of group a. Both paths give
// identical blocks (round half to even).
void quant_act_q8(const float *x, int64_t n, act_q8 a, int t, int simd);

void quant_dequantize_row(int type, const uint8_t *row, float *out, int64_t n);

// One weight row (n values) times each token of group x: out[t], t < x.nt.
typedef void (*dot_q8_fn)(int type, const uint8_t *row, act_q8 x, int64_t n, float *out);
// One weight row (n values) times one token.
typedef float (*dot_f32_fn)(int type, const uint8_t *row, const float *x, int64_t n);

dot_q8_fn quant_dot_q8(int type, int simd);
dot_f32_fn quant_dot_f32(int type, int simd);

#endif
