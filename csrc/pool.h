// The one pool of worker threads, shared by matmul and attention.
#ifndef KVCELLS_POOL_H
#define KVCELLS_POOL_H

// cffi-begin
#define KVC_MAX_THREADS 64
// cffi-end

// Calls fn(arg, 0) on the calling thread and fn(arg, i) on up to
// n_threads - 1 workers (1 <= i < n_threads), and returns once every call
// that started has returned. A call no worker has picked up by the time the
// caller's own call returns is withdrawn, so fn must hand out its work
// dynamically (e.g. from an atomic counter), never by the value of i; i
// only names per-call scratch. One pool_run at a time; n_threads is capped
// at KVC_MAX_THREADS.
void pool_run(void (*fn)(void *arg, int slot), void *arg, int n_threads);

#endif
