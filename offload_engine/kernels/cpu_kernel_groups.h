// The GEMVs with one group per lane (AVX-512 with VBMI, byte codes, groups of 16): the scales leave the inner
// loop. In fp32 (every dtype), and with bfloat16 dot products on the codes (bfloat16 x, AVX512-BF16, 1-4-bit
// codes, group_dot_runs). Included by cpu_kernel.cpp.
//
// In gemv_fp32's loop a vector holds 16 weights of one group, so every vector of weights pays a multiply by its
// group's scale before the tokens' FMAs: at 2-4 tokens that multiply is one op in 3-5 on the FMA pipes, which
// bound the loop. Here lane g of a vector belongs to group g of a block of 16 groups, and the 16 vectors of a
// block hold weight j = 0..15 of every group: per row and token, acc_g += q_gj * x_gj accumulates each group's
// sum of codes times x in its own lane, and the block's scales (a vector, one per lane) multiply it once per 16
// groups: total += s * acc + z_term * sum_x. Per vector of weights and row that leaves a mask, a convert and one
// FMA per token. The codes are stored group by group (16 bytes each), so each block's 256 bytes are transposed
// in registers (vpermt2b, 12 ops per 64 vectors of weights), and x once per call (gemv_groups).
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
constexpr bool GROUP_LANES_FORMAT = sizeof(WORD) == 1 && GROUP == 16 && LANES == 16;
#else
constexpr bool GROUP_LANES_FORMAT = false;
#endif

static bool group_lanes_run(const Matrix& m) { return GROUP_LANES_FORMAT && m.n % PACK == 0; }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
constexpr int BLOCK_BYTES = 16 * GROUP;  // 16 groups' codes

// Byte 16 jj + g of quarter J of a transposed block is weight 4 J + jj of group g, taken from the two 128-byte
// halves (groups 0-7, 8-15) at 16 (g % 8) + 4 J + jj.
static const uint8_t* transpose_indices() {
    alignas(64) static const auto indices = [] {
        struct { uint8_t quarter[4][64]; } t{};
        for (int J = 0; J < 4; J++)
            for (int jj = 0; jj < 4; jj++)
                for (int g = 0; g < 16; g++) t.quarter[J][16 * jj + g] = (uint8_t)(16 * (g % 8) + 4 * J + jj);
        return t;
    }();
    return &indices.quarter[0][0];
}

// out[16 j + g] = block[16 g + j]: the 16 groups' codes weight by weight.
static inline void transpose_block(const uint8_t* block, uint8_t* out) {
    const uint8_t* indices = transpose_indices();
    const __m512i in0 = _mm512_loadu_si512(block), in1 = _mm512_loadu_si512(block + 64);
    const __m512i in2 = _mm512_loadu_si512(block + 128), in3 = _mm512_loadu_si512(block + 192);
    const __mmask64 high_groups = 0xFF00FF00FF00FF00ull;  // bytes 8-15 of every 16: groups 8-15
    for (int J = 0; J < 4; J++) {
        const __m512i index = _mm512_load_si512(indices + 64 * J);
        const __m512i low = _mm512_permutex2var_epi8(in0, index, in1);
        const __m512i high = _mm512_permutex2var_epi8(in2, index, in3);
        _mm512_store_si512(out + 64 * J, _mm512_mask_blend_epi8(high_groups, low, high));
    }
}

// The PACK rows sharing `groups` word rows, T tokens: out[r * T + t] += sum_k w[r, k] x[t, k], with the scales s[r]
// and zero terms z[r] of gemv_meta (room for groups rounded up to 16), x transposed as gemv_groups makes it
// (tokens x_stride apart) and its group sums (sums_stride apart, zero past `groups`).
template <int T>
static void dot_groups(const uint8_t* words, int64_t groups, const float* const* s, const float* const* z,
                       const float* x, int64_t x_stride, const float* x_sums, int64_t sums_stride, float* out) {
    alignas(64) uint8_t codes[BLOCK_BYTES], tail[BLOCK_BYTES];
    vfloat total[PACK][T] = {};
    for (int64_t b = 0; b < groups; b += 16) {
        const uint8_t* block = words + b * GROUP;
        for (int line = 0; line < BLOCK_BYTES; line += 64) __builtin_prefetch(block + PREFETCH_WORDS + line);
        if (groups - b < 16) {  // the last, partial block: never read past the row's codes
            std::memset(tail, 0, sizeof(tail));
            std::memcpy(tail, block, (groups - b) * GROUP);
            block = tail;
        }
        transpose_block(block, codes);
        vfloat acc[PACK][T] = {};
        for (int j = 0; j < GROUP; j++) {
            vuint w;  // weight j of the 16 groups, widened to 32 bits
            const __m512i wide = _mm512_cvtepu8_epi32(_mm_load_si128((const __m128i*)(codes + 16 * j)));
            std::memcpy(&w, &wide, sizeof(w));
            vfloat xv[T];
            for (int t = 0; t < T; t++) xv[t] = load_floats(x + t * x_stride + (b + j) * 16);
            for (int r = 0; r < PACK; r++) {
                const vint code = (vint)(w & ((uint32_t)MASK << (BITS * (PACK - 1 - r))));  // q << shift, in place
                const vfloat weight = __builtin_convertvector(code, vfloat);
                for (int t = 0; t < T; t++) acc[r][t] += weight * xv[t];
            }
        }
        for (int r = 0; r < PACK; r++) {
            const vfloat scale = load_floats(s[r] + b), zero = load_floats(z[r] + b);
            for (int t = 0; t < T; t++)
                total[r][t] += scale * acc[r][t] + zero * load_floats(x_sums + t * sums_stride + b);
        }
    }
    for (int r = 0; r < PACK; r++)
        for (int t = 0; t < T; t++) out[r * T + t] += horizontal_sum(total[r][t]);
}

#if defined(__AVX512BF16__)
constexpr bool GROUP_DOT_FORMAT = GROUP_LANES_FORMAT && BITS <= 4;  // codes index a 32-word table
#else
constexpr bool GROUP_DOT_FORMAT = false;
#endif

// bfloat16 activations with a group per lane: the codes as bfloat16 integers (exact), times x as it comes, with
// bfloat16 dot products (vdpbf16ps: 32 multiply-adds, each product exact in fp32, summed in fp32).
static bool group_dot_runs(const Matrix& m) {
    return GROUP_DOT_FORMAT && m.meta.dtype == BFLOAT16 && m.n % PACK == 0;
}

#if defined(__AVX512BF16__)
// Bytes 32 pp + 2 g + e of quarter J of a block transposed by pairs are weight 2 (2 J + pp) + e of group g: the
// word pairs vdpbf16ps sums into lane g.
static const uint8_t* pair_indices() {
    alignas(64) static const auto indices = [] {
        struct { uint8_t quarter[4][64]; } t{};
        for (int J = 0; J < 4; J++)
            for (int pp = 0; pp < 2; pp++)
                for (int g = 0; g < 16; g++)
                    for (int e = 0; e < 2; e++)
                        t.quarter[J][32 * pp + 2 * g + e] = (uint8_t)(16 * (g % 8) + 2 * (2 * J + pp) + e);
        return t;
    }();
    return &indices.quarter[0][0];
}

static inline void transpose_pairs(const uint8_t* block, uint8_t* out) {
    const uint8_t* indices = pair_indices();
    const __m512i in0 = _mm512_loadu_si512(block), in1 = _mm512_loadu_si512(block + 64);
    const __m512i in2 = _mm512_loadu_si512(block + 128), in3 = _mm512_loadu_si512(block + 192);
    const __mmask64 high_groups = 0xFFFF0000FFFF0000ull;  // bytes 16-31 of every 32: groups 8-15
    for (int J = 0; J < 4; J++) {
        const __m512i index = _mm512_load_si512(indices + 64 * J);
        const __m512i low = _mm512_permutex2var_epi8(in0, index, in1);
        const __m512i high = _mm512_permutex2var_epi8(in2, index, in3);
        _mm512_store_si512(out + 64 * J, _mm512_mask_blend_epi8(high_groups, low, high));
    }
}

// dot_groups for bfloat16 x transposed by pairs (gemv_groups<true>): scales s[r] without the shift (the codes are
// shifted down before the lookup).
template <int T>
static void dot_group_pairs(const uint8_t* words, int64_t groups, const float* const* s, const float* const* z,
                            const uint16_t* x, int64_t x_stride, const float* x_sums, int64_t sums_stride,
                            float* out) {
    alignas(64) static const auto code_words = [] {  // word i = bfloat16 of code i & MASK
        struct { uint16_t word[32]; } t{};
        for (int i = 0; i < 32; i++) t.word[i] = bfloat16_bits((float)(i & MASK));
        return t;
    }();
    const __m512i table = _mm512_load_si512(code_words.word);
    alignas(64) uint8_t codes[BLOCK_BYTES], tail[BLOCK_BYTES];
    vfloat total[PACK][T] = {};
    for (int64_t b = 0; b < groups; b += 16) {
        const uint8_t* block = words + b * GROUP;
        for (int line = 0; line < BLOCK_BYTES; line += 64) __builtin_prefetch(block + PREFETCH_WORDS + line);
        if (groups - b < 16) {
            std::memset(tail, 0, sizeof(tail));
            std::memcpy(tail, block, (groups - b) * GROUP);
            block = tail;
        }
        transpose_pairs(block, codes);
        __m512 acc[PACK][T];
        for (int r = 0; r < PACK; r++)
            for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();
        for (int p = 0; p < GROUP / 2; p++) {
            const __m512i w = _mm512_cvtepu8_epi16(_mm256_load_si256((const __m256i*)(codes + 32 * p)));
            __m512bh xv[T];
            for (int t = 0; t < T; t++) xv[t] = (__m512bh)_mm512_loadu_si512(x + t * x_stride + (b + 2 * p) * 16);
            for (int r = 0; r < PACK; r++) {
                const __m512i index = _mm512_srli_epi16(w, BITS * (PACK - 1 - r));  // the lookup reads bits 0-4
                const __m512bh weight = (__m512bh)_mm512_permutexvar_epi16(index, table);
                for (int t = 0; t < T; t++) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], weight, xv[t]);
            }
        }
        for (int r = 0; r < PACK; r++) {
            const vfloat scale = load_floats(s[r] + b), zero = load_floats(z[r] + b);
            for (int t = 0; t < T; t++) {
                vfloat sums;
                std::memcpy(&sums, &acc[r][t], sizeof(sums));
                total[r][t] += scale * sums + zero * load_floats(x_sums + t * sums_stride + b);
            }
        }
    }
    for (int r = 0; r < PACK; r++)
        for (int t = 0; t < T; t++) out[r * T + t] += horizontal_sum(total[r][t]);
}
#endif

// y [T, N] (compute dtype) = x [T, K] (fp32) @ W.T for a matrix group_lanes_run (DOT: group_dot_runs) accepts.
template <bool DOT>
static void gemv_groups(const Matrix& m, const float* x, int tokens, void* y, int threads) {
    const int64_t G = m.k / GROUP, padded = round_up(G, 16), R = m.n / PACK;
    // x [T, K] as [T, blocks of 16 groups, weight j, group g] in fp32 (DOT: as [T, blocks, weight pair, group,
    // 2] in bfloat16), zero past the last group; and its group sums
    const AlignedFloats xt(tokens * padded * GROUP), sums(tokens * padded);
    uint16_t* const xt_words = (uint16_t*)xt.data;
    for (int t = 0; t < tokens; t++) {
        const int64_t row = t * padded * GROUP;
        if constexpr (DOT) std::fill(xt_words + row, xt_words + row + padded * GROUP, 0);
        else std::fill(xt.data + row, xt.data + row + padded * GROUP, 0.f);
        for (int64_t g = 0; g < G; g++)
            for (int j = 0; j < GROUP; j++) {
                const float v = x[t * m.k + g * GROUP + j];
                if constexpr (DOT) xt_words[row + g / 16 * 256 + j / 2 * 32 + 2 * (g % 16) + j % 2] = bfloat16_bits(v);
                else xt.data[row + (g / 16 * GROUP + j) * 16 + g % 16] = v;
            }
        std::fill(sums.data + t * padded, sums.data + (t + 1) * padded, 0.f);
        group_sums(x + t * m.k, 1, m.k, sums.data + t * padded);
    }
    const int dtype = m.meta.dtype;
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> sz(2 * PACK * padded), out(PACK * tokens), block(PACK * TOKEN_BLOCK);
        const float* s[PACK];
        const float* z[PACK];
        for (int q = 0; q < PACK; q++) s[q] = sz.data() + q * padded, z[q] = sz.data() + (PACK + q) * padded;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; r++) {
            for (int q = 0; q < PACK && r + 1 < R; q++) prefetch_meta(m.meta, (q * R + r + 1) * G, G);
            for (int q = 0; q < PACK; q++)  // the fp32 loop's codes stay shifted up: the scales take the shift back
                gemv_meta(m.meta, (q * R + r) * G, (int)G, DOT ? 0 : BITS * (PACK - 1 - q), (float*)s[q],
                          (float*)z[q]);
            const uint8_t* words = (const uint8_t*)(m.codes + r * G * GROUP);
            for (int t0 = 0; t0 < tokens; t0 += TOKEN_BLOCK) {
                const int count = std::min(TOKEN_BLOCK, tokens - t0);
                const float* st0 = sums.data + t0 * padded;
                std::fill(block.begin(), block.end(), 0.f);
                switch (count) {
#if defined(__AVX512BF16__)
#define DOT_GROUPS(T)                                                                                              \
    if constexpr (DOT)                                                                                             \
        dot_group_pairs<T>(words, G, s, z, xt_words + t0 * padded * GROUP, padded * GROUP, st0, padded, block.data()); \
    else                                                                                                           \
        dot_groups<T>(words, G, s, z, xt.data + t0 * padded * GROUP, padded * GROUP, st0, padded, block.data())
#else
#define DOT_GROUPS(T) dot_groups<T>(words, G, s, z, xt.data + t0 * padded * GROUP, padded * GROUP, st0, padded, \
                                    block.data())
#endif
                    case 1: DOT_GROUPS(1); break;
                    case 2: if constexpr (TOKEN_BLOCK >= 2) DOT_GROUPS(2); break;
                    case 3: if constexpr (TOKEN_BLOCK >= 3) DOT_GROUPS(3); break;
                    case 4: if constexpr (TOKEN_BLOCK >= 4) DOT_GROUPS(4); break;
#undef DOT_GROUPS
                }
                for (int q = 0; q < PACK; q++)
                    for (int t = 0; t < count; t++) out[q * tokens + t0 + t] = block[q * count + t];
            }
            for (int q = 0; q < PACK; q++)
                for (int t = 0; t < tokens; t++) store_as(y, t * m.n + q * R + r, out[q * tokens + t], dtype);
        }
    }
}
#else
constexpr bool GROUP_DOT_FORMAT = false;
static bool group_dot_runs(const Matrix&) { return false; }
template <bool DOT>
static void gemv_groups(const Matrix&, const float*, int, void*, int) {}
#endif
