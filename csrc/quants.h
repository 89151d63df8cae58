// The element types of every C file: ids, row sizes, f16 conversion,
// (de)quantisation, and the dot products of a quantised weight row with
// activations.
//
// Quantised weights are multiplied with activations quantised per block of 32
// to int8 (act_q8 below), so the inner loops are integer multiply-adds; F16,
// BF16 and F32 weights are multiplied with the f32 activations directly.
// Each kernel exists in portable C (the reference) and for x86 vector
// instructions (the paths below).
#ifndef KVCELLS_QUANTS_H
#define KVCELLS_QUANTS_H

#include <stdint.h>
#include <string.h>

#include "status.h"

// cffi-begin
// Element types, ggml's ids (gguf.GGMLQuantizationType); K/V rows use F32,
// F16, Q8_0 and Q4_0.
#define KVC_TYPE_F32 0
#define KVC_TYPE_F16 1
#define KVC_TYPE_Q4_0 2
#define KVC_TYPE_Q4_1 3
#define KVC_TYPE_Q5_0 6
#define KVC_TYPE_Q5_1 7
#define KVC_TYPE_Q8_0 8
#define KVC_TYPE_Q4_K 12
#define KVC_TYPE_Q5_K 13
#define KVC_TYPE_Q6_K 14
#define KVC_TYPE_BF16 30
// kvcells' own layout, not a GGUF type: Q5_0 blocks regrouped by 4 for the
// x86 kernels (quants.c); quant_regroup_q5_0 makes it from Q5_0 rows.
#define KVC_TYPE_Q5_0_G4 106

// *bytes_out = bytes of one row of n values; KVC_EINVAL when the type is
// unknown or n is not a positive multiple of its block size.
kvc_status quant_row_bytes(int type, int64_t n, int64_t *bytes_out);
// n_rows rows of n values (n % 32 == 0) into Q8_0 or Q4_0 blocks, rounding
// as ggml's reference quantisers do; out holds n_rows row_bytes.
kvc_status quant_quantize(int type, const float *x, int64_t n_rows, int64_t n, uint8_t *out);
// n_rows Q5_0 rows of n values (n % 128 == 0), src_stride bytes apart, into
// Q5_0_G4 rows of the same size, packed in out: the same values, bit for bit
// the same matmul results, fewer instructions to unpack.
kvc_status quant_regroup_q5_0(const uint8_t *src, int64_t src_stride, int64_t n_rows, int64_t n,
                              uint8_t *out);

// The kernel paths of matmul and attention, by the instructions they use:
// portable C (the reference), AVX2+FMA+F16C, AVX-VNNI (AVX2's vectors with
// vpdpbusd) and AVX-512 F/BW/VL/DQ with VNNI. The integer matmul kernels of
// every x86 path give bit for bit the same results.
#define KVC_SIMD_PORTABLE 0
#define KVC_SIMD_AVX2 1
#define KVC_SIMD_AVXVNNI 2
#define KVC_SIMD_AVX512 3
// Bit p is set for each path p this CPU runs; the default path is the last.
int kvc_simd_paths(void);
// KVC_EINVAL when the CPU cannot run it.
kvc_status kvc_set_simd_path(int path);
int kvc_simd_path(void);
// cffi-end

// The one-row kernels, and the read probe, ask for the bytes this far ahead
// of what they read: on weights read from memory (decode) the hardware
// prefetcher alone left the kernels 20-30% under their in-cache speed.
#define READ_AHEAD 3072

// quant_row_bytes's value, 0 when invalid
int64_t type_row_bytes(int type, int64_t n);
// the block size of a type, 0 when unknown
int type_block(int type);

static inline float f16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v;
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    const uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    if (exp == 0x1f) {
        v.u = sign | 0x7f800000u | (mant << 13);
    } else if (exp != 0) {
        v.u = sign | ((exp + 112) << 23) | (mant << 13);
    } else {
        const float sub = (float)mant * 5.9604644775390625e-8f;   // mant * 2^-24, exact
        return sign ? -sub : sub;
    }
    return v.f;
}

static inline float load_f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return f16_to_f32(h);
}

// rounding to nearest even, as a C cast does
static inline void store_f16(float x, uint8_t *p) {
    _Float16 h = (_Float16)x;
    memcpy(p, &h, 2);
}

// Activations of a group of nt (1 to ACT_GROUP = 8) tokens of n values quantised per
// block of 32, the values interleaved by block, so a kernel reads the group's
// block g from one place, the scales token by token, so a kernel loads 8
// blocks' at once: token t has x[32g + i] ~ d[t*n/32 + g] * q[32(g*nt + t) + i],
// s[t*n/32 + g] = d * (sum of those q), for the weight types with an offset,
// off[t*n/32 + g] = -128 * (sum of those q), for wide panels' Q8_0, and
// off_half[2(t*n/32 + g) + h] = -32 * (sum of q 16h..16h+15), for their Q6_K.
#define ACT_GROUP 8
typedef struct {
    int8_t *q;
    float *d;
    float *s;
    int32_t *off;
    int32_t *off_half;
    int nt;
} act_q8;

int quant_is_integer(int type);   // 1: dot with act_q8; 0: dot with f32 x
// Quantises x (n values, n % 32 == 0) as token t of group a. Both paths give
// identical blocks (round half to even).
void quant_act_q8(const float *x, int64_t n, act_q8 a, int t, int path);

// n values of a row of any type as floats
void quant_dequantize_row(int type, const uint8_t *row, float *out, int64_t n);
// n values (whole blocks) into a row of F32, F16, Q8_0 or Q4_0
void quant_quantize_row(int type, const float *x, int64_t n, uint8_t *out);

// Weight rows 0..n_rows-1 (row_stride bytes apart, n values each) times
// the first n_tok tokens of group x: y[t * y_stride + r].
typedef void (*dot_q8_fn)(int type, const uint8_t *w, int64_t row_stride, int64_t n_rows, act_q8 x,
                          int64_t n, float *y, int64_t y_stride, int n_tok);
// One weight row (n values) times one token.
typedef float (*dot_f32_fn)(int type, const uint8_t *row, const float *x, int64_t n);

dot_q8_fn quant_dot_q8(int type, int path);
dot_f32_fn quant_dot_f32(int type, int path);

// Many tokens (the x86 paths): PANEL weight rows unpacked once per matmul to
// int8, interleaved so that one vector holds 4 values of each of the 8 rows
// and the kernel's lanes are rows. In block g of a panel, value j of row r
// is a[r] * sc[j / 16][r][0] * v[j / 4][r][j % 4] + m[r], sc being Q6_K's
// int16 scales (1 for the other types: unused); rows the panel lacks are
// zeros. Each token's y is bit for bit what quant_dot_q8's kernel gives it.
#define PANEL 8
typedef struct {
    int8_t v[8][PANEL][4];
    float a[PANEL];
    float m[PANEL];
    int16_t sc[2][PANEL][2];
} panel_block;

// The AVX-512 path's panels: 16 rows, so that one 512-bit vector holds 4
// values of each, all unsigned, so that one vpdpbusd multiplies them with 4
// of a token's. Q8_0's are stored plus 128 and Q6_K's plus 32; their kernels
// start each block's sums (Q6_K's, each half block's) at act_q8's off
// (off_half) to take that back. Q6_K has no offsets m but int scales sc.
#define WIDE_PANEL 16
typedef struct {
    uint8_t v[8][WIDE_PANEL][4];
    float a[WIDE_PANEL];
    union {
        float m[WIDE_PANEL];
        int16_t sc[2][WIDE_PANEL];
    };
} wide_block;

// Unpacks rows (n_rows <= the kernel's rows, row_stride bytes apart, n
// values each) into n/32 blocks (panel_block or wide_block).
typedef void (*pack_fn)(const uint8_t *w, int64_t row_stride, int n_rows, int64_t n, void *out);
// The panel's rows times tokens t0.. of group x (tokens of them, x.nt when
// that is fewer): y[t * y_stride + r] for t < n_tok, r < n_rows.
typedef void (*panel_dot_fn)(const void *p, int64_t n, act_q8 x, int t0, float *y,
                             int64_t y_stride, int n_rows, int n_tok);
typedef struct {
    pack_fn pack;
    panel_dot_fn dot;
    int rows;          // PANEL or WIDE_PANEL
    int tokens;        // at most this many per call of dot
    int block_bytes;   // sizeof(panel_block) or sizeof(wide_block)
    int min_tokens;    // fewer go to the one-row kernels
} panel_kernel;

// pack NULL on the portable path.
panel_kernel quant_panel(int type, int path);

#endif
