// Attention over the K/V rows of a list of cells, for f32, f16, q8_0 and
// q4_0 storage. Per (token, kv head): one pass scores every visible cell for
// up to four query heads sharing that kv head (each K row read once for
// them), then the softmax, then one pass sums the V rows, 16 at a time with
// the sums in registers. The AVX2/FMA/F16C passes, specialised per element
// type, are chosen at run time; the plain C ones are the reference.
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
#endif

static int simd_allowed = 1;

void kv_allow_simd(int on) { simd_allowed = on != 0; }

static int have_avx2(int head_dim) {
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

int kv_attend(int type_k, const uint8_t *k, int type_v, const uint8_t *v,
              int64_t n_rows, int n_head_kv, int head_dim,
              const int32_t *cells, int64_t n_list,
              int n_tokens, const int32_t *lo, const int32_t *hi,
              const float *q, int n_head, float scale, float *out,
              int n_threads) {
    if (!valid_args(type_k, k, type_v, v, n_rows, n_head_kv, head_dim, cells, n_list,
                    n_tokens, lo, hi, q, n_head, out))
        return KV_EINVAL;
    const int64_t n_items = (int64_t)n_tokens * n_head_kv;
    int64_t longest = 1, visits = 0;
    for (int t = 0; t < n_tokens; t++) {
        if (hi[t] - lo[t] > longest) longest = hi[t] - lo[t];
        visits += (int64_t)(hi[t] - lo[t]) * n_head_kv;
    }
    // a thread is worth starting for about a millisecond of work or more
    if (n_threads > visits / CELLS_PER_THREAD + 1) n_threads = (int)(visits / CELLS_PER_THREAD + 1);
    if (n_threads < 1 || n_items == 0) n_threads = 1;
    const int n_split = n_items < n_threads ? (int)((n_threads + n_items - 1) / n_items) : 1;
    const int64_t n_units = n_items * n_split;
    const int g = n_head / n_head_kv;

    job *jobs = calloc((size_t)n_threads, sizeof(job));
    pthread_t *tids = calloc((size_t)n_threads, sizeof(pthread_t));
    float *parts = n_split > 1 ? malloc(sizeof(float) * (size_t)(n_units * g * (head_dim + 2)))
                               : NULL;
    int status = jobs && tids && (n_split == 1 || parts) ? KV_OK : KV_ENOMEM;
    const int avx2 = have_avx2(head_dim);
    for (int i = 0; status == KV_OK && i < n_threads; i++) {
        job *jb = &jobs[i];
        jb->type_k = type_k, jb->type_v = type_v, jb->n_head_kv = n_head_kv;
        jb->head_dim = head_dim, jb->n_head = n_head, jb->avx2 = avx2, jb->n_split = n_split;
        jb->k = k, jb->v = v, jb->cells = cells, jb->lo = lo, jb->hi = hi, jb->q = q;
        jb->hb_k = head_bytes(type_k, head_dim), jb->hb_v = head_bytes(type_v, head_dim);
        jb->row_k = jb->hb_k * n_head_kv, jb->row_v = jb->hb_v * n_head_kv;
        jb->scale = scale, jb->out = out, jb->parts = parts;
        jb->unit0 = n_units * i / n_threads, jb->unit1 = n_units * (i + 1) / n_threads;
        jb->scores = malloc(sizeof(float) * (size_t)(4 * longest));
        jb->rows = malloc(sizeof(uint8_t *) * (size_t)(2 * longest));
        jb->row = malloc(sizeof(float) * (size_t)head_dim);
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
