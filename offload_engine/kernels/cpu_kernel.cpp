// Fused dequantize-matmul for CPU: y = x @ W.T straight from hqq's packed codes and the 8-bit scale/zero codes.
//
// Built by cpu.py with g++ or clang (-O3 -march=native -fopenmp, dropping what the compiler lacks) once per packed
// format, which it fixes at compile time:
//   WORD  the word type of the codes (uint8_t, or uint32_t for hqq's 3-bit packing)
//   BITS  bits per code;  PACK  codes per word;  GROUP  weights per quantization group (g)
// Everything else (shapes, dtype, scale format) is a runtime argument. The layout (see packing.py): group
// i = n * G + k / g lives in word row p = i % S at slot q = i / S, bits [BITS * (PACK - 1 - q), +BITS).
//
// When N % PACK == 0 the PACK output rows {r, r + R, ..., r + (PACK - 1) R} (R = N / PACK) share their word rows
// exactly, so one pass over the words serves all of them: every packed byte is read once. Otherwise each row
// reads its own (at most two) runs of word rows: correct, just PACK times the traffic.
//
// The GEMV takes x and writes y in the compute dtype, all tokens of a call at once: each block of rows is read
// from memory once and stays in L1 while every token block runs over it. Four ways to multiply:
//  * fp32 (every machine and dtype): x converted to fp32 once per call; per group the weights are dequantized
//    in registers, w = (q - z) * s in fp32 (an FMA on the code masked in place, see fma_form), and multiplied
//    into per-row vector accumulators summed once per row: per vector of weights a mask, a convert, a multiply
//    by the scale, and one FMA per token. Scales and zeros are rebuilt as quantize.dequantize does (fp32
//    arithmetic, rounded through the compute dtype), a block of rows at a time. (A horizontal sum per group,
//    which the group-sum identity written in torch compiles to, was ~5x slower.)
//  * fp32 with one group per lane (cpu_kernel_groups.h; AVX-512 with VBMI, byte codes in groups of 16, e.g.
//    Mixtral's 2-bit g16 experts): the same arithmetic with the scale multiply moved out of the inner loop, once
//    per 16 groups (the group-sum identity, vectorised across groups instead of summed within one).
//  * bfloat16 dot products (AVX512-BF16 CPUs, bfloat16 activations): with a group per lane (cpu_kernel_groups.h,
//    groups of 16, codes of 1-4 bits, VBMI) the codes themselves as bfloat16 integers times x, exact products
//    summed in fp32, the scales applied per group as above; otherwise (cpu_kernel_bf16.h, 1- and 2-bit codes)
//    the reference's own bfloat16 weights from a per-group table, times x as it comes, accumulated in fp32.
//  * integer dot products (cpu_kernel_int.h; byte codes, groups a multiple of 16, AVX-512BW or AVX2, VNNI where
//    present; float16 and most bfloat16 x by default, any dtype on request): x quantized once per call to int16 (or
//    int8) with a scale per 16 inputs, codes times x summed exactly in int32, a subgroup per lane, scales applied
//    per block.
// Prefill instead dequantizes the whole matrix (dequantize below) for BLAS.
#include <vector>

#include "cpu_kernel_common.h"

// Tokens per pass over a block of rows: as many as keep PACK x tokens accumulators in registers.
constexpr int TOKEN_BLOCK = std::clamp(ACCUMULATORS / PACK, 1, 4);

// Turns a run's scales s and zeros z into the form the GEMV uses for codes read in place at bit offset `shift`
// (masked, not shifted down): w = (q - z) * s = (q << shift) * (s * 2^-shift) - z * s, where the second term
// multiplies each group's sum of x once per row (zero_term) instead of every weight. The power-of-two rescale is
// exact; the rest differs from the reference's (q - z) * s by about an fp32 rounding.
static void fma_form(float* s, float* z, int count, int shift) {
    const float unit = 1.0f / (float)(1u << shift);
    for (int j = 0; j < count; j++) {
        z[j] = -(z[j] * s[j]);
        s[j] *= unit;
    }
}

// The scales (times 2^-shift) and zero terms of groups [first, first + count) as fma_form makes them, computed a
// vector at a time (room for count rounded up to LANES).
template <int DT>
static void gemv_meta(const Meta& m, int64_t first, int count, int shift, float* s, float* z) {
    const float unit = 1.0f / (float)(1u << shift);
    for_each_scale_vector<DT>(m, first, count, [&](int j, vfloat sv, vfloat zv) {
        store_floats(z + j, -(zv * sv));
        store_floats(s + j, sv * unit);
    });
}

static void gemv_meta(const Meta& m, int64_t first, int count, int shift, float* s, float* z) {
    switch (m.dtype) {
        case FLOAT32: gemv_meta<FLOAT32>(m, first, count, shift, s, z); break;
        case BFLOAT16: gemv_meta<BFLOAT16>(m, first, count, shift, s, z); break;
        case FLOAT16: gemv_meta<FLOAT16>(m, first, count, shift, s, z); break;
    }
}

static void scales_and_zeros(const Meta& m, int64_t first, int count, float* s, float* z) {
    switch (m.dtype) {
        case FLOAT32: scales_and_zeros<FLOAT32>(m, first, count, s, z); break;
        case BFLOAT16: scales_and_zeros<BFLOAT16>(m, first, count, s, z); break;
        case FLOAT16: scales_and_zeros<FLOAT16>(m, first, count, s, z); break;
    }
}

// sum_j a[j] * b[j] for j < count, in vectors, plus the lanes of acc.
static float dot_floats(const float* a, const float* b, int count, vfloat acc = vfloat{}) {
    int j = 0;
    for (; j + LANES <= count; j += LANES) acc += load_floats(a + j) * load_floats(b + j);
    float total = horizontal_sum(acc);
    for (; j < count; j++) total += a[j] * b[j];
    return total;
}

// x_sums[t * G + g] = the sum of token t's inputs in group g (of every row): what the zeros multiply.
static void group_sums(const float* x, int tokens, int64_t k, float* x_sums) {
    for (int64_t i = 0; i < tokens * (k / GROUP); i++) {
        vfloat acc = {};
        for (int c = 0; c < GROUP; c += LANES) acc += load_floats(x + i * GROUP + c);
        x_sums[i] = horizontal_sum(acc);
    }
}

// P output rows reading the same run of `groups` word rows (row r's codes at bit offset shifts[r]), with their
// scales s[r] and zero terms z[r] for those groups (fma_form); x and x_sums point at the first group's inputs and
// group sums of token 0 (tokens x_stride and sums_stride apart). Adds sum_k w[r, k] x[t, k] over the run to
// out[r * T + t]: per vector of weights a mask, a convert and a multiply by the group's scale, then an FMA per
// token; the zeros add once per group and token.
template <int T, int P>
static void dot_run(const WORD* words, int groups, const int* shifts, const float* const* s, const float* const* z,
                    const float* x, int64_t x_stride, const float* x_sums, int64_t sums_stride, float* out) {
    vfloat acc[P][T] = {};
    for (int gi = 0; gi < groups; gi++) {
        for (int c = 0; c < GROUP; c += LANES) {
            if (c == 0) __builtin_prefetch(words + (int64_t)gi * GROUP + PREFETCH_WORDS);
            const vuint w = load_words(words + (int64_t)gi * GROUP + c);
            vfloat xv[T];
            for (int t = 0; t < T; t++) xv[t] = load_floats(x + t * x_stride + (int64_t)gi * GROUP + c);
            for (int r = 0; r < P; r++) {
                const vint code = (vint)(w & ((uint32_t)MASK << shifts[r]));  // < 2^31: a signed convert is exact
                const vfloat weight = __builtin_convertvector(code, vfloat) * s[r][gi];
                for (int t = 0; t < T; t++) acc[r][t] += weight * xv[t];
            }
        }
    }
    for (int r = 0; r < P; r++)
        for (int t = 0; t < T; t++)
            out[r * T + t] += dot_floats(z[r], x_sums + t * sums_stride, groups, acc[r][t]);
}

// dot_run for `tokens` tokens (out[r * tokens + t]), in blocks of TOKEN_BLOCK over the same run.
template <int P>
static void dot_run_tokens(const WORD* words, int groups, const int* shifts, const float* const* s,
                           const float* const* z, const float* x, int64_t x_stride, const float* x_sums,
                           int64_t sums_stride, int tokens, float* out) {
    float block[P * TOKEN_BLOCK];
    for (int t0 = 0; t0 < tokens; t0 += TOKEN_BLOCK) {
        const int count = std::min(TOKEN_BLOCK, tokens - t0);
        const float* xt = x + t0 * x_stride;
        const float* st = x_sums + t0 * sums_stride;
        std::fill(block, block + P * count, 0.f);
        switch (count) {
#define DOT_RUN(T) dot_run<T, P>(words, groups, shifts, s, z, xt, x_stride, st, sums_stride, block)
            case 1: DOT_RUN(1); break;
            case 2: if constexpr (TOKEN_BLOCK >= 2) DOT_RUN(2); break;
            case 3: if constexpr (TOKEN_BLOCK >= 3) DOT_RUN(3); break;
            case 4: if constexpr (TOKEN_BLOCK >= 4) DOT_RUN(4); break;
#undef DOT_RUN
        }
        for (int r = 0; r < P; r++)
            for (int t = 0; t < count; t++) out[r * tokens + t0 + t] += block[r * count + t];
    }
}

// Calls fn(first word row, groups, slot, first group of the row) for each run of word rows an output row reads:
// one run, or two when the row's groups cross from one slot to the next.
template <typename Fn>
static void for_each_run(const Matrix& m, int64_t row, Fn fn) {
    const int64_t groups_per_row = m.k / GROUP;
    int64_t i = row * groups_per_row, end = i + groups_per_row;
    while (i < end) {
        const int64_t slot = i / m.packed_rows, p = i % m.packed_rows;
        const int64_t run = std::min(end - i, m.packed_rows - p);
        fn(p, (int)run, (int)slot, i - row * groups_per_row);
        i += run;
    }
}

// y [T, N] (compute dtype) = x [T, K] (fp32) @ W.T
static void gemv_fp32(const Matrix& m, const float* x, int tokens, void* y, int threads) {
    const int64_t G = m.k / GROUP;
    const int dtype = m.meta.dtype;
    const AlignedFloats sums(tokens * G);
    group_sums(x, tokens, m.k, sums.data);
    if (m.n % PACK == 0) {  // PACK rows share every word row: read each byte once
        const int64_t R = m.n / PACK;
#pragma omp parallel num_threads(threads)
        {
            const int64_t padded = round_up(G, LANES);
            std::vector<float> sz(2 * PACK * padded), out(PACK * tokens);
            int shifts[PACK];
            const float* s[PACK];
            const float* z[PACK];
            for (int q = 0; q < PACK; q++) {
                shifts[q] = BITS * (PACK - 1 - q);
                s[q] = sz.data() + q * padded;
                z[q] = sz.data() + (PACK + q) * padded;
            }
#pragma omp for schedule(static)
            for (int64_t r = 0; r < R; r++) {
                for (int q = 0; q < PACK && r + 1 < R; q++) prefetch_meta(m.meta, (q * R + r + 1) * G, G);
                for (int q = 0; q < PACK; q++)
                    gemv_meta(m.meta, (q * R + r) * G, (int)G, shifts[q], (float*)s[q], (float*)z[q]);
                std::fill(out.begin(), out.end(), 0.f);
                dot_run_tokens<PACK>(m.codes + r * G * GROUP, (int)G, shifts, s, z, x, m.k, sums.data, G, tokens,
                                     out.data());
                for (int q = 0; q < PACK; q++)
                    for (int t = 0; t < tokens; t++) store_as(y, t * m.n + q * R + r, out[q * tokens + t], dtype);
            }
        }
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        const int64_t padded = round_up(G, LANES);
        std::vector<float> sz(2 * padded), out(tokens);
#pragma omp for schedule(static)
        for (int64_t row = 0; row < m.n; row++) {
            std::fill(out.begin(), out.end(), 0.f);
            scales_and_zeros(m.meta, row * G, (int)G, sz.data(), sz.data() + padded);
            for_each_run(m, row, [&](int64_t p, int run, int slot, int64_t first) {
                const int shift = BITS * (PACK - 1 - slot);
                float* s = sz.data() + first;
                float* z = sz.data() + padded + first;
                fma_form(s, z, run, shift);
                dot_run_tokens<1>(m.codes + p * GROUP, run, &shift, (const float* const*)&s, (const float* const*)&z,
                                  x + first * GROUP, m.k, sums.data + first, G, tokens, out.data());
            });
            for (int t = 0; t < tokens; t++) store_as(y, t * m.n + row, out[t], dtype);
        }
    }
}

#include "cpu_kernel_bf16.h"
#include "cpu_kernel_groups.h"
#include "cpu_kernel_int.h"

// y [T, N] (compute dtype) = x [T, K] (fp32) @ W.T, on the fastest fp32 path this build has for the matrix.
static void gemv_float(const Matrix& m, const float* x, int tokens, void* y, int threads) {
    if (group_lanes_run(m))
        gemv_groups<false>(m, x, tokens, y, threads);
    else
        gemv_fp32(m, x, tokens, y, threads);
}

// How gemv multiplies (its `how` argument, and what multiplies() reports).
enum How { AS_BUILT = 0, FP32_ONLY = 1, INT16 = 2, INT8 = 3 };

// The path gemv takes for `m` when asked for `how`, as multiplies() names it: 0 fp32, 1 bfloat16 dot products on
// the reference's weights (tables), 2 bfloat16 dot products on the codes (a group per lane), 3 int16 dot products,
// 4 int8 dot products. An integer request on a matrix the integer path does not take falls back to AS_BUILT's
// path; int8 on 8-bit codes without VNNI takes int16.
static int path_for(const Matrix& m, int how) {
    if (how == FP32_ONLY) return 0;
    if ((how == INT16 || how == INT8) && int_dot_runs(m)) return how == INT8 && int8_runs() ? 4 : 3;
    return group_dot_runs(m) ? 2 : bf16_dot_runs(m) ? 1 : 0;
}

// Stores v, already a value of dtype DT, as DT at out[at].
template <int DT>
static inline void store(void* out, int64_t at, vfloat v) {
    if constexpr (DT == FLOAT32) {
        std::memcpy((float*)out + at, &v, sizeof(v));
    } else {
        typedef uint16_t vhalf __attribute__((vector_size(2 * LANES)));
        vhalf bits;
        if constexpr (DT == BFLOAT16) {
            vuint u;
            std::memcpy(&u, &v, sizeof(v));
            bits = __builtin_convertvector(u >> 16, vhalf);  // exact: the low half is zero
        } else {
            for (int j = 0; j < LANES; j++) bits[j] = half_bits(v[j]);
        }
        std::memcpy((uint16_t*)out + at, &bits, sizeof(bits));
    }
}

// The full matrix, bit for bit what hqq's dequantize computes in dtype DT: (q - z) * s, each operation rounded.
template <int DT>
static void dequantize_matrix(const Matrix& m, void* out, int threads) {
    const int64_t G = m.k / GROUP;
#pragma omp parallel num_threads(threads)
    {
        const int64_t padded = round_up(G, LANES);
        std::vector<float> sz(2 * padded);
#pragma omp for schedule(static)
        for (int64_t row = 0; row < m.n; row++) {
            scales_and_zeros<DT>(m.meta, row * G, (int)G, sz.data(), sz.data() + padded);
            for_each_run(m, row, [&](int64_t p, int run, int slot, int64_t first) {
                const int shift = BITS * (PACK - 1 - slot);
                for (int gi = 0; gi < run; gi++) {
                    const float s = sz[first + gi], z = sz[padded + first + gi];
                    for (int c = 0; c < GROUP; c += LANES) {
                        const vuint code = (load_words(m.codes + (p + gi) * GROUP + c) >> shift) & MASK;
                        const vfloat centred = round_vector<DT>(__builtin_convertvector(code, vfloat) - z);
                        store<DT>(out, row * m.k + (first + gi) * GROUP + c, round_vector<DT>(centred * s));
                    }
                }
            });
        }
    }
}

// A matrix inside a packed buffer: `base` is the buffer, `offsets` the byte offsets of its segments in the order
// codes, scale_q, scale_range, zero_q, zero_range, scale, zero (-1 for a segment the format does not have) and
// `shape` = {dtype, N, K, S}. Passing these two small arrays, prepared once per layout, keeps the call cheap.
static Matrix matrix_at(const uint8_t* base, const int64_t* offsets, const int64_t* shape) {
    auto at = [&](int i) -> const void* { return offsets[i] < 0 ? nullptr : base + offsets[i]; };
    const Meta meta{(const uint8_t*)at(1), (const uint16_t*)at(2), (const uint8_t*)at(3), (const float*)at(4),
                    (const uint16_t*)at(5), (const uint16_t*)at(6), (int)shape[0]};
    return Matrix{(const WORD*)at(0), meta, shape[1], shape[2], shape[3]};
}

extern "C" {

// y [T, N] = x [T, K] @ W.T, x and y in the compute dtype, multiplied as `how` (How) asks where it can.
void gemv(const uint8_t* base, const int64_t* offsets, const int64_t* shape, const void* x, int tokens, void* y,
          int threads, int how) {
    const Matrix m = matrix_at(base, offsets, shape);
    const int path = path_for(m, how);
    if (path == 1) {
        gemv_bf16(m, (const uint16_t*)x, tokens, (uint16_t*)y, threads);
        return;
    }
    const float* x32 = (const float*)x;
    AlignedFloats converted(m.meta.dtype == FLOAT32 ? 0 : tokens * m.k);  // once per call
    if (m.meta.dtype != FLOAT32) {
        to_float(x, m.meta.dtype, tokens * m.k, converted.data);
        x32 = converted.data;
    }
    switch (path) {
        case 2: gemv_groups<true>(m, x32, tokens, y, threads); break;
        case 3: gemv_int<false>(m, x32, tokens, y, threads); break;
        case 4: gemv_int<true>(m, x32, tokens, y, threads); break;
        default: gemv_float(m, x32, tokens, y, threads);
    }
}

// How gemv multiplies a matrix of this `shape` when asked for `how`: path_for's code.
int multiplies(const int64_t* shape, int how) {
    const int64_t no_segments[7] = {-1, -1, -1, -1, -1, -1, -1};
    return path_for(matrix_at(nullptr, no_segments, shape), how);
}

// The full matrix W [N, K] in the compute dtype (`dtype`), as hqq's dequantize builds it there.
void dequantize(const uint8_t* base, const int64_t* offsets, const int64_t* shape, void* out, int threads) {
    const Matrix m = matrix_at(base, offsets, shape);
    switch (m.meta.dtype) {
        case FLOAT32: dequantize_matrix<FLOAT32>(m, out, threads); break;
        case BFLOAT16: dequantize_matrix<BFLOAT16>(m, out, threads); break;
        case FLOAT16: dequantize_matrix<FLOAT16>(m, out, threads); break;
    }
}

}  // extern "C"
