// Attention over the K/V rows of a list of cells, for f32, f16, q8_0 and
// q4_0 storage, and the K-shift's re-rotation of stored rows.
// Blocks of query tokens whose ranges overlap go over chunks of cells, each
// K/V row widened once for all of a block's query rows, with a streaming
// softmax; batch-invariant (see kv.h). The work units run on the thread
// pool. The AVX2/FMA/F16C and AVX-512 kernels, specialised per element
// type, are chosen at run time; the plain C ones are the reference.
#include "kv.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "exp8.h"
#include "pool.h"
#include "quants.h"
#include "simd.h"

#define QK 32
#define CELLS_PER_THREAD 16384
#define QB 16  // query tokens per block
#define KC 32  // cells per chunk
#define SEG KV_SEGMENT  // cells per segment: the unit of work along a row

// bytes of one head's row, 0 when the type cannot hold head_dim values
static int64_t head_bytes(int type, int head_dim) {
    if (type != KVC_TYPE_F32 && type != KVC_TYPE_F16 && type != KVC_TYPE_Q8_0
        && type != KVC_TYPE_Q4_0)
        return 0;
    return type_row_bytes(type, head_dim);
}

static float dot_plain(const float *a, const float *b, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static void axpy_plain(float a, const float *x, float *y, int n) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

// ---- AVX2 kernels, specialised per element type (head_dim % 16 == 0) ----

#ifdef KVC_X86
#define AVX2 TARGET_AVX2 __attribute__((always_inline)) static inline

// a block's f16 scale
AVX2 float scale_of(const uint8_t *block) {
    uint16_t h;
    memcpy(&h, block, 2);
    return _cvtsh_ss(h);
}

// elements i .. i+15 of a row (i % 16 == 0, so one quantised block), widened
// to float in x[0] (i .. i+7) and x[1] (i+8 .. i+15)
AVX2 void load16(int type, const uint8_t *row, int i, __m256 x[2]) {
    switch (type) {
    case KVC_TYPE_F16:
        x[0] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * i)));
        x[1] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * i + 16)));
        break;
    case KVC_TYPE_Q8_0: {
        const uint8_t *b = row + i / QK * (2 + QK);
        const __m256 d = _mm256_set1_ps(scale_of(b));
        const __m128i q = _mm_loadu_si128((const __m128i *)(b + 2 + i % QK));
        x[0] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
        x[1] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8))));
        break;
    }
    case KVC_TYPE_Q4_0: {
        const uint8_t *b = row + i / QK * (2 + QK / 2);
        const __m256 d = _mm256_set1_ps(scale_of(b));
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

// ---- AVX2 kernels on rows widened to float ----

AVX2 void widen_body(int type, const uint8_t *row, int d, float *dst) {
    for (int i = 0; i < d; i += 16) {
        __m256 x[2];
        load16(type, row, i, x);
        _mm256_storeu_ps(dst + i, x[0]);
        _mm256_storeu_ps(dst + i + 8, x[1]);
    }
}

TARGET_AVX2
static void widen_avx2(int type, const uint8_t *row, int d, float *dst) {
    switch (type) {
    case KVC_TYPE_F32: widen_body(KVC_TYPE_F32, row, d, dst); break;
    case KVC_TYPE_F16: widen_body(KVC_TYPE_F16, row, d, dst); break;
    case KVC_TYPE_Q8_0: widen_body(KVC_TYPE_Q8_0, row, d, dst); break;
    case KVC_TYPE_Q4_0: widen_body(KVC_TYPE_Q4_0, row, d, dst); break;
    }
}

// n floats (n % 8 == 0) to f16, rounding to nearest even as a C cast does
TARGET_AVX2
static void f16_from_f32_avx2(const float *x, int n, uint8_t *dst) {
    for (int i = 0; i < n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + 2 * i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
}

// s[x * KC + y] = the sum of a[x][y]'s lanes, the eight sums at once: lane
// 2x + y of t is the sum of a[x][y]
AVX2 void store_sums(__m256 a[4][2], float *s) {
    const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0][0], a[0][1]),
                                     _mm256_hadd_ps(a[1][0], a[1][1]));
    const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a[2][0], a[2][1]),
                                     _mm256_hadd_ps(a[3][0], a[3][1]));
    float t[8];
    _mm256_storeu_ps(t, _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20),
                                      _mm256_permute2f128_ps(h0, h1, 0x31)));
    for (int x = 0; x < 4; x++) s[x * KC] = t[2 * x], s[x * KC + 1] = t[2 * x + 1];
}

// s[r * KC + j] = q_r . k_j for r < nr, j < nc (both even counts: the
// callers pad), four query rows by two K rows at a time
TARGET_AVX2
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
            store_sums(a, s + r * KC + j);
        }
}

// One streaming-softmax step of a query row over a chunk: s[j] becomes
// exp(s[j] - m) for jlo <= j < jhi and 0 for the other j < n (n % 8 == 0),
// after raising the running max m to the chunk's (o, d values, and the
// total l rescaled); l gains the chunk's sum
TARGET_AVX2
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
TARGET_AVX2
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

// ---- AVX-512 kernels: the same, 16 floats a vector (head_dim % 16 == 0) ----

#define AVX512 TARGET_AVX512 __attribute__((always_inline)) static inline

// elements i .. i+15 of a row (i % 16 == 0), as load16 gives them
AVX512 __m512 load16_avx512(int type, const uint8_t *row, int i) {
    switch (type) {
    case KVC_TYPE_F16:
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + 2 * i)));
    case KVC_TYPE_Q8_0: {
        const uint8_t *b = row + i / QK * (2 + QK);
        const __m128i q = _mm_loadu_si128((const __m128i *)(b + 2 + i % QK));
        return _mm512_mul_ps(_mm512_set1_ps(scale_of(b)), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)));
    }
    case KVC_TYPE_Q4_0: {
        const uint8_t *b = row + i / QK * (2 + QK / 2);
        __m128i q = _mm_loadu_si128((const __m128i *)(b + 2));
        if (i % QK) q = _mm_srli_epi16(q, 4);
        q = _mm_sub_epi8(_mm_and_si128(q, _mm_set1_epi8(0x0F)), _mm_set1_epi8(8));
        return _mm512_mul_ps(_mm512_set1_ps(scale_of(b)), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)));
    }
    default:
        return _mm512_loadu_ps((const float *)row + i);
    }
}

AVX512 void widen_body_avx512(int type, const uint8_t *row, int d, float *dst) {
    for (int i = 0; i < d; i += 16) _mm512_storeu_ps(dst + i, load16_avx512(type, row, i));
}

TARGET_AVX512
static void widen_avx512(int type, const uint8_t *row, int d, float *dst) {
    switch (type) {
    case KVC_TYPE_F32: widen_body_avx512(KVC_TYPE_F32, row, d, dst); break;
    case KVC_TYPE_F16: widen_body_avx512(KVC_TYPE_F16, row, d, dst); break;
    case KVC_TYPE_Q8_0: widen_body_avx512(KVC_TYPE_Q8_0, row, d, dst); break;
    case KVC_TYPE_Q4_0: widen_body_avx512(KVC_TYPE_Q4_0, row, d, dst); break;
    }
}

// tile_scores_avx2's tile, the eight sums folded to 8 lanes before adding up
TARGET_AVX512
static void tile_scores_avx512(const float *q, int nr, const float *k, int nc, int d, float *s) {
    for (int r = 0; r < nr; r += 4)
        for (int j = 0; j < nc; j += 2) {
            __m512 a[4][2];
            for (int x = 0; x < 4; x++) a[x][0] = a[x][1] = _mm512_setzero_ps();
            for (int i = 0; i < d; i += 16) {
                const __m512 k0 = _mm512_loadu_ps(k + j * d + i);
                const __m512 k1 = _mm512_loadu_ps(k + (j + 1) * d + i);
                for (int x = 0; x < 4; x++) {
                    const __m512 qx = _mm512_loadu_ps(q + (r + x) * d + i);
                    a[x][0] = _mm512_fmadd_ps(qx, k0, a[x][0]);
                    a[x][1] = _mm512_fmadd_ps(qx, k1, a[x][1]);
                }
            }
            __m256 h[4][2];
            for (int x = 0; x < 4; x++)
                for (int y = 0; y < 2; y++)
                    h[x][y] = _mm256_add_ps(_mm512_castps512_ps256(a[x][y]),
                                            _mm512_extractf32x8_ps(a[x][y], 1));
            store_sums(h, s + r * KC + j);
        }
}

// tile_values_avx2's sums, 16 values of a row a vector; cells j and j + 1 (nc
// is even) go to two sums per row, added at the end, so that eight chains
// of FMAs run at once as in the AVX2 kernel
TARGET_AVX512
static void tile_values_avx512(const float *p, int nr, const float *v, int nc, int d, float *o) {
    for (int r = 0; r < nr; r += 4)
        for (int i = 0; i < d; i += 16) {
            __m512 a[4][2];
            for (int x = 0; x < 4; x++) {
                a[x][0] = _mm512_loadu_ps(o + (r + x) * d + i);
                a[x][1] = _mm512_setzero_ps();
            }
            for (int j = 0; j < nc; j += 2) {
                const __m512 v0 = _mm512_loadu_ps(v + j * d + i);
                const __m512 v1 = _mm512_loadu_ps(v + (j + 1) * d + i);
                for (int x = 0; x < 4; x++) {
                    a[x][0] = _mm512_fmadd_ps(_mm512_set1_ps(p[(r + x) * KC + j]), v0, a[x][0]);
                    a[x][1] = _mm512_fmadd_ps(_mm512_set1_ps(p[(r + x) * KC + j + 1]), v1, a[x][1]);
                }
            }
            for (int x = 0; x < 4; x++)
                _mm512_storeu_ps(o + (r + x) * d + i, _mm512_add_ps(a[x][0], a[x][1]));
        }
}
#endif

// The kernels attention and the K-shift run on: AVX-512 or AVX2 (on the
// AVX-VNNI path too) for head_dim % 16 == 0, plain C otherwise. The softmax
// is AVX2's on the AVX-512 path: it is a small share of the work.
static int attention_path(int head_dim) {
    const int path = kvc_simd_path();
    if (path == KVC_SIMD_PORTABLE || head_dim % 16) return KVC_SIMD_PORTABLE;
    return path == KVC_SIMD_AVX512 ? KVC_SIMD_AVX512 : KVC_SIMD_AVX2;
}

// ---- plain C passes ----

static void tile_scores_plain(const float *q, int nr, const float *k, int nc, int d, float *s) {
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < nc; j++) s[r * KC + j] = dot_plain(q + r * d, k + j * d, d);
}

static void tile_values_plain(const float *p, int nr, const float *v, int nc, int d, float *o) {
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < nc; j++) axpy_plain(p[r * KC + j], v + j * d, o + r * d, d);
}

// ---- re-rotating K rows after a shift ----

// a row of n values (whole blocks) widened to float on a path of
// attention_path, and back into its type
static void widen_row(int path, int type, const uint8_t *row, int n, float *x) {
#ifdef KVC_X86
    if (path == KVC_SIMD_AVX512) {
        widen_avx512(type, row, n, x);
        return;
    }
    if (path == KVC_SIMD_AVX2) {
        widen_avx2(type, row, n, x);
        return;
    }
#endif
    (void)path;
    quant_dequantize_row(type, row, x, n);
}

static void narrow(int avx2, int type, const float *x, int n, uint8_t *dst) {
#ifdef KVC_X86
    if (avx2 && type == KVC_TYPE_F16) {
        f16_from_f32_avx2(x, n, dst);
        return;
    }
#endif
    (void)avx2;
    quant_quantize_row(type, x, n, dst);
}

kvc_status kv_rope_shift(int type, uint8_t *const *rows, int n_layers, int64_t n_rows,
                         int n_head, int head_dim, const int32_t *cells, const int32_t *delta,
                         int64_t n, double base, double freq_scale, int neox) {
    if (head_bytes(type, head_dim) == 0 || head_dim % 2)
        return kvc_fail(KVC_EINVAL, "rope_shift: type %d cannot hold rows of %d values",
                        type, head_dim);
    if (n_head <= 0 || n_layers < 0 || n_rows < 0 || n < 0 || !(base > 0.0))
        return kvc_fail(KVC_EINVAL, "rope_shift: bad sizes or base");
    if ((n > 0 && (!cells || !delta)) || (n_layers > 0 && !rows))
        return kvc_fail(KVC_EINVAL, "rope_shift: missing array");
    for (int l = 0; l < n_layers; l++)
        if (!rows[l]) return kvc_fail(KVC_EINVAL, "rope_shift: layer %d has no rows", l);
    for (int64_t i = 0; i < n; i++)
        if (cells[i] < 0 || cells[i] >= n_rows)
            return kvc_fail(KVC_EINVAL, "rope_shift: cell %d outside [0, %lld)", cells[i],
                            (long long)n_rows);
    const int half = head_dim / 2, width = n_head * head_dim, path = attention_path(head_dim);
    const int64_t row_bytes = head_bytes(type, head_dim) * n_head;
    double *inv_freq = malloc(sizeof(double) * (size_t)half);
    float *cs = malloc(sizeof(float) * (size_t)head_dim), *x = malloc(sizeof(float) * (size_t)width);
    if (!inv_freq || !cs || !x) {
        free(inv_freq), free(cs), free(x);
        return kvc_fail(KVC_ENOMEM, "rope_shift: out of memory");
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
            widen_row(path, type, row, width, x);
            for (int h = 0; h < n_head; h++) {
                float *xh = x + h * head_dim;
                for (int p = 0; p < half; p++) {
                    float *a = neox ? xh + p : xh + 2 * p, *b = neox ? xh + half + p : xh + 2 * p + 1;
                    const float c = cs[p], sn = cs[half + p], ra = *a * c - *b * sn;
                    *b = *a * sn + *b * c;
                    *a = ra;
                }
            }
            narrow(path != KVC_SIMD_PORTABLE, type, x, width, row);
        }
    }
    free(inv_freq);
    free(cs);
    free(x);
    return KVC_OK;
}

// ---- attention ----

typedef struct {
    int type_k, type_v, n_head_kv, head_dim, n_head, path;  // path: attention_path's
    const uint8_t *k, *v;
    int64_t row_k, row_v, hb_k, hb_v;
    const int32_t *cells;
    const int32_t *lo, *hi;
    const float *q;
    float scale;
    float *out;
} job;

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
    int64_t *next;            // the first unit no thread has taken (atomic)
    float *q, *o, *m, *l, *s, *kc, *vc;  // scratch, rows padded to a multiple of 4
    int32_t *lo, *hi;
} tile_job;

// the chunk's scores of row r (cells c0 + j, j < nc) turned into
// exp(s - m) in place, zero where the row may not look; rescales o, l
static void softmax_chunk(tile_job *tj, int r, int64_t c0, int nc, int nc2) {
    const int d = tj->jb->head_dim;
    float *s = tj->s + r * KC, *o = tj->o + r * d;
    const int64_t jlo = tj->lo[r] - c0 > 0 ? tj->lo[r] - c0 : 0;
    const int64_t jhi = tj->hi[r] - c0 < nc ? tj->hi[r] - c0 : nc;
#ifdef KVC_X86
    if (tj->jb->path != KVC_SIMD_PORTABLE) {
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
            widen_row(jb->path, jb->type_k, jb->k + cell * jb->row_k + h * jb->hb_k, d,
                      tj->kc + j * d);
            widen_row(jb->path, jb->type_v, jb->v + cell * jb->row_v + h * jb->hb_v, d,
                      tj->vc + j * d);
        }
#ifdef KVC_X86
        if (jb->path == KVC_SIMD_AVX512) tile_scores_avx512(tj->q, nr4, tj->kc, nc2, d, tj->s);
        else if (jb->path == KVC_SIMD_AVX2) tile_scores_avx2(tj->q, nr4, tj->kc, nc2, d, tj->s);
        else
#endif
            tile_scores_plain(tj->q, nr4, tj->kc, nc2, d, tj->s);
        for (int r = 0; r < nr4; r++) softmax_chunk(tj, r, c0, nc, nc2);
#ifdef KVC_X86
        if (jb->path == KVC_SIMD_AVX512) tile_values_avx512(tj->s, nr4, tj->vc, nc2, d, tj->o);
        else if (jb->path == KVC_SIMD_AVX2) tile_values_avx2(tj->s, nr4, tj->vc, nc2, d, tj->o);
        else
#endif
            tile_values_plain(tj->s, nr4, tj->vc, nc2, d, tj->o);
    }
}

// slot: this thread's scratch; the units go to whichever thread asks first
static void run_tiles(void *arg, int slot) {
    tile_job *tj = (tile_job *)arg + slot;
    for (;;) {
        const int64_t u = __atomic_fetch_add(tj->next, 1, __ATOMIC_RELAXED);
        if (u >= tj->n_units) return;
        tile_unit(tj, tj->unit_item[u], tj->unit_seg[u], tj->parts + u * tj->part_floats);
    }
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

void kv_arena_free(kv_arena *a) {
    free(a->p);
    a->p = NULL, a->cap = 0;
}

// makes the arena hold at least n bytes, keeping what it holds
static int arena_reserve(kv_arena *a, size_t n) {
    if (n <= a->cap) return 1;
    void *p = realloc(a->p, n);
    if (!p) return 0;
    a->p = p, a->cap = n;
    return 1;
}

// the arena's bytes from *end on, n_bytes of them (64-byte aligned), as an
// offset; *end moves past them
static size_t carve(size_t *end, size_t n_bytes) {
    const size_t at = (*end + 63) / 64 * 64;
    *end = at + n_bytes;
    return at;
}

#define AT(a, off, type) ((type *)((char *)(a)->p + (off)))

// the arena's first `end` bytes hold the blocks already
static kvc_status attend_tiled(const job *proto, kv_arena *a, int n_blocks, size_t end,
                               int n_threads) {
    const int g = proto->n_head / proto->n_head_kv, d = proto->head_dim;
    const int64_t rows = (QB * g + 3) / 4 * 4, part_floats = rows * (d + 2);
    const int64_t n_items = (int64_t)n_blocks * proto->n_head_kv;
    const size_t at_first = carve(&end, sizeof(int64_t) * (size_t)(n_items + 1));
    if (!arena_reserve(a, end)) return kvc_fail(KVC_ENOMEM, "attend: out of memory");
    // the units: each item's segments, in order; first[item] is its first unit
    const int32_t *block = AT(a, 0, int32_t);
    int64_t *first = AT(a, at_first, int64_t), n_units = 0, next = 0;
    for (int64_t item = 0; item < n_items; item++) {
        int64_t u0, u1;
        block_union(proto, block, (int)(item / proto->n_head_kv), &u0, &u1);
        first[item] = n_units;
        n_units += u0 < u1 ? (u1 - 1) / SEG - u0 / SEG + 1 : 1;
    }
    first[n_items] = n_units;
    const size_t at_item = carve(&end, sizeof(int64_t) * (size_t)n_units);
    const size_t at_seg = carve(&end, sizeof(int64_t) * (size_t)n_units);
    const size_t at_parts = carve(&end, sizeof(float) * (size_t)(n_units * part_floats));
    const size_t at_tjs = carve(&end, sizeof(tile_job) * (size_t)n_threads);
    const size_t per_thread = sizeof(float) * (size_t)(rows * d + rows * KC + 2 * KC * d)
                              + sizeof(int32_t) * (size_t)(2 * rows) + 6 * 64;
    const size_t at_threads = carve(&end, per_thread * (size_t)n_threads);
    if (!arena_reserve(a, end)) return kvc_fail(KVC_ENOMEM, "attend: out of memory");
    block = AT(a, 0, int32_t), first = AT(a, at_first, int64_t);
    int64_t *unit_item = AT(a, at_item, int64_t), *unit_seg = AT(a, at_seg, int64_t);
    float *parts = AT(a, at_parts, float);
    tile_job *tjs = AT(a, at_tjs, tile_job);
    for (int64_t item = 0; item < n_items; item++) {
        int64_t u0, u1;
        block_union(proto, block, (int)(item / proto->n_head_kv), &u0, &u1);
        for (int64_t u = first[item]; u < first[item + 1]; u++)
            unit_item[u] = item, unit_seg[u] = (u0 < u1 ? u0 / SEG : 0) + (u - first[item]);
    }
    for (int i = 0; i < n_threads; i++) {
        tile_job *tj = &tjs[i];
        *tj = (tile_job){.jb = proto, .block = block, .next = &next, .unit_item = unit_item,
                         .unit_seg = unit_seg, .n_units = n_units, .parts = parts,
                         .part_floats = part_floats};
        size_t t = at_threads + per_thread * (size_t)i;
        tj->q = AT(a, carve(&t, sizeof(float) * (size_t)(rows * d)), float);
        tj->s = AT(a, carve(&t, sizeof(float) * (size_t)(rows * KC)), float);
        memset(tj->s, 0, sizeof(float) * (size_t)(rows * KC));  // read to a multiple of 8
        tj->kc = AT(a, carve(&t, sizeof(float) * (size_t)(KC * d)), float);
        tj->vc = AT(a, carve(&t, sizeof(float) * (size_t)(KC * d)), float);
        tj->lo = AT(a, carve(&t, sizeof(int32_t) * (size_t)rows), int32_t);
        tj->hi = AT(a, carve(&t, sizeof(int32_t) * (size_t)rows), int32_t);
    }
    pool_run(run_tiles, tjs, n_threads);
    for (int64_t item = 0; item < n_items; item++)
        merge_segments(proto, block, item, parts + first[item] * part_floats,
                       first[item + 1] - first[item], part_floats);
    return KVC_OK;
}

kvc_status kv_check_attend(int type_k, const uint8_t *k, int type_v, const uint8_t *v,
                           int64_t n_rows, int n_head_kv, int head_dim,
                           const int32_t *cells, int64_t n_list, int n_tokens,
                           const int32_t *lo, const int32_t *hi, const float *q, int n_head,
                           const float *out) {
    if (head_bytes(type_k, head_dim) == 0 || head_bytes(type_v, head_dim) == 0)
        return kvc_fail(KVC_EINVAL, "attend: types %d/%d cannot hold heads of %d values",
                        type_k, type_v, head_dim);
    if (n_rows < 0 || n_head_kv <= 0 || n_list < 0 || n_tokens < 0)
        return kvc_fail(KVC_EINVAL, "attend: negative size");
    if (n_head <= 0 || n_head % n_head_kv != 0)
        return kvc_fail(KVC_EINVAL, "attend: n_head %d is not a multiple of n_head_kv %d",
                        n_head, n_head_kv);
    if ((n_tokens > 0 && (!lo || !hi || !q || !out)) || (n_list > 0 && !cells)
        || (n_rows > 0 && (!k || !v)))
        return kvc_fail(KVC_EINVAL, "attend: missing array");
    for (int64_t j = 0; j < n_list; j++)
        if (cells[j] < 0 || cells[j] >= n_rows)
            return kvc_fail(KVC_EINVAL, "attend: cell %d outside [0, %lld)", cells[j],
                            (long long)n_rows);
    for (int t = 0; t < n_tokens; t++)
        if (lo[t] < 0 || lo[t] > hi[t] || hi[t] > n_list)
            return kvc_fail(KVC_EINVAL, "attend: token %d's range [%d, %d) is not in [0, %lld]",
                            t, lo[t], hi[t], (long long)n_list);
    return KVC_OK;
}

// The tiles' running max skips NaN scores; a NaN or infinite query row (or
// scale) gives NaN, as softmax(scale * q.K) . V would.
static void nan_where_q_is_not_finite(const job *jb, int n_tokens) {
    const int d = jb->head_dim;
    for (int64_t r = 0; r < (int64_t)n_tokens * jb->n_head; r++) {
        int finite = isfinite(jb->scale);
        for (int i = 0; finite && i < d; i++) finite = isfinite(jb->q[r * d + i]);
        if (!finite)
            for (int i = 0; i < d; i++) jb->out[r * d + i] = NAN;
    }
}

kvc_status kv_attend_in(kv_arena *a, int type_k, const uint8_t *k, int type_v,
                        const uint8_t *v, int64_t n_rows, int n_head_kv, int head_dim,
                        const int32_t *cells, int64_t n_list,
                        int n_tokens, const int32_t *lo, const int32_t *hi,
                        const float *q, int n_head, float scale, float *out,
                        int n_threads) {
    kvc_status st = kv_check_attend(type_k, k, type_v, v, n_rows, n_head_kv, head_dim, cells,
                                    n_list, n_tokens, lo, hi, q, n_head, out);
    if (st) return st;
    if (n_tokens == 0) return KVC_OK;
    int64_t visits = 0;
    for (int t = 0; t < n_tokens; t++) visits += (int64_t)(hi[t] - lo[t]) * n_head_kv;
    // a thread is worth starting for about a millisecond of work or more
    if (n_threads > visits / CELLS_PER_THREAD + 1) n_threads = (int)(visits / CELLS_PER_THREAD + 1);
    if (n_threads > KVC_MAX_THREADS) n_threads = KVC_MAX_THREADS;
    if (n_threads < 1) n_threads = 1;

    job proto = {0};
    proto.type_k = type_k, proto.type_v = type_v, proto.n_head_kv = n_head_kv;
    proto.head_dim = head_dim, proto.n_head = n_head, proto.path = attention_path(head_dim);
    proto.k = k, proto.v = v, proto.cells = cells, proto.lo = lo, proto.hi = hi, proto.q = q;
    proto.hb_k = head_bytes(type_k, head_dim), proto.hb_v = head_bytes(type_v, head_dim);
    proto.row_k = proto.hb_k * n_head_kv, proto.row_v = proto.hb_v * n_head_kv;
    proto.scale = scale, proto.out = out;

    // blocks of tokens, smaller ones when there would be fewer items than threads
    size_t end = 0;
    carve(&end, sizeof(int32_t) * ((size_t)n_tokens + 1));
    if (!arena_reserve(a, end)) return kvc_fail(KVC_ENOMEM, "attend: out of memory");
    int32_t *block = AT(a, 0, int32_t);
    int max_len = QB, n_blocks = make_blocks(n_tokens, lo, hi, max_len, block);
    while (max_len > 1 && (int64_t)n_blocks * n_head_kv < n_threads)
        n_blocks = make_blocks(n_tokens, lo, hi, max_len /= 2, block);
    st = attend_tiled(&proto, a, n_blocks, end, n_threads);
    if (st == KVC_OK) nan_where_q_is_not_finite(&proto, n_tokens);
    return st;
}

kvc_status kv_attend(int type_k, const uint8_t *k, int type_v, const uint8_t *v,
                     int64_t n_rows, int n_head_kv, int head_dim,
                     const int32_t *cells, int64_t n_list,
                     int n_tokens, const int32_t *lo, const int32_t *hi,
                     const float *q, int n_head, float scale, float *out,
                     int n_threads) {
    kv_arena a = {0};
    kvc_status st = kv_attend_in(&a, type_k, k, type_v, v, n_rows, n_head_kv, head_dim, cells,
                                 n_list, n_tokens, lo, hi, q, n_head, scale, out, n_threads);
    kv_arena_free(&a);
    return st;
}

kvc_status kv_store(int type, uint8_t *rows, int64_t n_rows, int64_t n_values,
                    const int32_t *cells, int64_t n, const float *x) {
    const int64_t row =
        n_values > 0 && n_values <= INT32_MAX ? head_bytes(type, (int)n_values) : 0;
    if (row == 0)
        return kvc_fail(KVC_EINVAL, "store: type %d cannot hold rows of %lld values", type,
                        (long long)n_values);
    if (n_rows < 0 || n < 0) return kvc_fail(KVC_EINVAL, "store: negative size");
    if (n > 0 && (!rows || !cells || !x)) return kvc_fail(KVC_EINVAL, "store: missing array");
    for (int64_t i = 0; i < n; i++)
        if (cells[i] < 0 || cells[i] >= n_rows)
            return kvc_fail(KVC_EINVAL, "store: cell %d outside [0, %lld)", cells[i],
                            (long long)n_rows);
    const int avx2 = kvc_simd_path() != KVC_SIMD_PORTABLE && n_values % 8 == 0;
    for (int64_t i = 0; i < n; i++) narrow(avx2, type, x + i * n_values, (int)n_values,
                                           rows + cells[i] * row);
    return KVC_OK;
}
