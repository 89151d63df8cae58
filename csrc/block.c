// One transformer layer per call (see block.h). Everything is checked
// before the first K/V row is written, so a bad call changes nothing.
#define _POSIX_C_SOURCE 200809L
#include "block.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kv.h"
#include "matmul.h"
#include "ops.h"
#include "quants.h"

struct kvc_scratch {
    int64_t n_tokens, n_embd, n_q, n_kv, n_ff, n_rot;
    // rows of n_embd, n_q, n_kv, n_kv, n_q, n_embd, n_ff, n_ff, n_embd floats
    float *h, *q, *k, *v, *a, *o, *g, *u, *x;
    float *cos, *sin;   // stack_run's RoPE tables: KVC_MAX_ROPE x n_tokens x n_rot each
    kv_arena attend;    // attention's working memory
    double t_matmul, t_attend;
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static kvc_status check_matrix(const kvc_matrix *m, const char *name, int64_t n_in) {
    const int64_t row = type_row_bytes(m->type, n_in);
    if (!m->w || row == 0 || m->row_stride < row)
        return kvc_fail(KVC_EINVAL, "block: matrix %s is missing, of type %d that cannot hold "
                        "rows of %lld values, or has rows %lld bytes apart", name, m->type,
                        (long long)n_in, (long long)m->row_stride);
    return KVC_OK;
}

static kvc_status check_block(const kvc_block *b) {
    if (!b) return kvc_fail(KVC_EINVAL, "block: no block");
    if (b->n_embd < 1 || b->n_head < 1 || b->n_head_kv < 1 || b->n_ff < 1 || b->head_dim < 2
        || b->head_dim % 2 || b->n_head % b->n_head_kv)
        return kvc_fail(KVC_EINVAL, "block: bad sizes (n_embd %d, %d heads on %d KV heads of "
                        "%d values, n_ff %d)", b->n_embd, b->n_head, b->n_head_kv, b->head_dim,
                        b->n_ff);
    if (b->act != KVC_ACT_SILU && b->act != KVC_ACT_GELU_TANH)
        return kvc_fail(KVC_EINVAL, "block: unknown activation %d", b->act);
    if (!b->attn_norm || !b->ffn_norm) return kvc_fail(KVC_EINVAL, "block: missing norm");
    const int64_t e = b->n_embd, nq = (int64_t)b->n_head * b->head_dim;
    kvc_status st;
    if ((st = check_matrix(&b->attn_q, "attn_q", e))
        || (st = check_matrix(&b->attn_k, "attn_k", e))
        || (st = check_matrix(&b->attn_v, "attn_v", e))
        || (st = check_matrix(&b->attn_output, "attn_output", nq))
        || (st = check_matrix(&b->ffn_gate, "ffn_gate", e))
        || (st = check_matrix(&b->ffn_up, "ffn_up", e))
        || (st = check_matrix(&b->ffn_down, "ffn_down", b->n_ff)))
        return st;
    return KVC_OK;
}

kvc_status block_scratch_new(const kvc_block *b, int64_t n_tokens, kvc_scratch **out) {
    kvc_status st = check_block(b);
    if (st) return st;
    if (!out || n_tokens < 1 || n_tokens > INT32_MAX)
        return kvc_fail(KVC_EINVAL, "block scratch: %lld tokens", (long long)n_tokens);
    const int64_t e = b->n_embd, nq = (int64_t)b->n_head * b->head_dim;
    const int64_t nkv = (int64_t)b->n_head_kv * b->head_dim, ff = b->n_ff;
    const int64_t n_rot = b->head_dim / 2;
    const int64_t per_token = 3 * e + 2 * nq + 2 * nkv + 2 * ff + 2 * KVC_MAX_ROPE * n_rot;
    kvc_scratch *s = calloc(1, sizeof *s);
    float *mem = s && (uint64_t)per_token * (uint64_t)n_tokens < (1ull << 40)
        ? malloc(sizeof(float) * (size_t)(per_token * n_tokens)) : NULL;
    if (!mem) {
        free(s);
        return kvc_fail(KVC_ENOMEM, "block scratch: out of memory for %lld tokens",
                        (long long)n_tokens);
    }
    *s = (kvc_scratch){.n_tokens = n_tokens, .n_embd = e, .n_q = nq, .n_kv = nkv, .n_ff = ff,
                       .n_rot = n_rot};
    s->h = mem;
    s->q = s->h + n_tokens * e;
    s->k = s->q + n_tokens * nq;
    s->v = s->k + n_tokens * nkv;
    s->a = s->v + n_tokens * nkv;
    s->o = s->a + n_tokens * nq;
    s->g = s->o + n_tokens * e;
    s->u = s->g + n_tokens * ff;
    s->x = s->u + n_tokens * ff;
    s->cos = s->x + n_tokens * e;
    s->sin = s->cos + KVC_MAX_ROPE * n_tokens * n_rot;
    *out = s;
    return KVC_OK;
}

void block_scratch_free(kvc_scratch *s) {
    if (s) {
        free(s->h);
        kv_arena_free(&s->attend);
    }
    free(s);
}

void block_scratch_times(const kvc_scratch *s, double *matmul_s, double *attend_s) {
    *matmul_s = s->t_matmul;
    *attend_s = s->t_attend;
}

static kvc_status check_run(const kvc_block *b, const kvc_layer_kv *kv, const kvc_ubatch *ub,
                            const kvc_scratch *s,
                            const float *x, int64_t n, const float *cos, const float *sin,
                            const int32_t *out_rows, int64_t n_out, int n_threads) {
    kvc_status st = check_block(b);
    if (st) return st;
    if (!kv || !ub || !s || !x || !cos || !sin) return kvc_fail(KVC_EINVAL, "block: missing array");
    if (s->n_embd != b->n_embd || s->n_q != (int64_t)b->n_head * b->head_dim
        || s->n_kv != (int64_t)b->n_head_kv * b->head_dim || s->n_ff != b->n_ff)
        return kvc_fail(KVC_EINVAL, "block: the scratch was made for another model");
    if (n < 1 || n > s->n_tokens)
        return kvc_fail(KVC_EINVAL, "block: %lld tokens (the scratch holds 1 to %lld)",
                        (long long)n, (long long)s->n_tokens);
    if (n_threads < 1) return kvc_fail(KVC_EINVAL, "n_threads must be >= 1, got %d", n_threads);
    if (ub->n_tokens != n || kv->n_values != s->n_kv)
        return kvc_fail(KVC_EINVAL, "block: a ubatch of %lld tokens, K/V rows of %lld values; "
                        "the block has %lld tokens, rows of %lld", (long long)ub->n_tokens,
                        (long long)kv->n_values, (long long)n, (long long)s->n_kv);
    if (!ub->slots) return kvc_fail(KVC_EINVAL, "block: no K/V slots");
    for (int64_t t = 0; t < n; t++)
        if (ub->slots[t] < 0 || ub->slots[t] >= kv->n_rows)
            return kvc_fail(KVC_EINVAL, "block: cell %d outside [0, %lld)", ub->slots[t],
                            (long long)kv->n_rows);
    if ((st = kv_check_attend(kv->type_k, kv->k, kv->type_v, kv->v, kv->n_rows, b->n_head_kv,
                              b->head_dim, ub->cells, ub->n_list, (int)n, ub->lo, ub->hi, s->q,
                              b->n_head, s->a)))
        return st;
    if (n_out >= 0) {
        if (n_out > n || (n_out > 0 && !out_rows))
            return kvc_fail(KVC_EINVAL, "block: %lld output rows of %lld tokens",
                            (long long)n_out, (long long)n);
        for (int64_t i = 0; i < n_out; i++)
            if (out_rows[i] < 0 || out_rows[i] >= n)
                return kvc_fail(KVC_EINVAL, "block: output row %d outside [0, %lld)",
                                out_rows[i], (long long)n);
    }
    return KVC_OK;
}

// The first bytes of the matrix multiplied next, asked for while this one runs:
// a matmul's first rows are read before its own read-ahead has started.
static void read_ahead(const kvc_matrix *next) {
    if (!next) return;
    for (int i = 0; i < READ_AHEAD; i += 64) __builtin_prefetch(next->w + i);
}

static kvc_status mm(kvc_scratch *s, const kvc_matrix *m, int64_t n_out, int64_t n_in,
                     const float *x, int64_t n, float *y, int n_threads, const kvc_matrix *next) {
    read_ahead(next);
    const double t = now_s();
    kvc_status st = matmul(m->type, m->w, m->row_stride, n_out, n_in, x, n, y, n_threads);
    s->t_matmul += now_s() - t;
    return st;
}

// y = norm(y) * w when w is not NULL, then x += y; rows of n floats
static void add_normed(float *x, float *y, const float *w, int64_t rows, int64_t n, float eps) {
    if (w) ops_rms_norm(y, w, y, rows, n, eps);
    ops_add(x, y, rows * n);
}

// rows out_rows of m (rows of n floats) into tmp, then back to m's first rows
static void keep_rows(float *m, float *tmp, int64_t n, const int32_t *out_rows, int64_t n_out) {
    for (int64_t i = 0; i < n_out; i++)
        memcpy(tmp + i * n, m + out_rows[i] * n, sizeof(float) * (size_t)n);
    memcpy(m, tmp, sizeof(float) * (size_t)(n_out * n));
}

// block_run once its arguments are checked
static kvc_status layer_run(const kvc_block *b, const kvc_layer_kv *kv, const kvc_ubatch *ub,
                            kvc_scratch *s, float *x, int64_t n, const float *cos,
                            const float *sin, const int32_t *out_rows, int64_t n_out,
                            int n_threads, const kvc_matrix *next) {
    kvc_status st;
    const int64_t e = b->n_embd, nq = s->n_q, nkv = s->n_kv, ff = b->n_ff, d = b->head_dim;
    const float eps = b->norm_eps;

    ops_rms_norm(x, b->attn_norm, s->h, n, e, eps);
    if ((st = mm(s, &b->attn_q, nq, e, s->h, n, s->q, n_threads, &b->attn_k))
        || (st = mm(s, &b->attn_k, nkv, e, s->h, n, s->k, n_threads, &b->attn_v))
        || (st = mm(s, &b->attn_v, nkv, e, s->h, n, s->v, n_threads, &b->attn_output)))
        return st;
    ops_rope(s->q, n, b->n_head, d, cos, sin, b->rope_neox, b->attn_q_norm, eps);
    ops_rope(s->k, n, b->n_head_kv, d, cos, sin, b->rope_neox, b->attn_k_norm, eps);
    if ((st = kv_store(kv->type_k, kv->k, kv->n_rows, nkv, ub->slots, n, s->k))
        || (st = kv_store(kv->type_v, kv->v, kv->n_rows, nkv, ub->slots, n, s->v)))
        return st;
    const double t = now_s();
    st = kv_attend_in(&s->attend, kv->type_k, kv->k, kv->type_v, kv->v, kv->n_rows,
                      b->n_head_kv, (int)d, ub->cells, ub->n_list, (int)n, ub->lo, ub->hi, s->q,
                      b->n_head, b->attn_scale, s->a, n_threads);
    s->t_attend += now_s() - t;
    if (st) return st;
    if (n_out >= 0) {   // only these rows go on
        keep_rows(s->a, s->q, nq, out_rows, n_out);
        keep_rows(x, s->h, e, out_rows, n_out);
        n = n_out;
        if (n == 0) return KVC_OK;
    }

    if ((st = mm(s, &b->attn_output, e, nq, s->a, n, s->o, n_threads, &b->ffn_gate))) return st;
    add_normed(x, s->o, b->post_attention_norm, n, e, eps);
    ops_rms_norm(x, b->ffn_norm, s->h, n, e, eps);
    if ((st = mm(s, &b->ffn_gate, ff, e, s->h, n, s->g, n_threads, &b->ffn_up))
        || (st = mm(s, &b->ffn_up, ff, e, s->h, n, s->u, n_threads, &b->ffn_down)))
        return st;
    if (b->act == KVC_ACT_SILU) ops_silu_mul(s->g, s->u, n * ff);
    else ops_gelu_tanh_mul(s->g, s->u, n, ff);
    if ((st = mm(s, &b->ffn_down, e, ff, s->g, n, s->o, n_threads, next))) return st;
    add_normed(x, s->o, b->post_ffw_norm, n, e, eps);
    return KVC_OK;
}

kvc_status block_run(const kvc_block *b, const kvc_layer_kv *kv, const kvc_ubatch *ub,
                     kvc_scratch *s, float *x, int64_t n, const float *cos, const float *sin,
                     const int32_t *out_rows, int64_t n_out, int n_threads) {
    kvc_status st = check_run(b, kv, ub, s, x, n, cos, sin, out_rows, n_out, n_threads);
    return st ? st : layer_run(b, kv, ub, s, x, n, cos, sin, out_rows, n_out, n_threads, NULL);
}

static kvc_status check_output(const float *norm_w, const kvc_matrix *head, int64_t n_vocab,
                               int64_t n_embd, float softcap, const float *x, int64_t n,
                               const float *logits, const kvc_scratch *s) {
    if (!norm_w || !head || !x || (n > 0 && !logits) || !s)
        return kvc_fail(KVC_EINVAL, "block output: missing array");
    if (n_embd != s->n_embd || n_vocab < 1 || n < 0 || n > s->n_tokens || !(softcap >= 0.0f))
        return kvc_fail(KVC_EINVAL, "block output: %lld rows of %lld values to %lld logits, "
                        "soft cap %g", (long long)n, (long long)n_embd, (long long)n_vocab,
                        (double)softcap);
    return check_matrix(head, "head", n_embd);
}

// block_output once its arguments are checked
static kvc_status output_run(const float *norm_w, float eps, const kvc_matrix *head,
                             int64_t n_vocab, int64_t n_embd, float softcap, float *x, int64_t n,
                             float *logits, kvc_scratch *s, int n_threads) {
    if (n == 0) return KVC_OK;
    ops_rms_norm(x, norm_w, x, n, n_embd, eps);
    kvc_status st = mm(s, head, n_vocab, n_embd, x, n, logits, n_threads, NULL);
    if (st) return st;
    if (softcap > 0.0f) ops_softcap(logits, n, n_vocab, softcap);
    return KVC_OK;
}

kvc_status block_output(const float *norm_w, float eps, const kvc_matrix *head,
                        int64_t n_vocab, int64_t n_embd, float softcap, float *x, int64_t n,
                        float *logits, kvc_scratch *s, int n_threads) {
    kvc_status st = check_output(norm_w, head, n_vocab, n_embd, softcap, x, n, logits, s);
    return st ? st : output_run(norm_w, eps, head, n_vocab, n_embd, softcap, x, n, logits, s,
                                n_threads);
}

static kvc_status check_stack(const kvc_stack *m, const kvc_layer_kv *const *kv,
                              const kvc_ubatch *const *ub, kvc_scratch *s, const int32_t *tokens,
                              const int32_t *pos, int64_t n, const int32_t *out_rows,
                              int64_t n_out, const float *logits, int n_threads) {
    if (!m || !m->blocks || !m->rope || !m->freq_scale || !m->inv_freq || !kv || !ub || !s
        || !tokens || !pos)
        return kvc_fail(KVC_EINVAL, "stack: missing array");
    if (m->n_layer < 1 || m->n_rope < 1 || m->n_rope > KVC_MAX_ROPE || n_out < 0)
        return kvc_fail(KVC_EINVAL, "stack: %d layers, %d RoPE tables (1 to %d), %lld output "
                        "rows", m->n_layer, m->n_rope, KVC_MAX_ROPE, (long long)n_out);
    kvc_status st = check_matrix(&m->token_embd, "token_embd", s->n_embd);
    if (st) return st;
    for (int64_t t = 0; t < n; t++) {
        if (tokens[t] < 0 || tokens[t] >= m->n_vocab)
            return kvc_fail(KVC_EINVAL, "stack: token id %d outside [0, %lld)", tokens[t],
                            (long long)m->n_vocab);
        if (pos[t] < 0)
            return kvc_fail(KVC_EINVAL, "stack: position %d of token %lld is negative", pos[t],
                            (long long)t);
    }
    const int last = m->n_layer - 1;
    for (int il = 0; il < m->n_layer; il++) {
        if (m->rope[il] < 0 || m->rope[il] >= m->n_rope)
            return kvc_fail(KVC_EINVAL, "stack: layer %d's RoPE table %d outside [0, %d)", il,
                            m->rope[il], m->n_rope);
        if (m->blocks[il].head_dim / 2 != s->n_rot)
            return kvc_fail(KVC_EINVAL, "stack: layer %d's heads differ from the scratch's", il);
        if ((st = check_run(&m->blocks[il], kv[il], ub[il], s, s->x, n, s->cos, s->sin,
                            il == last ? out_rows : NULL, il == last ? n_out : -1, n_threads)))
            return st;
    }
    return check_output(m->output_norm, &m->head, m->n_vocab, s->n_embd, m->softcap, s->x,
                        n_out, logits, s);
}

// the token rows, scaled, into s->x; the RoPE tables into s->cos, s->sin
static kvc_status embed(const kvc_stack *m, kvc_scratch *s, const int32_t *tokens,
                        const int32_t *pos, int64_t n) {
    const int64_t e = s->n_embd, nr = s->n_rot;
    for (int64_t t = 0; t < n; t++) {
        const int64_t id = tokens[t];
        kvc_status st = matmul_dequantize_rows(m->token_embd.type, m->token_embd.w,
                                               m->token_embd.row_stride, m->n_vocab, e, &id, 1,
                                               s->x + t * e);
        if (st) return st;
        for (int64_t i = 0; i < e; i++) s->x[t * e + i] *= m->embd_scale;
    }
    for (int r = 0; r < m->n_rope; r++)
        for (int64_t t = 0; t < n; t++)
            for (int64_t i = 0; i < nr; i++) {
                const double angle = ((double)pos[t] * m->freq_scale[r]) * m->inv_freq[r * nr + i];
                s->cos[(r * n + t) * nr + i] = (float)cos(angle);
                s->sin[(r * n + t) * nr + i] = (float)sin(angle);
            }
    return KVC_OK;
}

kvc_status stack_run(const kvc_stack *m, const kvc_layer_kv *const *kv,
                     const kvc_ubatch *const *ub, kvc_scratch *s, const int32_t *tokens,
                     const int32_t *pos, int64_t n, const int32_t *out_rows, int64_t n_out,
                     float *logits, int n_threads) {
    kvc_status st = check_stack(m, kv, ub, s, tokens, pos, n, out_rows, n_out, logits,
                                n_threads);
    if (st || (st = embed(m, s, tokens, pos, n))) return st;
    const int last = m->n_layer - 1;
    for (int il = 0; il < m->n_layer; il++) {
        const int64_t at = m->rope[il] * n * s->n_rot;
        if ((st = layer_run(&m->blocks[il], kv[il], ub[il], s, s->x, n, s->cos + at,
                            s->sin + at, il == last ? out_rows : NULL, il == last ? n_out : -1,
                            n_threads, il == last ? &m->head : &m->blocks[il + 1].attn_q)))
            return st;
    }
    return output_run(m->output_norm, m->output_eps, &m->head, m->n_vocab, s->n_embd,
                      m->softcap, s->x, n_out, logits, s, n_threads);
}
