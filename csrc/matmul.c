// Quantised matmul: activations quantised once per call, output rows handed
// out in chunks to a persistent pool of worker threads plus the caller.
//
// Workers spin for a while after a job (a decode step calls matmul ~130
// times with little Python in between, and waking a sleeping thread costs
// tens of microseconds), then sleep on a condition variable.
#define _POSIX_C_SOURCE 200809L
#include "matmul.h"

#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "quants.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

#define SPIN_NS 1000000   // how long an idle worker spins before sleeping
#define CHUNKS_PER_THREAD 8
#define MIN_PARALLEL_MACS 65536   // smaller products run on the caller alone
#define CHUNK_BYTES 65536   // at most this much of W per chunk: it stays in L2 across token tiles
#define TILE_GROUPS 2      // token groups per pass over a chunk of rows: their x stays in L1

typedef struct {
    act_q8 x;       // quantised weight types
    int64_t t0;     // first token of the group
    int n_valid;    // its tokens that are real; the rest is zero padding
} token_group;

typedef struct {
    int type;
    const uint8_t *w;
    int64_t row_stride, n_out, n_in, n;
    const float *x;        // f32 weight types
    const token_group *groups;
    int64_t n_groups;
    dot_q8_fn dot_q8;
    dot_f32_fn dot_f32;
    float *y;
    int64_t chunk, next;   // next: first row not yet handed out (atomic)
} job;

// Rows r0..r1 times token groups g0..g1.
static void run_tile(const job *j, int64_t r0, int64_t r1, int64_t g0, int64_t g1) {
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = j->w + r * j->row_stride;
        for (int64_t g = g0; g < g1; g++) {
            const token_group *tg = &j->groups[g];
            float out[ACT_GROUP];
            if (j->dot_q8) {
                j->dot_q8(j->type, row, tg->x, j->n_in, out);
            } else {
                for (int k = 0; k < tg->n_valid; k++)
                    out[k] = j->dot_f32(j->type, row, j->x + (tg->t0 + k) * j->n_in, j->n_in);
            }
            for (int k = 0; k < tg->n_valid; k++) j->y[(tg->t0 + k) * j->n_out + r] = out[k];
        }
    }
}

static void run_job(job *j) {
    for (;;) {
        int64_t r0 = __atomic_fetch_add(&j->next, j->chunk, __ATOMIC_RELAXED);
        if (r0 >= j->n_out) return;
        int64_t r1 = r0 + j->chunk < j->n_out ? r0 + j->chunk : j->n_out;
        for (int64_t g0 = 0; g0 < j->n_groups; g0 += TILE_GROUPS)
            run_tile(j, r0, r1, g0, g0 + TILE_GROUPS < j->n_groups ? g0 + TILE_GROUPS : j->n_groups);
    }
}

// Tokens per group, for `left` tokens still to place: 8s, then a 4 (padded
// if need be) unless a single token is left.
static int group_size(int64_t left, int quantised) {
    if (!quantised || left == 1) return 1;
    return left >= ACT_GROUP ? ACT_GROUP : 4;
}

// ---- thread pool ----
//
// Each worker has a mailbox: the caller posts a job (IDLE -> POSTED), the
// worker takes it (POSTED -> RUNNING -> IDLE). Once the caller has run out of
// rows it takes back the posts no worker has picked up (POSTED -> IDLE), so a
// worker that is slow to wake (asleep, or descheduled on a busy machine)
// never delays a call; only workers already RUNNING are waited for.

enum { IDLE, POSTED, RUNNING };

typedef struct {
    int state;   // atomic
    job *job;    // valid while POSTED or RUNNING
    char pad[64];
} mailbox;

static struct {
    pthread_mutex_t call;   // one matmul at a time uses the workers
    pthread_mutex_t mu;     // with wake: sleeping workers
    pthread_cond_t wake;
    int sleeping;           // atomic
    int n_workers;
    mailbox box[MATMUL_MAX_THREADS];
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, {{0}}};

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void wait_for_post(mailbox *box) {
    int64_t start = now_ns();
    for (int i = 1; __atomic_load_n(&box->state, __ATOMIC_ACQUIRE) != POSTED; i++) {
        cpu_relax();
        if (i % 256 == 0 && now_ns() - start > SPIN_NS) break;
    }
    pthread_mutex_lock(&pool.mu);
    __atomic_fetch_add(&pool.sleeping, 1, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(&box->state, __ATOMIC_SEQ_CST) != POSTED)
        pthread_cond_wait(&pool.wake, &pool.mu);
    __atomic_fetch_sub(&pool.sleeping, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&pool.mu);
}

static void *worker_main(void *arg) {
    mailbox *box = arg;
    for (;;) {
        wait_for_post(box);
        int posted = POSTED;
        if (__atomic_compare_exchange_n(&box->state, &posted, RUNNING, 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            run_job(box->job);
            __atomic_store_n(&box->state, IDLE, __ATOMIC_RELEASE);
        }
    }
    return NULL;
}

// After fork() only the forking thread exists: start the pool afresh.
static void pool_after_fork(void) {
    pthread_mutex_init(&pool.call, NULL);
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.sleeping = 0;
    pool.n_workers = 0;
}

static pthread_once_t init_once = PTHREAD_ONCE_INIT;
static int simd_supported, simd_enabled;

static void init(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    simd_supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
        && __builtin_cpu_supports("f16c");
#endif
    const char *no_simd = getenv("KVCELLS_NO_SIMD");
    simd_enabled = simd_supported && !(no_simd && strcmp(no_simd, "1") == 0);
    pthread_atfork(NULL, NULL, pool_after_fork);
}

// Called with pool.call held. Returns how many workers are available.
static int start_workers(int wanted) {
    while (pool.n_workers < wanted) {
        pthread_t t;
        mailbox *box = &pool.box[pool.n_workers];
        box->state = IDLE;
        if (pthread_create(&t, NULL, worker_main, box) != 0) break;
        pthread_detach(t);
        pool.n_workers++;
    }
    return pool.n_workers < wanted ? pool.n_workers : wanted;
}

static void run_on_pool(job *j, int n_threads) {
    pthread_mutex_lock(&pool.call);
    int n_workers = start_workers(n_threads - 1);
    for (int i = 0; i < n_workers; i++) {
        pool.box[i].job = j;
        __atomic_store_n(&pool.box[i].state, POSTED, __ATOMIC_SEQ_CST);
    }
    if (__atomic_load_n(&pool.sleeping, __ATOMIC_SEQ_CST) > 0) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.mu);
    }
    run_job(j);
    for (int i = 0; i < n_workers; i++) {
        int posted = POSTED;
        if (__atomic_compare_exchange_n(&pool.box[i].state, &posted, IDLE, 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            continue;   // never picked up
        for (int k = 1; __atomic_load_n(&pool.box[i].state, __ATOMIC_ACQUIRE) != IDLE; k++) {
            cpu_relax();
            if (k % 1024 == 0) sched_yield();   // the worker may be descheduled
        }
    }
    pthread_mutex_unlock(&pool.call);
}

// ---- entry points ----

int matmul_simd_supported(void) {
    pthread_once(&init_once, init);
    return simd_supported;
}

void matmul_set_simd(int on) {
    pthread_once(&init_once, init);
    __atomic_store_n(&simd_enabled, on && simd_supported, __ATOMIC_RELAXED);
}

int matmul_simd_enabled(void) {
    pthread_once(&init_once, init);
    return __atomic_load_n(&simd_enabled, __ATOMIC_RELAXED);
}

static int check_weights(int type, const uint8_t *w, int64_t row_stride,
                         int64_t n_rows, int64_t n_in) {
    size_t row_bytes = quant_row_bytes(type, n_in);
    if (!w || row_bytes == 0 || n_rows <= 0) return 0;
    return row_stride >= (int64_t)row_bytes && row_stride <= INT64_MAX / n_rows;
}

int matmul(int type, const uint8_t *w, int64_t row_stride, int64_t n_out,
           int64_t n_in, const float *x, int64_t n, float *y, int n_threads) {
    if (!check_weights(type, w, row_stride, n_out, n_in) || !x || !y || n <= 0
        || n > INT64_MAX / n_in || n > INT64_MAX / n_out || n_threads < 1)
        return MATMUL_EINVAL;
    if (n_threads > MATMUL_MAX_THREADS) n_threads = MATMUL_MAX_THREADS;
    int simd = matmul_simd_enabled();
    job j = {.type = type, .w = w, .row_stride = row_stride, .n_out = n_out, .n_in = n_in, .n = n,
             .x = x, .y = y};
    int quantised = quant_is_integer(type);
    int64_t nb = n_in / 32, room = n + ACT_GROUP;   // tokens incl. padding
    int8_t *q = quantised ? calloc((size_t)room, (size_t)n_in) : NULL;
    float *ds = quantised ? calloc((size_t)(2 * room * nb), sizeof(float)) : NULL;
    token_group *groups = malloc(sizeof(token_group) * (size_t)n);
    if (!groups || (quantised && (!q || !ds))) {
        free(q); free(ds); free(groups);
        return MATMUL_ENOMEM;
    }
    int64_t n_groups = 0;
    for (int64_t t = 0, slot = 0; t < n; n_groups++) {
        int nt = group_size(n - t, quantised);
        token_group *tg = &groups[n_groups];
        tg->t0 = t;
        tg->n_valid = n - t < nt ? (int)(n - t) : nt;
        if (quantised) {
            tg->x = (act_q8){q + slot * n_in, ds + 2 * slot * nb, ds + (2 * slot + nt) * nb, nt};
            for (int k = 0; k < tg->n_valid; k++)
                quant_act_q8(x + (t + k) * n_in, n_in, tg->x, k, simd);
        }
        t += tg->n_valid;
        slot += nt;
    }
    j.groups = groups;
    j.n_groups = n_groups;
    if (quantised) j.dot_q8 = quant_dot_q8(type, simd);
    else j.dot_f32 = quant_dot_f32(type, simd);
    int64_t chunk = n_out / ((int64_t)n_threads * CHUNKS_PER_THREAD);
    if (chunk > CHUNK_BYTES / row_stride) chunk = CHUNK_BYTES / row_stride;
    j.chunk = chunk > 0 ? chunk : 1;
    if (n_threads == 1 || (double)n_out * (double)n_in * (double)n < MIN_PARALLEL_MACS) run_job(&j);
    else run_on_pool(&j, n_threads);
    free(q); free(ds); free(groups);
    return MATMUL_OK;
}

int matmul_dequantize_rows(int type, const uint8_t *w, int64_t row_stride,
                           int64_t n_rows, int64_t n_in, const int64_t *ids,
                           int64_t n_ids, float *out) {
    if (!check_weights(type, w, row_stride, n_rows, n_in) || n_ids < 0
        || (n_ids > 0 && (!ids || !out)) || n_ids > INT64_MAX / n_in)
        return MATMUL_EINVAL;
    for (int64_t k = 0; k < n_ids; k++)
        if (ids[k] < 0 || ids[k] >= n_rows) return MATMUL_EINVAL;
    for (int64_t k = 0; k < n_ids; k++)
        quant_dequantize_row(type, w + ids[k] * row_stride, out + k * n_in, n_in);
    return MATMUL_OK;
}
