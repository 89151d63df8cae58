// One transformer layer for one ubatch in one call (llama and Gemma 3),
// described by a struct rather than a function per architecture:
//   h = norm(x) -> Q, K, V -> (per-head Q/K norms) -> RoPE -> K/V into the
//   ubatch's cells -> attention over each token's visible cells -> output
//   matrix -> (post-attention norm) -> x += ...
//   h = norm(x) -> gate, up -> act(gate) * up -> down -> (post-FFN norm) -> x += ...
// The matmuls and attention run on the thread pool (matmul.c, kv.c); the
// intermediate rows live in a scratch allocated once per context.
#ifndef KVCELLS_BLOCK_H
#define KVCELLS_BLOCK_H

#include <stdint.h>

#include "status.h"

// cffi-begin
#define KVC_ACT_SILU 0        // llama's SwiGLU
#define KVC_ACT_GELU_TANH 1   // Gemma's GELU (tanh approximation)

// A weight matrix in its file type: rows of quant_row_bytes(type, n_in)
// bytes, row_stride bytes apart.
typedef struct {
    int type;
    const uint8_t *w;
    int64_t row_stride;
} kvc_matrix;

typedef struct {
    int n_embd, n_head, n_head_kv, head_dim, n_ff;
    int act;         // KVC_ACT_*
    int rope_neox;   // 1: RoPE pairs (i, i + d/2) (NEOX), 0: (2i, 2i + 1) (NORM)
    float norm_eps, attn_scale;
    // the layer's tensors, by their GGUF names (blk.N.<name>.weight)
    const float *attn_norm, *ffn_norm;                    // n_embd floats
    const float *attn_q_norm, *attn_k_norm;               // head_dim floats, or NULL: none
    const float *post_attention_norm, *post_ffw_norm;     // n_embd floats, or NULL: none
    kvc_matrix attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down;
} kvc_block;

// One layer's K/V rows: n_rows rows of n_values values each.
typedef struct {
    int type_k, type_v;
    uint8_t *k, *v;
    int64_t n_rows, n_values;
} kvc_layer_kv;

// The applied ubatch of a cache: token t's K/V rows go to cell slots[t];
// it attends cells[lo[t]], ..., cells[hi[t] - 1] (kv_attend).
typedef struct {
    int64_t n_tokens;
    const int32_t *slots, *lo, *hi;   // n_tokens each
    const int32_t *cells;
    int64_t n_list;
} kvc_ubatch;

typedef struct kvc_scratch kvc_scratch;

// The intermediate rows of up to n_tokens tokens of blocks shaped like b.
kvc_status block_scratch_new(const kvc_block *b, int64_t n_tokens, kvc_scratch **out);
void block_scratch_free(kvc_scratch *s);
// Seconds spent in matmuls and in attention by the calls given s so far.
void block_scratch_times(const kvc_scratch *s, double *matmul_s, double *attend_s);

// Runs the layer b on x (n_tokens rows of n_embd floats, updated in place),
// RoPE's cos/sin given as (n_tokens, head_dim/2) floats. n_out < 0: every
// token goes on after attention; else only the n_out tokens out_rows (in
// [0, n_tokens)) do, and x's first n_out rows are then theirs (the last
// layer). Nothing is written on a failed check.
kvc_status block_run(const kvc_block *b, const kvc_layer_kv *kv, const kvc_ubatch *ub,
                     kvc_scratch *s, float *x,
                     int64_t n_tokens, const float *cos, const float *sin,
                     const int32_t *out_rows, int64_t n_out, int n_threads);

// logits (n rows of n_vocab) = head(norm(x) * norm_w), then
// softcap * tanh(logits / softcap) when softcap > 0; x is normed in place.
kvc_status block_output(const float *norm_w, float eps, const kvc_matrix *head,
                        int64_t n_vocab, int64_t n_embd, float softcap, float *x, int64_t n,
                        float *logits, kvc_scratch *s, int n_threads);
// A model, run by stack_run in one call: token embeddings, layers, head.
#define KVC_MAX_ROPE 2   // RoPE tables a stack may use (Gemma 3: global and sliding-window)
typedef struct {
    kvc_matrix token_embd;     // n_vocab rows of n_embd
    float embd_scale;          // x = token_embd[token] * embd_scale
    int n_layer;
    const kvc_block *blocks;   // n_layer blocks
    const int32_t *rope;       // per layer: which of the n_rope RoPE tables it uses
    int n_rope;
    // table r turns pair i of a token at p by (p * freq_scale[r]) * inv_freq[r * d/2 + i]
    const double *freq_scale, *inv_freq;
    // logits = head(norm(x) * output_norm), soft-capped when softcap > 0
    const float *output_norm;
    float output_eps, softcap;
    kvc_matrix head;
    int64_t n_vocab;
} kvc_stack;

// One ubatch through the whole model: the n tokens (ids in [0, n_vocab), at
// positions pos >= 0) embedded, through every layer il (block_run on
// m->blocks[il], K/V rows kv[il], applied ubatch ub[il], RoPE table
// m->rope[il]), only the rows out_rows (n_out of them, n_out >= 0) going on
// after the last layer's attention, then the head's logits of those rows
// (n_out x n_vocab). Every argument of every layer is checked before the
// first K/V row is written.
kvc_status stack_run(const kvc_stack *m, const kvc_layer_kv *const *kv,
                     const kvc_ubatch *const *ub, kvc_scratch *s, const int32_t *tokens,
                     const int32_t *pos, int64_t n, const int32_t *out_rows, int64_t n_out,
                     float *logits, int n_threads);
// cffi-end

#endif
