// The KV cell table: which position and which sequences each KV cell holds,
// with llama.cpp's placement rules (single stream). See docs/cells.md.
//
// Every function that can fail checks its arguments and returns a
// kvc_status (status.h); the table is unchanged when it is not KVC_OK.
// A table is not safe to use from two threads.
#ifndef KVCELLS_CELLS_H
#define KVCELLS_CELLS_H

#include <stdint.h>

#include "status.h"

// cffi-begin
#define KVC_SWA_NONE 0
#define KVC_SWA_STANDARD 1
#define KVC_SWA_CHUNKED 2
#define KVC_SWA_SYMMETRIC 3

#define KVC_MAX_SEQ 256
#define KVC_MAX_CELLS 268435456

typedef struct kvc_table kvc_table;

kvc_status kvc_new(int32_t n_cells, int32_t n_seq_max, int32_t n_swa, int32_t swa_type, kvc_table **out);
kvc_status kvc_clone(const kvc_table *t, kvc_table **out);
void kvc_free(kvc_table *t);

int32_t kvc_n_cells(const kvc_table *t);
int32_t kvc_n_seq_max(const kvc_table *t);
int32_t kvc_n_swa(const kvc_table *t);
int32_t kvc_swa_type(const kvc_table *t);
int32_t kvc_used(const kvc_table *t);
int32_t kvc_head(const kvc_table *t);
int32_t kvc_used_max_p1(const kvc_table *t);
int32_t kvc_has_shift(const kvc_table *t);

// idxs_out: n_tokens cells, in the order found
kvc_status kvc_find_slot(kvc_table *t, int32_t n_tokens, int32_t cont, int32_t *idxs_out);
// token i belongs to the sequences seq_ids[seq_offsets[i] .. seq_offsets[i+1]),
// seq_ids has n_seq_entries ids; seq_offsets == NULL: one sequence per token
kvc_status kvc_apply_ubatch(kvc_table *t, int32_t n_tokens, const int32_t *idxs, const int32_t *pos,
                     int32_t n_seq_entries, const int32_t *seq_ids, const int32_t *seq_offsets);
// the checks of kvc_apply_ubatch alone: KVC_OK means it would succeed (no change)
kvc_status kvc_check_ubatch(kvc_table *t, int32_t n_tokens, const int32_t *idxs, const int32_t *pos,
                            int32_t n_seq_entries, const int32_t *seq_ids, const int32_t *seq_offsets);
// What the tokens of a ubatch attend, for kv_attend (kv.h): for each sequence
// that is the first of some token, ascending, padding entries (cell 0) that
// put its cell of position p at an index equal to p modulo `segment` (while
// positions run without gaps), then its cells by position. Token i (first
// sequence seq_ids[i], position pos[i]) attends cells_out[lo_out[i] ..
// hi_out[i]): the cells of its sequence it may see, from its window start to
// pos[i]. *n_out gets the list's length; when that exceeds cap, the room of
// cells_out, nothing else is written.
kvc_status kvc_visible(kvc_table *t, int32_t n_tokens, const int32_t *pos, const int32_t *seq_ids,
                       int32_t segment, int32_t *cells_out, int64_t cap, int64_t *n_out,
                       int32_t *lo_out, int32_t *hi_out);

kvc_status kvc_cell_pos(kvc_table *t, int32_t i, int32_t *pos_out);
// seqs_out: room for n_seq_max ids
kvc_status kvc_cell_seqs(kvc_table *t, int32_t i, int32_t *seqs_out, int32_t *n_out);
// all cells: pos_out[n_cells]
void kvc_positions(const kvc_table *t, int32_t *pos_out);
// all cells: -1 empty, the sequence id when one, -2 when several
void kvc_cell_labels(const kvc_table *t, int32_t *labels_out);
// all cells: out[i * n_seq_max + s] = 1 when cell i holds sequence s
void kvc_seq_matrix(const kvc_table *t, uint8_t *out);

kvc_status kvc_seq_rm(kvc_table *t, int32_t seq_id, int32_t p0, int32_t p1);
kvc_status kvc_seq_cp(kvc_table *t, int32_t seq_src, int32_t seq_dst, int32_t p0, int32_t p1);
kvc_status kvc_seq_keep(kvc_table *t, int32_t seq_id);
kvc_status kvc_seq_add(kvc_table *t, int32_t seq_id, int32_t p0, int32_t p1, int32_t delta);
kvc_status kvc_seq_div(kvc_table *t, int32_t seq_id, int32_t p0, int32_t p1, int32_t d);
kvc_status kvc_seq_pos_min(kvc_table *t, int32_t seq_id, int32_t *out);
kvc_status kvc_seq_pos_max(kvc_table *t, int32_t seq_id, int32_t *out);
// every sequence at once: mins_out[n_seq_max], maxs_out[n_seq_max]
void kvc_seq_pos_bounds(const kvc_table *t, int32_t *mins_out, int32_t *maxs_out);
kvc_status kvc_seq_count(kvc_table *t, int32_t seq_id, int32_t *n_out);
// idxs_out, pos_out: room for kvc_seq_count cells
kvc_status kvc_seq_cells(kvc_table *t, int32_t seq_id, int32_t *idxs_out, int32_t *pos_out);

// shifts_out[n_cells]
void kvc_take_shifts(kvc_table *t, int32_t *shifts_out);
// moves_out: room for n_cells pairs (src, dst)
void kvc_defrag(kvc_table *t, int32_t *moves_out, int32_t *n_moves_out);
// mask_out[n_tokens * n_kv]; seq_ids: the first sequence of each token
kvc_status kvc_kq_mask(kvc_table *t, int32_t n_tokens, const int32_t *pos, const int32_t *seq_ids,
                int32_t n_kv, float *mask_out);
void kvc_clear(kvc_table *t);

int64_t kvc_state_size(const kvc_table *t);
kvc_status kvc_state_write(const kvc_table *t, uint8_t *buf, int64_t len);
kvc_status kvc_state_read(const uint8_t *buf, int64_t len, kvc_table **out);

// KVC_EBROKEN with the broken invariant named in the message
kvc_status kvc_check(const kvc_table *t);
// cffi-end

#endif
