// GGUF block formats (ggml's layouts, little-endian) and their kernels.
// Block layouts, in bytes:
//   Q8_0  (32 values, 34): f16 d, int8 q[32]                      x = d*q
//   Q4_0  (32 values, 18): f16 d, q[16] nibbles (low: 0..15, high: 16..31)
//                                                                 x = d*(q-8)
//   Q4_1  (32 values, 20): f16 d, f16 m, q[16] as Q4_0            x = d*q + m
//   Q5_0  (32 values, 22): f16 d, u32 qh (5th bits), q[16] nibbles as Q4_0
//                                                                 x = d*(q-16)
//   Q5_1  (32 values, 24): f16 d, f16 m, qh, q[16] as Q5_0        x = d*q + m
//   Q5_0_G4 (128 values, 88; kvcells' own): 4 Q5_0 blocks regrouped so the
//         x86 kernels unpack them with fewer instructions: f16 d[4]; h[16],
//         bit j of h[i] the 5th bit of value i of block j, bit 4+j that of
//         value 16+i; then per pair of blocks 32 bytes, value i of the first
//         in the low nibble of byte i, of the second in the high   x = d*(q-16)
//   Q4_K (256 values, 144): f16 d, f16 dmin, 12 bytes of 6-bit scale/min
//         pairs for 8 sub-blocks of 32, q[128]: 32 bytes per 64 values, low
//         nibbles the first sub-block, high the second   x = d*sc*q - dmin*m
//   Q5_K (256 values, 176): as Q4_K with qh[32] before q; bit s of qh[l] is
//         the 5th bit of value l of sub-block s
//   Q6_K (256 values, 210): ql[128], qh[64], int8 scales[16] (one per 16
//         values), f16 d; see q6_k_value()                  x = d*sc*(q-32)
#include "quants.h"

#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define QK 32
#define QK_K 256

// Fewer tokens than these go to the one-row kernels, which unpack each block
// once for the group but add its int32 totals across lanes per token; from
// here on rows are unpacked once into panels for all tokens (measured
// crossover: 5-6 tokens, 4 for Q6_K, more where W comes from memory; for
// Q8_0 in wide panels, 2: its one-row kernels pay for signed values).
#define PANEL_MIN_TOKENS 5
#define PANEL_MIN_TOKENS_Q6_K 4

static uint16_t load_u16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static uint32_t load_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

static float f32_from_bits(uint32_t bits) { float f; memcpy(&f, &bits, 4); return f; }

static float bf16_to_f32(uint16_t h) { return f32_from_bits((uint32_t)h << 16); }

// Values and bytes of a block of each type (0: unknown), inline for the kernels.
static inline int block_size(int type) {
    switch (type) {
    case KVC_TYPE_F32: case KVC_TYPE_F16: case KVC_TYPE_BF16: return 1;
    case KVC_TYPE_Q4_0: case KVC_TYPE_Q4_1: case KVC_TYPE_Q5_0: case KVC_TYPE_Q5_1:
    case KVC_TYPE_Q8_0: return QK;
    case KVC_TYPE_Q5_0_G4: return 4 * QK;
    case KVC_TYPE_Q4_K: case KVC_TYPE_Q5_K: case KVC_TYPE_Q6_K: return QK_K;
    default: return 0;
    }
}

static inline int block_bytes(int type) {
    switch (type) {
    case KVC_TYPE_F32: return 4;
    case KVC_TYPE_F16: case KVC_TYPE_BF16: return 2;
    case KVC_TYPE_Q4_0: return 18;
    case KVC_TYPE_Q4_1: return 20;
    case KVC_TYPE_Q5_0: return 22;
    case KVC_TYPE_Q5_1: return 24;
    case KVC_TYPE_Q8_0: return 34;
    case KVC_TYPE_Q5_0_G4: return 88;
    case KVC_TYPE_Q4_K: return 144;
    case KVC_TYPE_Q5_K: return 176;
    case KVC_TYPE_Q6_K: return 210;
    default: return 0;
    }
}

int type_block(int type) { return block_size(type); }

int64_t type_row_bytes(int type, int64_t n) {
    const int64_t bytes = block_bytes(type), block = block_size(type);
    if (block == 0 || n <= 0 || n % block != 0 || n / block > INT64_MAX / bytes) return 0;
    return n / block * bytes;
}

kvc_status quant_row_bytes(int type, int64_t n, int64_t *bytes_out) {
    if (!type_block(type)) return kvc_fail(KVC_EINVAL, "unknown element type %d", type);
    *bytes_out = type_row_bytes(type, n);
    if (*bytes_out == 0)
        return kvc_fail(KVC_EINVAL, "%lld is not a positive multiple of type %d's block of %d",
                        (long long)n, type, type_block(type));
    return KVC_OK;
}

int quant_is_integer(int type) {
    return type != KVC_TYPE_F32 && type != KVC_TYPE_F16 && type != KVC_TYPE_BF16;
}

// Round to nearest, ties to even, like the AVX2 conversion, for |v| < 2^22
// (here |v| <= 127) and without a libm call.
static int round_even(float v) { return (int)((v + 12582912.0f) - 12582912.0f); }

static void act_q8_portable(const float *x, int64_t n, act_q8 a, int t) {
    for (int64_t b = 0; b < n / QK; b++) {
        int64_t k = b * a.nt + t;
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int half[2] = {0, 0};
        for (int i = 0; i < QK; i++) {
            float v = xb[i] * id;
            int q = v == v ? round_even(v) : -128;   // NaN: what the AVX2 conversion gives
            a.q[k * QK + i] = (int8_t)q;
            half[i / 16] += q;
        }
        const int64_t ks = t * (n / QK) + b;
        const int sum = half[0] + half[1];
        a.d[ks] = amax / 127.0f;
        a.s[ks] = a.d[ks] * (float)sum;
        a.off[ks] = -128 * sum;
        a.off_half[2 * ks] = -32 * half[0], a.off_half[2 * ks + 1] = -32 * half[1];
    }
}

// ---- unpacking shared by both paths ----

// Q4_K/Q5_K: 6-bit scale and min of sub-block j from the 12 packed bytes.
static void k_scale_min(const uint8_t *s, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// Q4_K/Q5_K: value l (0..31) of sub-block s (0..7), unsigned.
static int k45_value(const uint8_t *blk, int five, int s, int l) {
    const uint8_t *qs = blk + (five ? 48 : 16);
    int q = (qs[32 * (s / 2) + l] >> (4 * (s % 2))) & 0xF;
    return five ? q | (((blk[16 + l] >> s) & 1) << 4) : q;
}

// Q6_K: value i (0..255), -32..31. Each half of 128 values takes 64 bytes of
// ql and 32 of qh; chunk c (0..3) of 32 values uses the low (c < 2) or high
// nibbles of ql[32*(c%2) + l] and bits 2c, 2c+1 of qh[l].
static int q6_k_value(const uint8_t *blk, int i) {
    int h = i / 128, c = (i % 128) / 32, l = i % 32;
    int lo = (blk[64 * h + 32 * (c % 2) + l] >> (4 * (c / 2))) & 0xF;
    int hi = (blk[128 + 32 * h + l] >> (2 * c)) & 3;
    return (lo | (hi << 4)) - 32;
}

// ---- portable kernels ----

// Group g of 32 values of a quantised row as x[i] = a[i/16] * q[i] - off.
static void unpack_group(int type, const uint8_t *row, int64_t g, int q[32], float a[2], float *off) {
    const uint8_t *blk;
    *off = 0.0f;
    switch (type) {
    case KVC_TYPE_Q8_0:
        blk = row + 34 * g;
        a[0] = a[1] = load_f16(blk);
        for (int i = 0; i < QK; i++) q[i] = (int8_t)blk[2 + i];
        return;
    case KVC_TYPE_Q4_0: case KVC_TYPE_Q4_1: case KVC_TYPE_Q5_0: case KVC_TYPE_Q5_1: {
        int five = type == KVC_TYPE_Q5_0 || type == KVC_TYPE_Q5_1;
        int has_min = type == KVC_TYPE_Q4_1 || type == KVC_TYPE_Q5_1;
        int bias = has_min ? 0 : five ? 16 : 8;
        blk = row + (18 + 2 * has_min + 4 * five) * g;
        const uint8_t *qs = blk + 2 + 2 * has_min + 4 * five;
        uint32_t qh = five ? load_u32(blk + 2 + 2 * has_min) : 0;
        a[0] = a[1] = load_f16(blk);
        if (has_min) *off = -load_f16(blk + 2);
        for (int j = 0; j < 16; j++) {
            q[j] = ((qs[j] & 0xF) | (int)(((qh >> j) & 1) << 4)) - bias;
            q[j + 16] = ((qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4)) - bias;
        }
        return;
    }
    case KVC_TYPE_Q5_0_G4: {
        const int j = (int)(g % 4);
        blk = row + 88 * (g / 4);
        a[0] = a[1] = load_f16(blk + 2 * j);
        for (int i = 0; i < 16; i++) {
            int lo = blk[24 + 32 * (j / 2) + i] >> (4 * (j % 2)) & 0xF;
            int hi = blk[24 + 32 * (j / 2) + 16 + i] >> (4 * (j % 2)) & 0xF;
            q[i] = (lo | (blk[8 + i] >> j & 1) << 4) - 16;
            q[i + 16] = (hi | (blk[8 + i] >> (4 + j) & 1) << 4) - 16;
        }
        return;
    }
    case KVC_TYPE_Q4_K: case KVC_TYPE_Q5_K: {
        int five = type == KVC_TYPE_Q5_K, s = (int)(g % 8), sc, m;
        blk = row + (five ? 176 : 144) * (g / 8);
        k_scale_min(blk + 4, s, &sc, &m);
        a[0] = a[1] = load_f16(blk) * (float)sc;
        *off = load_f16(blk + 2) * (float)m;
        for (int l = 0; l < 32; l++) q[l] = k45_value(blk, five, s, l);
        return;
    }
    case KVC_TYPE_Q6_K: {
        int s = (int)(g % 8);
        blk = row + 210 * (g / 8);
        float d = load_f16(blk + 208);
        a[0] = d * (float)(int8_t)blk[192 + 2 * s];
        a[1] = d * (float)(int8_t)blk[193 + 2 * s];
        for (int l = 0; l < 32; l++) q[l] = q6_k_value(blk, 32 * s + l);
        return;
    }
    }
}

static float float_at(int type, const uint8_t *row, int64_t i) {
    if (type == KVC_TYPE_F16) return load_f16(row + 2 * i);
    if (type == KVC_TYPE_BF16) return bf16_to_f32(load_u16(row + 2 * i));
    float w;
    memcpy(&w, row + 4 * i, 4);
    return w;
}

void quant_dequantize_row(int type, const uint8_t *row, float *out, int64_t n) {
    if (!quant_is_integer(type)) {
        for (int64_t i = 0; i < n; i++) out[i] = float_at(type, row, i);
        return;
    }
    for (int64_t g = 0; g < n / QK; g++) {
        int q[32];
        float a[2], off;
        unpack_group(type, row, g, q, a, &off);
        for (int i = 0; i < QK; i++) out[QK * g + i] = a[i / 16] * (float)q[i] - off;
    }
}

static void dot_q8_row_portable(int type, const uint8_t *row, act_q8 x, int64_t n, float *out) {
    float sum[ACT_GROUP] = {0};
    for (int64_t g = 0; g < n / QK; g++) {
        int q[32];
        float a[2], off;
        unpack_group(type, row, g, q, a, &off);
        for (int t = 0; t < x.nt; t++) {
            const int8_t *xq = x.q + QK * (g * x.nt + t);
            const int64_t k = t * (n / QK) + g;
            int lo = 0, hi = 0;
            for (int l = 0; l < 16; l++) {
                lo += q[l] * xq[l];
                hi += q[l + 16] * xq[l + 16];
            }
            sum[t] += x.d[k] * (a[0] * (float)lo + a[1] * (float)hi) - off * x.s[k];
        }
    }
    for (int t = 0; t < x.nt; t++) out[t] = sum[t];
}

static void dot_q8_portable(int type, const uint8_t *w, int64_t row_stride, int64_t n_rows,
                            act_q8 x, int64_t n, float *y, int64_t y_stride, int n_tok) {
    for (int64_t r = 0; r < n_rows; r++) {
        float out[ACT_GROUP];
        dot_q8_row_portable(type, w + r * row_stride, x, n, out);
        for (int t = 0; t < n_tok; t++) y[t * y_stride + r] = out[t];
    }
}

static float dot_f32_portable(int type, const uint8_t *row, const float *x, int64_t n) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) sum += float_at(type, row, i) * x[i];
    return sum;
}

// ---- AVX2 + FMA + F16C ----
#ifdef KVC_X86

static inline TARGET_AVX2 float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline TARGET_AVX2 float f16_simd(const uint8_t *p) { return _cvtsh_ss(load_u16(p)); }

// The 32 nibbles of 16 bytes: low nibbles in the low half, high in the high.
static inline TARGET_AVX2 __m256i nibbles16(const uint8_t *p) {
    __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    v = _mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
    return _mm256_and_si256(v, _mm256_set1_epi8(0xF));
}

// Byte i is 16 when bit i of bits is set, else 0: byte i keeps bit i % 8 of
// its byte of bits, and sign_epi8 turns that into 16 (or 0) in one step,
// -16 where the bit is the sign bit.
static inline TARGET_AVX2 __m256i bits_to_16s(uint32_t bits) {
    const __m256i spread = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
        2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i sixteen = _mm256_set1_epi64x((long long)0xF010101010101010ULL);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), spread);
    return _mm256_sign_epi8(sixteen, _mm256_and_si256(v, bit));
}

// Block g of token t of a group of nt tokens.
static inline TARGET_AVX2 __m256i load_x(act_q8 a, int nt, int64_t g, int t) {
    return _mm256_loadu_si256((const __m256i *)(a.q + (g * nt + t) * QK));
}

static inline TARGET_AVX2 int hsum8i(__m256i v) {
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    return _mm_cvtsi128_si32(s4);
}

static TARGET_AVX2 void act_q8_avx2(const float *x, int64_t n, act_q8 a, int t) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < n / QK; b++) {
        __m256 v[4], amax = _mm256_setzero_ps();
        for (int k = 0; k < 4; k++) {
            v[k] = _mm256_loadu_ps(x + b * QK + 8 * k);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[k]));
        }
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_movehdup_ps(m));
        float max = _mm_cvtss_f32(m), id = max > 0.0f ? 127.0f / max : 0.0f;
        __m256i q[4];
        for (int k = 0; k < 4; k++) q[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], _mm256_set1_ps(id)));
        __m256i q16 = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        int64_t k = b * a.nt + t;
        _mm256_storeu_si256((__m256i *)(a.q + k * QK), _mm256_permutevar8x32_epi32(q16, order));
        const int64_t ks = t * (n / QK) + b;
        const int half0 = hsum8i(_mm256_add_epi32(q[0], q[1])), half1 = hsum8i(_mm256_add_epi32(q[2], q[3]));
        a.d[ks] = max / 127.0f;
        a.s[ks] = a.d[ks] * (float)(half0 + half1);
        a.off[ks] = -128 * (half0 + half1);
        a.off_half[2 * ks] = -32 * half0, a.off_half[2 * ks + 1] = -32 * half1;
    }
}

// The quantised one-row kernels (int8_kernels.h) multiply weight rows with
// one token or a few (matmul sends more to the panels), 8
// blocks at a time, lanes being blocks. The panel kernels multiply 8 rows
// at once (lanes being rows) and must give each token bit for bit what the
// one-row kernels give it alone, so both follow one order: the
// products of a block of 32 are summed exactly in int32; that sum, times
// (the block's scale times the token's), plus the block's offset term, is
// added to chain g % 8 by FMAs; the 8 chains are added as hsum8 adds lanes.
#define TILE static inline __attribute__((always_inline)) TARGET_AVX2

// Q4_0, Q4_1, Q5_0, Q5_1: the unsigned q of a block.
static inline TARGET_AVX2 __m256i q45_values(const uint8_t *blk, int five, int has_min) {
    __m256i u = nibbles16(blk + 2 + 2 * has_min + 4 * five);
    if (!five) return u;
    return _mm256_or_si256(u, bits_to_16s(load_u32(blk + 2 + 2 * has_min)));
}

// The unsigned q of block j (0..3) of a Q5_0_G4 group: its nibbles, and bit j
// (values 0..15) or bit 4+j (16..31) of h moved to bit 4 of each byte.
static inline TARGET_AVX2 __m256i q5_0_g4_values(const uint8_t *grp, int j) {
    __m256i v = _mm256_loadu_si256((const __m256i *)(grp + 24 + 32 * (j / 2)));
    v = _mm256_srl_epi16(v, _mm_cvtsi32_si128(4 * (j % 2)));
    __m256i h = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(grp + 8)));
    h = _mm256_srlv_epi32(h, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
    h = _mm256_sll_epi16(h, _mm_cvtsi32_si128(4 - j));
    return _mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi8(0xF)),
                           _mm256_and_si256(h, _mm256_set1_epi8(0x10)));
}

// Q4_K/Q5_K block header: d*sc and dmin*m of the 8 sub-blocks, the 6-bit
// fields unpacked four at a time (as k_scale_min does one by one).
static inline TARGET_AVX2 void k_scales_avx2(const uint8_t *blk, __m256 *ds, __m256 *dm) {
    uint32_t w0 = load_u32(blk + 4), w1 = load_u32(blk + 8), w2 = load_u32(blk + 12);
    uint32_t sc_hi = (w2 & 0x0f0f0f0f) | ((w0 >> 2) & 0x30303030);
    uint32_t m_hi = ((w2 >> 4) & 0x0f0f0f0f) | ((w1 >> 2) & 0x30303030);
    __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, (int)sc_hi, (int)(w0 & 0x3f3f3f3f))));
    __m256 m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, (int)m_hi, (int)(w1 & 0x3f3f3f3f))));
    *ds = _mm256_mul_ps(_mm256_set1_ps(f16_simd(blk)), sc);
    *dm = _mm256_mul_ps(_mm256_set1_ps(f16_simd(blk + 2)), m);
}

// The f16 at p + j * stride as lane j, j < n (lanes n.. are 0): gathered in
// general registers, then one conversion.
static inline TARGET_AVX2 __m256 f16_strided(const uint8_t *p, int64_t stride, int n) {
    uint64_t lo = 0, hi = 0;
    for (int j = 0; j < n; j++) {
        if (j < 4) lo |= (uint64_t)load_u16(p + j * stride) << (16 * j);
        else hi |= (uint64_t)load_u16(p + j * stride) << (16 * (j - 4));
    }
    __asm__("" : "+r"(lo), "+r"(hi));   // keep the gathering in general registers
    return _mm256_cvtph_ps(_mm_set_epi64x((long long)hi, (long long)lo));
}

// The unsigned q of sub-block s of a Q4_K or Q5_K block.
static inline TARGET_AVX2 __m256i k45_values(const uint8_t *blk, int five, int s) {
    const __m128i shift = _mm_cvtsi32_si128(4 * (s % 2));
    __m256i u = _mm256_loadu_si256((const __m256i *)(blk + (five ? 48 : 16) + 32 * (s / 2)));
    u = _mm256_and_si256(_mm256_srl_epi16(u, shift), _mm256_set1_epi8(0xF));
    if (!five) return u;
    __m256i qh = _mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)(blk + 16)), _mm_cvtsi32_si128(s));
    return _mm256_or_si256(u, _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(1)), 4));
}

// The signed q (-32..31) of chunk c of half h of a Q6_K block (see q6_k_value).
static inline TARGET_AVX2 __m256i q6_k_values(const uint8_t *blk, int h, int c) {
    __m256i lo = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32 * (c % 2)));
    lo = _mm256_and_si256(_mm256_srl_epi16(lo, _mm_cvtsi32_si128(4 * (c / 2))), _mm256_set1_epi8(0xF));
    __m256i hi = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
    hi = _mm256_and_si256(_mm256_srl_epi16(hi, _mm_cvtsi32_si128(2 * c)), _mm256_set1_epi8(3));
    return _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), _mm256_set1_epi8(32));
}

// Bytes of 8 blocks of 32 values (a chunk of the one-row kernels).
static inline int chunk_bytes(int type) { return block_bytes(type) * (8 * QK / block_size(type)); }

// Q8_0 and Q6_K: signed values, no offset; the others unsigned with one.
static inline int signed_values(int type) {
    return type == KVC_TYPE_Q8_0 || type == KVC_TYPE_Q6_K;
}

// Blocks g0..g0+n-1 of a row (g0 % 8 == 0; n = 8 but at the end of a row
// of 32-blocks) are, for block j, value = a*v + m with scale lane j of *a
// and offset lane j of *m (lanes n.. are 0), and for Q6_K value = a*sc*v
// with int16 scales lanes 2j and 2j+1 of *sc16 for its two halves.
TILE void block_scales(int type, const uint8_t *row, int64_t g0, int n, __m256 *a, __m256 *m,
                       __m256i *sc16) {
    if (type == KVC_TYPE_Q6_K) {
        const uint8_t *blk = row + 210 * (g0 / 8);
        *a = _mm256_set1_ps(f16_simd(blk + 208)), *m = _mm256_setzero_ps();
        *sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 192)));
    } else if (type == KVC_TYPE_Q4_K || type == KVC_TYPE_Q5_K) {
        __m256 dm;
        k_scales_avx2(row + (type == KVC_TYPE_Q5_K ? 176 : 144) * (g0 / 8), a, &dm);
        *m = _mm256_xor_ps(dm, _mm256_set1_ps(-0.0f));
    } else if (type == KVC_TYPE_Q8_0) {
        *a = f16_strided(row + 34 * g0, 34, n), *m = _mm256_setzero_ps();
    } else if (type == KVC_TYPE_Q5_0_G4) {   // n is 4 or 8: rows are whole groups
        const uint8_t *grp = row + 88 * (g0 / 4);
        __m128i d = _mm_loadl_epi64((const __m128i *)grp);
        if (n > 4) d = _mm_unpacklo_epi64(d, _mm_loadl_epi64((const __m128i *)(grp + 88)));
        *a = _mm256_cvtph_ps(d);
        *m = _mm256_mul_ps(_mm256_set1_ps(-16.0f), *a);
    } else {
        int five = type == KVC_TYPE_Q5_0 || type == KVC_TYPE_Q5_1;
        int has_min = type == KVC_TYPE_Q4_1 || type == KVC_TYPE_Q5_1;
        const int64_t size = 18 + 2 * has_min + 4 * five;
        *a = f16_strided(row + size * g0, size, n);
        *m = has_min ? f16_strided(row + size * g0 + 2, size, n)
                     : _mm256_mul_ps(_mm256_set1_ps(five ? -16.0f : -8.0f), *a);
    }
}

// The values v of block g0 + j (signed or unsigned as signed_values says).
TILE __m256i block_values(int type, const uint8_t *row, int64_t g0, int j) {
    switch (type) {
    case KVC_TYPE_Q6_K: return q6_k_values(row + 210 * (g0 / 8), j / 4, j % 4);
    case KVC_TYPE_Q4_K: return k45_values(row + 144 * (g0 / 8), 0, j);
    case KVC_TYPE_Q5_K: return k45_values(row + 176 * (g0 / 8), 1, j);
    case KVC_TYPE_Q8_0: return _mm256_loadu_si256((const __m256i *)(row + 34 * (g0 + j) + 2));
    case KVC_TYPE_Q5_0_G4: return q5_0_g4_values(row + 88 * (g0 / 4) + 88 * (j / 4), j % 4);   // g0 % 4 == 0
    }
    int five = type == KVC_TYPE_Q5_0 || type == KVC_TYPE_Q5_1;
    int has_min = type == KVC_TYPE_Q4_1 || type == KVC_TYPE_Q5_1;
    return q45_values(row + (18 + 2 * has_min + 4 * five) * (g0 + j), five, has_min);
}

// Lane j: the int32 total of the 8 lanes of p[j].
static inline TARGET_AVX2 __m256i lane_totals(const __m256i *p) {
    __m256i h0 = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
    __m256i h1 = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(h0, h1, 0x20), _mm256_permute2x128_si256(h0, h1, 0x31));
}

// Lane j: the int32 total of the 16 int16 lanes of p[j], each lane a
// maddubs pair sum of values 0..31 times int8s (|.| <= 2 * 31 * 128): the
// two int16 levels add 8 products (<= 31744), exact as the int32 sums are.
static inline TARGET_AVX2 __m256i lane_totals16(const __m256i *p) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i h0 = _mm256_hadd_epi16(_mm256_hadd_epi16(p[0], p[1]), _mm256_hadd_epi16(p[2], p[3]));
    __m256i h1 = _mm256_hadd_epi16(_mm256_hadd_epi16(p[4], p[5]), _mm256_hadd_epi16(p[6], p[7]));
    h0 = _mm256_madd_epi16(h0, ones), h1 = _mm256_madd_epi16(h1, ones);
    return _mm256_add_epi32(_mm256_permute2x128_si256(h0, h1, 0x20), _mm256_permute2x128_si256(h0, h1, 0x31));
}

// p[j] for j < n (a token's act_q8 scales of n blocks), 0 for the rest.
static inline TARGET_AVX2 __m256 first8(const float *p, int n) {
    if (n == 8) return _mm256_loadu_ps(p);
    if (n == 4) return _mm256_insertf128_ps(_mm256_setzero_ps(), _mm_loadu_ps(p), 0);
    float v[8] = {0};
    for (int j = 0; j < n; j++) v[j] = p[j];
    return _mm256_loadu_ps(v);
}

// Q6_K: the int16 multipliers of sub-block c (0..7): its two halves' scales,
// lanes 2c and 2c+1 of sc16, each over 8 lanes.
static inline TARGET_AVX2 __m256i q6_k_mul(__m256i sc16, int c) {
    const __m256i half = c < 4 ? _mm256_permute4x64_epi64(sc16, 0x44) : _mm256_permute4x64_epi64(sc16, 0xEE);
    const int8_t b = (int8_t)(4 * (c % 4));
    const __m256i lo = _mm256_set1_epi16((int16_t)(b | (b + 1) << 8));
    const __m256i hi = _mm256_set1_epi16((int16_t)((b + 2) | (b + 3) << 8));
    return _mm256_shuffle_epi8(half, _mm256_permute2x128_si256(lo, hi, 0x20));
}

static TARGET_AVX2 float dot_f32_avx2(int type, const uint8_t *row, const float *x, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps((const float *)(row + 4 * i)), _mm256_loadu_ps(x + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps((const float *)(row + 4 * i + 32)), _mm256_loadu_ps(x + i + 8), acc1);
    }
    float sum = hsum8(_mm256_add_ps(acc0, acc1));
    return sum + dot_f32_portable(type, row + 4 * i, x + i, n - i);
}

static TARGET_AVX2 float dot_f16_avx2(int type, const uint8_t *row, const float *x, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * i)));
        __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * i + 16)));
        acc0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + i), acc0);
        acc1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + i + 8), acc1);
    }
    float sum = hsum8(_mm256_add_ps(acc0, acc1));
    return sum + dot_f32_portable(type, row + 2 * i, x + i, n - i);
}

static inline TARGET_AVX2 __m256 bf16x8(const uint8_t *p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

static TARGET_AVX2 float dot_bf16_avx2(int type, const uint8_t *row, const float *x, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(bf16x8(row + 2 * i), _mm256_loadu_ps(x + i), acc0);
        acc1 = _mm256_fmadd_ps(bf16x8(row + 2 * i + 16), _mm256_loadu_ps(x + i + 8), acc1);
    }
    float sum = hsum8(_mm256_add_ps(acc0, acc1));
    return sum + dot_f32_portable(type, row + 2 * i, x + i, n - i);
}

// ---- the panel kernels (many tokens) ----

// v[r] (the 8 dwords of row r) into v[k] (dword k of rows 0..7).
static inline TARGET_AVX2 void transpose_8x8(__m256i *v) {
    __m256i t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++) {
            u[4 * i + 2 * j] = _mm256_unpacklo_epi64(t[4 * i + j], t[4 * i + j + 2]);
            u[4 * i + 2 * j + 1] = _mm256_unpackhi_epi64(t[4 * i + j], t[4 * i + j + 2]);
        }
    for (int k = 0; k < 4; k++) {
        v[k] = _mm256_permute2x128_si256(u[k], u[k + 4], 0x20);
        v[k + 4] = _mm256_permute2x128_si256(u[k], u[k + 4], 0x31);
    }
}

// Both kinds of panel block hold, for R rows, values [8][R][4], then scales
// a[R], then offsets m[R].
_Static_assert(offsetof(panel_block, a) == 32 * PANEL && offsetof(panel_block, m) == 36 * PANEL,
               "panel_block layout");
_Static_assert(offsetof(wide_block, a) == 32 * WIDE_PANEL && offsetof(wide_block, m) == 36 * WIDE_PANEL,
               "wide_block layout");

static inline int64_t panel_block_bytes(int rows) {
    return rows == PANEL ? sizeof(panel_block) : sizeof(wide_block);
}

// Blocks g0..g0+nv-1 of row r into the blocks at out of a panel of `rows`
// rows, values as [row][32 bytes].
static inline __attribute__((always_inline)) TARGET_AVX2 void pack_chunk(
        int type, const uint8_t *row, int r, int64_t g0, int nv, uint8_t *out, int rows) {
    __m256i sc16 = _mm256_setzero_si256();
    __m256 va, vm;
    float a[8], m[8];
    int16_t sc[16];
    block_scales(type, row, g0, nv, &va, &vm, &sc16);
    _mm256_storeu_ps(a, va), _mm256_storeu_ps(m, vm);
    _mm256_storeu_si256((__m256i *)sc, sc16);
    for (int j = 0; j < nv; j++) {
        uint8_t *b = out + (g0 + j) * panel_block_bytes(rows);
        _mm256_storeu_si256((__m256i *)b + r, block_values(type, row, g0, j));
        ((float *)(b + 32 * rows))[r] = a[j];
        if (!signed_values(type)) ((float *)(b + 36 * rows))[r] = m[j];   // the kernels read m and sc
        if (type == KVC_TYPE_Q6_K && rows == PANEL) {                      // only where the type has them
            panel_block *pb = (panel_block *)b;
            pb->sc[0][r][0] = pb->sc[0][r][1] = sc[2 * j];
            pb->sc[1][r][0] = pb->sc[1][r][1] = sc[2 * j + 1];
        } else if (type == KVC_TYPE_Q6_K) {
            wide_block *wb = (wide_block *)b;
            wb->sc[0][r] = sc[2 * j], wb->sc[1][r] = sc[2 * j + 1];
        }
    }
}

// Row by row first (one stream of reads at a time: several interleaved
// streams defeat the hardware prefetcher), each block's values stored as
// [row][32 bytes], then each block's 8-row groups transposed in place: for
// a wide panel, 4 values of rows 0-7 and then of rows 8-15 make one vector,
// Q8_0's plus 128 and Q6_K's plus 32.
TILE void pack_rows(int type, const uint8_t *w, int64_t row_stride, int n_rows, int64_t n,
                    uint8_t *out, int rows) {
    const int64_t nb = n / QK, size = panel_block_bytes(rows);
    const int plus = rows == PANEL ? 0 : type == KVC_TYPE_Q8_0 ? 128 : type == KVC_TYPE_Q6_K ? 32 : 0;
    const __m256i offset = _mm256_set1_epi8((char)plus);
    if (n_rows < rows) memset(out, 0, (size_t)(size * nb));
    for (int r = 0; r < n_rows; r++) {
        const uint8_t *row = w + r * row_stride;
        int64_t g0 = 0;
        for (; g0 + 8 <= nb; g0 += 8) pack_chunk(type, row, r, g0, 8, out, rows);
        if (nb - g0 == 4) pack_chunk(type, row, r, g0, 4, out, rows);   // rows of 256k + 128 values
        else if (g0 < nb) pack_chunk(type, row, r, g0, (int)(nb - g0), out, rows);
    }
    for (int64_t g = 0; g < nb; g++) {
        __m256i *v = (__m256i *)(out + g * size), t[WIDE_PANEL];
        for (int r = 0; r < rows; r++) t[r] = _mm256_loadu_si256(v + r);
        for (int h = 0; h < rows / PANEL; h++) transpose_8x8(t + PANEL * h);
        for (int k = 0; k < 8; k++)
            for (int h = 0; h < rows / PANEL; h++)
                _mm256_storeu_si256(v + k * (rows / PANEL) + h, _mm256_add_epi8(t[PANEL * h + k], offset));
    }
}

// The quantised weight types, each as M(name suffix, type id).
#define EACH_TYPE(M)                                                                     \
    M(q8_0, KVC_TYPE_Q8_0) M(q4_0, KVC_TYPE_Q4_0) M(q4_1, KVC_TYPE_Q4_1)                 \
    M(q5_0, KVC_TYPE_Q5_0) M(q5_1, KVC_TYPE_Q5_1) M(q4_k, KVC_TYPE_Q4_K)                 \
    M(q5_k, KVC_TYPE_Q5_K) M(q6_k, KVC_TYPE_Q6_K) M(q5_0_g4, KVC_TYPE_Q5_0_G4)

#define PACK_ENTRY(t, type)                                                                 \
    static TARGET_AVX2 void pack_##t(const uint8_t *w, int64_t row_stride, int n_rows,      \
                                     int64_t n, void *out) {                                \
        pack_rows(type, w, row_stride, n_rows, n, out, PANEL);                              \
    }
EACH_TYPE(PACK_ENTRY)

#define PACK_CASE(t, type) case type: return pack_##t;
static pack_fn pack_of(int type) {
    switch (type) { EACH_TYPE(PACK_CASE) }
    return NULL;
}

// The 8 chains of a token's blocks (chain g % 8 has block g), added as
// hsum8 adds lanes.
static inline TARGET_AVX2 __m256 add_chains(const __m256 *c) {
    return _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(c[0], c[4]), _mm256_add_ps(c[2], c[6])),
                         _mm256_add_ps(_mm256_add_ps(c[1], c[5]), _mm256_add_ps(c[3], c[7])));
}

#define PATH(name) name##_avx2
#define TARGET TARGET_AVX2
#include "int8_kernels.h"

#define PATH(name) name##_avxvnni
#define TARGET TARGET_AVXVNNI
#define DPBUSD _mm256_dpbusd_avx_epi32
#include "int8_kernels.h"

#define PATH(name) name##_avx512
#define TARGET TARGET_AVX512
#define DPBUSD _mm256_dpbusd_epi32
#define WIDE_PANELS
#include "int8_kernels.h"

// ---- AVX-512: wide panels, 16 rows to a vector ----

#define WIDE static inline __attribute__((always_inline)) TARGET_AVX512

// A wide panel times the nt tokens t0.. of group x. As panel_tile, chain g %
// 8 takes blocks g, g + 8, ... in that order, one chain after another; each
// 4 values of a block are one vpdpbusd per token, all 16 rows at once.
// Q6_K sums each half block apart (sum, sum2), then weighs the two by their
// scales in floats: each product and the total are integers below 2^24, so
// exact, the AVX2 path's int32 total.
WIDE void wide_tile(int type, const wide_block *p, int64_t n, act_q8 x, int t0, int nt, float *y,
                    int64_t y_stride, int n_rows, int n_tok) {
    const int64_t nb = n / QK;
    const int q8 = type == KVC_TYPE_Q8_0, q6 = type == KVC_TYPE_Q6_K;
    __m512 chains[ACT_GROUP][8];   // token, chain
    for (int c = 0; c < 8; c++) {
        __m512 acc[ACT_GROUP];
        for (int t = 0; t < nt; t++) acc[t] = _mm512_setzero_ps();
        for (int64_t g = c; g < nb; g += 8) {
            const wide_block *b = p + g;
            const int8_t *xq = x.q + (g * x.nt + t0) * QK;
            __m512i sum[ACT_GROUP], sum2[ACT_GROUP];
#pragma GCC unroll 8
            for (int t = 0; t < nt; t++) {
                const int64_t k = (t0 + t) * nb + g;
                sum[t] = q8 ? _mm512_set1_epi32(x.off[k])
                       : q6 ? _mm512_set1_epi32(x.off_half[2 * k]) : _mm512_setzero_si512();
                if (q6) sum2[t] = _mm512_set1_epi32(x.off_half[2 * k + 1]);
            }
#pragma GCC unroll 8
            for (int k = 0; k < 8; k++) {
                const __m512i w = _mm512_loadu_si512(b->v[k]);
#pragma GCC unroll 8
                for (int t = 0; t < nt; t++) {
                    const __m512i xb = _mm512_set1_epi32((int)load_u32((const uint8_t *)xq + t * QK + 4 * k));
                    if (q6 && k >= 4) sum2[t] = _mm512_dpbusd_epi32(sum2[t], w, xb);
                    else sum[t] = _mm512_dpbusd_epi32(sum[t], w, xb);
                }
            }
            const __m512 va = _mm512_loadu_ps(b->a);
            __m512 vm = _mm512_setzero_ps(), sc0 = vm, sc1 = vm;
            if (q6) {
                sc0 = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i *)b->sc[0])));
                sc1 = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i *)b->sc[1])));
            } else if (!q8) {
                vm = _mm512_loadu_ps(b->m);
            }
#pragma GCC unroll 8
            for (int t = 0; t < nt; t++) {
                const int64_t k = (t0 + t) * nb + g;   // the token's scales
                const __m512 total = q6 ? _mm512_fmadd_ps(sc0, _mm512_cvtepi32_ps(sum[t]),
                                                          _mm512_mul_ps(sc1, _mm512_cvtepi32_ps(sum2[t])))
                                        : _mm512_cvtepi32_ps(sum[t]);
                acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(va, _mm512_set1_ps(x.d[k])), total, acc[t]);
                if (!q8 && !q6) acc[t] = _mm512_fmadd_ps(vm, _mm512_set1_ps(x.s[k]), acc[t]);
            }
        }
        for (int t = 0; t < nt; t++) chains[t][c] = acc[t];
    }
    for (int t = 0; t < n_tok; t++) {
        const __m512 *ch = chains[t];
        const __m512 sum = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(ch[0], ch[4]), _mm512_add_ps(ch[2], ch[6])),
                                         _mm512_add_ps(_mm512_add_ps(ch[1], ch[5]), _mm512_add_ps(ch[3], ch[7])));
        float out[WIDE_PANEL];
        _mm512_storeu_ps(out, sum);
        memcpy(y + t * y_stride, out, sizeof(float) * (size_t)n_rows);
    }
}

// Groups of 1, 2, 4 and 8 tokens (as matmul makes them), each with its loops
// over tokens unrolled.
#define WIDE_ENTRY(t, type)                                                                    \
    static TARGET_AVX512 void pack_wide_##t(const uint8_t *w, int64_t row_stride, int n_rows,  \
                                            int64_t n, void *out) {                            \
        pack_rows(type, w, row_stride, n_rows, n, out, WIDE_PANEL);                            \
    }                                                                                          \
    static TARGET_AVX512 void wide_##t(const void *p, int64_t n, act_q8 x, int t0, float *y,   \
                                       int64_t y_stride, int n_rows, int n_tok) {              \
        switch (x.nt) {                                                                        \
        case 1: wide_tile(type, p, n, x, t0, 1, y, y_stride, n_rows, n_tok); break;            \
        case 2: wide_tile(type, p, n, x, t0, 2, y, y_stride, n_rows, n_tok); break;            \
        case 4: wide_tile(type, p, n, x, t0, 4, y, y_stride, n_rows, n_tok); break;            \
        default: wide_tile(type, p, n, x, t0, 8, y, y_stride, n_rows, n_tok);                  \
        }                                                                                      \
    }
EACH_TYPE(WIDE_ENTRY)

#define WIDE_CASE(t, type) \
    case type: return (panel_kernel){pack_wide_##t, wide_##t, WIDE_PANEL, ACT_GROUP, sizeof(wide_block), \
                                     type == KVC_TYPE_Q8_0 ? 2 : PANEL_MIN_TOKENS};
static panel_kernel wide_panel(int type) {
    switch (type) { EACH_TYPE(WIDE_CASE) }
    return (panel_kernel){0};
}
#endif  // KVC_X86

void quant_act_q8(const float *x, int64_t n, act_q8 a, int t, int path) {
#ifdef KVC_X86
    if (path != KVC_SIMD_PORTABLE) {
        act_q8_avx2(x, n, a, t);
        return;
    }
#endif
    act_q8_portable(x, n, a, t);
}

dot_q8_fn quant_dot_q8(int type, int path) {
    if (!quant_is_integer(type) || type_block(type) == 0) return NULL;
#ifdef KVC_X86
    switch (path) {
    case KVC_SIMD_AVX2: return dot_q8_avx2(type);
    case KVC_SIMD_AVXVNNI: return dot_q8_avxvnni(type);
    case KVC_SIMD_AVX512: return dot_q8_avx512(type);
    }
#endif
    return dot_q8_portable;
}


panel_kernel quant_panel(int type, int path) {
    panel_kernel k = {NULL, NULL, PANEL, 4, sizeof(panel_block),
                      type == KVC_TYPE_Q6_K ? PANEL_MIN_TOKENS_Q6_K : PANEL_MIN_TOKENS};
#ifdef KVC_X86
    if (path == KVC_SIMD_AVX512) return wide_panel(type);
    switch (path) {
    case KVC_SIMD_AVX2: k.dot = panel_dot_avx2(type); break;
    case KVC_SIMD_AVXVNNI: k.dot = panel_dot_avxvnni(type); break;
    }
    if (k.dot) k.pack = pack_of(type);
#endif
    (void)type, (void)path;
    return k;
}

dot_f32_fn quant_dot_f32(int type, int path) {
    if (quant_is_integer(type)) return NULL;
#ifdef KVC_X86
    if (path != KVC_SIMD_PORTABLE)
        return type == KVC_TYPE_F32 ? dot_f32_avx2
             : type == KVC_TYPE_F16 ? dot_f16_avx2 : dot_bf16_avx2;
#endif
    (void)path;
    return dot_f32_portable;
}

// ---- quantising rows (ggml's reference rounding) ----

static void quantize_q8_0(const float *x, uint8_t *b) {
    float amax = 0.0f;
    for (int i = 0; i < QK; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    store_f16(d, b);
    for (int i = 0; i < QK; i++) b[2 + i] = (uint8_t)(int8_t)roundf(x[i] * id);
}

static void quantize_q4_0(const float *x, uint8_t *b) {
    float amax = 0.0f, max = 0.0f;  // max: the value of largest magnitude, first one
    for (int i = 0; i < QK; i++)
        if (fabsf(x[i]) > amax) amax = fabsf(x[i]), max = x[i];
    const float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    store_f16(d, b);
    for (int i = 0; i < QK / 2; i++) {
        // x/d + 8.5 lies in [0.5, 16.5]: truncated, then clamped to 15
        const int lo = (int)(x[i] * id + 8.5f), hi = (int)(x[i + QK / 2] * id + 8.5f);
        b[2 + i] = (uint8_t)((lo < 15 ? lo : 15) | (hi < 15 ? hi : 15) << 4);
    }
}

void quant_quantize_row(int type, const float *x, int64_t n, uint8_t *out) {
    switch (type) {
    case KVC_TYPE_F32: memcpy(out, x, (size_t)n * 4); break;
    case KVC_TYPE_F16:
        for (int64_t i = 0; i < n; i++) store_f16(x[i], out + 2 * i);
        break;
    case KVC_TYPE_Q8_0:
        for (int64_t b = 0; b < n / QK; b++) quantize_q8_0(x + b * QK, out + b * (2 + QK));
        break;
    case KVC_TYPE_Q4_0:
        for (int64_t b = 0; b < n / QK; b++) quantize_q4_0(x + b * QK, out + b * (2 + QK / 2));
        break;
    }
}

kvc_status quant_quantize(int type, const float *x, int64_t n_rows, int64_t n, uint8_t *out) {
    if (type != KVC_TYPE_Q8_0 && type != KVC_TYPE_Q4_0)
        return kvc_fail(KVC_EINVAL, "quantize: type %d is not Q8_0 or Q4_0", type);
    if (n_rows < 0 || n <= 0 || n % QK)
        return kvc_fail(KVC_EINVAL, "quantize: %lld rows of %lld values (need a multiple of %d)",
                        (long long)n_rows, (long long)n, QK);
    if (n_rows > 0 && (!x || !out)) return kvc_fail(KVC_EINVAL, "quantize: no input or output");
    const int64_t row = type_row_bytes(type, n);
    for (int64_t r = 0; r < n_rows; r++) quant_quantize_row(type, x + r * n, n, out + r * row);
    return KVC_OK;
}

// ---- regrouping Q5_0 ----

static void regroup_q5_0(const uint8_t *blocks, uint8_t *grp) {
    memset(grp, 0, 88);
    for (int j = 0; j < 4; j++) {
        const uint8_t *b = blocks + 22 * j;
        const uint32_t qh = load_u32(b + 2);
        uint8_t *q = grp + 24 + 32 * (j / 2);
        const int shift = 4 * (j % 2);
        memcpy(grp + 2 * j, b, 2);
        for (int i = 0; i < 16; i++) {
            grp[8 + i] |= (uint8_t)((qh >> i & 1) << j | (qh >> (16 + i) & 1) << (4 + j));
            q[i] |= (uint8_t)((b[6 + i] & 0xF) << shift);
            q[16 + i] |= (uint8_t)((b[6 + i] >> 4) << shift);
        }
    }
}

kvc_status quant_regroup_q5_0(const uint8_t *src, int64_t src_stride, int64_t n_rows, int64_t n,
                              uint8_t *out) {
    const int64_t row = type_row_bytes(KVC_TYPE_Q5_0_G4, n);
    if (n_rows < 0 || row == 0 || n_rows > INT64_MAX / row)
        return kvc_fail(KVC_EINVAL, "regroup: %lld rows of %lld values (need a multiple of 128)",
                        (long long)n_rows, (long long)n);
    if (n_rows > 0 && (!src || !out)) return kvc_fail(KVC_EINVAL, "regroup: no input or output");
    if (src_stride < row)
        return kvc_fail(KVC_EINVAL, "regroup: row stride %lld for rows of %lld bytes",
                        (long long)src_stride, (long long)row);
    for (int64_t r = 0; r < n_rows; r++)
        for (int64_t g = 0; g < n / (4 * QK); g++)
            regroup_q5_0(src + r * src_stride + 88 * g, out + r * row + 88 * g);
    return KVC_OK;
}

// ---- which kernels run ----

static pthread_once_t simd_once = PTHREAD_ONCE_INIT;
static int simd_paths, simd_path;

static void simd_init(void) {
    simd_paths = 1 << KVC_SIMD_PORTABLE;
#if defined(KVC_SIMD_EMULATED)
    simd_paths |= 1 << KVC_SIMD_AVX2 | 1 << KVC_SIMD_AVXVNNI | 1 << KVC_SIMD_AVX512;
#elif defined(KVC_X86)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
        simd_paths |= 1 << KVC_SIMD_AVX2;
        if (__builtin_cpu_supports("avxvnni")) simd_paths |= 1 << KVC_SIMD_AVXVNNI;
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
            && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")
            && __builtin_cpu_supports("avx512vnni"))
            simd_paths |= 1 << KVC_SIMD_AVX512;
    }
#endif
    for (int p = KVC_SIMD_AVX512; p >= 0; p--)
        if (simd_paths >> p & 1) { simd_path = p; break; }
}

int kvc_simd_paths(void) {
    pthread_once(&simd_once, simd_init);
    return simd_paths;
}

kvc_status kvc_set_simd_path(int path) {
    pthread_once(&simd_once, simd_init);
    if (path < 0 || path > KVC_SIMD_AVX512 || !(simd_paths >> path & 1))
        return kvc_fail(KVC_EINVAL, "kernel path %d is not one this CPU runs (paths 0x%x)", path, simd_paths);
    __atomic_store_n(&simd_path, path, __ATOMIC_RELAXED);
    return KVC_OK;
}

int kvc_simd_path(void) {
    pthread_once(&simd_once, simd_init);
    return __atomic_load_n(&simd_path, __ATOMIC_RELAXED);
}
