// Reading a libFuzzer input as a stream of small choices.
#ifndef KVCELLS_FUZZ_INPUT_H
#define KVCELLS_FUZZ_INPUT_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    const uint8_t *p;
    size_t n;
} input;

static inline uint8_t take_u8(input *in) {
    if (!in->n) return 0;
    in->n--;
    return *in->p++;
}

// mostly small numbers around 0, sometimes the edges of int32 or any value
static inline int32_t take_i32(input *in) {
    uint8_t b = take_u8(in);
    if (b < 200) return (int32_t)b - 10;
    if (b < 220) return INT32_MAX - (b - 200);
    if (b < 240) return INT32_MIN + (b - 220);
    uint32_t v = 0;
    for (int k = 0; k < 4; k++) v = v << 8 | take_u8(in);
    return (int32_t)v;
}

#endif
