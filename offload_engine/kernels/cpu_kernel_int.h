// The GEMV with integer dot products (AVX-512BW or AVX2; VNNI where the CPU has it): x quantized once per call to
// int16 (or int8) with one scale per 16 inputs, the codes multiplied as unsigned bytes. Included by
// cpu_kernel.cpp; cpu.py's `int_activations` chooses it (float16 and most bfloat16 x by default: see CPUKernels).
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

#include "cpu_kernel_int_vectors.h"

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
// of the time, scale codes read from one cached place in 90 %; most of it was ScaleReader's bookkeeping, which
// the overload below skips.
static inline void block_scales(ScaleReader& reader, int64_t first, int64_t groups, int64_t b, float unit,
                                vfloat& scale, vfloat& zero) {
    const int64_t at = b * INT_LANES / SUB_PER_GROUP;
    vfloat s, z;
    reader.read(first + at, (int)std::min<int64_t>(LANES, groups - at), s, z);
    if constexpr (!SCALES_IN_LANE_ORDER) s = permute_lanes(s, scale_lanes()), z = permute_lanes(z, scale_lanes());
    scale = s * unit;
    zero = -(z * s);
}

// The same for a block of 8-bit scale codes whose LANES codes, from group `at` on, lie inside the row and whose
// groups lie in the (min, step) range of fp32 `step` and `low`: the same arithmetic without ScaleReader's per-call
// range check, float16 conversions and broadcasts (12-15 % of a whole Mixtral expert at 1-2 tokens).
static inline void block_scales(const Meta& m, int64_t at, vfloat step, vfloat low, vfloat zero_step,
                                vfloat zero_min, float unit, vfloat& scale, vfloat& zero) {
    vfloat s = multiply_then_add(byte_codes(m.scale_q + at), step, low);
    vfloat z = multiply_then_add(byte_codes(m.zero_q + at), zero_step, zero_min);
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

typedef float subgroup_floats __attribute__((vector_size(4 * SUBGROUP)));  // one subgroup's inputs
typedef int32_t subgroup_ints __attribute__((vector_size(4 * SUBGROUP)));

// The largest lane of v: a halving tree in vector registers. (Subgroup vectors pass by reference: by value, wider
// than AVX2's registers, they draw GCC's ABI-change warning.)
static inline float largest_lane(const subgroup_floats& v) {
    static_assert(SUBGROUP == 16, "the tree halves 16 lanes");
    subgroup_floats m = v, other = __builtin_shufflevector(m, m, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    m = m > other ? m : other;
    other = __builtin_shufflevector(m, m, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    m = m > other ? m : other;
    other = __builtin_shufflevector(m, m, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    m = m > other ? m : other;
    return std::max(m[0], m[1]);
}

// v made opaque to the compiler, in place: a product kept from fusing into the add that follows (an FMA would
// round the exact product, not the float that std::nearbyint rounds; GCC fuses across statements).
static inline void no_contraction(subgroup_floats& v) {
    vfloat parts[sizeof(v) / sizeof(vfloat)];
    std::memcpy(parts, &v, sizeof(v));
    for (vfloat& part : parts) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
        __asm__("" : "+v"(part));
#else
        __asm__("" : "+m"(part));
#endif
    }
    std::memcpy(&v, parts, sizeof(v));
}

// x [T, K] (fp32) -> xq [T, blocks, vectors, lanes, PER] (int16 or int8, zero past the last subgroup), its scales
// xs [T, padded subgroups] in lane order and the quantized subgroup sums xsum = xs * sum_j xq_j. A subgroup a
// vector: it runs before the threads start (on 2 threads, 1-2 % faster on a Mixtral expert at 2-4 tokens than
// input by input). Rounds x * (QMAX / largest) to the nearest integer, ties to even, by adding and subtracting
// 1.5 * 2^23 (|x * QMAX / largest| <= QMAX < 2^22): std::nearbyint in the default rounding mode, lane by lane.
template <typename Q>
static void quantize_x(const float* x, int tokens, int64_t k, int64_t padded_subs, Q* xq, float* xs, float* xsum) {
    constexpr int PER = sizeof(Q) == 2 ? 2 : 4;
    constexpr float QMAX = sizeof(Q) == 2 ? 32767.f : 127.f, ROUND = 12582912.f;
    const int64_t subs = k / SUBGROUP;
    std::fill(xq, xq + tokens * padded_subs * SUBGROUP, (Q)0);
    std::fill(xs, xs + tokens * padded_subs, 0.f);
    std::fill(xsum, xsum + tokens * padded_subs, 0.f);
    for (int t = 0; t < tokens; t++) {
        Q* row = xq + t * padded_subs * SUBGROUP;
        for (int64_t sub = 0; sub < subs; sub++) {
            subgroup_floats in;
            std::memcpy(&in, x + t * k + sub * SUBGROUP, sizeof(in));
            const subgroup_floats magnitude = (subgroup_floats)((subgroup_ints)in & 0x7fffffff);
            const float largest = largest_lane(magnitude);
            const float scale = largest / QMAX, inverse = largest > 0.f ? QMAX / largest : 0.f;
            subgroup_floats rounded = in * inverse;
            no_contraction(rounded);
            rounded += ROUND;
            rounded -= ROUND;
            rounded = rounded > QMAX ? QMAX : rounded < -QMAX ? -QMAX : rounded;
            const subgroup_ints q = __builtin_convertvector(rounded, subgroup_ints);
            int sum = 0;
            for (int j = 0; j < SUBGROUP; j++) {
                row[quantized_at<PER>(sub, j)] = (Q)q[j];
                sum += q[j];
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
    // Rows per pass over a block's codes (divides PACK): ROWS x T accumulator chains, at most 8 (see below). On a
    // whole Mixtral expert (1 thread), with AVX-512: 2 rows at 2 tokens 7 % faster than 4, 1 row at 3 tokens (with
    // the ranges in registers, below) 4-8 % faster than 2 with VNNI, 3 % slower without; with AVX2: 4 rows at 2
    // tokens 14 % faster than 2, 1 row at 3 tokens 2 % slower than 2.
    constexpr bool AVX512 = INT_LANES == 16, ONE_ROW_AT_3 = AVX512 && INT_VNNI;
    constexpr int ROWS = std::min(T == 1 ? 4 : T == 2 ? (AVX512 ? 2 : 4) : T == 3 && ONE_ROW_AT_3 ? 1 : 2, PACK);
    ScaleReader readers[PACK];
    float units[PACK];  // the codes stay masked in place (q << shift): the scales take 2^-shift
    for (int r = 0; r < PACK; r++) {
        readers[r] = ScaleReader(meta);
        units[r] = SHIFT_DOWN ? 1.f : 1.f / (float)(1u << (BITS * (PACK - 1 - r)));
    }
    const ivec widen0 = load_ivec(widen_indices()), widen1 = load_ivec(widen_indices() + 64);
    alignas(64) uint8_t tail[INT_BLOCK];
    vfloat total[PACK][T] = {};
    // Where every row's groups start a (min, step) range (Mixtral's all do) and scales are 8-bit codes, the blocks
    // of whole codes whose LANES scale codes lie inside the rows run a range at a time (IN_RANGE), its fp32 (min,
    // step) in registers; the rest through ScaleReader. Not at 4 tokens, nor at 3 on AVX2: there the 8 more live
    // vectors spilled the fp32 totals (6-15 % slower on a whole expert).
    constexpr int USED = INT_LANES / SUB_PER_GROUP, RANGE_BLOCKS = SCALE_GROUP / USED;  // groups a block uses
    constexpr bool RANGES_IN_REGISTERS = T <= 2 || (T == 3 && ONE_ROW_AT_3);
    bool aligned = RANGES_IN_REGISTERS && meta.scale_q != nullptr && groups >= LANES;
    for (int r = 0; r < PACK; r++) aligned = aligned && first[r] % SCALE_GROUP == 0;
    const int64_t in_range_end = aligned ? std::min(subs / INT_LANES, (groups - LANES) / USED + 1) : 0;
    vfloat zero_step{}, zero_min{};
    if (aligned) zero_step += meta.zero_range[1], zero_min += meta.zero_range[0];
    vfloat step[PACK], low[PACK];
    auto run = [&](int64_t b, auto in_range) __attribute__((always_inline)) {
        constexpr bool IN_RANGE = decltype(in_range)::value;
        const uint8_t* block = words + b * INT_BLOCK;
        for (int line = 0; line < INT_BLOCK; line += 64) __builtin_prefetch(block + PREFETCH_WORDS + line);
        // The last, partial block: never read past the row's codes.
        if (!IN_RANGE && subs - b * INT_LANES < INT_LANES) {
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
                if constexpr (IN_RANGE)
                    block_scales(meta, first[r0 + r] + b * USED, step[r0 + r], low[r0 + r], zero_step, zero_min,
                                 units[r0 + r], scale, zero);
                else
                    block_scales(readers[r0 + r], first[r0 + r], groups, b, units[r0 + r], scale, zero);
                for (int t = 0; t < T; t++) {
                    const ivec sums = SHIFT_DOWN ? widen_pairs(acc[r][t]) : acc[r][t];
                    const int64_t at = t * sums_stride + b * INT_LANES;
                    total[r0 + r][t] +=
                        lanes_to_floats(sums) * (scale * load_floats(xs + at)) + zero * load_floats(xsum + at);
                }
            }
        }
    };
    int64_t b = 0;
    while (b < in_range_end) {
        for (int r = 0; r < PACK; r++) {
            const int64_t range = (first[r] + b * USED) / SCALE_GROUP;
            step[r] = vfloat{} + half_to_float(meta.scale_range[2 * range + 1]);
            low[r] = vfloat{} + half_to_float(meta.scale_range[2 * range]);
        }
        for (const int64_t end = std::min(in_range_end, b + RANGE_BLOCKS); b < end; b++) run(b, std::true_type{});
    }
    for (; b * INT_LANES < subs; b++) run(b, std::false_type{});
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
