// Attention over the K/V rows of a list of cells, for f32, f16, q8_0 and
// q4_0 storage, and the K-shift's re-rotation of stored rows.
// Tiled path (default): blocks of query tokens whose ranges overlap go over
// chunks of cells, each K/V row widened once for all of a block's query rows,
// with a streaming softmax; batch-invariant (see kv.h).
// Per-token path: per (token, kv head), one pass scores every visible cell
// for up to four query heads sharing that kv head, then the softmax, then
// one pass sums the V rows, 16 at a time with the sums in registers.
// The AVX2/FMA/F16C kernels, specialised per element type, are chosen at run
// time; the plain C ones are the reference.
#include "kv.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KV_X86 1
#endif

#define QK 32
#define CELLS_PER_THREAD 16384
#define QB 16  // query tokens per block of the tiled path
#define KC 32  // cells per chunk of the tiled path
#define SEG KV_SEGMENT  // cells per segment: the tiled path's unit of work along a row

static int64_t head_bytes(int type, int head_dim) {
    switch (type) {
    case KV_TYPE_F32: return 4 * (int64_t)head_dim;
    case KV_TYPE_F16: return 2 * (int64_t)head_dim;
    case KV_TYPE_Q8_0: return (int64_t)head_dim / QK * (2 + QK);
    case KV_TYPE_Q4_0: return (int64_t)head_dim / QK * (2 + QK / 2);
    default: return -1;
    }
}

static float f16_to_f32(const uint8_t *p) {
    _Float16 h;
    memcpy(&h, p, 2);
    return (float)h;
}

// ---- plain C inner loops ----

static void widen_plain(int type, const uint8_t *src, int n, float *dst) {
    switch (type) {
    case KV_TYPE_F32:
        memcpy(dst, src, (size_t)n * 4);
        break;
    case KV_TYPE_F16:
        for (int i = 0; i < n; i++) dst[i] = f16_to_f32(src + 2 * i);
        break;
    case KV_TYPE_Q8_0:
        for (int b = 0; b < n / QK; b++, src += 2 + QK) {
            const float d = f16_to_f32(src);
            for (int i = 0; i < QK; i++) dst[b * QK + i] = d * (float)(int8_t)src[2 + i];
        }
        break;
    case KV_TYPE_Q4_0:
        for (int b = 0; b < n / QK; b++, src += 2 + QK / 2) {
            const float d = f16_to_f32(src);
            for (int i = 0; i < QK / 2; i++) {
                dst[b * QK + i] = d * (float)((src[2 + i] & 0x0F) - 8);
                dst[b * QK + i + QK / 2] = d * (float)((src[2 + i] >> 4) - 8);
            }
        }
        break;
    }
}

static float dot_plain(const float *a, const float *b, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static void axpy_plain(float a, const float *x, float *y, int n) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

// ---- AVX2 passes, specialised per element type (head_dim % 16 == 0) ----

#ifdef KV_X86
#define AVX2 __attribute__((target("avx2,fma,f16c"), always_inline)) static inline

// elements i .. i+15 of a row (i % 16 == 0, so one quantised block), widened
// to float in x[0] (i .. i+7) and x[1] (i+8 .. i+15)
AVX2 void load16(int type, const uint8_t *row, int i, __m256 x[2]) {
    switch (type) {
    case KV_TYPE_F16:
        x[0] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * i)));
        x[1] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * i + 16)));
        break;
    case KV_TYPE_Q8_0: {
        const uint8_t *b = row + i / QK * (2 + QK);
        const __m256 d = _mm256_set1_ps(f16_to_f32(b));
        const __m128i q = _mm_loadu_si128((const __m128i *)(b + 2 + i % QK));
        x[0] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
        x[1] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8))));
        break;
    }
    case KV_TYPE_Q4_0: {
        const uint8_t *b = row + i / QK * (2 + QK / 2);
        const __m256 d = _mm256_set1_ps(f16_to_f32(b));
        // the low nibbles hold elements 0..15 of the block, the high ones 16..31
        __m128i q = _mm_loadu_si128((const __m128i *)(b + 2));
        if (i % QK) q = _mm_srli_epi16(q, 4);
        q = _mm_sub_epi8(_mm_and_si128(q, _mm_set1_epi8(0x0F)), _mm_set1_epi8(8));
        x[0] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
        x[1] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8))));
        break;
    }
    default:
        x[0] = _mm256_loadu_ps((const float *)row + i);
        x[1] = _mm256_loadu_ps((const float *)row + i + 8);
    }
}

AVX2 float hsum(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    return _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)));
}

// s[k * n + j] = scale * q_k . K_j for nh (1 or 4) query heads q_k = q + k * d
AVX2 void scores_body(int type, int nh, const uint8_t *const *rows, int64_t n,
                      const float *q, int d, float scale, float *s) {
    for (int64_t j = 0; j < n; j++) {
        __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                       _mm256_setzero_ps()};
        __m256 b[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                       _mm256_setzero_ps()};
        for (int i = 0; i < d; i += 16) {
            __m256 x[2];
            load16(type, rows[j], i, x);
            for (int k = 0; k < nh; k++) {
                a[k] = _mm256_fmadd_ps(_mm256_loadu_ps(q + k * d + i), x[0], a[k]);
                b[k] = _mm256_fmadd_ps(_mm256_loadu_ps(q + k * d + i + 8), x[1], b[k]);
            }
        }
        for (int k = 0; k < nh; k++) s[k * n + j] = scale * hsum(_mm256_add_ps(a[k], b[k]));
    }
}

// out_k += sum_j p[k * n + j] V_j for nh (1 or 4) heads out_k = out + k * d;
// V rows are summed TILE at a time so the sums stay in registers
#define TILE 16
AVX2 void values_body(int type, int nh, const uint8_t *const *rows, int64_t n,
                      const float *p, int d, float *out) {
    for (int64_t j0 = 0; j0 < n; j0 += TILE) {
        const int64_t j1 = j0 + TILE < n ? j0 + TILE : n;
        for (int i = 0; i < d; i += 16) {
            __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                           _mm256_setzero_ps()};
            __m256 b[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                           _mm256_setzero_ps()};
            for (int64_t j = j0; j < j1; j++) {
                __m256 x[2];
                load16(type, rows[j], i, x);
                for (int k = 0; k < nh; k++) {
                    const __m256 pk = _mm256_set1_ps(p[k * n + j]);
                    a[k] = _mm256_fmadd_ps(pk, x[0], a[k]);
                    b[k] = _mm256_fmadd_ps(pk, x[1], b[k]);
                }
            }
            for (int k = 0; k < nh; k++) {
                float *o = out + k * d + i;
                _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), a[k]));
                _mm256_storeu_ps(o + 8, _mm256_add_ps(_mm256_loadu_ps(o + 8), b[k]));
            }
        }
    }
}

// one instance per (type, nh): the compiler keeps the sums in registers
#define KV_CASES(body, ...)                                                          \
    switch (type * 8 + nh) {                                                         \
    case KV_TYPE_F32 * 8 + 1: body(KV_TYPE_F32, 1, __VA_ARGS__); break;              \
    case KV_TYPE_F32 * 8 + 4: body(KV_TYPE_F32, 4, __VA_ARGS__); break;              \
    case KV_TYPE_F16 * 8 + 1: body(KV_TYPE_F16, 1, __VA_ARGS__); break;              \
    case KV_TYPE_F16 * 8 + 4: body(KV_TYPE_F16, 4, __VA_ARGS__); break;              \
    case KV_TYPE_Q8_0 * 8 + 1: body(KV_TYPE_Q8_0, 1, __VA_ARGS__); break;            \
    case KV_TYPE_Q8_0 * 8 + 4: body(KV_TYPE_Q8_0, 4, __VA_ARGS__); break;            \
    case KV_TYPE_Q4_0 * 8 + 1: body(KV_TYPE_Q4_0, 1, __VA_ARGS__); break;            \
    case KV_TYPE_Q4_0 * 8 + 4: body(KV_TYPE_Q4_0, 4, __VA_ARGS__); break;            \
    }

__attribute__((target("avx2,fma,f16c")))
static void scores_avx2(int type, int nh, const uint8_t *const *rows, int64_t n,
                        const float *q, int d, float scale, float *s) {
    KV_CASES(scores_body, rows, n, q, d, scale, s)
}

__attribute__((target("avx2,fma,f16c")))
static void values_avx2(int type, int nh, const uint8_t *const *rows, int64_t n,
                        const float *p, int d, float *out) {
    KV_CASES(values_body, rows, n, p, d, out)
}

// ---- AVX2 kernels of the tiled (prompt) path, on rows widened to float ----

AVX2 void widen_body(int type, const uint8_t *row, int d, float *dst) {
    for (int i = 0; i < d; i += 16) {
        __m256 x[2];
        load16(type, row, i, x);
        _mm256_storeu_ps(dst + i, x[0]);
        _mm256_storeu_ps(dst + i + 8, x[1]);
    }
}

__attribute__((target("avx2,fma,f16c")))
static void widen_avx2(int type, const uint8_t *row, int d, float *dst) {
    switch (type) {
    case KV_TYPE_F32: widen_body(KV_TYPE_F32, row, d, dst); break;
    case KV_TYPE_F16: widen_body(KV_TYPE_F16, row, d, dst); break;
    case KV_TYPE_Q8_0: widen_body(KV_TYPE_Q8_0, row, d, dst); break;
    case KV_TYPE_Q4_0: widen_body(KV_TYPE_Q4_0, row, d, dst); break;
    }
}

// n floats (n % 8 == 0) to f16, rounding to nearest even as a C cast does
__attribute__((target("avx2,fma,f16c")))
static void f16_from_f32_avx2(const float *x, int n, uint8_t *dst) {
    for (int i = 0; i < n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + 2 * i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
}

// s[r * KC + j] = q_r . k_j for r < nr, j < nc (both even counts: the
// callers pad), four query rows by two K rows at a time
__attribute__((target("avx2,fma,f16c")))
static void tile_scores_avx2(const float *q, int nr, const float *k, int nc, int d, float *s) {
    for (int r = 0; r < nr; r += 4)
        for (int j = 0; j < nc; j += 2) {
            __m256 a[4][2];
            for (int x = 0; x < 4; x++) a[x][0] = a[x][1] = _mm256_setzero_ps();
            for (int i = 0; i < d; i += 8) {
                const __m256 k0 = _mm256_loadu_ps(k + j * d + i);
                const __m256 k1 = _mm256_loadu_ps(k + (j + 1) * d + i);
                for (int x = 0; x < 4; x++) {
                    const __m256 qx = _mm256_loadu_ps(q + (r + x) * d + i);
                    a[x][0] = _mm256_fmadd_ps(qx, k0, a[x][0]);
                    a[x][1] = _mm256_fmadd_ps(qx, k1, a[x][1]);
                }
            }
            // the eight sums at once: lane 2x + y of t is the sum of a[x][y]
            const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0][0], a[0][1]),
                                             _mm256_hadd_ps(a[1][0], a[1][1]));
            const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a[2][0], a[2][1]),
                                             _mm256_hadd_ps(a[3][0], a[3][1]));
            float t[8];
            _mm256_storeu_ps(t, _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20),
                                              _mm256_permute2f128_ps(h0, h1, 0x31)));
            for (int x = 0; x < 4; x++) {
                s[(r + x) * KC + j] = t[2 * x];
                s[(r + x) * KC + j + 1] = t[2 * x + 1];
            }
        }
}

// e^x for x <= 0 (a softmax's shifted scores): 2^n e^f with n = round(x / ln 2),
// |f| <= ln 2 / 2, e^f by its Taylor series to f^6 (relative error < 2e-7);
// x below -87 gives about 1e-38 instead of 0, NaN stays NaN
AVX2 __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);  // ln 2, high bits
    f = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), f);      // and the rest
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}

// One streaming-softmax step of a query row over a chunk: s[j] becomes
// exp(s[j] - m) for jlo <= j < jhi and 0 for the other j < n (n % 8 == 0),
// after raising the running max m to the chunk's (o, d values, and the
// total l rescaled); l gains the chunk's sum
__attribute__((target("avx2,fma,f16c")))
static void softmax_row_avx2(float *s, int n, int64_t jlo, int64_t jhi, float *m, float *l,
                             float *o, int d) {
    const __m256i lo = _mm256_set1_epi32((int)jlo - 1), hi = _mm256_set1_epi32((int)jhi);
    __m256i in[KC / 8];
    __m256 mx = _mm256_set1_ps(-INFINITY);
    for (int j0 = 0; j0 < n; j0 += 8) {
        const __m256i j = _mm256_add_epi32(_mm256_set1_epi32(j0),
                                           _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        in[j0 / 8] = _mm256_and_si256(_mm256_cmpgt_epi32(j, lo), _mm256_cmpgt_epi32(hi, j));
        mx = _mm256_max_ps(mx, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_loadu_ps(s + j0),
                                                _mm256_castsi256_ps(in[j0 / 8])));
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    const float top = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    if (top > *m) {
        const __m256 alpha = _mm256_set1_ps(expf(*m - top));  // 0 the first time (m = -inf)
        for (int i = 0; i < d; i += 8)
            _mm256_storeu_ps(o + i, _mm256_mul_ps(alpha, _mm256_loadu_ps(o + i)));
        *l *= _mm256_cvtss_f32(alpha);
        *m = top;
    }
    const __m256 mv = _mm256_set1_ps(*m);
    __m256 sum = _mm256_setzero_ps();
    for (int j0 = 0; j0 < n; j0 += 8) {
        const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j0), mv)),
                                       _mm256_castsi256_ps(in[j0 / 8]));
        _mm256_storeu_ps(s + j0, e);
        sum = _mm256_add_ps(sum, e);
    }
    *l += hsum(sum);
}

// o_r += sum_j p[r * KC + j] v_j for r < nr (a multiple of 4), j < nc
__attribute__((target("avx2,fma,f16c")))
static void tile_values_avx2(const float *p, int nr, const float *v, int nc, int d, float *o) {
    for (int r = 0; r < nr; r += 4)
        for (int i = 0; i < d; i += 16) {
            __m256 a[4][2];
            for (int x = 0; x < 4; x++) {
                a[x][0] = _mm256_loadu_ps(o + (r + x) * d + i);
                a[x][1] = _mm256_loadu_ps(o + (r + x) * d + i + 8);
            }
            for (int j = 0; j < nc; j++) {
                const __m256 v0 = _mm256_loadu_ps(v + j * d + i);
                const __m256 v1 = _mm256_loadu_ps(v + j * d + i + 8);
                for (int x = 0; x < 4; x++) {
                    const __m256 px = _mm256_broadcast_ss(p + (r + x) * KC + j);
                    a[x][0] = _mm256_fmadd_ps(px, v0, a[x][0]);
                    a[x][1] = _mm256_fmadd_ps(px, v1, a[x][1]);
                }
            }
            for (int x = 0; x < 4; x++) {
                _mm256_storeu_ps(o + (r + x) * d + i, a[x][0]);
                _mm256_storeu_ps(o + (r + x) * d + i + 8, a[x][1]);
            }
        }
}
#endif

static int simd_allowed = -1;   // -1: not yet read from KVCELLS_NO_SIMD

void kv_allow_simd(int on) { simd_allowed = on != 0; }

static int have_avx2(int head_dim) {
    if (simd_allowed < 0) {
        const char *no_simd = getenv("KVCELLS_NO_SIMD");
        simd_allowed = !(no_simd && strcmp(no_simd, "1") == 0);
    }
#ifdef KV_X86
    __builtin_cpu_init();
    return simd_allowed && head_dim % 16 == 0 && __builtin_cpu_supports("avx2")
        && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

// ---- plain C passes ----

static void scores_plain(int type, int nh, const uint8_t *const *rows, int64_t n,
                         const float *q, int d, float scale, float *s, float *row) {
    for (int64_t j = 0; j < n; j++) {
        widen_plain(type, rows[j], d, row);
        for (int k = 0; k < nh; k++) s[k * n + j] = scale * dot_plain(q + k * d, row, d);
    }
}

static void values_plain(int type, int nh, const uint8_t *const *rows, int64_t n,
                         const float *p, int d, float *out, float *row) {
    for (int64_t j = 0; j < n; j++) {
        widen_plain(type, rows[j], d, row);
        for (int k = 0; k < nh; k++) axpy_plain(p[k * n + j], row, out + k * d, d);
    }
}

static void tile_scores_plain(const float *q, int nr, const float *k, int nc, int d, float *s) {
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < nc; j++) s[r * KC + j] = dot_plain(q + r * d, k + j * d, d);
}

static void tile_values_plain(const float *p, int nr, const float *v, int nc, int d, float *o) {
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < nc; j++) axpy_plain(p[r * KC + j], v + j * d, o + r * d, d);
}

// ---- quantising rows (ggml's reference rounding) ----

static void f32_to_f16(float x, uint8_t *p) {
    _Float16 h = (_Float16)x;
    memcpy(p, &h, 2);
}

static void quantize_q8_0(const float *x, uint8_t *b) {
    float amax = 0.0f;
    for (int i = 0; i < QK; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    f32_to_f16(d, b);
    for (int i = 0; i < QK; i++) b[2 + i] = (uint8_t)(int8_t)roundf(x[i] * id);
}

static void quantize_q4_0(const float *x, uint8_t *b) {
    float amax = 0.0f, max = 0.0f;  // max: the value of largest magnitude, first one
    for (int i = 0; i < QK; i++)
        if (fabsf(x[i]) > amax) amax = fabsf(x[i]), max = x[i];
    const float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    f32_to_f16(d, b);
    for (int i = 0; i < QK / 2; i++) {
        // x/d + 8.5 lies in [0.5, 16.5]: truncated, then clamped to 15
        const int lo = (int)(x[i] * id + 8.5f), hi = (int)(x[i + QK / 2] * id + 8.5f);
        b[2 + i] = (uint8_t)((lo < 15 ? lo : 15) | (hi < 15 ? hi : 15) << 4);
    }
}

int kv_quantize(int type, const float *x, int64_t n_rows, int n, uint8_t *out) {
    if ((type != KV_TYPE_Q8_0 && type != KV_TYPE_Q4_0) || n_rows < 0 || n <= 0 || n % QK)
        return KV_EINVAL;
    if (n_rows > 0 && (!x || !out)) return KV_EINVAL;
    const int64_t block = head_bytes(type, QK), n_blocks = n_rows * (n / QK);
    for (int64_t i = 0; i < n_blocks; i++) {
        if (type == KV_TYPE_Q8_0) quantize_q8_0(x + i * QK, out + i * block);
        else quantize_q4_0(x + i * QK, out + i * block);
    }
    return KV_OK;
}

// ---- re-rotating K rows after a shift ----

// a row of n values (whole blocks) widened to float, and back into its type
static void widen_row(int avx2, int type, const uint8_t *row, int n, float *x) {
#ifdef KV_X86
    if (avx2) {
        widen_avx2(type, row, n, x);
        return;
    }
#endif
    (void)avx2;
    widen_plain(type, row, n, x);
}

static void narrow(int avx2, int type, const float *x, int n, uint8_t *dst) {
    switch (type) {
    case KV_TYPE_F32: memcpy(dst, x, (size_t)n * 4); break;
    case KV_TYPE_F16:
#ifdef KV_X86
        if (avx2) {
            f16_from_f32_avx2(x, n, dst);
            break;
        }
#endif
        for (int i = 0; i < n; i++) f32_to_f16(x[i], dst + 2 * i);
        break;
    case KV_TYPE_Q8_0:
        for (int b = 0; b < n / QK; b++) quantize_q8_0(x + b * QK, dst + b * (2 + QK));
        break;
    case KV_TYPE_Q4_0:
        for (int b = 0; b < n / QK; b++) quantize_q4_0(x + b * QK, dst + b * (2 + QK / 2));
        break;
    }
}

int kv_rope_shift(int type, uint8_t *const *rows, int n_layers, int64_t n_rows, int n_head,
                  int head_dim, const int32_t *cells, const int32_t *delta, int64_t n,
                  double base, double freq_scale, int neox) {
    if (head_bytes(type, head_dim) < 0 || head_dim <= 0 || head_dim % 2 || n_head <= 0
        || n_layers < 0 || n_rows < 0 || n < 0 || !(base > 0.0))
        return KV_EINVAL;
    if (type >= KV_TYPE_Q8_0 && head_dim % QK) return KV_EINVAL;
    if ((n > 0 && (!cells || !delta)) || (n_layers > 0 && !rows)) return KV_EINVAL;
    for (int l = 0; l < n_layers; l++)
        if (!rows[l]) return KV_EINVAL;
    for (int64_t i = 0; i < n; i++)
        if (cells[i] < 0 || cells[i] >= n_rows) return KV_EINVAL;
    const int half = head_dim / 2, width = n_head * head_dim, avx2 = have_avx2(head_dim);
    const int64_t row_bytes = head_bytes(type, head_dim) * n_head;
    double *inv_freq = malloc(sizeof(double) * (size_t)half);
    float *cs = malloc(sizeof(float) * (size_t)head_dim), *x = malloc(sizeof(float) * (size_t)width);
    if (!inv_freq || !cs || !x) {
        free(inv_freq), free(cs), free(x);
        return KV_ENOMEM;
    }
    // the angles as kvcells.rope computes them: float64, cos/sin rounded to float
    for (int p = 0; p < half; p++) inv_freq[p] = pow(base, -(double)(2 * p) / head_dim);
    int32_t angles_of = 0;  // the delta cs holds the angles of (0: none yet)
    for (int64_t i = 0; i < n; i++) {
        if (delta[i] == 0) continue;
        if (delta[i] != angles_of) {
            for (int p = 0; p < half; p++) {
                const double theta = (double)delta[i] * freq_scale * inv_freq[p];
                cs[p] = (float)cos(theta), cs[half + p] = (float)sin(theta);
            }
            angles_of = delta[i];
        }
        for (int l = 0; l < n_layers; l++) {
            uint8_t *row = rows[l] + cells[i] * row_bytes;
            widen_row(avx2, type, row, width, x);
            for (int h = 0; h < n_head; h++) {
                float *xh = x + h * head_dim;
                for (int p = 0; p < half; p++) {
                    float *a = neox ? xh + p : xh + 2 * p, *b = neox ? xh + half + p : xh + 2 * p + 1;
                    const float c = cs[p], sn = cs[half + p], ra = *a * c - *b * sn;
                    *b = *a * sn + *b * c;
                    *a = ra;
                }
            }
            narrow(avx2, type, x, width, row);
        }
    }
    free(inv_freq);
    free(cs);
    free(x);
    return KV_OK;
}

// ---- attention ----
//
// A work unit is one (token, kv head) item, or a part of its cells when there
// are fewer items than threads (one long sequence decoding): each part then
// leaves unnormalised sums with their max and total, merged at the end.

typedef struct {
    int type_k, type_v, n_head_kv, head_dim, n_head, avx2, n_split;
    const uint8_t *k, *v;
    int64_t row_k, row_v, hb_k, hb_v;
    const int32_t *cells;
    const int32_t *lo, *hi;
    const float *q;
    float scale;
    float *out;
    float *parts;          // split items: per unit g*d sums, g maxima, g totals
    int64_t unit0, unit1;  // this thread's units [unit0, unit1)
    float *scores;         // scratch: 4 * (longest visible list)
    const uint8_t **rows;  // scratch: 2 * (longest visible list)
    float *row;            // scratch: head_dim
    float *stats;          // scratch: 2 * g (maxima, totals of an unsplit item)
} job;

// s[j] = exp(s[j] - max); returns the total, the max in *mx
static float exp_scores(float *s, int64_t n, float *mx) {
    float m = s[0], sum = 0.0f;
    for (int64_t j = 1; j < n; j++) m = s[j] > m ? s[j] : m;
    for (int64_t j = 0; j < n; j++) {
        s[j] = expf(s[j] - m);
        sum += s[j];
    }
    *mx = m;
    return sum;
}

// o (g x d) = sum_j exp(score_j - m) V_j over cells[0..n) for the g query
// heads of kv head h, with m (maxima) and l (totals) per head
static void attend_cells(job *jb, int t, int h, const int32_t *cells, int64_t n,
                         float *o, float *m, float *l) {
    const int g = jb->n_head / jb->n_head_kv, d = jb->head_dim;
    const float *q = jb->q + ((int64_t)t * jb->n_head + (int64_t)h * g) * d;
    const uint8_t **krows = jb->rows, **vrows = jb->rows + n;

    memset(o, 0, sizeof(float) * (size_t)g * d);
    for (int k = 0; k < g; k++) m[k] = -INFINITY, l[k] = 0.0f;
    if (n == 0) return;
    for (int64_t j = 0; j < n; j++) {
        krows[j] = jb->k + cells[j] * jb->row_k + h * jb->hb_k;
        vrows[j] = jb->v + cells[j] * jb->row_v + h * jb->hb_v;
    }
    // four query heads at a time (then one at a time)
    for (int g0 = 0; g0 < g;) {
        const int nh = g - g0 >= 4 ? 4 : 1;
#ifdef KV_X86
        if (jb->avx2) scores_avx2(jb->type_k, nh, krows, n, q + g0 * d, d, jb->scale, jb->scores);
        else
#endif
            scores_plain(jb->type_k, nh, krows, n, q + g0 * d, d, jb->scale, jb->scores, jb->row);
        for (int k = 0; k < nh; k++) l[g0 + k] = exp_scores(jb->scores + k * n, n, &m[g0 + k]);
#ifdef KV_X86
        if (jb->avx2) values_avx2(jb->type_v, nh, vrows, n, jb->scores, d, o + g0 * d);
        else
#endif
            values_plain(jb->type_v, nh, vrows, n, jb->scores, d, o + g0 * d, jb->row);
        g0 += nh;
    }
}

static void attend_unit(job *jb, int64_t u) {
    const int g = jb->n_head / jb->n_head_kv, d = jb->head_dim;
    const int64_t item = u / jb->n_split, part = u % jb->n_split;
    const int t = (int)(item / jb->n_head_kv), h = (int)(item % jb->n_head_kv);
    const int64_t n = (int64_t)jb->hi[t] - jb->lo[t];
    const int64_t j0 = n * part / jb->n_split, j1 = n * (part + 1) / jb->n_split;
    const int32_t *cells = jb->cells + jb->lo[t] + j0;
    if (jb->n_split > 1) {
        float *o = jb->parts + u * (int64_t)g * (d + 2);
        attend_cells(jb, t, h, cells, j1 - j0, o, o + g * d, o + g * d + g);
        return;
    }
    float *o = jb->out + ((int64_t)t * jb->n_head + (int64_t)h * g) * d;
    attend_cells(jb, t, h, cells, j1 - j0, o, jb->stats, jb->stats + g);
    for (int k = 0; k < g; k++)
        for (int i = 0; jb->stats[g + k] > 0.0f && i < d; i++) o[k * d + i] /= jb->stats[g + k];
}

static void *run_job(void *arg) {
    job *jb = arg;
    for (int64_t u = jb->unit0; u < jb->unit1; u++) attend_unit(jb, u);
    return NULL;
}

// out = sum_p exp(m_p - M) o_p / sum_p exp(m_p - M) l_p over the parts of each item
static void merge_parts(const job *jb, int64_t n_items) {
    const int g = jb->n_head / jb->n_head_kv, d = jb->head_dim;
    const int64_t stride = (int64_t)g * (d + 2);
    for (int64_t item = 0; item < n_items; item++) {
        const int t = (int)(item / jb->n_head_kv), h = (int)(item % jb->n_head_kv);
        float *out = jb->out + ((int64_t)t * jb->n_head + (int64_t)h * g) * d;
        const float *first = jb->parts + item * jb->n_split * stride;
        for (int k = 0; k < g; k++) {
            float mx = -INFINITY, total = 0.0f;
            for (int p = 0; p < jb->n_split; p++) {
                const float mp = first[p * stride + g * d + k];
                mx = mp > mx ? mp : mx;
            }
            memset(out + k * d, 0, sizeof(float) * (size_t)d);
            for (int p = 0; p < jb->n_split; p++) {
                const float *o = first + p * stride;
                if (o[g * d + g + k] == 0.0f) continue;  // a part with no cells
                const float w = expf(o[g * d + k] - mx);
                total += w * o[g * d + g + k];
                for (int i = 0; i < d; i++) out[k * d + i] += w * o[k * d + i];
            }
            for (int i = 0; total > 0.0f && i < d; i++) out[k * d + i] /= total;
        }
    }
}

// ---- attention, tiled: the prompt path ----
//
// Consecutive tokens whose cell ranges overlap (a prompt's tokens: nested or
// sliding ranges of one sequence's cells) form blocks of up to QB tokens. An
// item is (block, kv head): its g * QB query rows go over the union of their
// ranges KC cells at a time; each chunk of K and V rows is widened once for
// all of them, and a streaming softmax keeps per row a running max m, total l
// and unnormalised sum o, rescaled when m grows.

typedef struct {
    const job *jb;
    const int32_t *block;     // block b holds tokens [block[b], block[b + 1])
    const int64_t *unit_item, *unit_seg;  // work unit u: (item, segment)
    int64_t n_units, part_floats;
    float *parts;             // per unit: o (rows x d), m (rows), l (rows)
    int tid, n_threads;       // this thread takes units tid, tid + n_threads, ...
    float *q, *o, *m, *l, *s, *kc, *vc;  // scratch, rows padded to a multiple of 4
    int32_t *lo, *hi;
} tile_job;

static void widen(const job *jb, int type, const uint8_t *row, float *dst) {
#ifdef KV_X86
    if (jb->avx2) {
        widen_avx2(type, row, jb->head_dim, dst);
        return;
    }
#endif
    widen_plain(type, row, jb->head_dim, dst);
}

// the chunk's scores of row r (cells c0 + j, j < nc) turned into
// exp(s - m) in place, zero where the row may not look; rescales o, l
static void softmax_chunk(tile_job *tj, int r, int64_t c0, int nc, int nc2) {
    const int d = tj->jb->head_dim;
    float *s = tj->s + r * KC, *o = tj->o + r * d;
    const int64_t jlo = tj->lo[r] - c0 > 0 ? tj->lo[r] - c0 : 0;
    const int64_t jhi = tj->hi[r] - c0 < nc ? tj->hi[r] - c0 : nc;
#ifdef KV_X86
    if (tj->jb->avx2) {
        softmax_row_avx2(s, (nc2 + 7) / 8 * 8, jlo, jhi, &tj->m[r], &tj->l[r], o, d);
        return;
    }
#endif
    float mx = -INFINITY, sum = 0.0f;
    for (int64_t j = jlo; j < jhi; j++) mx = s[j] > mx ? s[j] : mx;
    if (mx > tj->m[r]) {
        const float alpha = expf(tj->m[r] - mx);  // 0 the first time (m = -inf)
        for (int i = 0; i < d; i++) o[i] *= alpha;
        tj->l[r] *= alpha;
        tj->m[r] = mx;
    }
    for (int j = 0; j < nc2; j++) {
        s[j] = j >= jlo && j < jhi ? expf(s[j] - tj->m[r]) : 0.0f;
        sum += s[j];
    }
    tj->l[r] += sum;
}

// the block's union of ranges [*u0, *u1) (empty: *u0 >= *u1)
static void block_union(const job *jb, const int32_t *block, int b, int64_t *u0, int64_t *u1) {
    *u0 = INT64_MAX, *u1 = 0;
    for (int t = block[b]; t < block[b + 1]; t++)
        if (jb->lo[t] < jb->hi[t]) {
            *u0 = jb->lo[t] < *u0 ? jb->lo[t] : *u0;
            *u1 = jb->hi[t] > *u1 ? jb->hi[t] : *u1;
        }
}

// The partial softmax sums (o, m, l) of an item's rows over the cells of one
// segment [seg * SEG, (seg + 1) * SEG) of the list.
static void tile_unit(tile_job *tj, int64_t item, int64_t seg, float *part) {
    const job *jb = tj->jb;
    const int g = jb->n_head / jb->n_head_kv, d = jb->head_dim;
    const int b = (int)(item / jb->n_head_kv), h = (int)(item % jb->n_head_kv);
    const int t0 = tj->block[b], nt = tj->block[b + 1] - t0;
    const int nr = nt * g, nr4 = (nr + 3) / 4 * 4;
    int64_t u0, u1;
    block_union(jb, tj->block, b, &u0, &u1);
    u0 = u0 > seg * SEG ? u0 : seg * SEG;
    u1 = u1 < (seg + 1) * SEG ? u1 : (seg + 1) * SEG;
    tj->o = part, tj->m = part + (int64_t)nr4 * d, tj->l = tj->m + nr4;
    for (int r = 0; r < nr4; r++) {
        const int t = t0 + r / g;
        float *qr = tj->q + r * d;
        tj->lo[r] = tj->hi[r] = 0;
        if (r < nr) {
            const float *src = jb->q + ((int64_t)t * jb->n_head + (int64_t)h * g + r % g) * d;
            for (int i = 0; i < d; i++) qr[i] = jb->scale * src[i];
            tj->lo[r] = jb->lo[t], tj->hi[r] = jb->hi[t];
        } else {
            memset(qr, 0, sizeof(float) * (size_t)d);
        }
        tj->m[r] = -INFINITY, tj->l[r] = 0.0f;
    }
    memset(tj->o, 0, sizeof(float) * (size_t)nr4 * d);
    // Chunks start at multiples of KC (segments at multiples of SEG) of the
    // list, so a row meets the same chunks, and gets the same bits, in
    // whatever block it is; rows outside the block's union are zeros (their
    // weight is 0, and 0 * a finite row adds exactly nothing)
    for (int64_t c0 = u0 / KC * KC; c0 < u1; c0 += KC) {
        const int nc = (int)(u1 - c0 < KC ? u1 - c0 : KC), nc2 = (nc + 1) / 2 * 2;
        for (int j = 0; j < nc2; j++) {
            if (c0 + j < u0 || j >= nc) {
                memset(tj->kc + j * d, 0, sizeof(float) * (size_t)d);
                memset(tj->vc + j * d, 0, sizeof(float) * (size_t)d);
                continue;
            }
            const int64_t cell = jb->cells[c0 + j];
            widen(jb, jb->type_k, jb->k + cell * jb->row_k + h * jb->hb_k, tj->kc + j * d);
            widen(jb, jb->type_v, jb->v + cell * jb->row_v + h * jb->hb_v, tj->vc + j * d);
        }
#ifdef KV_X86
        if (jb->avx2) tile_scores_avx2(tj->q, nr4, tj->kc, nc2, d, tj->s);
        else
#endif
            tile_scores_plain(tj->q, nr4, tj->kc, nc2, d, tj->s);
        for (int r = 0; r < nr4; r++) softmax_chunk(tj, r, c0, nc, nc2);
#ifdef KV_X86
        if (jb->avx2) tile_values_avx2(tj->s, nr4, tj->vc, nc2, d, tj->o);
        else
#endif
            tile_values_plain(tj->s, nr4, tj->vc, nc2, d, tj->o);
    }
}

static void *run_tiles(void *arg) {
    tile_job *tj = arg;
    for (int64_t u = tj->tid; u < tj->n_units; u += tj->n_threads)
        tile_unit(tj, tj->unit_item[u], tj->unit_seg[u], tj->parts + u * tj->part_floats);
    return NULL;
}

// out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s over an item's
// segments, in order
static void merge_segments(const job *jb, const int32_t *block, int64_t item,
                           const float *parts, int64_t n_segs, int64_t part_floats) {
    const int g = jb->n_head / jb->n_head_kv, d = jb->head_dim;
    const int b = (int)(item / jb->n_head_kv), h = (int)(item % jb->n_head_kv);
    const int t0 = block[b], nr = (block[b + 1] - t0) * g, nr4 = (nr + 3) / 4 * 4;
    for (int r = 0; r < nr; r++) {
        float *out = jb->out + ((int64_t)(t0 + r / g) * jb->n_head + (int64_t)h * g + r % g) * d;
        float mx = -INFINITY, total = 0.0f;
        for (int64_t sg = 0; sg < n_segs; sg++) {
            const float m = parts[sg * part_floats + (int64_t)nr4 * d + r];
            mx = m > mx ? m : mx;
        }
        memset(out, 0, sizeof(float) * (size_t)d);
        for (int64_t sg = 0; sg < n_segs; sg++) {
            const float *o = parts + sg * part_floats + (int64_t)r * d;
            const float m = parts[sg * part_floats + (int64_t)nr4 * d + r];
            if (m == -INFINITY) continue;  // no cell of this row in the segment
            const float w = expf(m - mx);  // 1 for a row in one segment
            total += w * parts[sg * part_floats + (int64_t)nr4 * (d + 1) + r];
            for (int i = 0; i < d; i++) out[i] += w * o[i];
        }
        const float inv = total > 0.0f ? 1.0f / total : 0.0f;
        for (int i = 0; i < d; i++) out[i] *= inv;
    }
}

// Splits the tokens into blocks of at most max_len tokens whose ranges
// overlap (a token that sees nothing joins any block); returns their number.
static int make_blocks(int n_tokens, const int32_t *lo, const int32_t *hi, int max_len,
                       int32_t *block) {
    int n = 0;
    int64_t u0 = 0, u1 = 0;  // the current block's union, empty at first
    for (int t = 0; t < n_tokens; t++) {
        const int empty = lo[t] >= hi[t];
        const int joins = n > 0 && t - block[n - 1] < max_len
                          && (empty || u0 >= u1 || (lo[t] < u1 && hi[t] > u0));
        if (!joins) block[n++] = t, u0 = u1 = 0;
        if (!empty && u0 >= u1) u0 = lo[t], u1 = hi[t];
        else if (!empty) u0 = lo[t] < u0 ? lo[t] : u0, u1 = hi[t] > u1 ? hi[t] : u1;
    }
    block[n] = n_tokens;
    return n;
}

static int attend_tiled(const job *proto, const int32_t *block, int n_blocks, int n_threads) {
    const int g = proto->n_head / proto->n_head_kv, d = proto->head_dim;
    const int64_t rows = (QB * g + 3) / 4 * 4, part_floats = rows * (d + 2);
    const int64_t n_items = (int64_t)n_blocks * proto->n_head_kv;
    // the units: each item's segments, in order; first[item] is its first unit
    int64_t *first = malloc(sizeof(int64_t) * (size_t)(n_items + 1)), n_units = 0;
    if (!first) return KV_ENOMEM;
    for (int64_t item = 0; item < n_items; item++) {
        int64_t u0, u1;
        block_union(proto, block, (int)(item / proto->n_head_kv), &u0, &u1);
        first[item] = n_units;
        n_units += u0 < u1 ? (u1 - 1) / SEG - u0 / SEG + 1 : 1;
    }
    first[n_items] = n_units;
    int64_t *unit_item = malloc(sizeof(int64_t) * (size_t)n_units);
    int64_t *unit_seg = malloc(sizeof(int64_t) * (size_t)n_units);
    float *parts = malloc(sizeof(float) * (size_t)(n_units * part_floats));
    tile_job *tjs = calloc((size_t)n_threads, sizeof(tile_job));
    pthread_t *tids = calloc((size_t)n_threads, sizeof(pthread_t));
    int status = unit_item && unit_seg && parts && tjs && tids ? KV_OK : KV_ENOMEM;
    for (int64_t item = 0; status == KV_OK && item < n_items; item++) {
        int64_t u0, u1;
        block_union(proto, block, (int)(item / proto->n_head_kv), &u0, &u1);
        for (int64_t u = first[item]; u < first[item + 1]; u++)
            unit_item[u] = item, unit_seg[u] = (u0 < u1 ? u0 / SEG : 0) + (u - first[item]);
    }
    for (int i = 0; status == KV_OK && i < n_threads; i++) {
        tile_job *tj = &tjs[i];
        tj->jb = proto, tj->block = block, tj->tid = i, tj->n_threads = n_threads;
        tj->unit_item = unit_item, tj->unit_seg = unit_seg, tj->n_units = n_units;
        tj->parts = parts, tj->part_floats = part_floats;
        tj->q = malloc(sizeof(float) * (size_t)(rows * d));
        tj->s = calloc((size_t)(rows * KC), sizeof(float));  // read to a multiple of 8
        tj->kc = malloc(sizeof(float) * (size_t)(KC * d));
        tj->vc = malloc(sizeof(float) * (size_t)(KC * d));
        tj->lo = malloc(sizeof(int32_t) * (size_t)rows);
        tj->hi = malloc(sizeof(int32_t) * (size_t)rows);
        if (!tj->q || !tj->s || !tj->kc || !tj->vc || !tj->lo || !tj->hi) status = KV_ENOMEM;
    }
    if (status == KV_OK) {
        int started = 1;
        for (; started < n_threads; started++)
            if (pthread_create(&tids[started], NULL, run_tiles, &tjs[started]) != 0) break;
        run_tiles(&tjs[0]);
        for (int i = started; i < n_threads; i++) run_tiles(&tjs[i]);
        for (int i = 1; i < started; i++) pthread_join(tids[i], NULL);
        for (int64_t item = 0; item < n_items; item++)
            merge_segments(proto, block, item, parts + first[item] * part_floats,
                           first[item + 1] - first[item], part_floats);
    }
    for (int i = 0; tjs && i < n_threads; i++) {
        tile_job *tj = &tjs[i];
        free(tj->q), free(tj->s), free(tj->kc), free(tj->vc), free(tj->lo), free(tj->hi);
    }
    free(tjs), free(tids), free(parts), free(unit_item), free(unit_seg), free(first);
    return status;
}

static int kv_path = KV_PATH_TILE;

void kv_force_path(int path) { kv_path = path; }

static int valid_args(int type_k, const uint8_t *k, int type_v, const uint8_t *v,
                      int64_t n_rows, int n_head_kv, int head_dim,
                      const int32_t *cells, int64_t n_list, int n_tokens,
                      const int32_t *lo, const int32_t *hi, const float *q, int n_head,
                      const float *out) {
    if (head_bytes(type_k, head_dim) < 0 || head_bytes(type_v, head_dim) < 0) return 0;
    if (n_rows < 0 || n_head_kv <= 0 || head_dim <= 0 || n_list < 0 || n_tokens < 0) return 0;
    if (n_head <= 0 || n_head % n_head_kv != 0) return 0;
    if ((type_k >= KV_TYPE_Q8_0 || type_v >= KV_TYPE_Q8_0) && head_dim % QK != 0) return 0;
    if (n_tokens > 0 && (!lo || !hi || !q || !out)) return 0;
    if (n_list > 0 && !cells) return 0;
    if (n_rows > 0 && (!k || !v)) return 0;
    for (int64_t j = 0; j < n_list; j++)
        if (cells[j] < 0 || cells[j] >= n_rows) return 0;
    for (int t = 0; t < n_tokens; t++)
        if (lo[t] < 0 || lo[t] > hi[t] || hi[t] > n_list) return 0;
    return 1;
}

static int attend_tokens(const job *proto, int n_tokens, int n_threads, int64_t longest) {
    const int64_t n_items = (int64_t)n_tokens * proto->n_head_kv;
    const int n_split = n_items < n_threads ? (int)((n_threads + n_items - 1) / n_items) : 1;
    const int64_t n_units = n_items * n_split;
    const int g = proto->n_head / proto->n_head_kv;

    job *jobs = calloc((size_t)n_threads, sizeof(job));
    pthread_t *tids = calloc((size_t)n_threads, sizeof(pthread_t));
    float *parts = n_split > 1
        ? malloc(sizeof(float) * (size_t)(n_units * g * (proto->head_dim + 2))) : NULL;
    int status = jobs && tids && (n_split == 1 || parts) ? KV_OK : KV_ENOMEM;
    for (int i = 0; status == KV_OK && i < n_threads; i++) {
        job *jb = &jobs[i];
        *jb = *proto;
        jb->n_split = n_split, jb->parts = parts;
        jb->unit0 = n_units * i / n_threads, jb->unit1 = n_units * (i + 1) / n_threads;
        jb->scores = malloc(sizeof(float) * (size_t)(4 * longest));
        jb->rows = malloc(sizeof(uint8_t *) * (size_t)(2 * longest));
        jb->row = malloc(sizeof(float) * (size_t)proto->head_dim);
        jb->stats = malloc(sizeof(float) * (size_t)(2 * g));
        if (!jb->scores || !jb->rows || !jb->row || !jb->stats) status = KV_ENOMEM;
    }
    if (status == KV_OK) {
        int started = 1;
        for (; started < n_threads; started++)
            if (pthread_create(&tids[started], NULL, run_job, &jobs[started]) != 0) break;
        run_job(&jobs[0]);
        for (int i = started; i < n_threads; i++) run_job(&jobs[i]);  // threads that did not start
        for (int i = 1; i < started; i++) pthread_join(tids[i], NULL);
        if (n_split > 1) merge_parts(&jobs[0], n_items);
    }
    for (int i = 0; jobs && i < n_threads; i++) {
        free(jobs[i].scores);
        free(jobs[i].rows);
        free(jobs[i].row);
        free(jobs[i].stats);
    }
    free(jobs);
    free(tids);
    free(parts);
    return status;
}

int kv_attend(int type_k, const uint8_t *k, int type_v, const uint8_t *v,
              int64_t n_rows, int n_head_kv, int head_dim,
              const int32_t *cells, int64_t n_list,
              int n_tokens, const int32_t *lo, const int32_t *hi,
              const float *q, int n_head, float scale, float *out,
              int n_threads) {
    if (!valid_args(type_k, k, type_v, v, n_rows, n_head_kv, head_dim, cells, n_list,
                    n_tokens, lo, hi, q, n_head, out))
        return KV_EINVAL;
    int64_t longest = 1, visits = 0;
    for (int t = 0; t < n_tokens; t++) {
        if (hi[t] - lo[t] > longest) longest = hi[t] - lo[t];
        visits += (int64_t)(hi[t] - lo[t]) * n_head_kv;
    }
    // a thread is worth starting for about a millisecond of work or more
    if (n_threads > visits / CELLS_PER_THREAD + 1) n_threads = (int)(visits / CELLS_PER_THREAD + 1);
    if (n_threads < 1 || n_tokens == 0) n_threads = 1;

    job proto = {0};
    proto.type_k = type_k, proto.type_v = type_v, proto.n_head_kv = n_head_kv;
    proto.head_dim = head_dim, proto.n_head = n_head, proto.avx2 = have_avx2(head_dim);
    proto.k = k, proto.v = v, proto.cells = cells, proto.lo = lo, proto.hi = hi, proto.q = q;
    proto.hb_k = head_bytes(type_k, head_dim), proto.hb_v = head_bytes(type_v, head_dim);
    proto.row_k = proto.hb_k * n_head_kv, proto.row_v = proto.hb_v * n_head_kv;
    proto.scale = scale, proto.out = out;
    if (kv_path == KV_PATH_TOKEN || n_tokens == 0)
        return attend_tokens(&proto, n_tokens, n_threads, longest);

    // blocks of tokens, smaller ones when there would be fewer items than threads
    int32_t *block = malloc(sizeof(int32_t) * ((size_t)n_tokens + 1));
    if (!block) return KV_ENOMEM;
    int max_len = QB, n_blocks = make_blocks(n_tokens, lo, hi, max_len, block);
    while (max_len > 1 && (int64_t)n_blocks * n_head_kv < n_threads)
        n_blocks = make_blocks(n_tokens, lo, hi, max_len /= 2, block);
    const int status = attend_tiled(&proto, block, n_blocks, n_threads);
    free(block);
    return status;
}
