// libFuzzer target: any sequence of calls on a small cell table. After
// every call the table must pass kvc_check, and a call that returns an
// error must leave the table byte for byte as it was.
//   clang -g -O1 -fsanitize=fuzzer,address,undefined -Icsrc fuzz/fuzz_cells.c csrc/cells.c csrc/status.c
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cells.h"
#include "fuzz_input.h"

static const int32_t SEQ_MAX[] = {1, 2, 3, 4, 63, 64, 65, 256};

// the state of the largest table here: 32-byte header, 48 cells of 8 + 4 x 8
// bytes, 8-byte checksum
#define IMAGE_MAX (32 + 48 * 40 + 8)

static int64_t image(const kvc_table *t, uint8_t *buf) {
    int64_t len = kvc_state_size(t);
    if (len > IMAGE_MAX || kvc_state_write(t, buf, len) != KVC_OK) abort();
    return len;
}

static void fail(const char *what, const char *detail) {
    fprintf(stderr, "fuzz_cells: %s: %s\n", what, detail);
    abort();
}

// one call chosen by the input; returns its result code (KVC_OK for calls without one)
static int one_call(kvc_table **tp, input *in) {
    kvc_table *t = *tp;
    int32_t n_cells = kvc_n_cells(t), n_seq = kvc_n_seq_max(t);
    int32_t buf[64 + 64 * 2];
    switch (take_u8(in) % 16) {
    case 0: {   // placement as decode does it: find_slot, then apply there
        int32_t n = 1 + take_u8(in) % 16, multi = take_u8(in) & 1;
        int rc = kvc_find_slot(t, n, take_u8(in) & 1, buf);
        if (rc) return rc;
        int32_t pos[16], seqs[48], offs[17] = {0};
        for (int32_t i = 0; i < n; i++) {
            pos[i] = take_i32(in);
            int32_t k = multi ? 1 + take_u8(in) % 3 : 1;
            for (int32_t j = 0; j < k; j++) seqs[offs[i] + j] = take_u8(in) % n_seq;
            offs[i + 1] = offs[i] + k;
        }
        return kvc_apply_ubatch(t, n, buf, pos, offs[n], seqs, multi ? offs : NULL);
    }
    case 1: {   // apply anywhere, any arguments
        int32_t n = take_u8(in) % 8, pos[8], seqs[8];
        for (int32_t i = 0; i < n; i++) {
            buf[i] = take_i32(in);
            pos[i] = take_i32(in);
            seqs[i] = take_i32(in);
        }
        return kvc_apply_ubatch(t, n, buf, pos, n, seqs, NULL);
    }
    case 2: return kvc_seq_rm(t, take_i32(in), take_i32(in), take_i32(in));
    case 3: return kvc_seq_cp(t, take_i32(in), take_i32(in), take_i32(in), take_i32(in));
    case 4: return kvc_seq_keep(t, take_i32(in));
    case 5: return kvc_seq_add(t, take_i32(in), take_i32(in), take_i32(in), take_i32(in));
    case 6: return kvc_seq_div(t, take_i32(in), take_i32(in), take_i32(in), take_i32(in));
    case 7: {
        int32_t lo, hi;
        int32_t s = take_i32(in);
        int rc = kvc_seq_pos_min(t, s, &lo);
        return rc ? rc : kvc_seq_pos_max(t, s, &hi);
    }
    case 8: {
        int32_t s = take_i32(in), n;
        int rc = kvc_seq_count(t, s, &n);
        if (rc) return rc;
        int32_t *idxs = malloc(sizeof(int32_t) * (size_t)(n + 1)), *pos = malloc(sizeof(int32_t) * (size_t)(n + 1));
        rc = kvc_seq_cells(t, s, idxs, pos);
        free(idxs);
        free(pos);
        return rc;
    }
    case 9: {
        int32_t *shifts = malloc(sizeof(int32_t) * (size_t)n_cells);
        kvc_take_shifts(t, shifts);
        free(shifts);
        return KVC_OK;
    }
    case 10: {
        int32_t *moves = malloc(sizeof(int32_t) * 2 * (size_t)n_cells), n;
        kvc_defrag(t, moves, &n);
        free(moves);
        return KVC_OK;
    }
    case 11: {
        int32_t n = take_u8(in) % 4, pos[4], seqs[4], n_kv = take_i32(in);
        for (int32_t i = 0; i < n; i++) {
            pos[i] = take_i32(in);
            seqs[i] = take_i32(in);
        }
        size_t room = (size_t)n * (size_t)(n_kv > 0 && n_kv <= n_cells ? n_kv : 1);
        float *mask = malloc(sizeof(float) * (room ? room : 1));
        int rc = kvc_kq_mask(t, n, pos, seqs, n_kv, mask);
        free(mask);
        return rc;
    }
    case 12: kvc_clear(t); return KVC_OK;
    case 13: {  // a state round trip replaces the table
        uint8_t b[IMAGE_MAX];
        int64_t len = image(t, b);
        kvc_table *u;
        if (kvc_state_read(b, len, &u) != KVC_OK) fail("own state refused", kvc_last_error());
        kvc_free(t);
        *tp = u;
        return KVC_OK;
    }
    case 14: {
        kvc_table *u;
        if (kvc_clone(t, &u) != KVC_OK) fail("clone", "failed");
        kvc_free(t);
        *tp = u;
        return KVC_OK;
    }
    default: {
        int32_t i = take_i32(in), p, n;
        int rc = kvc_cell_pos(t, i, &p);
        return rc ? rc : kvc_cell_seqs(t, i, buf, &n);
    }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    input in = {data, size};
    int32_t n_cells = 1 + take_u8(&in) % 48;
    int32_t n_seq = SEQ_MAX[take_u8(&in) % 8];
    int32_t swa_type = take_u8(&in) % 4, n_swa = swa_type ? 1 + take_u8(&in) % 10 : 0;
    kvc_table *t;
    if (kvc_new(n_cells, n_seq, n_swa, swa_type, &t) != KVC_OK) fail("kvc_new", "refused");
    uint8_t before[IMAGE_MAX], after[IMAGE_MAX];
    while (in.n) {
        int64_t len_before = image(t, before);
        int rc = one_call(&t, &in);
        if (kvc_check(t) != KVC_OK) fail("kvc_check", kvc_last_error());
        if (rc != KVC_OK) {
            int64_t len_after = image(t, after);
            if (len_after != len_before || memcmp(before, after, (size_t)len_before))
                fail("a refused call changed the table", kvc_last_error());
        }
    }
    kvc_free(t);
    return 0;
}
