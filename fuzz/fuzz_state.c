// libFuzzer target: kvc_state_read on untrusted bytes. Whatever it accepts
// must pass kvc_check, write back to the same bytes and take further calls.
// The first input byte chooses: odd, the rest is taken as it is; even, the
// harness appends the right checksum so the fuzzer gets past it.
//   clang -g -O1 -fsanitize=fuzzer,address,undefined -Icsrc fuzz/fuzz_state.c csrc/cells.c csrc/status.c
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cells.h"
#include "fuzz_input.h"

// the state format's trailer: FNV-1a 64 of everything before it, little-endian
static void append_checksum(uint8_t *buf, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ buf[i]) * 0x100000001b3ull;
    for (int k = 0; k < 8; k++) buf[n + k] = (uint8_t)(h >> (8 * k));
}

static void fail(const char *what, const char *detail) {
    fprintf(stderr, "fuzz_state: %s: %s\n", what, detail);
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    int raw = data[0] & 1;
    size_t n = size - 1, len = raw ? n : n + 8;
    uint8_t *buf = malloc(len ? len : 1);   // exactly the bytes: ASan sees any overread
    memcpy(buf, data + 1, n);
    if (!raw) append_checksum(buf, n);
    kvc_table *t;
    if (kvc_state_read(buf, (int64_t)len, &t) != KVC_OK) {
        if (t) fail("a refused state returned a table", kvc_last_error());
        free(buf);
        return 0;
    }
    if (kvc_check(t) != KVC_OK) fail("accepted a broken table", kvc_last_error());
    if (kvc_state_size(t) != (int64_t)len) fail("round trip", "size differs");
    uint8_t *back = malloc(len);
    if (kvc_state_write(t, back, (int64_t)len) != KVC_OK || memcmp(back, buf, len))
        fail("round trip", "bytes differ");
    free(back);
    // the loaded table must take placements and sequence operations
    int32_t idxs[4], pos[4] = {0, 1, 2, 3}, seqs[4] = {0, 0, 0, 0};
    if (kvc_find_slot(t, 4, 0, idxs) == KVC_OK &&
        kvc_apply_ubatch(t, 4, idxs, pos, 4, seqs, NULL) != KVC_OK)
        fail("apply after find_slot", kvc_last_error());
    kvc_seq_add(t, 0, -1, -1, 1);
    kvc_seq_rm(t, -1, 2, 5);
    int32_t *moves = malloc(sizeof(int32_t) * 2 * (size_t)kvc_n_cells(t)), n_moves;
    kvc_defrag(t, moves, &n_moves);
    free(moves);
    if (kvc_check(t) != KVC_OK) fail("broken after calls", kvc_last_error());
    kvc_free(t);
    free(buf);
    return 0;
}
