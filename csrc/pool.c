// Worker threads started on first need and kept. Each worker has a mailbox:
// the caller posts a call (IDLE -> POSTED), the worker takes it (POSTED ->
// RUNNING -> IDLE). Once the caller's own call returns it takes back the
// posts no worker has picked up (POSTED -> IDLE), so a worker slow to wake
// (asleep, or descheduled on a busy machine) never delays a call; only
// workers already RUNNING are waited for.
//
// Workers spin for a while after a call (a decode step makes ~130 matmul
// and ~20 attention calls with little Python in between, and waking a
// sleeping thread costs tens of microseconds), then sleep on a condition
// variable.
#define _POSIX_C_SOURCE 200809L
#include "pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

#define SPIN_NS 1000000   // how long an idle worker spins before sleeping

enum { IDLE, POSTED, RUNNING };

typedef struct {
    int state;   // atomic
    void (*fn)(void *, int);
    void *arg;   // fn and arg: valid while POSTED or RUNNING
    int slot;
    char pad[64];
} mailbox;

static struct {
    pthread_mutex_t call;   // one pool_run at a time uses the workers
    pthread_mutex_t mu;     // with wake: sleeping workers
    pthread_cond_t wake;
    int sleeping;           // atomic
    int n_workers;
    mailbox box[KVC_MAX_THREADS];
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
            box->fn(box->arg, box->slot);
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

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

static void register_fork_handler(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

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

void pool_run(void (*fn)(void *arg, int slot), void *arg, int n_threads) {
    if (n_threads > KVC_MAX_THREADS) n_threads = KVC_MAX_THREADS;
    if (n_threads <= 1) {
        fn(arg, 0);
        return;
    }
    pthread_once(&fork_once, register_fork_handler);
    pthread_mutex_lock(&pool.call);
    int n_workers = start_workers(n_threads - 1);
    for (int i = 0; i < n_workers; i++) {
        pool.box[i].fn = fn, pool.box[i].arg = arg, pool.box[i].slot = i + 1;
        __atomic_store_n(&pool.box[i].state, POSTED, __ATOMIC_SEQ_CST);
    }
    if (__atomic_load_n(&pool.sleeping, __ATOMIC_SEQ_CST) > 0) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.mu);
    }
    fn(arg, 0);
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
