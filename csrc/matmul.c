// Quantised matmul: activations quantised once per call, output rows handed
// out in chunks to the thread pool's workers plus the caller.
#include "matmul.h"

#include <stdlib.h>
#include <string.h>

#include "pool.h"
#include "quants.h"

#define CHUNKS_PER_THREAD 8
#define MIN_PARALLEL_MACS 65536   // smaller products run on the caller alone
#define CHUNK_BYTES 65536   // at most this much of W per chunk: it stays in L2 across token tiles
#define TILE_GROUPS 2      // token groups per pass over a chunk of rows: their x stays in L1
#define PACKED_BYTES 262144 // at most this much of unpacked panels per chunk: it stays in L2
#define PARALLEL_QUANT_TOKENS 64   // from here on the threads quantise the activations too
#define LINE_ROWS 16        // outputs per 64-byte line: chunks of whole lines keep threads
                            // from writing to one line of y

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
    panel_kernel panel;    // used when panel.pack is set
    uint8_t *packed;       // per slot, room for one chunk of rows
    float *y;
    int64_t chunk;
    uint64_t ends;         // take_chunk's (atomic)
} job;

// Rows r0..r1 times token groups g0..g1.
static void run_tile(const job *j, int64_t r0, int64_t r1, int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; g++) {
        const token_group *tg = &j->groups[g];
        float *y = j->y + tg->t0 * j->n_out;
        if (j->dot_q8) {
            j->dot_q8(j->type, j->w + r0 * j->row_stride, j->row_stride, r1 - r0, tg->x, j->n_in,
                      y + r0, j->n_out, tg->n_valid);
            continue;
        }
        for (int64_t r = r0; r < r1; r++)
            for (int k = 0; k < tg->n_valid; k++)
                y[k * j->n_out + r] = j->dot_f32(j->type, j->w + r * j->row_stride,
                                                 j->x + (tg->t0 + k) * j->n_in, j->n_in);
    }
}

// Rows r0..r1 unpacked into panels, then times every token: a token
// group's x stays in L1 across the panels, the panels in L2 across groups.
static void run_panels(const job *j, int64_t r0, int64_t r1, uint8_t *packed) {
    const panel_kernel *k = &j->panel;
    const int64_t panel_bytes = j->n_in / 32 * k->block_bytes;
    for (int64_t r = r0; r < r1; r += k->rows)
        k->pack(j->w + r * j->row_stride, j->row_stride, r1 - r < k->rows ? (int)(r1 - r) : k->rows,
                j->n_in, packed + (r - r0) / k->rows * panel_bytes);
    for (int64_t g = 0; g < j->n_groups; g++) {
        const token_group *tg = &j->groups[g];
        const int step = tg->x.nt < k->tokens ? tg->x.nt : k->tokens;
        for (int t0 = 0; t0 < tg->n_valid; t0 += step) {
            int n_tok = tg->n_valid - t0 < step ? tg->n_valid - t0 : step;
            for (int64_t r = r0; r < r1; r += k->rows)
                k->dot(packed + (r - r0) / k->rows * panel_bytes, j->n_in, tg->x, t0,
                       j->y + (tg->t0 + t0) * j->n_out + r, j->n_out,
                       r1 - r < k->rows ? (int)(r1 - r) : k->rows, n_tok);
        }
    }
}

// Chunks are handed out from both ends of what is left: slot 0 takes the
// first, the other slots the last, so that on 2 threads each reads one run of
// memory, front to back or back to front (the hardware prefetcher keeps
// ahead of one run better than of chunks interleaved with another thread's:
// the head 5-8% faster). *ends packs the first and the end of the chunks
// left, 32 bits each (callers check that the chunks are fewer than 2^32).
static uint64_t chunks_left(int64_t n_chunks) { return (uint64_t)n_chunks << 32; }

// The chunk slot takes next, or -1 when none is left.
static int64_t take_chunk(uint64_t *ends, int slot) {
    uint64_t left = __atomic_load_n(ends, __ATOMIC_RELAXED), rest;
    do {
        const uint32_t first = (uint32_t)left, end = (uint32_t)(left >> 32);
        if (first >= end) return -1;
        rest = slot == 0 ? left + 1 : left - ((uint64_t)1 << 32);
    } while (!__atomic_compare_exchange_n(ends, &left, rest, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return slot == 0 ? (int64_t)(uint32_t)left : (int64_t)(left >> 32) - 1;
}

static void run_job(void *arg, int slot) {
    job *j = arg;
    for (int64_t c; (c = take_chunk(&j->ends, slot)) >= 0;) {
        int64_t r0 = c * j->chunk;
        int64_t r1 = r0 + j->chunk < j->n_out ? r0 + j->chunk : j->n_out;
        if (j->panel.pack) {
            run_panels(j, r0, r1, j->packed + slot * j->chunk / j->panel.rows * (j->n_in / 32)
                                                         * j->panel.block_bytes);
            continue;
        }
        for (int64_t g0 = 0; g0 < j->n_groups; g0 += TILE_GROUPS)
            run_tile(j, r0, r1, g0, g0 + TILE_GROUPS < j->n_groups ? g0 + TILE_GROUPS : j->n_groups);
    }
}

typedef struct {
    const float *x;
    int64_t n_in, n_groups, next;   // next: the first group not yet taken (atomic)
    const token_group *groups;
    int path;
} quant_job;

// Each group's tokens quantised into its act_q8.
static void run_quant(void *arg, int slot) {
    quant_job *qj = arg;
    (void)slot;
    for (int64_t g; (g = __atomic_fetch_add(&qj->next, 1, __ATOMIC_RELAXED)) < qj->n_groups;) {
        const token_group *tg = &qj->groups[g];
        for (int k = 0; k < tg->n_valid; k++)
            quant_act_q8(qj->x + (tg->t0 + k) * qj->n_in, qj->n_in, tg->x, k, qj->path);
    }
}

// Tokens per group, for `left` tokens still to place: 8s, then for the
// panels a 4 (padded if need be) or the last 1 or 2 alone, for the one-row
// kernels the rest.
static int group_size(int64_t left, int quantised, int panels) {
    if (!quantised) return 1;
    if (left <= 2 || (!panels && left < ACT_GROUP)) return (int)left;
    return left >= ACT_GROUP ? ACT_GROUP : 4;
}

// Rows per chunk: CHUNKS_PER_THREAD chunks a thread, at most CHUNK_BYTES of
// W or PACKED_BYTES of panels, whole lines of y (or one panel).
static int64_t chunk_rows(const job *j, int n_threads) {
    int64_t chunk = j->n_out / ((int64_t)n_threads * CHUNKS_PER_THREAD);
    const int64_t max_rows = j->panel.pack ? PACKED_BYTES / (j->n_in / 32 * j->panel.block_bytes) * j->panel.rows
                                           : CHUNK_BYTES / j->row_stride;
    if (chunk > max_rows) chunk = max_rows;
    if (chunk >= LINE_ROWS) return chunk / LINE_ROWS * LINE_ROWS;
    return j->panel.pack ? j->panel.rows : chunk > 0 ? chunk : 1;
}

static kvc_status check_weights(int type, const uint8_t *w, int64_t row_stride,
                                int64_t n_rows, int64_t n_in) {
    const int64_t row_bytes = type_row_bytes(type, n_in);
    if (!w) return kvc_fail(KVC_EINVAL, "no weights");
    if (row_bytes == 0) return kvc_fail(KVC_EINVAL, "type %d cannot hold rows of %lld values",
                                        type, (long long)n_in);
    if (n_rows <= 0) return kvc_fail(KVC_EINVAL, "%lld weight rows", (long long)n_rows);
    if (row_stride < row_bytes || row_stride > INT64_MAX / n_rows)
        return kvc_fail(KVC_EINVAL, "row stride %lld for rows of %lld bytes",
                        (long long)row_stride, (long long)row_bytes);
    return KVC_OK;
}

kvc_status matmul(int type, const uint8_t *w, int64_t row_stride, int64_t n_out,
                  int64_t n_in, const float *x, int64_t n, float *y, int n_threads) {
    kvc_status s = check_weights(type, w, row_stride, n_out, n_in);
    if (s) return s;
    if (!x || !y || n <= 0 || n > INT64_MAX / n_in || n > INT64_MAX / n_out)
        return kvc_fail(KVC_EINVAL, "matmul: bad activations (%lld tokens)", (long long)n);
    if (n_threads < 1) return kvc_fail(KVC_EINVAL, "n_threads must be >= 1, got %d", n_threads);
    const int path = kvc_simd_path();
    job j = {.type = type, .w = w, .row_stride = row_stride, .n_out = n_out, .n_in = n_in, .n = n,
             .x = x, .y = y};
    int quantised = quant_is_integer(type);
    if (quantised) j.panel = quant_panel(type, path);
    if (n < j.panel.min_tokens) j.panel.pack = NULL;
    int64_t nb = n_in / 32, room = n + 3;   // tokens incl. the padding of a last group of 4
    if (n_threads > KVC_MAX_THREADS) n_threads = KVC_MAX_THREADS;
    if ((double)n_out * (double)n_in * (double)n < MIN_PARALLEL_MACS) n_threads = 1;
    const int64_t chunk = chunk_rows(&j, n_threads), n_chunks = (n_out + chunk - 1) / chunk;
    const int64_t panel_bytes = nb * j.panel.block_bytes;
    if (n_chunks > UINT32_MAX) return kvc_fail(KVC_EINVAL, "matmul: %lld rows is too many", (long long)n_out);
    j.chunk = chunk;
    j.ends = chunks_left(n_chunks);
    int8_t *q = quantised ? calloc((size_t)room, (size_t)n_in) : NULL;
    float *ds = quantised ? calloc((size_t)(2 * room * nb), sizeof(float)) : NULL;
    int32_t *off = quantised ? calloc((size_t)(3 * room * nb), sizeof(int32_t)) : NULL;   // off, off_half
    token_group *groups = malloc(sizeof(token_group) * (size_t)n);
    if (!groups || (quantised && (!q || !ds || !off))) {
        free(q); free(ds); free(off); free(groups);
        return kvc_fail(KVC_ENOMEM, "matmul: out of memory");
    }
    int64_t n_groups = 0;
    for (int64_t t = 0, slot = 0; t < n; n_groups++) {
        int nt = group_size(n - t, quantised, j.panel.pack != NULL);
        token_group *tg = &groups[n_groups];
        tg->t0 = t;
        tg->n_valid = n - t < nt ? (int)(n - t) : nt;
        if (quantised) {
            tg->x = (act_q8){q + slot * n_in, ds + 2 * slot * nb, ds + (2 * slot + nt) * nb,
                             off + slot * nb, off + (room + 2 * slot) * nb, nt};
        }
        t += tg->n_valid;
        slot += nt;
    }
    j.groups = groups;
    j.n_groups = n_groups;
    if (quantised) {
        quant_job qj = {.x = x, .n_in = n_in, .groups = groups, .n_groups = n_groups, .path = path};
        pool_run(run_quant, &qj, n >= PARALLEL_QUANT_TOKENS ? n_threads : 1);
        j.dot_q8 = quant_dot_q8(type, path);
    } else {
        j.dot_f32 = quant_dot_f32(type, path);
    }
    if (j.panel.pack && !(j.packed = malloc((size_t)(n_threads * chunk / j.panel.rows * panel_bytes)))) {
        free(q); free(ds); free(off); free(groups);
        return kvc_fail(KVC_ENOMEM, "matmul: out of memory");
    }
    pool_run(run_job, &j, n_threads);
    free(q); free(ds); free(off); free(groups); free(j.packed);
    return KVC_OK;
}

kvc_status matmul_dequantize_rows(int type, const uint8_t *w, int64_t row_stride,
                                  int64_t n_rows, int64_t n_in, const int64_t *ids,
                                  int64_t n_ids, float *out) {
    kvc_status s = check_weights(type, w, row_stride, n_rows, n_in);
    if (s) return s;
    if (n_ids < 0 || (n_ids > 0 && (!ids || !out)) || n_ids > INT64_MAX / n_in)
        return kvc_fail(KVC_EINVAL, "dequantize_rows: bad ids or output (%lld ids)",
                        (long long)n_ids);
    for (int64_t k = 0; k < n_ids; k++)
        if (ids[k] < 0 || ids[k] >= n_rows)
            return kvc_fail(KVC_EINVAL, "row id %lld outside [0, %lld)", (long long)ids[k],
                            (long long)n_rows);
    for (int64_t k = 0; k < n_ids; k++)
        quant_dequantize_row(type, w + ids[k] * row_stride, out + k * n_in, n_in);
    return KVC_OK;
}

typedef struct {
    const uint8_t *p;
    int64_t n_bytes;
    uint64_t ends, sum;      // take_chunk's; the sum of what was read (atomic)
} read_job;

static void run_read(void *arg, int slot) {
    read_job *j = arg;
    uint64_t acc[8] = {0};
    for (int64_t c; (c = take_chunk(&j->ends, slot)) >= 0;) {
        int64_t b0 = c * CHUNK_BYTES;
        int64_t b1 = b0 + CHUNK_BYTES < j->n_bytes ? b0 + CHUNK_BYTES : j->n_bytes;
        for (int64_t b = b0; b < b1; b += 64) {
            __builtin_prefetch(j->p + b + READ_AHEAD);   // as the kernels read
            uint64_t w[8];
            memcpy(w, j->p + b, 64);
            for (int k = 0; k < 8; k++) acc[k] += w[k];
        }
    }
    uint64_t sum = 0;
    for (int k = 0; k < 8; k++) sum += acc[k];
    __atomic_fetch_add(&j->sum, sum, __ATOMIC_RELAXED);
}

kvc_status matmul_read_probe(const uint8_t *p, int64_t n_bytes, int n_threads,
                             uint64_t *sum_out) {
    if (!p || !sum_out || n_bytes <= 0 || n_bytes % 64)
        return kvc_fail(KVC_EINVAL, "read_probe: %lld bytes (need a positive multiple of 64)",
                        (long long)n_bytes);
    if (n_threads < 1) return kvc_fail(KVC_EINVAL, "n_threads must be >= 1, got %d", n_threads);
    if (n_bytes / CHUNK_BYTES >= UINT32_MAX)
        return kvc_fail(KVC_EINVAL, "read_probe: %lld bytes is too many", (long long)n_bytes);
    read_job j = {.p = p, .n_bytes = n_bytes, .ends = chunks_left((n_bytes + CHUNK_BYTES - 1) / CHUNK_BYTES)};
    pool_run(run_read, &j, n_threads);
    *sum_out = j.sum;
    return KVC_OK;
}
