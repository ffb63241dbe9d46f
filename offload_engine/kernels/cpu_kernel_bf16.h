// The GEMV with bfloat16 dot products (AVX512-BF16: vdpbf16ps, 32 multiply-adds per instruction where an fp32
// FMA does 16), for bfloat16 activations and 1- or 2-bit codes. Included by cpu_kernel.cpp.
//
// In bfloat16 the reference's weight is itself a bfloat16, w = bf16(bf16(q - z) * s), one of 2^BITS values per
// group: those values are computed 128 groups of a block of rows at a time into tables (TABLE_GROUPS groups per
// 32 entries), and the weights of 32 codes are looked up with one permute (vpermw). x is read as it comes. Each
// product of two bfloat16s is exact in fp32 and accumulates in fp32, as the reference's matmul does, so only
// the order of the sums differs from it. Each 32 weights of a row cost a shift, a mask and the lookup, plus one
// dot product per token; building the tables costs about as much again at one token (~1.5 vector operations per
// group of 16 weights), which is why bfloat16 gains most from 2 tokens on.
#pragma once

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
constexpr bool BF16_DOT_FORMAT = sizeof(WORD) == 1 && (BITS == 1 || BITS == 2) && (GROUP == 16 || GROUP % 32 == 0);
#else
constexpr bool BF16_DOT_FORMAT = false;
#endif

static bool bf16_dot_runs(const Matrix& m) {
    return BF16_DOT_FORMAT && m.meta.dtype == BFLOAT16 && m.n % PACK == 0 && m.k % 32 == 0;
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
constexpr int LEVELS = 1 << BITS;                  // table entries per group
constexpr int TABLE_GROUPS = LEVELS <= 32 ? 32 / LEVELS : 1;  // groups per table of 32 entries
constexpr int CHUNKS_PER_TABLE = TABLE_GROUPS * GROUP / 32 > 0 ? TABLE_GROUPS * GROUP / 32 : 1;
constexpr int BF16_TOKEN_BLOCK = std::clamp(16 / PACK, 1, 4);
// Groups of a row tabled at a time, so that the tables stay in L1 beside x (~5 % faster on 14336-wide rows than
// tabling whole rows). A multiple of 16 (build_tables) and of TABLE_GROUPS.
constexpr int CHUNK_GROUPS = 128;

// Word indices for the permutes of build_tables, made once.
struct TableIndices {
    uint16_t spread[32];            // word w <- word w % 16: a group's scale beside each of its products
    uint16_t zero_high[32];         // word 2 l + 1 <- word 16 + l: zero l as an fp32 (its bf16 in the high half)
    uint16_t order[LEVELS / 2][32];  // table entry g * LEVELS + q <- its word in the packed products
};
static const TableIndices& table_indices() {
    alignas(64) static const TableIndices indices = [] {
        TableIndices t{};
        for (int w = 0; w < 32; w++) t.spread[w] = (uint16_t)(w % 16), t.zero_high[w] = (uint16_t)(16 + w / 2);
        // After build_tables' packing, the weight for code q = 2 p + c of group g is word
        // (g odd ? 16 : 0) + 8 c + g / 2 of products[p] (product pairs p take 32 words each).
        for (int e = 0; e < LEVELS * 16; e++) {
            const int g = e / LEVELS, q = e % LEVELS, pair = q / 2, c = q % 2;
            t.order[e / 32][e % 32] = (uint16_t)(32 * pair + (g % 2 ? 16 : 0) + 8 * c + g / 2);
        }
        return t;
    }();
    return indices;
}

// table[g * LEVELS + q] = the reference's bfloat16 weight bf16(bf16(q - z) * s) for code q in group g, for the
// 16 groups whose scales s and zeros z are given in fp32 (rounded to bfloat16 by pack_scales; like vdpbf16ps,
// the rounding instructions treat values below 2^-126 as zero). Work in packed bfloat16 where it
// can: the products of two bfloat16s come from vdpbf16ps against a vector holding each scale beside a zero
// (exact in fp32), then round once to bfloat16: the reference's rounding of (q - z) * s.
// Done in two passes over a chunk of groups, each a shorter chain of dependent instructions (a few % faster than
// one pass):
//   1. pack_scales: words 0-15: bf16(s), 16-31: bf16(z) of 16 groups;
//   2. build_tables: the 16 groups' table entries from that.
static inline __m512i pack_scales(vfloat s, vfloat z) {
    __m512 sv, zv;
    std::memcpy(&sv, &s, sizeof(sv));
    std::memcpy(&zv, &z, sizeof(zv));
    return (__m512i)_mm512_cvtne2ps_pbh(zv, sv);
}

static inline void build_tables(__m512i packed, uint16_t* table) {
    const TableIndices& ix = table_indices();
    const __m512 zero = _mm512_castsi512_ps(
        _mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, _mm512_load_si512(ix.zero_high), packed));
    const __m512i spread = _mm512_load_si512(ix.spread);
    const __m512bh scale_even = (__m512bh)_mm512_maskz_permutexvar_epi16(0x55555555u, spread, packed);
    const __m512bh scale_odd = (__m512bh)_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, spread, packed);
    __m512i products[LEVELS / 2];
    for (int pair = 0; pair < LEVELS / 2; pair++) {
        // words 0-15: bf16(2 p - z) of the 16 groups, 16-31: bf16(2 p + 1 - z)
        const __m512bh centred = _mm512_cvtne2ps_pbh(_mm512_sub_ps(_mm512_set1_ps(2.f * pair + 1), zero),
                                                     _mm512_sub_ps(_mm512_set1_ps(2.f * pair), zero));
        const __m512 even = _mm512_dpbf16_ps(_mm512_setzero_ps(), centred, scale_even);  // even groups
        const __m512 odd = _mm512_dpbf16_ps(_mm512_setzero_ps(), centred, scale_odd);
        products[pair] = (__m512i)_mm512_cvtne2ps_pbh(odd, even);
    }
    if constexpr (LEVELS == 2) {
        _mm512_storeu_si512(table, _mm512_permutexvar_epi16(_mm512_load_si512(ix.order[0]), products[0]));
    } else {
        for (int half = 0; half < 2; half++)
            _mm512_storeu_si512(table + 32 * half, _mm512_permutex2var_epi16(
                products[0], _mm512_load_si512(ix.order[half]), products[1]));
    }
}

// The PACK rows sharing a run of `weights` words, T tokens: out[r * T + t] += sum_k w[r, k] x[t, k], the weights
// looked up in tables[r] (as build_tables makes them), x in bfloat16 (tokens x_stride apart). Out of line: GCC's
// inlined copy ran ~40 % slower at 4 tokens.
template <int T>
__attribute__((noinline)) static void dot_bf16(const uint8_t* words, int64_t weights, const uint16_t* const* tables,
                                               const uint16_t* x, int64_t x_stride, float* out) {
    // Which group of its table each of a chunk's 32 weights is in, times LEVELS: the lookup's offsets.
    alignas(64) static const auto offsets = [] {
        struct { uint16_t lane[CHUNKS_PER_TABLE][32]; } o{};
        for (int c = 0; c < CHUNKS_PER_TABLE; c++)
            for (int l = 0; l < 32; l++) o.lane[c][l] = (uint16_t)(LEVELS * (((32 * c + l) / GROUP) % TABLE_GROUPS));
        return o;
    }();
    const __m512i mask = _mm512_set1_epi16(MASK);
    __m512 acc[PACK][T];
    for (int r = 0; r < PACK; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();
    int chunk = 0;
    int64_t table_at = 0;
    for (int64_t c = 0; c < weights; c += 32) {
        __builtin_prefetch(words + c + PREFETCH_WORDS);
        const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(words + c)));
        const __m512i offset = _mm512_load_si512(offsets.lane[chunk]);
        __m512bh xv[T];
        for (int t = 0; t < T; t++) xv[t] = (__m512bh)_mm512_loadu_si512(x + t * x_stride + c);
        for (int r = 0; r < PACK; r++) {
            const __m512i shifted = _mm512_srli_epi16(w, BITS * (PACK - 1 - r));
            const __m512i index = _mm512_ternarylogic_epi32(shifted, mask, offset, 0xEA);  // (a & b) | c
            const __m512bh weight = (__m512bh)_mm512_permutexvar_epi16(index, _mm512_loadu_si512(tables[r] + table_at));
            for (int t = 0; t < T; t++) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], weight, xv[t]);
        }
        if (++chunk == CHUNKS_PER_TABLE) chunk = 0, table_at += 32;
    }
    for (int r = 0; r < PACK; r++)
        for (int t = 0; t < T; t++) out[r * T + t] += _mm512_reduce_add_ps(acc[r][t]);
}

// y [T, N] = x [T, K] @ W.T, both bfloat16, for a matrix bf16_dot_runs accepts.
static void gemv_bf16(const Matrix& m, const uint16_t* x, int tokens, uint16_t* y, int threads) {
    const int64_t G = m.k / GROUP, R = m.n / PACK;
    const int64_t table_size = CHUNK_GROUPS * LEVELS;
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> out(PACK * tokens), block(PACK * BF16_TOKEN_BLOCK);
        std::vector<uint16_t> table_store(PACK * table_size);
        const uint16_t* tables[PACK];
        for (int q = 0; q < PACK; q++) tables[q] = table_store.data() + q * table_size;
        __m512i packed[PACK][CHUNK_GROUPS / 16];
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; r++) {
            for (int q = 0; q < PACK && r + 1 < R; q++) prefetch_meta(m.meta, (q * R + r + 1) * G, G);
            ScaleReader readers[PACK];
            for (int q = 0; q < PACK; q++) readers[q] = ScaleReader(m.meta);
            std::fill(out.begin(), out.end(), 0.f);
            for (int64_t first = 0; first < G; first += CHUNK_GROUPS) {
                const int64_t groups = std::min<int64_t>(CHUNK_GROUPS, G - first);
                for (int64_t j = 0; j < groups; j += 16)
                    for (int q = 0; q < PACK; q++) {
                        vfloat s, z;
                        readers[q].read((q * R + r) * G + first + j, (int)std::min<int64_t>(16, groups - j), s, z);
                        packed[q][j / 16] = pack_scales(s, z);
                    }
                for (int64_t j = 0; j < groups; j += 16)
                    for (int q = 0; q < PACK; q++) build_tables(packed[q][j / 16], (uint16_t*)tables[q] + j * LEVELS);
                const uint8_t* words = (const uint8_t*)(m.codes + (r * G + first) * GROUP);
                const int64_t weights = groups * GROUP;
                for (int t0 = 0; t0 < tokens; t0 += BF16_TOKEN_BLOCK) {
                    const int count = std::min(BF16_TOKEN_BLOCK, tokens - t0);
                    const uint16_t* xt = x + t0 * m.k + first * GROUP;
                    std::fill(block.begin(), block.end(), 0.f);
                    switch (count) {
#define DOT_BF16(T) dot_bf16<T>(words, weights, tables, xt, m.k, block.data())
                        case 1: DOT_BF16(1); break;
                        case 2: if constexpr (BF16_TOKEN_BLOCK >= 2) DOT_BF16(2); break;
                        case 3: if constexpr (BF16_TOKEN_BLOCK >= 3) DOT_BF16(3); break;
                        case 4: if constexpr (BF16_TOKEN_BLOCK >= 4) DOT_BF16(4); break;
#undef DOT_BF16
                    }
                    for (int q = 0; q < PACK; q++)
                        for (int t = 0; t < count; t++) out[q * tokens + t0 + t] += block[q * count + t];
                }
            }
            for (int q = 0; q < PACK; q++)
                for (int t = 0; t < tokens; t++) y[t * m.n + q * R + r] = bfloat16_bits(out[q * tokens + t]);
        }
    }
}
#else
static void gemv_bf16(const Matrix&, const uint16_t*, int, uint16_t*, int) {}
#endif
