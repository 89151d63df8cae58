// The KV cell table: which position and which sequences each KV cell holds,
// with llama.cpp's placement rules (single stream). See docs/cells.md.
//
// Every function checks its arguments and returns KVC_OK or an error code;
// the table is unchanged when an error is returned. kvc_error() gives the
// message of the last error. A table is not safe to use from two threads.
#ifndef KVCELLS_CELLS_H
#define KVCELLS_CELLS_H

#include <stdint.h>

// cffi-begin
#define KVC_OK 0
#define KVC_EINVAL 1
#define KVC_EFULL 2
#define KVC_ESTATE 3
#define KVC_ENOMEM 4
#define KVC_EBROKEN 5

#define KVC_SWA_NONE 0
#define KVC_SWA_STANDARD 1
#define KVC_SWA_CHUNKED 2
#define KVC_SWA_SYMMETRIC 3

#define KVC_MAX_SEQ 256
#define KVC_MAX_CELLS 268435456

typedef struct kvc_table kvc_table;

int kvc_new(int32_t n_cells, int32_t n_seq_max, int32_t n_swa, int32_t swa_type, kvc_table **out);
int kvc_clone(const kvc_table *t, kvc_table **out);
void kvc_free(kvc_table *t);
const char *kvc_error(const kvc_table *t);

int32_t kvc_n_cells(const kvc_table *t);
int32_t kvc_n_seq_max(const kvc_table *t);
int32_t kvc_n_swa(const kvc_table *t);
int32_t kvc_swa_type(const kvc_table *t);
int32_t kvc_used(const kvc_table *t);
int32_t kvc_head(const kvc_table *t);
int32_t kvc_used_max_p1(const kvc_table *t);
int32_t kvc_has_shift(const kvc_table *t);

// idxs_out: n_tokens cells, in the order found
int kvc_find_slot(kvc_table *t, int32_t n_tokens, int32_t cont, int32_t *idxs_out);
// token i belongs to the sequences seq_ids[seq_offsets[i] .. seq_offsets[i+1]),
// seq_ids has n_seq_entries ids; seq_offsets == NULL: one sequence per token
int kvc_apply_ubatch(kvc_table *t, int32_t n_tokens, const int32_t *idxs, const int32_t *pos,
                     int32_t n_seq_entries, const int32_t *seq_ids, const int32_t *seq_offsets);

int kvc_cell_pos(kvc_table *t, int32_t i, int32_t *pos_out);
// seqs_out: room for n_seq_max ids
int kvc_cell_seqs(kvc_table *t, int32_t i, int32_t *seqs_out, int32_t *n_out);
// all cells: pos_out[n_cells]
void kvc_positions(const kvc_table *t, int32_t *pos_out);
// all cells: -1 empty, the sequence id when one, -2 when several
void kvc_cell_labels(const kvc_table *t, int32_t *labels_out);
// all cells: out[i * n_seq_max + s] = 1 when cell i holds sequence s
void kvc_seq_matrix(const kvc_table *t, uint8_t *out);

int kvc_seq_rm(kvc_table *t, int32_t seq_id, int32_t p0, int32_t p1);
int kvc_seq_cp(kvc_table *t, int32_t seq_src, int32_t seq_dst, int32_t p0, int32_t p1);
int kvc_seq_keep(kvc_table *t, int32_t seq_id);
int kvc_seq_add(kvc_table *t, int32_t seq_id, int32_t p0, int32_t p1, int32_t delta);
int kvc_seq_div(kvc_table *t, int32_t seq_id, int32_t p0, int32_t p1, int32_t d);
int kvc_seq_pos_min(kvc_table *t, int32_t seq_id, int32_t *out);
int kvc_seq_pos_max(kvc_table *t, int32_t seq_id, int32_t *out);
// every sequence at once: mins_out[n_seq_max], maxs_out[n_seq_max]
void kvc_seq_pos_bounds(const kvc_table *t, int32_t *mins_out, int32_t *maxs_out);
int kvc_seq_count(kvc_table *t, int32_t seq_id, int32_t *n_out);
// idxs_out, pos_out: room for kvc_seq_count cells
int kvc_seq_cells(kvc_table *t, int32_t seq_id, int32_t *idxs_out, int32_t *pos_out);

// shifts_out[n_cells]
void kvc_take_shifts(kvc_table *t, int32_t *shifts_out);
// moves_out: room for n_cells pairs (src, dst)
void kvc_defrag(kvc_table *t, int32_t *moves_out, int32_t *n_moves_out);
// mask_out[n_tokens * n_kv]; seq_ids: the first sequence of each token
int kvc_kq_mask(kvc_table *t, int32_t n_tokens, const int32_t *pos, const int32_t *seq_ids,
                int32_t n_kv, float *mask_out);
void kvc_clear(kvc_table *t);

int64_t kvc_state_size(const kvc_table *t);
int kvc_state_write(const kvc_table *t, uint8_t *buf, int64_t len);
int kvc_state_read(const uint8_t *buf, int64_t len, kvc_table **out, char *err, int32_t err_len);

// KVC_EBROKEN with the broken invariant named in err
int kvc_check(const kvc_table *t, char *err, int32_t err_len);
// cffi-end

#endif
