// Attention over the K/V rows of a list of cells, for f32, f16, q8_0 and
// q4_0 storage. Per (token, kv head): one pass scores every visible cell for
// the query heads sharing that kv head, then softmax, then one pass sums the
// V rows. Each K or V row is widened to float once and used by all those
// query heads. AVX2/FMA/F16C versions of the three inner loops are chosen at
// run time; the plain C ones are the reference.
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

static int have_avx2(int head_dim) {
#ifdef KV_X86
    __builtin_cpu_init();
    return head_dim % 16 == 0 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
        && __builtin_cpu_supports("f16c");
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

// ---- attention ----

typedef struct {
    int type_k, type_v, n_head_kv, head_dim, n_head, avx2;
    const uint8_t *k, *v;
    int64_t row_k, row_v, hb_k, hb_v;
    const int32_t *cells;
    const int32_t *lo, *hi;
    const float *q;
    float scale;
    float *out;
    int64_t item0, item1;  // work items [item0, item1): token * n_head_kv + kv head
    float *scores;         // scratch: 4 * (longest visible list)
    const uint8_t **rows;  // scratch: 2 * (longest visible list)
    float *row;            // scratch: head_dim
} job;

static void softmax(float *s, int64_t n) {
    float mx = s[0], sum = 0.0f;
    for (int64_t j = 1; j < n; j++) mx = s[j] > mx ? s[j] : mx;
    for (int64_t j = 0; j < n; j++) {
        s[j] = expf(s[j] - mx);
        sum += s[j];
    }
    for (int64_t j = 0; j < n; j++) s[j] /= sum;
}

static void attend_item(job *jb, int t, int h) {
    const int g = jb->n_head / jb->n_head_kv, d = jb->head_dim;
    const int64_t n = (int64_t)jb->hi[t] - jb->lo[t];
    const int32_t *cells = jb->cells + jb->lo[t];
    const float *q = jb->q + ((int64_t)t * jb->n_head + (int64_t)h * g) * d;
    float *out = jb->out + ((int64_t)t * jb->n_head + (int64_t)h * g) * d;
    const uint8_t **krows = jb->rows, **vrows = jb->rows + n;

    memset(out, 0, sizeof(float) * (size_t)g * d);
    if (n == 0) return;
    for (int64_t j = 0; j < n; j++) {
        krows[j] = jb->k + cells[j] * jb->row_k + h * jb->hb_k;
        vrows[j] = jb->v + cells[j] * jb->row_v + h * jb->hb_v;
    }
    // the query heads of this kv head, four at a time (then one at a time)
    for (int g0 = 0; g0 < g;) {
        const int nh = g - g0 >= 4 ? 4 : 1;
        const float *qh = q + g0 * d;
        float *oh = out + g0 * d;
#ifdef KV_X86
        if (jb->avx2) scores_avx2(jb->type_k, nh, krows, n, qh, d, jb->scale, jb->scores);
        else
#endif
            scores_plain(jb->type_k, nh, krows, n, qh, d, jb->scale, jb->scores, jb->row);
        for (int k = 0; k < nh; k++) softmax(jb->scores + k * n, n);
#ifdef KV_X86
        if (jb->avx2) values_avx2(jb->type_v, nh, vrows, n, jb->scores, d, oh);
        else
#endif
            values_plain(jb->type_v, nh, vrows, n, jb->scores, d, oh, jb->row);
        g0 += nh;
    }
}

static void *run_job(void *arg) {
    job *jb = arg;
    for (int64_t it = jb->item0; it < jb->item1; it++)
        attend_item(jb, (int)(it / jb->n_head_kv), (int)(it % jb->n_head_kv));
    return NULL;
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
    if (n_threads > n_items) n_threads = (int)n_items;
    if (n_threads < 1) n_threads = 1;

    job *jobs = calloc((size_t)n_threads, sizeof(job));
    pthread_t *tids = calloc((size_t)n_threads, sizeof(pthread_t));
    int status = jobs && tids ? KV_OK : KV_ENOMEM;
    const int avx2 = have_avx2(head_dim);
    for (int i = 0; status == KV_OK && i < n_threads; i++) {
        job *jb = &jobs[i];
        jb->type_k = type_k, jb->type_v = type_v, jb->n_head_kv = n_head_kv;
        jb->head_dim = head_dim, jb->n_head = n_head;
        jb->k = k, jb->v = v, jb->cells = cells, jb->lo = lo, jb->hi = hi, jb->q = q;
        jb->hb_k = head_bytes(type_k, head_dim), jb->hb_v = head_bytes(type_v, head_dim);
        jb->row_k = jb->hb_k * n_head_kv, jb->row_v = jb->hb_v * n_head_kv;
        jb->scale = scale, jb->out = out, jb->avx2 = avx2;
        jb->item0 = n_items * i / n_threads, jb->item1 = n_items * (i + 1) / n_threads;
        jb->scores = malloc(sizeof(float) * (size_t)(4 * longest));
        jb->rows = malloc(sizeof(uint8_t *) * (size_t)(2 * longest));
        jb->row = malloc(sizeof(float) * (size_t)head_dim);
        if (!jb->scores || !jb->rows || !jb->row) status = KV_ENOMEM;
    }
    if (status == KV_OK) {
        int started = 1;
        for (; started < n_threads; started++)
            if (pthread_create(&tids[started], NULL, run_job, &jobs[started]) != 0) break;
        run_job(&jobs[0]);
        for (int i = started; i < n_threads; i++) run_job(&jobs[i]);  // threads that did not start
        for (int i = 1; i < started; i++) pthread_join(tids[i], NULL);
    }
    for (int i = 0; jobs && i < n_threads; i++) {
        free(jobs[i].scores);
        free(jobs[i].rows);
        free(jobs[i].row);
    }
    free(jobs);
    free(tids);
    return status;
}
