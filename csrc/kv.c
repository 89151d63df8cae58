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

// ---- AVX2 inner loops (head_dim is a multiple of 8 on this path) ----

#ifdef KV_X86
__attribute__((target("avx2,fma,f16c")))
static void widen_avx2(int type, const uint8_t *src, int n, float *dst) {
    switch (type) {
    case KV_TYPE_F32:
        memcpy(dst, src, (size_t)n * 4);
        break;
    case KV_TYPE_F16:
        for (int i = 0; i < n; i += 8) {
            __m128i h = _mm_loadu_si128((const __m128i *)(src + 2 * i));
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
        }
        break;
    case KV_TYPE_Q8_0:
        for (int b = 0; b < n / QK; b++, src += 2 + QK) {
            const __m256 d = _mm256_set1_ps(f16_to_f32(src));
            for (int i = 0; i < QK; i += 8) {
                __m128i q8 = _mm_loadl_epi64((const __m128i *)(src + 2 + i));
                __m256 x = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8));
                _mm256_storeu_ps(dst + b * QK + i, _mm256_mul_ps(d, x));
            }
        }
        break;
    case KV_TYPE_Q4_0:
        for (int b = 0; b < n / QK; b++, src += 2 + QK / 2) {
            const __m256 d = _mm256_set1_ps(f16_to_f32(src));
            const __m128i bytes = _mm_loadu_si128((const __m128i *)(src + 2));
            const __m128i mask = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
            __m128i lo = _mm_sub_epi8(_mm_and_si128(bytes, mask), eight);
            __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask), eight);
            __m128i halves[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
            for (int k = 0; k < 4; k++) {
                __m256 x = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(halves[k]));
                _mm256_storeu_ps(dst + b * QK + 8 * k, _mm256_mul_ps(d, x));
            }
        }
        break;
    }
}

__attribute__((target("avx2,fma")))
static float dot_avx2(const float *a, const float *b, int n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i < n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    __m256 s = _mm256_add_ps(s0, s1);
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

__attribute__((target("avx2,fma")))
static void axpy_avx2(float a, const float *x, float *y, int n) {
    const __m256 va = _mm256_set1_ps(a);
    for (int i = 0; i < n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
}
#endif

typedef struct {
    void (*widen)(int, const uint8_t *, int, float *);
    float (*dot)(const float *, const float *, int);
    void (*axpy)(float, const float *, float *, int);
} kernels;

static kernels pick_kernels(int head_dim) {
    kernels kn = {widen_plain, dot_plain, axpy_plain};
#ifdef KV_X86
    __builtin_cpu_init();
    if (head_dim % 8 == 0 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
        && __builtin_cpu_supports("f16c")) {
        kn.widen = widen_avx2;
        kn.dot = dot_avx2;
        kn.axpy = axpy_avx2;
    }
#endif
    return kn;
}

// ---- attention ----

typedef struct {
    int type_k, type_v, n_head_kv, head_dim, n_head;
    const uint8_t *k, *v;
    int64_t row_k, row_v, hb_k, hb_v;
    const int32_t *cells;
    const int32_t *lo, *hi;
    const float *q;
    float scale;
    float *out;
    kernels kn;
    int64_t item0, item1;  // work items [item0, item1): token * n_head_kv + kv head
    float *scores;         // scratch: g * (longest visible list)
    float *row;            // scratch: head_dim
    int status;
} job;

static void attend_item(job *jb, int t, int h) {
    const int g = jb->n_head / jb->n_head_kv, d = jb->head_dim;
    const int64_t n = (int64_t)jb->hi[t] - jb->lo[t];
    const int32_t *cells = jb->cells + jb->lo[t];
    const float *q = jb->q + ((int64_t)t * jb->n_head + (int64_t)h * g) * d;
    float *out = jb->out + ((int64_t)t * jb->n_head + (int64_t)h * g) * d;
    float *s = jb->scores;

    memset(out, 0, sizeof(float) * (size_t)g * d);
    if (n == 0) return;
    for (int64_t j = 0; j < n; j++) {
        jb->kn.widen(jb->type_k, jb->k + cells[j] * jb->row_k + h * jb->hb_k, d, jb->row);
        for (int i = 0; i < g; i++) s[i * n + j] = jb->scale * jb->kn.dot(q + i * d, jb->row, d);
    }
    for (int i = 0; i < g; i++) {
        float *si = s + i * n, mx = si[0], sum = 0.0f;
        for (int64_t j = 1; j < n; j++) mx = si[j] > mx ? si[j] : mx;
        for (int64_t j = 0; j < n; j++) {
            si[j] = expf(si[j] - mx);
            sum += si[j];
        }
        for (int64_t j = 0; j < n; j++) si[j] /= sum;
    }
    for (int64_t j = 0; j < n; j++) {
        jb->kn.widen(jb->type_v, jb->v + cells[j] * jb->row_v + h * jb->hb_v, d, jb->row);
        for (int i = 0; i < g; i++) jb->kn.axpy(s[i * n + j], jb->row, out + i * d, d);
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
    if (n_threads < 1) n_threads = 1;
    if (n_threads > n_items) n_threads = n_items > 0 ? (int)n_items : 1;
    int64_t longest = 1;
    for (int t = 0; t < n_tokens; t++)
        if (hi[t] - lo[t] > longest) longest = hi[t] - lo[t];

    job *jobs = calloc((size_t)n_threads, sizeof(job));
    pthread_t *tids = calloc((size_t)n_threads, sizeof(pthread_t));
    int status = jobs && tids ? KV_OK : KV_ENOMEM;
    const int g = n_head / n_head_kv;
    for (int i = 0; status == KV_OK && i < n_threads; i++) {
        job *jb = &jobs[i];
        jb->type_k = type_k, jb->type_v = type_v, jb->n_head_kv = n_head_kv;
        jb->head_dim = head_dim, jb->n_head = n_head;
        jb->k = k, jb->v = v, jb->cells = cells, jb->lo = lo, jb->hi = hi, jb->q = q;
        jb->hb_k = head_bytes(type_k, head_dim), jb->hb_v = head_bytes(type_v, head_dim);
        jb->row_k = jb->hb_k * n_head_kv, jb->row_v = jb->hb_v * n_head_kv;
        jb->scale = scale, jb->out = out, jb->kn = pick_kernels(head_dim);
        jb->item0 = n_items * i / n_threads, jb->item1 = n_items * (i + 1) / n_threads;
        jb->scores = malloc(sizeof(float) * (size_t)(g * longest));
        jb->row = malloc(sizeof(float) * (size_t)head_dim);
        if (!jb->scores || !jb->row) status = KV_ENOMEM;
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
        free(jobs[i].row);
    }
    free(jobs);
    free(tids);
    return status;
}
