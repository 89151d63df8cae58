// The integer kernels of one x86 path: quantised weight rows times act_q8
// tokens, a row by one token or a few (the one-row kernels) and 8 rows by 4
// tokens (the panel kernels). quants.c includes this file once per path, defining
//   PATH(name)  the path's name of a function (name ## _avx2, ...),
//   TARGET      the path's target attribute,
//   DPBUSD      where the path has VNNI, its vpdpbusd: acc + the sums of 4
//               u8 x s8 products per int32 lane, in one instruction,
//   WIDE_PANELS where the path's panels are quants.c's wide ones (no 8-row
//               panel entries then),
// and using quants.c's EACH_TYPE (the quantised weight types).
// Every path gives bit for bit what the AVX2 one gives: a block's products
// are summed exactly in int32 whichever instructions add them, and the
// float steps are the same.

#define KERNEL static inline __attribute__((always_inline)) TARGET
#ifdef DPBUSD
#define VNNI 1
#else
#define VNNI 0
#define DPBUSD(acc, u, s) (acc)   // never reached: each use is under VNNI
#endif

// The int32 lanes whose total is block value vector w (u: its magnitudes
// for the signed types, else w) times token block xv; int16 lanes (pair
// sums) for the unsigned types without VNNI. mul: Q6_K's int16 scales, else 1.
// Q6_K keeps maddubs: its int16 scales multiply pairs of products.
KERNEL __m256i PATH(block_products)(int type, __m256i w, __m256i u, __m256i mul, __m256i xv) {
    const int sgn = signed_values(type), q6 = type == KVC_TYPE_Q6_K;
    if (sgn) xv = _mm256_sign_epi8(xv, w);
    if (VNNI && !q6) return DPBUSD(_mm256_setzero_si256(), u, xv);
    const __m256i p = _mm256_maddubs_epi16(u, xv);
    return sgn ? _mm256_madd_epi16(p, mul) : p;
}

// Token t's block totals of products p (block j's in p[j]) times the blocks'
// scales va, plus the offset term (vm) where the type has one, into acc[t].
KERNEL void PATH(add_blocks)(int type, const __m256i *p, __m256 va, __m256 vm, act_q8 x, int64_t n,
                             int64_t g0, int nv, int t, __m256 *acc) {
    const int sgn = signed_values(type);
    const int64_t k = t * (n / QK) + g0;   // the token's scales
    const __m256i sums = sgn || VNNI ? lane_totals(p) : lane_totals16(p);
    acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(va, first8(x.d + k, nv)), _mm256_cvtepi32_ps(sums), acc[t]);
    if (!sgn) acc[t] = _mm256_fmadd_ps(vm, first8(x.s + k, nv), acc[t]);
}

// Blocks g0..g0+nv-1 of a row times the token of group x (x.nt = 1), into
// acc, each block unpacked and multiplied in turn, in registers.
KERNEL void PATH(token_chunk)(int type, const uint8_t *row, act_q8 x, int64_t n, int64_t g0, int nv,
                              __m256 *acc) {
    const int sgn = signed_values(type), q6 = type == KVC_TYPE_Q6_K;
    __m256i sc16 = _mm256_setzero_si256(), p[8];
    __m256 va, vm;
    block_scales(type, row, g0, nv, &va, &vm, &sc16);
    for (int j = 0; j < 8; j++) {
        if (j >= nv) { p[j] = _mm256_setzero_si256(); continue; }
        const __m256i w = block_values(type, row, g0, j);
        p[j] = PATH(block_products)(type, w, sgn ? _mm256_abs_epi8(w) : w,
                                    q6 ? q6_k_mul(sc16, j) : _mm256_set1_epi16(1), load_x(x, 1, g0 + j, 0));
    }
    PATH(add_blocks)(type, p, va, vm, x, n, g0, nv, 0, acc);
}

// Blocks g0..g0+nv-1 of a row times tokens 0..n_tok-1 of group x (x.nt =
// nt > 1), into acc[t]: the blocks unpacked first, once for all the tokens.
KERNEL void PATH(blocks_chunk)(int type, const uint8_t *row, act_q8 x, int nt, int n_tok, int64_t n,
                               int64_t g0, int nv, __m256 *acc) {
    const int sgn = signed_values(type), q6 = type == KVC_TYPE_Q6_K;
    __m256i sc16 = _mm256_setzero_si256(), w[8], u[8], mul[8], p[8];
    __m256 va, vm;
    block_scales(type, row, g0, nv, &va, &vm, &sc16);
    for (int j = 0; j < 8; j++) {
        p[j] = _mm256_setzero_si256();
        if (j >= nv) continue;
        w[j] = block_values(type, row, g0, j);
        u[j] = sgn ? _mm256_abs_epi8(w[j]) : w[j];
        mul[j] = q6 ? q6_k_mul(sc16, j) : _mm256_set1_epi16(1);
    }
    for (int t = 0; t < n_tok; t++) {
        for (int j = 0; j < nv; j++)
            p[j] = PATH(block_products)(type, w[j], u[j], mul[j], load_x(x, nt, g0 + j, t));
        PATH(add_blocks)(type, p, va, vm, x, n, g0, nv, t, acc);
    }
}

// Rows of w times tokens 0..n_tok-1 of group x (x.nt = nt > 1): y[t * y_stride + r].
KERNEL void PATH(blocks_tile)(int type, const uint8_t *w, int64_t row_stride, int64_t n_rows,
                              act_q8 x, int nt, int n_tok, int64_t n, float *y, int64_t y_stride) {
    const int64_t nb = n / QK;
    for (int64_t r = 0; r < n_rows; r++) {
        const uint8_t *row = w + r * row_stride;
        __m256 acc[ACT_GROUP];
        for (int t = 0; t < n_tok; t++) acc[t] = _mm256_setzero_ps();
        int64_t g0 = 0;
        for (; g0 + 8 <= nb; g0 += 8) PATH(blocks_chunk)(type, row, x, nt, n_tok, n, g0, 8, acc);
        if (nb - g0 == 4) PATH(blocks_chunk)(type, row, x, nt, n_tok, n, g0, 4, acc);   // rows of 256k + 128 values
        else if (g0 < nb) PATH(blocks_chunk)(type, row, x, nt, n_tok, n, g0, (int)(nb - g0), acc);
        for (int t = 0; t < n_tok; t++) y[t * y_stride + r] = hsum8(acc[t]);
    }
}

// One token, rows of nb % 8 == 4 blocks (640 values: Gemma 3 270M's Q5_0
// matrices and its head), two rows at a time: the half chunk that ends a
// row and the half that starts the next are unpacked and added up as one.
// The next row's chunks then start at block 4, so its accumulator holds
// chains 4-7 in lanes 0-3 and chains 0-3 in lanes 4-7; hsum8 adds the two
// halves first, so the sum is the same.
KERNEL void PATH(seam_chunk)(int type, const uint8_t *row, const uint8_t *next, act_q8 x,
                             int64_t g0, __m256 *acc, __m256 *acc_next) {
    const int sgn = signed_values(type);
    __m256i sc16 = _mm256_setzero_si256(), p[8];
    __m256 va, vm, va_next, vm_next;
    block_scales(type, row, g0, 4, &va, &vm, &sc16);
    block_scales(type, next, 0, 4, &va_next, &vm_next, &sc16);
    va = _mm256_permute2f128_ps(va, va_next, 0x20);
    vm = _mm256_permute2f128_ps(vm, vm_next, 0x20);
    for (int j = 0; j < 8; j++) {
        const __m256i w = j < 4 ? block_values(type, row, g0, j) : block_values(type, next, 0, j - 4);
        p[j] = PATH(block_products)(type, w, sgn ? _mm256_abs_epi8(w) : w, _mm256_set1_epi16(1),
                                    load_x(x, 1, j < 4 ? g0 + j : j - 4, 0));
    }
    const __m256i sums = sgn || VNNI ? lane_totals(p) : lane_totals16(p);
    const __m256 xd = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(x.d + g0)), _mm_loadu_ps(x.d), 1);
    __m256 both = _mm256_blend_ps(*acc, _mm256_setzero_ps(), 0xF0);
    both = _mm256_fmadd_ps(_mm256_mul_ps(va, xd), _mm256_cvtepi32_ps(sums), both);
    if (!sgn) {
        const __m256 xs = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(x.s + g0)), _mm_loadu_ps(x.s), 1);
        both = _mm256_fmadd_ps(vm, xs, both);
    }
    *acc = _mm256_blend_ps(*acc, both, 0x0F);
    *acc_next = _mm256_blend_ps(_mm256_setzero_ps(), both, 0xF0);
}

// Asks for the chunk (8 blocks) READ_AHEAD bytes on from the one at p: a
// one-token matmul reads its weights from memory, and the hardware
// prefetcher alone left it 20-30% under its in-cache speed.
KERNEL void PATH(chunk_ahead)(int type, const uint8_t *p) {
    for (int i = 0; i < chunk_bytes(type); i += 64)
        _mm_prefetch((const char *)p + READ_AHEAD + i, _MM_HINT_T0);
}

// Rows of w times the one token of group x, into y; a row ending in half a
// chunk shares its last one with the next row (seam_chunk).
KERNEL void PATH(token_tile)(int type, const uint8_t *w, int64_t row_stride, int64_t n_rows,
                             act_q8 x, int64_t n, float *y) {
    const int64_t nb = n / QK, chunk = chunk_bytes(type);
    for (int64_t r = 0; r < n_rows; r++) {
        const uint8_t *row = w + r * row_stride;
        __m256 acc = _mm256_setzero_ps();
        int64_t g0 = 0;
        for (; g0 + 8 <= nb; g0 += 8) {
            PATH(chunk_ahead)(type, row + g0 / 8 * chunk);
            PATH(token_chunk)(type, row, x, n, g0, 8, &acc);
        }
        if (nb - g0 == 4 && r + 1 < n_rows) {
            const uint8_t *next = row + row_stride;
            __m256 acc_next = _mm256_setzero_ps();
            PATH(chunk_ahead)(type, row + g0 / 8 * chunk);
            PATH(seam_chunk)(type, row, next, x, g0, &acc, &acc_next);
            for (g0 = 4; g0 + 8 <= nb; g0 += 8) {
                PATH(chunk_ahead)(type, next + g0 / 8 * chunk + chunk / 2);
                PATH(token_chunk)(type, next, x, n, g0, 8, &acc_next);
            }
            y[r++] = hsum8(acc);
            y[r] = hsum8(acc_next);
            continue;
        }
        if (nb - g0 == 4) PATH(token_chunk)(type, row, x, n, g0, 4, &acc);
        else if (g0 < nb) PATH(token_chunk)(type, row, x, n, g0, (int)(nb - g0), &acc);
        y[r] = hsum8(acc);
    }
}

// A panel times nt tokens (4, 2 or 1). Each 4-byte piece of a token's block
// is broadcast and multiplied with the same piece of the 8 rows, so the
// lanes are rows and one conversion and one FMA serve 8 rows. The block's
// int32 total is the one blocks_tile forms, whatever order it is added in.

// sum[t] += the products of pieces k0..k0+3 of block b with token t's (at
// xq + t * QK), times mul's int16 (Q6_K's scales, else 1). Without VNNI they
// are added in int16 first where that cannot overflow (|v| <= 32: 4 * 2 *
// 32 * 127 < 2^15), i.e. for every type but Q8_0.
KERNEL void PATH(panel_pieces)(const panel_block *b, int k0, const int8_t *xq, int nt, __m256i *sum,
                               __m256i mul, int type) {
    const int sgn = signed_values(type), dp = VNNI && type != KVC_TYPE_Q6_K;
    const int wide = type == KVC_TYPE_Q8_0;
    __m256i s16[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) {
        __m256i w = _mm256_loadu_si256((const __m256i *)b->v[k0 + i]);
        __m256i aw = sgn ? _mm256_abs_epi8(w) : w;
#pragma GCC unroll 4
        for (int t = 0; t < nt; t++) {
            __m256i xb = _mm256_set1_epi32((int)load_u32((const uint8_t *)xq + t * QK + 4 * (k0 + i)));
            if (sgn) xb = _mm256_sign_epi8(xb, w);
            if (dp) {
                sum[t] = DPBUSD(sum[t], aw, xb);
                continue;
            }
            __m256i p16 = _mm256_maddubs_epi16(aw, xb);
            if (wide) {
                sum[t] = _mm256_add_epi32(sum[t], _mm256_madd_epi16(p16, mul));
                IN_REGISTER(sum[t]);
            }
            else {
                s16[t] = i ? _mm256_add_epi16(s16[t], p16) : p16;
                IN_REGISTER(s16[t]);
            }
        }
    }
    if (!wide && !dp)
#pragma GCC unroll 4
        for (int t = 0; t < nt; t++) sum[t] = _mm256_add_epi32(sum[t], _mm256_madd_epi16(s16[t], mul));
}

// Chain g % 8 takes blocks g, g + 8, ... in that order, one chain after
// another, so a chain's 4 accumulators stay in registers.
KERNEL void PATH(panel_tile)(int type, const panel_block *p, int64_t n, act_q8 x, int t0, int nt,
                             float *y, int64_t y_stride, int n_rows, int n_tok) {
    const int sgn = signed_values(type), q6 = type == KVC_TYPE_Q6_K;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 chains[4][8];   // token, chain
    for (int c = 0; c < 8; c++) {
        __m256 acc[4];
        for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
        for (int64_t g = c; g < n / QK; g += 8) {
            const panel_block *b = p + g;
            const int8_t *xq = x.q + (g * x.nt + t0) * QK;
            __m256i sum[4];
            for (int t = 0; t < nt; t++) sum[t] = _mm256_setzero_si256();
            PATH(panel_pieces)(b, 0, xq, nt, sum, q6 ? _mm256_loadu_si256((const __m256i *)b->sc[0]) : ones, type);
            PATH(panel_pieces)(b, 4, xq, nt, sum, q6 ? _mm256_loadu_si256((const __m256i *)b->sc[1]) : ones, type);
            const __m256 va = _mm256_loadu_ps(b->a), vm = _mm256_loadu_ps(b->m);
#pragma GCC unroll 4
            for (int t = 0; t < nt; t++) {
                const int64_t k = (t0 + t) * (n / QK) + g;   // the token's scales
                acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(va, _mm256_set1_ps(x.d[k])),
                                         _mm256_cvtepi32_ps(sum[t]), acc[t]);
                if (!sgn) acc[t] = _mm256_fmadd_ps(vm, _mm256_set1_ps(x.s[k]), acc[t]);
            }
        }
        for (int t = 0; t < nt; t++) chains[t][c] = acc[t];
    }
    for (int t = 0; t < n_tok; t++) {
        float out[PANEL];
        _mm256_storeu_ps(out, add_chains(chains[t]));
        memcpy(y + t * y_stride, out, sizeof(float) * (size_t)n_rows);
    }
}

// A group of one token (the decode case, token_tile) and one of several,
// each its own function: their registers are allocated apart. Groups of 2 and 4 (all
// their tokens real) have their loops over tokens unrolled; 3 is left to the
// loop, which keeps the build of the core near a minute.
#define TILE_ENTRY(name, type)                                                                     \
    static __attribute__((noinline)) TARGET void PATH(name##_n)(const uint8_t *w, int64_t row_stride, \
                                  int64_t n_rows, act_q8 x, int64_t n, float *y, int64_t y_stride, \
                                  int n_tok) {                                                     \
        switch (n_tok == x.nt ? n_tok : 0) {                                                       \
        case 2: PATH(blocks_tile)(type, w, row_stride, n_rows, x, 2, 2, n, y, y_stride); break;    \
        case 4: PATH(blocks_tile)(type, w, row_stride, n_rows, x, 4, 4, n, y, y_stride); break;    \
        default: PATH(blocks_tile)(type, w, row_stride, n_rows, x, x.nt, n_tok, n, y, y_stride);   \
        }                                                                                          \
    }                                                                                              \
    static TARGET void PATH(name)(int type_, const uint8_t *w, int64_t row_stride, int64_t n_rows, \
                                  act_q8 x, int64_t n, float *y, int64_t y_stride, int n_tok) {    \
        (void)type_;                                                                               \
        if (x.nt == 1) PATH(token_tile)(type, w, row_stride, n_rows, x, n, y);                     \
        else PATH(name##_n)(w, row_stride, n_rows, x, n, y, y_stride, n_tok);                      \
    }

#define PANEL_ENTRY(name, type)                                                          \
    static TARGET void PATH(name)(const void *p, int64_t n, act_q8 x, int t0,            \
                                  float *y, int64_t y_stride, int n_rows, int n_tok) {   \
        if (x.nt == 1) PATH(panel_tile)(type, p, n, x, t0, 1, y, y_stride, n_rows, n_tok); \
        else if (x.nt == 2) PATH(panel_tile)(type, p, n, x, t0, 2, y, y_stride, n_rows, n_tok); \
        else PATH(panel_tile)(type, p, n, x, t0, 4, y, y_stride, n_rows, n_tok);         \
    }

#ifdef WIDE_PANELS
#define ENTRIES(t, type) TILE_ENTRY(dot_##t, type)
#else
#define ENTRIES(t, type) TILE_ENTRY(dot_##t, type) PANEL_ENTRY(panel_##t, type)
#endif
EACH_TYPE(ENTRIES)

#define DOT_CASE(t, type) case type: return PATH(dot_##t);
#define PANEL_CASE(t, type) case type: return PATH(panel_##t);
static dot_q8_fn PATH(dot_q8)(int type) {
    switch (type) { EACH_TYPE(DOT_CASE) }
    return NULL;
}

#ifndef WIDE_PANELS
static panel_dot_fn PATH(panel_dot)(int type) {
    switch (type) { EACH_TYPE(PANEL_CASE) }
    return NULL;
}
#endif

#undef PATH
#undef TARGET
#undef KERNEL
#undef VNNI
#undef WIDE_PANELS
#undef DPBUSD
#undef TILE_ENTRY
#undef PANEL_ENTRY
#undef ENTRIES
#undef DOT_CASE
#undef PANEL_CASE
