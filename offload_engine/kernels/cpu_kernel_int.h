// The GEMV with integer dot products (AVX-512BW or AVX2; VNNI where the CPU has it): x quantized once per call to
// int16 (or int8) with one scale per 16 inputs, the codes multiplied as unsigned bytes. Included by
// cpu_kernel.cpp; cpu.py's `int_activations` chooses it (float16 x by default: see CPUKernels).
//
// Why: the fp32 paths spend per vector of weights a convert and one FMA per token, and on Zen 4 those share the
// two FMA pipes (BENCHMARKS.md §1): ~4.7 GB/s per core at 4 tokens. An integer dot product instead multiplies 2
// (vpdpwssd: int16) or 4 (vpdpbusd: int8) weights per 32-bit lane and sums them in one op, with no convert.
//
// Per 16 inputs j of a token (a "subgroup": a group of 16, or a sixteenth-aligned part of a larger group),
// x_j ~ xs * xq_j with xs = max |x_j| / QMAX, so for a row with w_j = (q_j - z) * s:
//     sum_j w_j x_j ~ s * xs * (sum_j q_j xq_j) - z * s * (xs * sum_j xq_j),
// the first sum exact in int32, the second (the quantized x's subgroup sum) computed once per call. Using the
// quantized x in both terms makes the error sum_j w_j (x^_j - x_j): the weights times x's rounding, at most
// xs / 2 per input (int16: 1 / 65534 of the subgroup's largest |x|, ~1/30 of float16's rounding of it).
//
// Layout: as in cpu_kernel_groups.h, a 32-bit lane l of a vector belongs to one subgroup of a block of INT_LANES
// subgroups, so a block's dot products leave each subgroup's sum in its own lane, converted and scaled once per
// block and row: total_l += float(acc_l) * (s_l * xs_l) + (-z_l s_l) * xsum_l. The codes are stored subgroup by
// subgroup (16 bytes each), so each block's bytes are transposed 4 bytes (one dword) at a time, which needs no
// VBMI: quarter J's lane l holds bytes 4J..4J+3 of subgroup lane_subgroup(l) (AVX-512: vpermt2d, l itself; AVX2:
// unpacks within 128-bit halves, a permuted order). x is laid out the same way once per call; the scales are
// permuted into lane order as they are loaded. The codes stay masked in place (q << shift, the scale takes the
// shift back) except for int8 without VNNI, whose vpmaddubsw saturates at int16: there they are shifted down.
#pragma once
#include <cmath>
#include <type_traits>

// (Macros, not constants: the preprocessor picks the code for the ISA.)
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define INT_ISA_LANES 16
typedef __m512i ivec;
#elif defined(__AVX2__)
#define INT_ISA_LANES 8
typedef __m256i ivec;
#else
#define INT_ISA_LANES 0
#endif
#if defined(__AVX512VNNI__) && INT_ISA_LANES == 16
#define INT_ISA_VNNI 1
#else
#define INT_ISA_VNNI 0
#endif
constexpr int INT_LANES = INT_ISA_LANES;  // 32-bit lanes per integer vector (0: no integer path in this build)
constexpr bool INT_VNNI = INT_ISA_VNNI;

constexpr int SUBGROUP = 16;                                 // inputs per x scale and per lane
constexpr int SUB_PER_GROUP = GROUP / SUBGROUP > 0 ? GROUP / SUBGROUP : 1;  // subgroups sharing a weight scale
// Byte codes, groups a multiple of 16 whose subgroups tile a block (so one load of scales serves a block), rows
// sharing words (N % PACK == 0, checked at run time). 3-bit codes (10 per 32-bit word) stay on the fp32 path.
constexpr bool INT_FORMAT = INT_LANES > 0 && sizeof(WORD) == 1 && GROUP % SUBGROUP == 0 &&
                            (SUB_PER_GROUP & (SUB_PER_GROUP - 1)) == 0 && SUB_PER_GROUP <= INT_LANES &&
                            LANES == INT_LANES;

static bool int_dot_runs(const Matrix& m) { return INT_FORMAT && m.n % PACK == 0 && m.k % SUBGROUP == 0; }

// int8 without VNNI multiplies codes shifted down (vpmaddubsw's int16 pair sums must not saturate: 8-bit codes
// would, so 8-bit matrices take int16 there).
static bool int8_runs() { return INT_VNNI || BITS <= 4; }

#if INT_ISA_LANES > 0
constexpr int INT_BLOCK = INT_LANES * SUBGROUP;  // bytes of codes (and inputs) per block
// Tokens per pass over a block: as the fp32 paths' TOKEN_BLOCK, but counting 16 accumulators with AVX2 too: its
// integer accumulators then spill past 16 registers, yet on a Mixtral w1 (-mno-avx512f, 1 thread) 3 tokens ran
// ~10 % faster (int8 ~25 %) than in passes of 2 + 1, 4 tokens within 4 % for int16.
constexpr int INT_TOKEN_BLOCK = std::clamp(16 / PACK, 1, 4);

// The subgroup (of its block) that lane l holds, and the lane that holds subgroup j.
constexpr int lane_subgroup(int l) { return INT_LANES == 16 ? l : 2 * (l % 4) + l / 4; }
constexpr int subgroup_lane(int j) { return INT_LANES == 16 ? j : 4 * (j % 2) + j / 2; }

static inline ivec load_ivec(const void* at) {
    ivec v;
    std::memcpy(&v, at, sizeof(v));
    return v;
}

static inline vfloat lanes_to_floats(ivec v) {
    vint i;
    std::memcpy(&i, &v, sizeof(v));
    return __builtin_convertvector(i, vfloat);
}

#if INT_ISA_LANES == 16
static inline ivec splat8(int v) { return _mm512_set1_epi8((char)v); }
static inline ivec splat16(int v) { return _mm512_set1_epi16((short)v); }
static inline ivec and_ivec(ivec a, ivec b) { return _mm512_and_si512(a, b); }
static inline ivec shift_down16(ivec a, int n) { return _mm512_srli_epi16(a, n); }
static inline ivec zero_ivec() { return _mm512_setzero_si512(); }
static inline ivec shuffle_bytes(ivec a, ivec index) { return _mm512_shuffle_epi8(a, index); }

// The block's 4 quarters: q[J] lane l = dword J of subgroup l (vpermt2d from two 64-byte loads, then a blend).
static inline void transpose_quarters(const uint8_t* block, ivec* q) {
    alignas(64) static const auto indices = [] {
        struct { int32_t quarter[4][16]; } t{};
        for (int J = 0; J < 4; J++)
            for (int l = 0; l < 16; l++) t.quarter[J][l] = (l % 8) / 4 * 16 + 4 * (l % 4) + J;
        return t;
    }();
    const __m512i in0 = _mm512_loadu_si512(block), in1 = _mm512_loadu_si512(block + 64);
    const __m512i in2 = _mm512_loadu_si512(block + 128), in3 = _mm512_loadu_si512(block + 192);
    for (int J = 0; J < 4; J++) {
        const __m512i index = _mm512_load_si512(indices.quarter[J]);
        q[J] = _mm512_mask_blend_epi32(0xFF00, _mm512_permutex2var_epi32(in0, index, in1),
                                       _mm512_permutex2var_epi32(in2, index, in3));
    }
}

// acc + sum of the int16 pair products in each lane (vpdpwssd, or vpmaddwd + vpaddd).
static inline ivec dot16(ivec acc, ivec a, ivec b) {
#if defined(__AVX512VNNI__)
    return _mm512_dpwssd_epi32(acc, a, b);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}
#if INT_ISA_VNNI
static inline ivec dot8(ivec acc, ivec u8, ivec s8) { return _mm512_dpbusd_epi32(acc, u8, s8); }
#endif
static inline ivec pairs8(ivec u8, ivec s8) { return _mm512_maddubs_epi16(u8, s8); }
static inline ivec add16(ivec a, ivec b) { return _mm512_add_epi16(a, b); }
static inline ivec widen_pairs(ivec a) { return _mm512_madd_epi16(a, _mm512_set1_epi16(1)); }
static inline vfloat permute_lanes(vfloat v, const int32_t* index) {
    __m512 w;
    std::memcpy(&w, &v, sizeof(w));
    w = _mm512_permutexvar_ps(_mm512_load_si512(index), w);
    std::memcpy(&v, &w, sizeof(w));
    return v;
}
#else
static inline ivec splat8(int v) { return _mm256_set1_epi8((char)v); }
static inline ivec splat16(int v) { return _mm256_set1_epi16((short)v); }
static inline ivec and_ivec(ivec a, ivec b) { return _mm256_and_si256(a, b); }
static inline ivec shift_down16(ivec a, int n) { return _mm256_srli_epi16(a, n); }
static inline ivec zero_ivec() { return _mm256_setzero_si256(); }
static inline ivec shuffle_bytes(ivec a, ivec index) { return _mm256_shuffle_epi8(a, index); }

// q[J] lane l = dword J of subgroup lane_subgroup(l): a 4x4 dword transpose within each 128-bit half (AVX2 has
// no two-source dword permute), so the low half holds subgroups 0, 2, 4, 6 and the high half 1, 3, 5, 7.
static inline void transpose_quarters(const uint8_t* block, ivec* q) {
    const __m256i in0 = _mm256_loadu_si256((const __m256i*)block), in1 = _mm256_loadu_si256((const __m256i*)(block + 32));
    const __m256i in2 = _mm256_loadu_si256((const __m256i*)(block + 64));
    const __m256i in3 = _mm256_loadu_si256((const __m256i*)(block + 96));
    const __m256i t0 = _mm256_unpacklo_epi32(in0, in1), t1 = _mm256_unpackhi_epi32(in0, in1);
    const __m256i t2 = _mm256_unpacklo_epi32(in2, in3), t3 = _mm256_unpackhi_epi32(in2, in3);
    q[0] = _mm256_unpacklo_epi64(t0, t2), q[1] = _mm256_unpackhi_epi64(t0, t2);
    q[2] = _mm256_unpacklo_epi64(t1, t3), q[3] = _mm256_unpackhi_epi64(t1, t3);
}

static inline ivec dot16(ivec acc, ivec a, ivec b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
static inline ivec pairs8(ivec u8, ivec s8) { return _mm256_maddubs_epi16(u8, s8); }
static inline ivec add16(ivec a, ivec b) { return _mm256_add_epi16(a, b); }
static inline ivec widen_pairs(ivec a) { return _mm256_madd_epi16(a, _mm256_set1_epi16(1)); }
static inline vfloat permute_lanes(vfloat v, const int32_t* index) {
    __m256 w;
    std::memcpy(&w, &v, sizeof(w));
    w = _mm256_permutevar8x32_ps(w, _mm256_load_si256((const __m256i*)index));
    std::memcpy(&v, &w, sizeof(w));
    return v;
}
#endif

// Bytes 2k, 2k + 1 of a dword's 4 -> two zero-extended int16s (half 0: bytes 0, 1; half 1: bytes 2, 3).
static const uint8_t* widen_indices() {
    alignas(64) static const auto indices = [] {
        struct { uint8_t half[2][64]; } t{};
        for (int h = 0; h < 2; h++)
            for (int b = 0; b < 64; b++) t.half[h][b] = b % 2 ? 0x80 : (uint8_t)(b % 16 / 4 * 4 + 2 * h + b % 4 / 2);
        return t;
    }();
    return &indices.half[0][0];
}

// Lane l's weight scale sits at index lane_subgroup(l) / SUB_PER_GROUP from the block's first group.
static const int32_t* scale_lanes() {
    alignas(64) static const auto indices = [] {
        struct { int32_t lane[16]; } t{};
        for (int l = 0; l < INT_LANES; l++) t.lane[l] = lane_subgroup(l) / SUB_PER_GROUP;
        return t;
    }();
    return indices.lane;
}
constexpr bool SCALES_IN_LANE_ORDER = INT_LANES == 16 && SUB_PER_GROUP == 1;

// Block b's lane scales (times 2^-shift) and zero terms (-z * s) for the row whose groups start at `first`
// (`groups` of them), rebuilt from the 8-bit codes right here rather than in a pass over the row beforehand
// (~5 % faster at one token). In fp32, as quantize.dequantize computes them before its cast, not rounded to the
// compute dtype: the products approximate x times hqq's fp32 dequantization, as the reference's own roundings
// do. Rebuilding them is expensive: on a Mixtral w1 at one token (1 thread), constant scales instead ran in 65 %
// of the time, scale codes read from one cached place in 90 %.
static inline void block_scales(ScaleReader& reader, int64_t first, int64_t groups, int64_t b, float unit,
                                vfloat& scale, vfloat& zero) {
    const int64_t at = b * INT_LANES / SUB_PER_GROUP;
    vfloat s, z;
    reader.read(first + at, (int)std::min<int64_t>(LANES, groups - at), s, z);
    if constexpr (!SCALES_IN_LANE_ORDER) s = permute_lanes(s, scale_lanes()), z = permute_lanes(z, scale_lanes());
    scale = s * unit;
    zero = -(z * s);
}

// Where input j of subgroup `sub` goes in a token's quantized x (PER: inputs per lane per vector, 2 for int16, 4
// for int8): block sub / INT_LANES, vector j / PER, lane subgroup_lane(sub % INT_LANES), element j % PER.
template <int PER>
static inline int64_t quantized_at(int64_t sub, int j) {
    return sub / INT_LANES * INT_BLOCK + (j / PER * INT_LANES + subgroup_lane(sub % INT_LANES)) * PER + j % PER;
}

// x [T, K] (fp32) -> xq [T, blocks, vectors, lanes, PER] (int16 or int8, zero past the last subgroup), its scales
// xs [T, padded subgroups] in lane order and the quantized subgroup sums xsum = xs * sum_j xq_j.
template <typename Q>
static void quantize_x(const float* x, int tokens, int64_t k, int64_t padded_subs, Q* xq, float* xs, float* xsum) {
    constexpr int PER = sizeof(Q) == 2 ? 2 : 4;
    constexpr float QMAX = sizeof(Q) == 2 ? 32767.f : 127.f;
    const int64_t subs = k / SUBGROUP;
    std::fill(xq, xq + tokens * padded_subs * SUBGROUP, (Q)0);
    std::fill(xs, xs + tokens * padded_subs, 0.f);
    std::fill(xsum, xsum + tokens * padded_subs, 0.f);
    for (int t = 0; t < tokens; t++) {
        Q* row = xq + t * padded_subs * SUBGROUP;
        for (int64_t sub = 0; sub < subs; sub++) {
            const float* in = x + t * k + sub * SUBGROUP;
            float largest = 0.f;
            for (int j = 0; j < SUBGROUP; j++) largest = std::max(largest, std::fabs(in[j]));
            const float scale = largest / QMAX, inverse = largest > 0.f ? QMAX / largest : 0.f;
            int sum = 0;
            for (int j = 0; j < SUBGROUP; j++) {
                const int q = std::clamp((int)std::nearbyint(in[j] * inverse), -(int)QMAX, (int)QMAX);
                row[quantized_at<PER>(sub, j)] = (Q)q;
                sum += q;
            }
            const int64_t lane = t * padded_subs + sub / INT_LANES * INT_LANES + subgroup_lane(sub % INT_LANES);
            xs[lane] = scale;
            xsum[lane] = scale * (float)sum;
        }
    }
}

// The PACK rows sharing `subs` subgroups' word bytes, T tokens: out[r * T + t] += sum_k w[r, k] x[t, k], row r's
// scales and zeros those of groups first[r] + [0, groups), x quantized by quantize_x (tokens x_stride elements
// apart, its scales and sums sums_stride apart).
template <int T, bool INT8>
static void dot_int(const uint8_t* words, int64_t subs, const Meta& meta, const int64_t* first, int64_t groups,
                    const void* xq, int64_t x_stride, const float* xs, const float* xsum, int64_t sums_stride,
                    float* out) {
    constexpr int VECTORS = INT8 ? 4 : 8;  // per block and token
    constexpr bool SHIFT_DOWN = INT8 && !INT_VNNI;
    constexpr int ROWS = std::clamp(8 / T, 1, PACK);  // rows per pass over a block's codes (divides PACK)
    ScaleReader readers[PACK];
    float units[PACK];  // the codes stay masked in place (q << shift): the scales take 2^-shift
    for (int r = 0; r < PACK; r++) {
        readers[r] = ScaleReader(meta);
        units[r] = SHIFT_DOWN ? 1.f : 1.f / (float)(1u << (BITS * (PACK - 1 - r)));
    }
    const ivec widen0 = load_ivec(widen_indices()), widen1 = load_ivec(widen_indices() + 64);
    alignas(64) uint8_t tail[INT_BLOCK];
    vfloat total[PACK][T] = {};
    for (int64_t b = 0; b * INT_LANES < subs; b++) {
        const uint8_t* block = words + b * INT_BLOCK;
        for (int line = 0; line < INT_BLOCK; line += 64) __builtin_prefetch(block + PREFETCH_WORDS + line);
        if (subs - b * INT_LANES < INT_LANES) {  // the last, partial block: never read past the row's codes
            std::memset(tail, 0, sizeof(tail));
            std::memcpy(tail, block, (subs - b * INT_LANES) * SUBGROUP);
            block = tail;
        }
        ivec codes[VECTORS];
        {
            ivec quarters[4];
            transpose_quarters(block, quarters);
            for (int J = 0; J < 4; J++) {
                if constexpr (INT8) {
                    codes[J] = quarters[J];
                } else {  // vector 2J + h: inputs 4J + 2h, 4J + 2h + 1 of each lane's subgroup
                    codes[2 * J] = shuffle_bytes(quarters[J], widen0);
                    codes[2 * J + 1] = shuffle_bytes(quarters[J], widen1);
                }
            }
        }
        // ROWS rows' and every token's dot products at once, a vector of codes at a time: ROWS x T independent
        // chains (a chain of 8 dependent vpdpwssd per row and token was ~15 % slower at 4 tokens), at most 8
        // so that the int accumulators, x and the codes fit the registers beside the fp32 totals. int8 without
        // VNNI sums vpmaddubsw's int16 pairs (far inside int16 for codes < 16) and widens them once per block.
        for (int r0 = 0; r0 < PACK; r0 += ROWS) {
            ivec acc[ROWS][T];
            for (int r = 0; r < ROWS; r++)
                for (int t = 0; t < T; t++) acc[r][t] = zero_ivec();
            for (int v = 0; v < VECTORS; v++) {
                ivec xv[T];
                for (int t = 0; t < T; t++)
                    xv[t] = load_ivec((const uint8_t*)xq + (t * x_stride + b * INT_BLOCK) * (INT8 ? 1 : 2) +
                                      v * sizeof(ivec));
                for (int r = 0; r < ROWS; r++) {
                    const int shift = BITS * (PACK - 1 - (r0 + r));
                    ivec masked;
                    if constexpr (SHIFT_DOWN) masked = and_ivec(shift_down16(codes[v], shift), splat8(MASK));
                    else if constexpr (INT8) masked = and_ivec(codes[v], splat8(MASK << shift));
                    else masked = and_ivec(codes[v], splat16(MASK << shift));
                    for (int t = 0; t < T; t++) {
                        if constexpr (SHIFT_DOWN)
                            acc[r][t] = v == 0 ? pairs8(masked, xv[t]) : add16(acc[r][t], pairs8(masked, xv[t]));
#if INT_ISA_VNNI
                        else if constexpr (INT8) acc[r][t] = dot8(acc[r][t], masked, xv[t]);
#endif
                        else acc[r][t] = dot16(acc[r][t], masked, xv[t]);
                    }
                }
            }
            // Unrolled: GCC's rolled loop kept the accumulators and readers on the stack (~15 % slower at 1 token).
#pragma GCC unroll 8
            for (int r = 0; r < ROWS; r++) {
                vfloat scale, zero;
                block_scales(readers[r0 + r], first[r0 + r], groups, b, units[r0 + r], scale, zero);
                for (int t = 0; t < T; t++) {
                    const ivec sums = SHIFT_DOWN ? widen_pairs(acc[r][t]) : acc[r][t];
                    const int64_t at = t * sums_stride + b * INT_LANES;
                    total[r0 + r][t] +=
                        lanes_to_floats(sums) * (scale * load_floats(xs + at)) + zero * load_floats(xsum + at);
                }
            }
        }
    }
    for (int r = 0; r < PACK; r++)
        for (int t = 0; t < T; t++) out[r * T + t] += horizontal_sum(total[r][t]);
}

// y [T, N] (compute dtype) = x [T, K] (fp32) @ W.T for a matrix int_dot_runs accepts, x quantized to int16 or
// (INT8) int8 per 16 inputs.
template <bool INT8>
static void gemv_int(const Matrix& m, const float* x, int tokens, void* y, int threads) {
    typedef typename std::conditional<INT8, int8_t, int16_t>::type Q;
    const int64_t G = m.k / GROUP, R = m.n / PACK, subs = m.k / SUBGROUP;
    const int64_t padded_subs = round_up(subs, INT_LANES);
    const AlignedFloats quantized((tokens * padded_subs * SUBGROUP * sizeof(Q) + 3) / 4);
    const AlignedFloats xs(tokens * padded_subs), xsum(tokens * padded_subs);
    quantize_x<Q>(x, tokens, m.k, padded_subs, (Q*)quantized.data, xs.data, xsum.data);
    const int dtype = m.meta.dtype;
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> out(PACK * tokens), block(PACK * INT_TOKEN_BLOCK);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; r++) {
            for (int q = 0; q < PACK && r + 1 < R; q++) prefetch_meta(m.meta, (q * R + r + 1) * G, G);
            int64_t first[PACK];
            for (int q = 0; q < PACK; q++) first[q] = (q * R + r) * G;
            const uint8_t* words = (const uint8_t*)(m.codes + r * G * GROUP);
            for (int t0 = 0; t0 < tokens; t0 += INT_TOKEN_BLOCK) {
                const int count = std::min(INT_TOKEN_BLOCK, tokens - t0);
                const Q* xt = (const Q*)quantized.data + t0 * padded_subs * SUBGROUP;
                const float *xst = xs.data + t0 * padded_subs, *sumt = xsum.data + t0 * padded_subs;
                std::fill(block.begin(), block.end(), 0.f);
                switch (count) {
#define DOT_INT(T) dot_int<T, INT8>(words, subs, m.meta, first, G, xt, padded_subs * SUBGROUP, xst, sumt, \
                                    padded_subs, block.data())
                    case 1: DOT_INT(1); break;
                    case 2: if constexpr (INT_TOKEN_BLOCK >= 2) DOT_INT(2); break;
                    case 3: if constexpr (INT_TOKEN_BLOCK >= 3) DOT_INT(3); break;
                    case 4: if constexpr (INT_TOKEN_BLOCK >= 4) DOT_INT(4); break;
#undef DOT_INT
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
template <bool INT8>
static void gemv_int(const Matrix&, const float*, int, void*, int) {}
#endif
