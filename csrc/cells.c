// The KV cell table. See cells.h and docs/cells.md.
//
// Per cell: position (-1 = empty), accumulated shift, a bitset of sequences
// and its popcount. Per sequence: a treap of (pos, cell) keys, so that the
// cells of a sequence in a position range are found in O(log n + k), and its
// cached min/max position. Treap nodes live in one pool addressed by index.
#include "cells.h"

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define STATE_MAGIC 0x5443564bu // "KVCT" little-endian
#define STATE_VERSION 1u
#define STATE_HEADER 32
#define STATE_TRAILER 8

typedef struct {
    int32_t pos, cell;
    int32_t left, right;
    uint32_t prio;
} node;

struct kvc_table {
    int32_t n_cells, n_seq_max, n_swa, swa_type;
    int32_t n_words; // uint64 words per cell bitset
    int32_t used, head, used_max_p1, has_shift;

    int32_t *pos;
    int32_t *shift;
    uint16_t *nseq;
    uint64_t *seq;       // n_cells * n_words
    uint64_t *used_bits; // one bit per cell, for used_max_p1

    int32_t *root; // per sequence: treap root, -1 when empty
    int32_t *count;
    int32_t *pos_min;
    int32_t *pos_max;

    node *nodes;
    int32_t n_nodes, cap_nodes, free_node, n_free;
    uint32_t rng;

    // scratch, not part of the state
    int32_t *tmp_cell;  // n_cells
    int32_t *tmp_pos;   // n_cells
    int32_t *tmp_seq;   // n_seq_max
    uint8_t *tmp_mark;  // n_cells, all zero between calls
};

#define fail(t, ...) kvc_fail(__VA_ARGS__)

// ---------------------------------------------------------------- SWA

// llama.cpp's is_masked_swa: may a token at p1 not see a cell at p0?
static int is_masked_swa(const kvc_table *t, int64_t p0, int64_t p1) {
    switch (t->swa_type) {
    case KVC_SWA_STANDARD:
        return p1 - p0 >= t->n_swa;
    case KVC_SWA_CHUNKED:
        return p0 < (p1 / t->n_swa) * t->n_swa;
    case KVC_SWA_SYMMETRIC: {
        int64_t half = t->n_swa / 2, d = p1 - p0;
        return d < -half || d > half;
    }
    default:
        return 0;
    }
}

// the lowest position a token at p1 may see
static int64_t swa_lowest(const kvc_table *t, int64_t p1) {
    switch (t->swa_type) {
    case KVC_SWA_STANDARD:
        return p1 - t->n_swa + 1;
    case KVC_SWA_CHUNKED:
        return (p1 / t->n_swa) * t->n_swa;
    case KVC_SWA_SYMMETRIC:
        return p1 - t->n_swa / 2;
    default:
        return 0;
    }
}

// ---------------------------------------------------------------- treap

static int key_less(int32_t pa, int32_t ca, int32_t pb, int32_t cb) {
    return pa < pb || (pa == pb && ca < cb);
}

// l gets the keys < (pos, cell), r the others
static void split(node *nd, int32_t t, int32_t pos, int32_t cell, int32_t *l, int32_t *r) {
    if (t < 0) {
        *l = *r = -1;
    } else if (key_less(nd[t].pos, nd[t].cell, pos, cell)) {
        split(nd, nd[t].right, pos, cell, &nd[t].right, r);
        *l = t;
    } else {
        split(nd, nd[t].left, pos, cell, l, &nd[t].left);
        *r = t;
    }
}

// every key of a is below every key of b
static int32_t merge(node *nd, int32_t a, int32_t b) {
    if (a < 0) return b;
    if (b < 0) return a;
    if (nd[a].prio > nd[b].prio) {
        nd[a].right = merge(nd, nd[a].right, b);
        return a;
    }
    nd[b].left = merge(nd, a, nd[b].left);
    return b;
}

static int32_t tree_insert(node *nd, int32_t t, int32_t n) {
    if (t < 0) return n;
    if (nd[n].prio > nd[t].prio) {
        split(nd, t, nd[n].pos, nd[n].cell, &nd[n].left, &nd[n].right);
        return n;
    }
    if (key_less(nd[n].pos, nd[n].cell, nd[t].pos, nd[t].cell)) {
        nd[t].left = tree_insert(nd, nd[t].left, n);
    } else {
        nd[t].right = tree_insert(nd, nd[t].right, n);
    }
    return t;
}

// removes key (pos, cell), which must be present; *gone gets its node
static int32_t tree_erase(node *nd, int32_t t, int32_t pos, int32_t cell, int32_t *gone) {
    if (t < 0) return -1;
    if (nd[t].pos == pos && nd[t].cell == cell) {
        *gone = t;
        return merge(nd, nd[t].left, nd[t].right);
    }
    if (key_less(pos, cell, nd[t].pos, nd[t].cell)) {
        nd[t].left = tree_erase(nd, nd[t].left, pos, cell, gone);
    } else {
        nd[t].right = tree_erase(nd, nd[t].right, pos, cell, gone);
    }
    return t;
}

static int32_t tree_min_pos(const node *nd, int32_t t) {
    while (nd[t].left >= 0) t = nd[t].left;
    return nd[t].pos;
}

static int32_t tree_max_pos(const node *nd, int32_t t) {
    while (nd[t].right >= 0) t = nd[t].right;
    return nd[t].pos;
}

// appends the (cell, pos) of keys with p0 <= pos < p1, in key order
static void tree_collect(const node *nd, int32_t t, int64_t p0, int64_t p1,
                         int32_t *cells, int32_t *poss, int32_t *n) {
    while (t >= 0) {
        if (nd[t].pos < p0) {
            t = nd[t].right;
        } else if (nd[t].pos >= p1) {
            t = nd[t].left;
        } else {
            tree_collect(nd, nd[t].left, p0, p1, cells, poss, n);
            cells[*n] = nd[t].cell;
            if (poss) poss[*n] = nd[t].pos;
            (*n)++;
            t = nd[t].right;
        }
    }
}

// ---------------------------------------------------------------- node pool

// makes sure `extra` nodes can be allocated without failing
static int nodes_reserve(kvc_table *t, int64_t extra) {
    int64_t have = (int64_t)t->cap_nodes - t->n_nodes + t->n_free;
    if (extra <= have) return KVC_OK;
    int64_t cap = t->cap_nodes ? t->cap_nodes : 64;
    while (cap - t->n_nodes + t->n_free < extra) cap *= 2;
    if (cap > INT32_MAX) return fail(t, KVC_ENOMEM, "cell index too large");
    node *nodes = realloc(t->nodes, (size_t)cap * sizeof(node));
    if (!nodes) return fail(t, KVC_ENOMEM, "out of memory");
    t->nodes = nodes;
    t->cap_nodes = (int32_t)cap;
    return KVC_OK;
}

static int32_t node_alloc(kvc_table *t, int32_t pos, int32_t cell) {
    int32_t n;
    if (t->free_node >= 0) {
        n = t->free_node;
        t->free_node = t->nodes[n].left;
        t->n_free--;
    } else {
        n = t->n_nodes++;
    }
    t->rng ^= t->rng << 13; // xorshift32
    t->rng ^= t->rng >> 17;
    t->rng ^= t->rng << 5;
    t->nodes[n] = (node){pos, cell, -1, -1, t->rng};
    return n;
}

static void node_free(kvc_table *t, int32_t n) {
    t->nodes[n].left = t->free_node;
    t->nodes[n].cell = -1;
    t->free_node = n;
    t->n_free++;
}

// ---------------------------------------------------------------- cells

static int has_seq(const kvc_table *t, int32_t c, int32_t s) {
    return (t->seq[(size_t)c * t->n_words + s / 64] >> (s % 64)) & 1;
}

static int32_t first_seq(const kvc_table *t, int32_t c) {
    const uint64_t *w = t->seq + (size_t)c * t->n_words;
    for (int32_t k = 0; k < t->n_words; k++) {
        if (w[k]) return k * 64 + __builtin_ctzll(w[k]);
    }
    return -1;
}

// a cell find_slot may take: empty, or one sequence whose position there is SWA-masked
static int cell_usable(const kvc_table *t, int32_t c) {
    if (t->pos[c] < 0) return 1;
    if (t->nseq[c] != 1) return 0;
    int32_t s = first_seq(t, c);
    return is_masked_swa(t, t->pos[c], (int64_t)t->pos_max[s] + 1);
}

static void index_add(kvc_table *t, int32_t s, int32_t c) {
    int32_t p = t->pos[c];
    t->root[s] = tree_insert(t->nodes, t->root[s], node_alloc(t, p, c));
    if (t->count[s]++ == 0) {
        t->pos_min[s] = t->pos_max[s] = p;
    } else {
        if (p < t->pos_min[s]) t->pos_min[s] = p;
        if (p > t->pos_max[s]) t->pos_max[s] = p;
    }
}

static void index_del(kvc_table *t, int32_t s, int32_t c) {
    int32_t p = t->pos[c], gone = -1;
    t->root[s] = tree_erase(t->nodes, t->root[s], p, c, &gone);
    node_free(t, gone);
    if (--t->count[s] == 0) {
        t->pos_min[s] = t->pos_max[s] = -1;
        return;
    }
    if (p == t->pos_min[s]) t->pos_min[s] = tree_min_pos(t->nodes, t->root[s]);
    if (p == t->pos_max[s]) t->pos_max[s] = tree_max_pos(t->nodes, t->root[s]);
}

// removes / re-adds every index entry of cell c (around a change of its pos or index)
static void cell_unindex(kvc_table *t, int32_t c) {
    const uint64_t *w = t->seq + (size_t)c * t->n_words;
    for (int32_t k = 0; k < t->n_words; k++) {
        for (uint64_t b = w[k]; b; b &= b - 1) index_del(t, k * 64 + __builtin_ctzll(b), c);
    }
}

static void cell_reindex(kvc_table *t, int32_t c) {
    const uint64_t *w = t->seq + (size_t)c * t->n_words;
    for (int32_t k = 0; k < t->n_words; k++) {
        for (uint64_t b = w[k]; b; b &= b - 1) index_add(t, k * 64 + __builtin_ctzll(b), c);
    }
}

static void mark_used(kvc_table *t, int32_t c) {
    t->used_bits[c / 64] |= 1ull << (c % 64);
    t->used++;
    if (c + 1 > t->used_max_p1) t->used_max_p1 = c + 1;
}

static void mark_free(kvc_table *t, int32_t c) {
    t->used_bits[c / 64] &= ~(1ull << (c % 64));
    t->used--;
    if (c + 1 == t->used_max_p1) {
        int32_t k = c / 64;
        while (k >= 0 && !t->used_bits[k]) k--;
        t->used_max_p1 = k < 0 ? 0 : k * 64 + 64 - __builtin_clzll(t->used_bits[k]);
    }
}

// empties a cell that has no sequence left
static void cell_free(kvc_table *t, int32_t c) {
    t->pos[c] = -1;
    t->shift[c] = 0;
    mark_free(t, c);
}

static void cell_add_seq(kvc_table *t, int32_t c, int32_t s) {
    t->seq[(size_t)c * t->n_words + s / 64] |= 1ull << (s % 64);
    t->nseq[c]++;
    index_add(t, s, c);
}

// returns 1 when the cell became empty
static int cell_del_seq(kvc_table *t, int32_t c, int32_t s) {
    index_del(t, s, c);
    t->seq[(size_t)c * t->n_words + s / 64] &= ~(1ull << (s % 64));
    if (--t->nseq[c] > 0) return 0;
    cell_free(t, c);
    return 1;
}

static void cell_rm(kvc_table *t, int32_t c) {
    cell_unindex(t, c);
    memset(t->seq + (size_t)c * t->n_words, 0, (size_t)t->n_words * sizeof(uint64_t));
    t->nseq[c] = 0;
    cell_free(t, c);
}

// the cells of sequence s with p0 <= pos < p1 into tmp_cell (and tmp_pos), in position order
static int32_t seq_range(kvc_table *t, int32_t s, int64_t p0, int64_t p1) {
    int32_t n = 0;
    tree_collect(t->nodes, t->root[s], p0, p1, t->tmp_cell, t->tmp_pos, &n);
    return n;
}

// ---------------------------------------------------------------- create / free

void kvc_free(kvc_table *t) {
    if (!t) return;
    free(t->pos);
    free(t->shift);
    free(t->nseq);
    free(t->seq);
    free(t->used_bits);
    free(t->root);
    free(t->count);
    free(t->pos_min);
    free(t->pos_max);
    free(t->nodes);
    free(t->tmp_cell);
    free(t->tmp_pos);
    free(t->tmp_seq);
    free(t->tmp_mark);
    free(t);
}

static const char *params_error(int64_t n_cells, int64_t n_seq_max, int64_t n_swa, int64_t swa_type) {
    if (n_cells < 1 || n_cells > KVC_MAX_CELLS) return "n_cells must be in [1, 2^28]";
    if (n_seq_max < 1 || n_seq_max > KVC_MAX_SEQ) return "n_seq_max must be in [1, 256]";
    if (swa_type < KVC_SWA_NONE || swa_type > KVC_SWA_SYMMETRIC) return "unknown swa_type";
    if (n_swa < 0) return "n_swa must be >= 0";
    if (swa_type != KVC_SWA_NONE && n_swa < 1) return "n_swa must be >= 1 for a sliding window";
    return NULL;
}

kvc_status kvc_new(int32_t n_cells, int32_t n_seq_max, int32_t n_swa, int32_t swa_type, kvc_table **out) {
    *out = NULL;
    const char *why = params_error(n_cells, n_seq_max, n_swa, swa_type);
    if (why) return kvc_fail(KVC_EINVAL, "%s", why);
    kvc_table *t = calloc(1, sizeof *t);
    if (!t) return kvc_fail(KVC_ENOMEM, "cannot allocate the cell table");
    size_t n = (size_t)n_cells, ns = (size_t)n_seq_max;
    t->n_cells = n_cells;
    t->n_seq_max = n_seq_max;
    t->n_swa = n_swa;
    t->swa_type = swa_type;
    t->n_words = (n_seq_max + 63) / 64;
    t->pos = malloc(n * sizeof(int32_t));
    t->shift = calloc(n, sizeof(int32_t));
    t->nseq = calloc(n, sizeof(uint16_t));
    t->seq = calloc(n * (size_t)t->n_words, sizeof(uint64_t));
    t->used_bits = calloc((n + 63) / 64, sizeof(uint64_t));
    t->root = malloc(ns * sizeof(int32_t));
    t->count = calloc(ns, sizeof(int32_t));
    t->pos_min = malloc(ns * sizeof(int32_t));
    t->pos_max = malloc(ns * sizeof(int32_t));
    t->tmp_cell = malloc(n * sizeof(int32_t));
    t->tmp_pos = malloc(n * sizeof(int32_t));
    t->tmp_seq = malloc(ns * sizeof(int32_t));
    t->tmp_mark = calloc(n, 1);
    if (!t->pos || !t->shift || !t->nseq || !t->seq || !t->used_bits || !t->root || !t->count ||
        !t->pos_min || !t->pos_max || !t->tmp_cell || !t->tmp_pos || !t->tmp_seq || !t->tmp_mark) {
        kvc_free(t);
        return kvc_fail(KVC_ENOMEM, "cannot allocate the cell table");
    }
    for (size_t i = 0; i < n; i++) t->pos[i] = -1;
    for (size_t s = 0; s < ns; s++) t->root[s] = t->pos_min[s] = t->pos_max[s] = -1;
    t->free_node = -1;
    t->rng = 0x9e3779b9u;
    *out = t;
    return KVC_OK;
}

static void *dup(const void *p, size_t size) {
    void *q = malloc(size ? size : 1);
    if (q && size) memcpy(q, p, size);
    return q;
}

kvc_status kvc_clone(const kvc_table *t, kvc_table **out) {
    kvc_table *c;
    int rc = kvc_new(t->n_cells, t->n_seq_max, t->n_swa, t->swa_type, &c);
    *out = NULL;
    if (rc) return rc;
    size_t n = (size_t)t->n_cells, ns = (size_t)t->n_seq_max;
    node *nodes = dup(t->nodes, (size_t)t->cap_nodes * sizeof(node));
    if (!nodes) {
        kvc_free(c);
        return kvc_fail(KVC_ENOMEM, "cannot copy the cell table");
    }
    c->nodes = nodes;
    c->cap_nodes = t->cap_nodes;
    c->n_nodes = t->n_nodes;
    c->free_node = t->free_node;
    c->n_free = t->n_free;
    c->rng = t->rng;
    c->used = t->used;
    c->head = t->head;
    c->used_max_p1 = t->used_max_p1;
    c->has_shift = t->has_shift;
    memcpy(c->pos, t->pos, n * sizeof(int32_t));
    memcpy(c->shift, t->shift, n * sizeof(int32_t));
    memcpy(c->nseq, t->nseq, n * sizeof(uint16_t));
    memcpy(c->seq, t->seq, n * (size_t)t->n_words * sizeof(uint64_t));
    memcpy(c->used_bits, t->used_bits, (n + 63) / 64 * sizeof(uint64_t));
    memcpy(c->root, t->root, ns * sizeof(int32_t));
    memcpy(c->count, t->count, ns * sizeof(int32_t));
    memcpy(c->pos_min, t->pos_min, ns * sizeof(int32_t));
    memcpy(c->pos_max, t->pos_max, ns * sizeof(int32_t));
    *out = c;
    return KVC_OK;
}

int32_t kvc_n_cells(const kvc_table *t) { return t->n_cells; }
int32_t kvc_n_seq_max(const kvc_table *t) { return t->n_seq_max; }
int32_t kvc_n_swa(const kvc_table *t) { return t->n_swa; }
int32_t kvc_swa_type(const kvc_table *t) { return t->swa_type; }
int32_t kvc_used(const kvc_table *t) { return t->used; }
int32_t kvc_head(const kvc_table *t) { return t->head; }
int32_t kvc_used_max_p1(const kvc_table *t) { return t->used_max_p1; }
int32_t kvc_has_shift(const kvc_table *t) { return t->has_shift; }

static int bad_seq(kvc_table *t, int32_t s) {
    if (s >= 0 && s < t->n_seq_max) return KVC_OK;
    return fail(t, KVC_EINVAL, "sequence id %d outside [0, %d)", s, t->n_seq_max);
}

static int bad_cell(kvc_table *t, int32_t i) {
    if (i >= 0 && i < t->n_cells) return KVC_OK;
    return fail(t, KVC_EINVAL, "cell index %d outside [0, %d)", i, t->n_cells);
}

// ---------------------------------------------------------------- find_slot / apply_ubatch

kvc_status kvc_find_slot(kvc_table *t, int32_t n_tokens, int32_t cont, int32_t *idxs_out) {
    if (n_tokens < 1) return fail(t, KVC_EINVAL, "n_tokens must be >= 1, got %d", n_tokens);
    const uint32_t size = (uint32_t)t->n_cells;
    uint32_t head = (uint32_t)t->head;
    // plenty of free cells before head: search from the start to fill the cache
    if ((int64_t)head > (int64_t)t->used + 2 * (int64_t)n_tokens) head = 0;
    if ((uint32_t)n_tokens > size) {
        return fail(t, KVC_EFULL, "%d tokens do not fit in %u cells", n_tokens, size);
    }
    const uint32_t n_test = cont ? (uint32_t)n_tokens : 1;
    uint32_t n_tested = 0, n_found = 0;
    for (;;) {
        if (head + n_test > size) {
            n_tested += size - head;
            head = 0;
            continue;
        }
        for (uint32_t k = 0; k < n_test; k++) {
            uint32_t c = head++;
            n_tested++;
            if (cell_usable(t, (int32_t)c)) {
                idxs_out[n_found++] = (int32_t)c;
            } else if (cont) {
                break;
            }
        }
        if (n_found == (uint32_t)n_tokens) return KVC_OK;
        if (cont) n_found = 0;
        if (n_tested >= size) {
            return fail(t, KVC_EFULL, "no slot for %d tokens%s (used %d of %u cells)", n_tokens,
                        cont ? " in a row" : "", t->used, size);
        }
    }
}

static int check_ubatch(kvc_table *t, int32_t n_tokens, const int32_t *idxs, const int32_t *pos,
                        int32_t n_seq_entries, const int32_t *seq_ids, const int32_t *seq_offsets) {
    if (n_tokens < 1) return fail(t, KVC_EINVAL, "a ubatch needs at least one token");
    if (seq_offsets ? (seq_offsets[0] != 0 || seq_offsets[n_tokens] != n_seq_entries)
                    : n_seq_entries != n_tokens) {
        return fail(t, KVC_EINVAL, "sequence lists do not match the %d tokens", n_tokens);
    }
    int rc = KVC_OK;
    int32_t n_marked = 0;
    for (int32_t i = 0; i < n_tokens && rc == KVC_OK; i++) {
        int32_t c = idxs[i];
        if ((rc = bad_cell(t, c))) break;
        if (t->tmp_mark[c]) {
            rc = fail(t, KVC_EINVAL, "cell %d appears twice in idxs", c);
            break;
        }
        t->tmp_mark[c] = 1;
        n_marked++;
        if (t->pos[c] >= 0 && t->nseq[c] != 1) {
            rc = fail(t, KVC_EINVAL, "cell %d holds %d sequences; only an empty cell or one of a "
                      "single sequence can be overwritten", c, t->nseq[c]);
            break;
        }
        if (pos[i] < 0) {
            rc = fail(t, KVC_EINVAL, "position %d of token %d is negative", pos[i], i);
            break;
        }
        int32_t a = seq_offsets ? seq_offsets[i] : i, b = seq_offsets ? seq_offsets[i + 1] : i + 1;
        if (b <= a || a < 0 || b > n_seq_entries) {
            rc = fail(t, KVC_EINVAL, "token %d has no sequence", i);
            break;
        }
        for (int32_t k = a; k < b && rc == KVC_OK; k++) {
            if ((rc = bad_seq(t, seq_ids[k]))) break;
            for (int32_t m = a; m < k; m++) {
                if (seq_ids[m] == seq_ids[k]) {
                    rc = fail(t, KVC_EINVAL, "token %d lists sequence %d twice", i, seq_ids[k]);
                    break;
                }
            }
        }
    }
    for (int32_t k = 0; k < n_marked; k++) t->tmp_mark[idxs[k]] = 0;
    return rc;
}

static void seq_rm_range(kvc_table *t, int32_t s, int64_t p0, int64_t p1, int32_t *first_freed);

kvc_status kvc_apply_ubatch(kvc_table *t, int32_t n_tokens, const int32_t *idxs, const int32_t *pos,
                     int32_t n_seq_entries, const int32_t *seq_ids, const int32_t *seq_offsets) {
    int rc = check_ubatch(t, n_tokens, idxs, pos, n_seq_entries, seq_ids, seq_offsets);
    if (rc) return rc;
    if ((rc = nodes_reserve(t, n_seq_entries))) return rc;

    // per sequence, the largest position overwritten
    int32_t *max_rm = t->tmp_seq;
    for (int32_t s = 0; s < t->n_seq_max; s++) max_rm[s] = -1;

    for (int32_t i = 0; i < n_tokens; i++) {
        int32_t c = idxs[i];
        if (t->pos[c] >= 0) {
            int32_t s = first_seq(t, c);
            if (t->pos[c] > max_rm[s]) max_rm[s] = t->pos[c];
            cell_rm(t, c);
        }
        t->pos[c] = pos[i];
        mark_used(t, c);
        int32_t a = seq_offsets ? seq_offsets[i] : i, b = seq_offsets ? seq_offsets[i + 1] : i + 1;
        for (int32_t k = a; k < b; k++) cell_add_seq(t, c, seq_ids[k]);
    }

    // keep each sequence's positions contiguous: drop what lies below an overwritten one
    for (int32_t s = 0; s < t->n_seq_max; s++) {
        if (max_rm[s] >= 0 && t->count[s] > 0 && t->pos_min[s] <= max_rm[s]) {
            seq_rm_range(t, s, t->pos_min[s], (int64_t)max_rm[s] + 1, NULL);
        }
    }
    t->head = idxs[n_tokens - 1] + 1;
    return KVC_OK;
}

kvc_status kvc_check_ubatch(kvc_table *t, int32_t n_tokens, const int32_t *idxs, const int32_t *pos,
                            int32_t n_seq_entries, const int32_t *seq_ids, const int32_t *seq_offsets) {
    int rc = check_ubatch(t, n_tokens, idxs, pos, n_seq_entries, seq_ids, seq_offsets);
    // reserving the nodes now leaves kvc_apply_ubatch nothing that can fail
    return rc ? rc : nodes_reserve(t, n_seq_entries);
}

// ---------------------------------------------------------------- visible cells

// the number of the n ascending positions p[] below x (searchsorted left)
static int32_t count_below(const int32_t *p, int32_t n, int64_t x) {
    int32_t a = 0, b = n;
    while (a < b) {
        int32_t m = a + (b - a) / 2;
        if (p[m] < x) a = m + 1;
        else b = m;
    }
    return a;
}

kvc_status kvc_visible(kvc_table *t, int32_t n_tokens, const int32_t *pos, const int32_t *seq_ids,
                       int32_t segment, int32_t *cells_out, int64_t cap, int64_t *n_out,
                       int32_t *lo_out, int32_t *hi_out) {
    if (n_tokens < 0 || segment < 1 || cap < 0)
        return fail(t, KVC_EINVAL, "visible: %d tokens, segment %d, room %lld", n_tokens,
                    segment, (long long)cap);
    for (int32_t i = 0; i < n_tokens; i++) {
        if (bad_seq(t, seq_ids[i])) return KVC_EINVAL;
        if (pos[i] < 0) return fail(t, KVC_EINVAL, "position %d of token %d is negative", pos[i], i);
    }
    int32_t *wanted = t->tmp_seq;
    for (int32_t s = 0; s < t->n_seq_max; s++) wanted[s] = 0;
    for (int32_t i = 0; i < n_tokens; i++) wanted[seq_ids[i]] = 1;
    // the length first, so that a list without room writes nothing
    int64_t n = 0;
    for (int32_t s = 0; s < t->n_seq_max; s++) {
        if (!wanted[s] || t->count[s] == 0) continue;
        n += ((t->pos_min[s] - n) % segment + segment) % segment + t->count[s];
    }
    if (n > INT32_MAX) return fail(t, KVC_EINVAL, "visible: a list of %lld cells", (long long)n);
    if (n > cap) {
        *n_out = n;
        return KVC_OK;
    }
    n = 0;
    for (int32_t s = 0; s < t->n_seq_max; s++) {
        if (!wanted[s]) continue;
        int32_t k = 0;
        if (t->count[s] > 0) {
            // padding (cell 0, in no range) puts position p at an index = p mod segment
            int64_t pad = ((t->pos_min[s] - n) % segment + segment) % segment;
            memset(cells_out + n, 0, sizeof(int32_t) * (size_t)pad);
            n += pad;
            tree_collect(t->nodes, t->root[s], 0, (int64_t)INT32_MAX + 1, cells_out + n,
                         t->tmp_pos, &k);
        }
        for (int32_t i = 0; i < n_tokens; i++) {
            if (seq_ids[i] != s) continue;
            lo_out[i] = (int32_t)(n + count_below(t->tmp_pos, k, swa_lowest(t, pos[i])));
            hi_out[i] = (int32_t)(n + count_below(t->tmp_pos, k, (int64_t)pos[i] + 1));
        }
        n += k;
    }
    *n_out = n;
    return KVC_OK;
}

// ---------------------------------------------------------------- cell queries

kvc_status kvc_cell_pos(kvc_table *t, int32_t i, int32_t *pos_out) {
    int rc = bad_cell(t, i);
    if (rc) return rc;
    *pos_out = t->pos[i];
    return KVC_OK;
}

kvc_status kvc_cell_seqs(kvc_table *t, int32_t i, int32_t *seqs_out, int32_t *n_out) {
    int rc = bad_cell(t, i);
    if (rc) return rc;
    int32_t n = 0;
    for (int32_t s = 0; s < t->n_seq_max; s++) {
        if (has_seq(t, i, s)) seqs_out[n++] = s;
    }
    *n_out = n;
    return KVC_OK;
}

void kvc_positions(const kvc_table *t, int32_t *pos_out) {
    memcpy(pos_out, t->pos, (size_t)t->n_cells * sizeof(int32_t));
}

void kvc_cell_labels(const kvc_table *t, int32_t *labels_out) {
    for (int32_t c = 0; c < t->n_cells; c++) {
        labels_out[c] = t->pos[c] < 0 ? -1 : t->nseq[c] == 1 ? first_seq(t, c) : -2;
    }
}

void kvc_seq_matrix(const kvc_table *t, uint8_t *out) {
    for (int32_t c = 0; c < t->n_cells; c++) {
        for (int32_t s = 0; s < t->n_seq_max; s++) {
            out[(size_t)c * t->n_seq_max + s] = (uint8_t)has_seq(t, c, s);
        }
    }
}

// ---------------------------------------------------------------- sequence operations

static int64_t range_lo(int32_t p0) { return p0 < 0 ? 0 : p0; }
// p1 < 0: no upper end, so a cell at INT32_MAX is in range too
static int64_t range_hi(int32_t p1) { return p1 < 0 ? (int64_t)INT32_MAX + 1 : p1; }

// removes s from its cells with p0 <= pos < p1; *first_freed lowers to the lowest freed cell
static void seq_rm_range(kvc_table *t, int32_t s, int64_t p0, int64_t p1, int32_t *first_freed) {
    int32_t n = seq_range(t, s, p0, p1);
    for (int32_t k = 0; k < n; k++) {
        int32_t c = t->tmp_cell[k];
        if (cell_del_seq(t, c, s) && first_freed && c < *first_freed) *first_freed = c;
    }
}

kvc_status kvc_seq_rm(kvc_table *t, int32_t seq_id, int32_t p0, int32_t p1) {
    if (seq_id != -1 && bad_seq(t, seq_id)) return KVC_EINVAL;
    int64_t lo = range_lo(p0), hi = range_hi(p1);
    int32_t first_freed = t->n_cells;
    if (seq_id >= 0) {
        seq_rm_range(t, seq_id, lo, hi, &first_freed);
    } else {
        for (int32_t s = 0; s < t->n_seq_max; s++) {
            int32_t n = seq_range(t, s, lo, hi);
            for (int32_t k = 0; k < n; k++) {
                int32_t c = t->tmp_cell[k];
                cell_rm(t, c);
                if (c < first_freed) first_freed = c;
            }
        }
    }
    if (first_freed < t->head) t->head = first_freed;
    return KVC_OK;
}

kvc_status kvc_seq_cp(kvc_table *t, int32_t seq_src, int32_t seq_dst, int32_t p0, int32_t p1) {
    int rc;
    if ((rc = bad_seq(t, seq_src)) || (rc = bad_seq(t, seq_dst))) return rc;
    if (seq_src == seq_dst) return KVC_OK;
    int32_t n = seq_range(t, seq_src, range_lo(p0), range_hi(p1));
    if ((rc = nodes_reserve(t, n))) return rc;
    for (int32_t k = 0; k < n; k++) {
        int32_t c = t->tmp_cell[k];
        if (!has_seq(t, c, seq_dst)) cell_add_seq(t, c, seq_dst);
    }
    return KVC_OK;
}

kvc_status kvc_seq_keep(kvc_table *t, int32_t seq_id) {
    int rc = bad_seq(t, seq_id);
    if (rc) return rc;
    int32_t first_freed = t->n_cells;
    for (int32_t s = 0; s < t->n_seq_max; s++) {
        if (s == seq_id) continue;
        int32_t n = seq_range(t, s, 0, range_hi(-1));
        for (int32_t k = 0; k < n; k++) {
            int32_t c = t->tmp_cell[k];
            if (cell_del_seq(t, c, s) && c < first_freed) first_freed = c;
        }
    }
    if (first_freed < t->head) t->head = first_freed;
    return KVC_OK;
}

kvc_status kvc_seq_add(kvc_table *t, int32_t seq_id, int32_t p0, int32_t p1, int32_t delta) {
    int rc = bad_seq(t, seq_id);
    if (rc) return rc;
    int64_t lo = range_lo(p0), hi = range_hi(p1);
    if (delta == 0 || lo == hi) return KVC_OK;
    int32_t n = seq_range(t, seq_id, lo, hi);
    if (n > 0 && (int64_t)t->tmp_pos[n - 1] + delta > INT32_MAX) {
        return fail(t, KVC_EINVAL, "seq_add: position %d + %d overflows int32", t->tmp_pos[n - 1], delta);
    }
    int32_t first_freed = t->n_cells;
    for (int32_t k = 0; k < n; k++) {
        int32_t c = t->tmp_cell[k];
        cell_unindex(t, c);
        t->has_shift = 1;
        int64_t p = (int64_t)t->pos[c] + delta;
        if (p < 0) {
            memset(t->seq + (size_t)c * t->n_words, 0, (size_t)t->n_words * sizeof(uint64_t));
            t->nseq[c] = 0;
            cell_free(t, c);
            if (c < first_freed) first_freed = c;
        } else {
            t->pos[c] = (int32_t)p;
            t->shift[c] += delta;
            cell_reindex(t, c);
        }
    }
    t->head = first_freed < t->n_cells ? first_freed : 0;
    return KVC_OK;
}

kvc_status kvc_seq_div(kvc_table *t, int32_t seq_id, int32_t p0, int32_t p1, int32_t d) {
    int rc = bad_seq(t, seq_id);
    if (rc) return rc;
    if (d < 1) return fail(t, KVC_EINVAL, "seq_div: divisor must be >= 1, got %d", d);
    int64_t lo = range_lo(p0), hi = range_hi(p1);
    if (d == 1 || lo == hi) return KVC_OK;
    int32_t n = seq_range(t, seq_id, lo, hi);
    for (int32_t k = 0; k < n; k++) {
        int32_t c = t->tmp_cell[k];
        int32_t p = t->pos[c] / d;
        cell_unindex(t, c);
        // the shift is how far the position moved, as for seq_add
        t->shift[c] += p - t->pos[c];
        t->pos[c] = p;
        cell_reindex(t, c);
        t->has_shift = 1;
    }
    return KVC_OK;
}

kvc_status kvc_seq_pos_min(kvc_table *t, int32_t seq_id, int32_t *out) {
    int rc = bad_seq(t, seq_id);
    if (rc) return rc;
    *out = t->pos_min[seq_id];
    return KVC_OK;
}

kvc_status kvc_seq_pos_max(kvc_table *t, int32_t seq_id, int32_t *out) {
    int rc = bad_seq(t, seq_id);
    if (rc) return rc;
    *out = t->pos_max[seq_id];
    return KVC_OK;
}

void kvc_seq_pos_bounds(const kvc_table *t, int32_t *mins_out, int32_t *maxs_out) {
    memcpy(mins_out, t->pos_min, (size_t)t->n_seq_max * sizeof(int32_t));
    memcpy(maxs_out, t->pos_max, (size_t)t->n_seq_max * sizeof(int32_t));
}

kvc_status kvc_seq_count(kvc_table *t, int32_t seq_id, int32_t *n_out) {
    int rc = bad_seq(t, seq_id);
    if (rc) return rc;
    *n_out = t->count[seq_id];
    return KVC_OK;
}

kvc_status kvc_seq_cells(kvc_table *t, int32_t seq_id, int32_t *idxs_out, int32_t *pos_out) {
    int rc = bad_seq(t, seq_id);
    if (rc) return rc;
    int32_t n = 0;
    tree_collect(t->nodes, t->root[seq_id], 0, (int64_t)INT32_MAX + 1, idxs_out, pos_out, &n);
    return KVC_OK;
}

// ---------------------------------------------------------------- shifts, defrag, mask, clear

void kvc_take_shifts(kvc_table *t, int32_t *shifts_out) {
    memcpy(shifts_out, t->shift, (size_t)t->n_cells * sizeof(int32_t));
    memset(t->shift, 0, (size_t)t->n_cells * sizeof(int32_t));
    t->has_shift = 0;
}

// moves the last used cells into the first holes: every dst < used <= every src
void kvc_defrag(kvc_table *t, int32_t *moves_out, int32_t *n_moves_out) {
    int32_t n_moves = 0, i = 0, j = t->n_cells - 1;
    const size_t w = (size_t)t->n_words;
    for (;;) {
        while (i < j && t->pos[i] >= 0) i++;
        while (j > i && t->pos[j] < 0) j--;
        if (i >= j) break;
        cell_unindex(t, j);
        t->pos[i] = t->pos[j];
        t->shift[i] = t->shift[j];
        t->nseq[i] = t->nseq[j];
        memcpy(t->seq + i * w, t->seq + j * w, w * sizeof(uint64_t));
        memset(t->seq + j * w, 0, w * sizeof(uint64_t));
        t->nseq[j] = 0;
        cell_free(t, j);
        mark_used(t, i);
        cell_reindex(t, i);
        moves_out[2 * n_moves] = j;
        moves_out[2 * n_moves + 1] = i;
        n_moves++;
    }
    if (n_moves > 0) t->head = t->used;
    *n_moves_out = n_moves;
}

// opens row[cell] for the cells of a treap with lo <= pos <= p1 that a token at p1 may see;
// uses no scratch, so that masks can be built from several threads at once
static void mask_walk(const kvc_table *t, int32_t n, int64_t lo, int64_t p1, int32_t n_kv, float *row) {
    const node *nd = t->nodes;
    while (n >= 0) {
        if (nd[n].pos < lo) {
            n = nd[n].right;
        } else if (nd[n].pos > p1) {
            n = nd[n].left;
        } else {
            mask_walk(t, nd[n].left, lo, p1, n_kv, row);
            if (nd[n].cell < n_kv && !is_masked_swa(t, nd[n].pos, p1)) row[nd[n].cell] = 0.0f;
            n = nd[n].right;
        }
    }
}

kvc_status kvc_kq_mask(kvc_table *t, int32_t n_tokens, const int32_t *pos, const int32_t *seq_ids,
                int32_t n_kv, float *mask_out) {
    if (n_tokens < 0) return fail(t, KVC_EINVAL, "n_tokens must be >= 0");
    if (n_kv < 0 || n_kv > t->n_cells) return fail(t, KVC_EINVAL, "n_kv %d outside [0, %d]", n_kv, t->n_cells);
    for (int32_t i = 0; i < n_tokens; i++) {
        if (bad_seq(t, seq_ids[i])) return KVC_EINVAL;
        if (pos[i] < 0) return fail(t, KVC_EINVAL, "position %d of token %d is negative", pos[i], i);
    }
    for (int32_t i = 0; i < n_tokens; i++) {
        float *row = mask_out + (size_t)i * n_kv;
        for (int32_t j = 0; j < n_kv; j++) row[j] = -INFINITY;
        mask_walk(t, t->root[seq_ids[i]], swa_lowest(t, pos[i]), pos[i], n_kv, row);
    }
    return KVC_OK;
}

void kvc_clear(kvc_table *t) {
    size_t n = (size_t)t->n_cells;
    for (size_t i = 0; i < n; i++) t->pos[i] = -1;
    memset(t->shift, 0, n * sizeof(int32_t));
    memset(t->nseq, 0, n * sizeof(uint16_t));
    memset(t->seq, 0, n * (size_t)t->n_words * sizeof(uint64_t));
    memset(t->used_bits, 0, (n + 63) / 64 * sizeof(uint64_t));
    for (int32_t s = 0; s < t->n_seq_max; s++) {
        t->root[s] = t->pos_min[s] = t->pos_max[s] = -1;
        t->count[s] = 0;
    }
    t->n_nodes = t->n_free = 0;
    t->free_node = -1;
    t->used = t->head = t->used_max_p1 = t->has_shift = 0;
}

// ---------------------------------------------------------------- serialisation
//
// little-endian: "KVCT", u32 version, i32 n_cells, n_seq_max, n_swa, swa_type,
// head, has_shift; per cell i32 pos, i32 shift, u64 x n_words sequence bits;
// u64 FNV-1a hash of everything before it.

static void put32(uint8_t *p, uint32_t v) {
    for (int k = 0; k < 4; k++) p[k] = (uint8_t)(v >> (8 * k));
}

static void put64(uint8_t *p, uint64_t v) {
    for (int k = 0; k < 8; k++) p[k] = (uint8_t)(v >> (8 * k));
}

static uint32_t get32(const uint8_t *p) {
    uint32_t v = 0;
    for (int k = 0; k < 4; k++) v |= (uint32_t)p[k] << (8 * k);
    return v;
}

static uint64_t get64(const uint8_t *p) {
    uint64_t v = 0;
    for (int k = 0; k < 8; k++) v |= (uint64_t)p[k] << (8 * k);
    return v;
}

static uint64_t fnv1a(const uint8_t *p, int64_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (int64_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

static int64_t state_size(int64_t n_cells, int64_t n_words) {
    return STATE_HEADER + n_cells * (8 + 8 * n_words) + STATE_TRAILER;
}

int64_t kvc_state_size(const kvc_table *t) { return state_size(t->n_cells, t->n_words); }

kvc_status kvc_state_write(const kvc_table *t, uint8_t *buf, int64_t len) {
    int64_t size = kvc_state_size(t);
    if (len != size)
        return kvc_fail(KVC_EINVAL, "state buffer of %lld bytes, need %lld", (long long)len,
                        (long long)size);
    uint32_t header[8] = {STATE_MAGIC, STATE_VERSION, (uint32_t)t->n_cells, (uint32_t)t->n_seq_max,
                          (uint32_t)t->n_swa, (uint32_t)t->swa_type, (uint32_t)t->head,
                          (uint32_t)t->has_shift};
    for (int k = 0; k < 8; k++) put32(buf + 4 * k, header[k]);
    uint8_t *p = buf + STATE_HEADER;
    for (int32_t c = 0; c < t->n_cells; c++) {
        put32(p, (uint32_t)t->pos[c]);
        put32(p + 4, (uint32_t)t->shift[c]);
        p += 8;
        for (int32_t k = 0; k < t->n_words; k++, p += 8) put64(p, t->seq[(size_t)c * t->n_words + k]);
    }
    put64(p, fnv1a(buf, size - STATE_TRAILER));
    return KVC_OK;
}

// validates one serialised cell; returns its number of sequences, or -1
static int read_cell(const uint8_t *p, int32_t n_seq_max, int32_t n_words, int32_t has_shift, int32_t c) {
    int32_t pos = (int32_t)get32(p), shift = (int32_t)get32(p + 4);
    int n = 0;
    for (int32_t k = 0; k < n_words; k++) {
        uint64_t w = get64(p + 8 + 8 * k);
        int32_t valid = n_seq_max - 64 * k; // bits of this word that name a sequence
        if (valid < 64 && (w >> valid)) {
            kvc_fail(KVC_ESTATE, "cell %d names a sequence >= n_seq_max", c);
            return -1;
        }
        n += __builtin_popcountll(w);
    }
    const char *why = NULL;
    if (pos < -1) why = "has a position below -1";
    else if (pos == -1 && (n || shift)) why = "is empty but has sequences or a shift";
    else if (pos >= 0 && !n) why = "holds a position but no sequence";
    else if (!has_shift && shift) why = "has a shift while has_shift is off";
    else if (pos >= 0 && ((int64_t)pos - shift < 0 || (int64_t)pos - shift > INT32_MAX)) why = "has a shift beyond its position";
    if (why) {
        kvc_fail(KVC_ESTATE, "cell %d %s", c, why);
        return -1;
    }
    return n;
}

kvc_status kvc_state_read(const uint8_t *buf, int64_t len, kvc_table **out) {
    *out = NULL;
    if (len < STATE_HEADER + STATE_TRAILER) return kvc_fail(KVC_ESTATE, "truncated: %lld bytes", (long long)len);
    if (get32(buf) != STATE_MAGIC) return kvc_fail(KVC_ESTATE, "not a cell table state (bad magic)");
    if (get32(buf + 4) != STATE_VERSION) {
        return kvc_fail(KVC_ESTATE, "unsupported format version %u", get32(buf + 4));
    }
    int32_t n_cells = (int32_t)get32(buf + 8), n_seq_max = (int32_t)get32(buf + 12);
    int32_t n_swa = (int32_t)get32(buf + 16), swa_type = (int32_t)get32(buf + 20);
    int32_t head = (int32_t)get32(buf + 24), has_shift = (int32_t)get32(buf + 28);
    const char *why = params_error(n_cells, n_seq_max, n_swa, swa_type);
    if (why) return kvc_fail(KVC_ESTATE, "bad header: %s", why);
    int32_t n_words = (n_seq_max + 63) / 64;
    if (len != state_size(n_cells, n_words)) {
        return kvc_fail(KVC_ESTATE, "size %lld does not match %d cells", (long long)len, n_cells);
    }
    if (get64(buf + len - STATE_TRAILER) != fnv1a(buf, len - STATE_TRAILER)) {
        return kvc_fail(KVC_ESTATE, "checksum mismatch");
    }
    if (head < 0 || head > n_cells) return kvc_fail(KVC_ESTATE, "head %d outside [0, %d]", head, n_cells);
    if (has_shift != 0 && has_shift != 1) return kvc_fail(KVC_ESTATE, "bad has_shift flag");

    int64_t n_entries = 0;
    const uint8_t *p = buf + STATE_HEADER;
    for (int32_t c = 0; c < n_cells; c++, p += 8 + 8 * n_words) {
        int n = read_cell(p, n_seq_max, n_words, has_shift, c);
        if (n < 0) return KVC_ESTATE;
        n_entries += n;
    }

    kvc_table *t;
    int rc = kvc_new(n_cells, n_seq_max, n_swa, swa_type, &t);
    if (!rc) rc = nodes_reserve(t, n_entries);
    if (rc) {
        kvc_free(t);
        return kvc_fail(KVC_ENOMEM, "out of memory");
    }
    p = buf + STATE_HEADER;
    for (int32_t c = 0; c < n_cells; c++, p += 8 + 8 * n_words) {
        int32_t pos = (int32_t)get32(p);
        if (pos < 0) continue;
        t->pos[c] = pos;
        t->shift[c] = (int32_t)get32(p + 4);
        mark_used(t, c);
        for (int32_t k = 0; k < n_words; k++) {
            uint64_t w = get64(p + 8 + 8 * k);
            t->seq[(size_t)c * n_words + k] = w;
            t->nseq[c] += (uint16_t)__builtin_popcountll(w);
        }
        cell_reindex(t, c);
    }
    t->head = head;
    t->has_shift = has_shift;
    *out = t;
    return KVC_OK;
}

// ---------------------------------------------------------------- invariants

// walks one treap: keys strictly increasing within (lo, hi), heap order, keys match the cells
static int check_tree(const kvc_table *t, int32_t s, int32_t n, int32_t depth, int64_t *n_seen) {
    const node *nd = t->nodes;
    if (n < 0) return KVC_OK;
    if (n >= t->n_nodes || depth > 4096 || ++*n_seen > t->count[s]) {
        return kvc_fail(KVC_EBROKEN, "index of sequence %d: bad node link", s);
    }
    int32_t c = nd[n].cell;
    if (c < 0 || c >= t->n_cells || t->pos[c] != nd[n].pos || !has_seq(t, c, s)) {
        return kvc_fail(KVC_EBROKEN, "index of sequence %d: entry (pos %d, cell %d) "
                   "does not match the cell", s, nd[n].pos, c);
    }
    int32_t kids[2] = {nd[n].left, nd[n].right};
    for (int k = 0; k < 2; k++) {
        int32_t m = kids[k];
        if (m < 0) continue;
        if (m >= t->n_nodes) return kvc_fail(KVC_EBROKEN, "index of sequence %d: bad node link", s);
        int ordered = k == 0 ? key_less(nd[m].pos, nd[m].cell, nd[n].pos, nd[n].cell)
                             : key_less(nd[n].pos, nd[n].cell, nd[m].pos, nd[m].cell);
        if (!ordered || nd[m].prio > nd[n].prio) {
            return kvc_fail(KVC_EBROKEN, "index of sequence %d: treap order broken", s);
        }
        int rc = check_tree(t, s, m, depth + 1, n_seen);
        if (rc) return rc;
    }
    return KVC_OK;
}

// the in-order sequence must be sorted: compare each key with the next one
static int check_sorted(const kvc_table *t, int32_t s) {
    int32_t n = t->count[s];
    if (n == 0) {
        if (t->pos_min[s] == -1 && t->pos_max[s] == -1) return KVC_OK;
        return kvc_fail(KVC_EBROKEN, "empty sequence %d has a min/max", s);
    }
    int32_t *cells = malloc((size_t)n * sizeof(int32_t));
    int32_t *poss = malloc((size_t)n * sizeof(int32_t));
    int rc = KVC_OK;
    if (!cells || !poss) {
        rc = kvc_fail(KVC_ENOMEM, "out of memory");
    } else {
        int32_t got = 0; // check_tree found exactly n entries
        tree_collect(t->nodes, t->root[s], INT64_MIN, INT64_MAX, cells, poss, &got);
        for (int32_t k = 1; k < got && !rc; k++) {
            if (!key_less(poss[k - 1], cells[k - 1], poss[k], cells[k])) {
                rc = kvc_fail(KVC_EBROKEN, "index of sequence %d is not sorted", s);
            }
        }
        if (!rc && (t->pos_min[s] != poss[0] || t->pos_max[s] != poss[got - 1])) {
            rc = kvc_fail(KVC_EBROKEN, "cached min/max of sequence %d is stale", s);
        }
    }
    free(cells);
    free(poss);
    return rc;
}

static int check_cells(const kvc_table *t, int64_t *n_entries) {
    int32_t used = 0, used_max_p1 = 0;
    int64_t entries = 0;
    int32_t *per_seq = calloc((size_t)t->n_seq_max, sizeof(int32_t));
    if (!per_seq) return kvc_fail(KVC_ENOMEM, "out of memory");
    int rc = KVC_OK;
    for (int32_t c = 0; c < t->n_cells && !rc; c++) {
        int bit = (t->used_bits[c / 64] >> (c % 64)) & 1;
        int32_t n = 0, extra = 0; // extra: bits beyond n_seq_max
        for (int32_t k = 0; k < t->n_words; k++) {
            uint64_t w = t->seq[(size_t)c * t->n_words + k];
            int32_t valid = t->n_seq_max - 64 * k;
            if (valid < 64 && (w >> valid)) {
                extra = 1;
                break;
            }
            for (; w; w &= w - 1) {
                n++;
                per_seq[k * 64 + __builtin_ctzll(w)]++;
            }
        }
        entries += n;
        const char *why = NULL;
        if (t->pos[c] < -1) why = "position below -1";
        else if (extra) why = "sequence bit beyond n_seq_max";
        else if (n != t->nseq[c]) why = "sequence count differs from its bitset";
        else if (t->pos[c] == -1 && (n || t->shift[c] || bit)) why = "empty cell with sequences, shift or used bit";
        else if (t->pos[c] >= 0 && (!n || !bit)) why = "used cell without sequence or used bit";
        else if (!t->has_shift && t->shift[c]) why = "shift recorded while has_shift is off";
        else if (t->pos[c] >= 0 && (int64_t)t->pos[c] - t->shift[c] < 0) why = "shift larger than the position";
        if (why) rc = kvc_fail(KVC_EBROKEN, "cell %d: %s", c, why);
        if (t->pos[c] >= 0) {
            used++;
            used_max_p1 = c + 1;
        }
    }
    for (int32_t s = 0; s < t->n_seq_max && !rc; s++) {
        if (per_seq[s] != t->count[s]) {
            rc = kvc_fail(KVC_EBROKEN, "sequence %d: count %d but %d cells hold it", s, t->count[s], per_seq[s]);
        }
    }
    free(per_seq);
    if (rc) return rc;
    if (used != t->used) return kvc_fail(KVC_EBROKEN, "used is %d but %d cells are used", t->used, used);
    if (used_max_p1 != t->used_max_p1) {
        return kvc_fail(KVC_EBROKEN, "used_max_p1 is %d, should be %d", t->used_max_p1, used_max_p1);
    }
    if (t->head < 0 || t->head > t->n_cells) return kvc_fail(KVC_EBROKEN, "head %d out of range", t->head);
    *n_entries = entries;
    return KVC_OK;
}

kvc_status kvc_check(const kvc_table *t) {
    int64_t entries = 0;
    int rc = check_cells(t, &entries);
    if (rc) return rc;
    for (int32_t s = 0; s < t->n_seq_max; s++) {
        int64_t seen = 0;
        if ((rc = check_tree(t, s, t->root[s], 0, &seen))) return rc;
        if (seen != t->count[s]) {
            return kvc_fail(KVC_EBROKEN, "index of sequence %d has %lld entries, count %d",
                       s, (long long)seen, t->count[s]);
        }
        if ((rc = check_sorted(t, s))) return rc;
    }
    int64_t n_free = 0;
    for (int32_t n = t->free_node; n >= 0 && n_free <= t->n_nodes; n = t->nodes[n].left) n_free++;
    if (n_free != t->n_free || entries != (int64_t)t->n_nodes - t->n_free) {
        return kvc_fail(KVC_EBROKEN, "node pool: %lld entries, %d nodes, %d free (list %lld)",
                   (long long)entries, t->n_nodes, t->n_free, (long long)n_free);
    }
    return KVC_OK;
}
