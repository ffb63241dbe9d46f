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
// Per group the weights are dequantized in registers, w = (q - z) * s in fp32 (as an FMA on the code masked in
// place, see fma_form), and multiplied into per-row vector accumulators that are summed once per row: per
// vector of weights a mask, a convert, an FMA, and one FMA per token. Scales and zeros are rebuilt exactly as
// quantize.dequantize does (fp32 arithmetic, rounded through the compute dtype), a row at a time into a buffer.
// (A horizontal sum per group, which the group-sum identity written in torch compiles to, was ~5x slower.)
// Prefill instead dequantizes the whole matrix (dequantize below) for BLAS.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#ifndef WORD
#error "build with -DWORD=... -DBITS=... -DPACK=... -DGROUP=... (see cpu.py)"
#endif

#if defined(__AVX512F__)
constexpr int NATIVE_LANES = 16;
#else
constexpr int NATIVE_LANES = 8;
#endif
constexpr int largest_pow2_divisor(int v) { return v & -v; }
// Lanes per vector: the machine's float vector width, or fewer when the group is narrower.
constexpr int LANES = largest_pow2_divisor(GROUP) < NATIVE_LANES ? largest_pow2_divisor(GROUP) : NATIVE_LANES;
constexpr int MASK = (1 << BITS) - 1;
constexpr int SCALE_GROUP = 128;  // scales sharing one (min, step) pair (quantize.py)
constexpr int MAX_TOKENS = 4;     // the GEMV's widest token block; cpu.py calls it in blocks of at most this
static_assert(GROUP % LANES == 0, "group size must be a multiple of the vector width");

typedef float vfloat __attribute__((vector_size(4 * LANES)));
typedef uint32_t vuint __attribute__((vector_size(4 * LANES)));
typedef int32_t vint __attribute__((vector_size(4 * LANES)));

enum Dtype { FLOAT32 = 0, BFLOAT16 = 1, FLOAT16 = 2 };

// float16 <-> float32 without the _Float16 type (GCC before 12 has none on x86: Colab's g++ is 11): the F16C
// instructions where the CPU has them (-march=native turns them on), bit arithmetic elsewhere.
static inline float half_to_float(uint16_t half) {
#if defined(__F16C__)
    return _cvtsh_ss(half);
#else
    const uint32_t sign = (uint32_t)(half & 0x8000u) << 16, exponent = (half >> 10) & 0x1fu, mantissa = half & 0x3ffu;
    if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
        const float value = (float)mantissa * 5.9604644775390625e-08f;
        return sign ? -value : value;
    }
    const uint32_t bits = sign | (exponent == 0x1f ? 0x7f800000u | (mantissa << 13)  // inf, nan
                                                   : ((exponent + 112) << 23) | (mantissa << 13));
    float value;
    std::memcpy(&value, &bits, 4);
    return value;
#endif
}

// The float16 nearest to v (ties to even, overflow to infinity), as its bits.
static inline uint16_t half_bits(float v) {
#if defined(__F16C__)
    return _cvtss_sh(v, 0);  // 0: round to nearest even
#else
    // F. Giesen's float_to_half_fast3_rtne (public domain).
    const uint32_t infinity = 255u << 23, half_max = (127u + 16) << 23;
    const uint32_t denormal_magic = ((127u - 15) + (23 - 10) + 1) << 23;
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    const uint32_t sign = bits & 0x80000000u;
    bits ^= sign;
    uint16_t half;
    if (bits >= half_max) {
        half = bits > infinity ? 0x7e00 : 0x7c00;
    } else if (bits < (113u << 23)) {  // becomes a subnormal: let the float adder round it
        float magnitude, magic;
        std::memcpy(&magnitude, &bits, 4);
        std::memcpy(&magic, &denormal_magic, 4);
        magnitude += magic;
        uint32_t rounded;
        std::memcpy(&rounded, &magnitude, 4);
        half = (uint16_t)(rounded - denormal_magic);
    } else {
        const uint32_t odd = (bits >> 13) & 1u;
        bits += ((uint32_t)(15 - 127) << 23) + 0xfffu + odd;
        half = (uint16_t)(bits >> 13);
    }
    return (uint16_t)(half | (sign >> 16));
#endif
}

static inline float round_to_half(float v) { return half_to_float(half_bits(v)); }

// Where a matrix's scales and zeros live: 8-bit codes with float ranges (quant_meta) or float16 values.
struct Meta {
    const uint8_t* scale_q;       // [S_groups * SCALE_GROUP] or null
    const uint16_t* scale_range;  // [S_groups, 2] float16 (min, step)
    const uint8_t* zero_q;        // [n_groups]
    const float* zero_range;      // [2] float32 (min, step)
    const uint16_t* scale16;      // [n_groups] float16, when not quant_meta
    const uint16_t* zero16;
    int dtype;
};

// v[0 .. count) rounded to the compute dtype in place (vectorizable loops, one per dtype).
static void round_all(float* v, int count, int dtype) {
    if (dtype == FLOAT16) {
        for (int j = 0; j < count; j++) v[j] = round_to_half(v[j]);
    } else if (dtype == BFLOAT16) {
        for (int j = 0; j < count; j++) {
            uint32_t u;
            std::memcpy(&u, &v[j], 4);
            const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
            u = (u & 0x7fffffffu) > 0x7f800000u ? u : rounded;  // NaN stays NaN
            std::memcpy(&v[j], &u, 4);
        }
    }
}

// Scales and zeros of groups [first, first + count) into s and z, as fp32 values of the compute dtype.
// Separate multiply and add (no FMA contraction): the same two roundings as the reference's torch ops.
#if !defined(__clang__)  // GCC contracts across statements by default; clang does not
__attribute__((optimize("fp-contract=off")))
#endif
static void scales_and_zeros(const Meta& m, int64_t first, int count, float* s, float* z) {
    if (m.scale_q) {
        for (int j = 0; j < count;) {  // runs of scales sharing one (min, step) pair
            const int64_t range = (first + j) / SCALE_GROUP;
            const int end = (int)std::min<int64_t>(count, (range + 1) * SCALE_GROUP - first);
            const float step = half_to_float(m.scale_range[2 * range + 1]);
            const float low = half_to_float(m.scale_range[2 * range]);
            for (; j < end; j++) {
                const float scaled = (float)m.scale_q[first + j] * step;
                s[j] = scaled + low;
            }
        }
        const float zero_min = m.zero_range[0], zero_step = m.zero_range[1];
        for (int j = 0; j < count; j++) {
            const float scaled = (float)m.zero_q[first + j] * zero_step;
            z[j] = scaled + zero_min;
        }
    } else {
        for (int j = 0; j < count; j++) {
            s[j] = half_to_float(m.scale16[first + j]);
            z[j] = half_to_float(m.zero16[first + j]);
        }
    }
    round_all(s, count, m.dtype);
    round_all(z, count, m.dtype);
}

// LANES words widened to 32 bits: one zero-extending load on x86 (GCC's generic byte-vector conversions go
// lane by lane through general registers, which made this the hot spot).
static inline vuint load_words(const WORD* at) {
    vuint w;
    if constexpr (sizeof(WORD) == 4) {
        std::memcpy(&w, at, sizeof(w));
#if defined(__AVX512F__)
    } else if constexpr (LANES == 16) {
        const __m512i wide = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)at));
        std::memcpy(&w, &wide, sizeof(wide));
#endif
#if defined(__AVX2__)
    } else if constexpr (LANES == 8) {
        const __m256i wide = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)at));
        std::memcpy(&w, &wide, sizeof(wide));
#endif
    } else {
        for (int j = 0; j < LANES; j++) w[j] = at[j];
    }
    return w;
}

static inline vfloat load_floats(const float* at) {
    vfloat v;
    std::memcpy(&v, at, sizeof(v));
    return v;
}

static inline float horizontal_sum(vfloat v) {
    float total = 0.f;
    for (int j = 0; j < LANES; j++) total += v[j];
    return total;
}

// Turns a run's scales s and zeros z into the FMA form of w = (q - z) * s for codes read in place at bit
// offset `shift` (masked, not shifted down): w = (q << shift) * (s * 2^-shift) + (-z * s). The power-of-two
// rescale is exact; the rest differs from the reference's (q - z) * s by about an fp32 rounding.
static void fma_form(float* s, float* z, int count, int shift) {
    const float unit = 1.0f / (float)(1u << shift);
    for (int j = 0; j < count; j++) {
        z[j] = -(z[j] * s[j]);
        s[j] *= unit;
    }
}

// P output rows reading the same run of `groups` word rows (row r's codes at bit offset shifts[r]), with their
// scales s[r] and offsets z[r] for those groups in FMA form; x points at the first group's inputs of token 0
// (tokens `x_stride` apart). Adds sum_k w[r, k] x[t, k] over the run to out[r * T + t].
template <int T, int P>
static void dot_run(const WORD* words, int groups, const int* shifts, const float* const* s, const float* const* z,
                    const float* x, int64_t x_stride, float* out) {
    vfloat acc[P][T] = {};
    for (int gi = 0; gi < groups; gi++) {
        for (int c = 0; c < GROUP; c += LANES) {
            const vuint w = load_words(words + (int64_t)gi * GROUP + c);
            vfloat xv[T];
            for (int t = 0; t < T; t++) xv[t] = load_floats(x + t * x_stride + (int64_t)gi * GROUP + c);
            for (int r = 0; r < P; r++) {
                const vint code = (vint)(w & ((uint32_t)MASK << shifts[r]));  // < 2^31: a signed convert is exact
                const vfloat weight = __builtin_convertvector(code, vfloat) * s[r][gi] + z[r][gi];
                for (int t = 0; t < T; t++) acc[r][t] += weight * xv[t];
            }
        }
    }
    for (int r = 0; r < P; r++)
        for (int t = 0; t < T; t++) out[r * T + t] += horizontal_sum(acc[r][t]);
}

struct Matrix {
    const WORD* codes;  // [S, GROUP] words
    Meta meta;
    int64_t n, k, packed_rows;  // N, K, S
};

// Calls fn(first word row, groups, slot, output row, first group of the row) for each run of word rows an output
// row reads: one run, or two when the row's groups cross from one slot to the next.
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

template <int T>
static void gemv_tokens(const Matrix& m, const float* x, float* y, int threads) {
    const int64_t G = m.k / GROUP;
    if (m.n % PACK == 0) {  // PACK rows share every word row: read each byte once
        const int64_t R = m.n / PACK;
#pragma omp parallel num_threads(threads)
        {
            std::vector<float> sz(2 * PACK * G);
            int shifts[PACK];
            const float* s[PACK];
            const float* z[PACK];
            for (int q = 0; q < PACK; q++) {
                shifts[q] = BITS * (PACK - 1 - q);
                s[q] = sz.data() + q * G;
                z[q] = sz.data() + (PACK + q) * G;
            }
#pragma omp for schedule(static)
            for (int64_t r = 0; r < R; r++) {
                float out[PACK * T] = {};
                for (int q = 0; q < PACK; q++) {
                    scales_and_zeros(m.meta, (q * R + r) * G, (int)G, (float*)s[q], (float*)z[q]);
                    fma_form((float*)s[q], (float*)z[q], (int)G, shifts[q]);
                }
                dot_run<T, PACK>(m.codes + r * G * GROUP, (int)G, shifts, s, z, x, m.k, out);
                for (int q = 0; q < PACK; q++)
                    for (int t = 0; t < T; t++) y[t * m.n + q * R + r] = out[q * T + t];
            }
        }
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> sz(2 * G);
#pragma omp for schedule(static)
        for (int64_t row = 0; row < m.n; row++) {
            float out[T] = {};
            scales_and_zeros(m.meta, row * G, (int)G, sz.data(), sz.data() + G);
            for_each_run(m, row, [&](int64_t p, int run, int slot, int64_t first) {
                const int shift = BITS * (PACK - 1 - slot);
                float* s = sz.data() + first;
                float* z = sz.data() + G + first;
                fma_form(s, z, run, shift);
                dot_run<T, 1>(m.codes + p * GROUP, run, &shift, (const float* const*)&s, (const float* const*)&z, x + first * GROUP, m.k, out);
            });
            for (int t = 0; t < T; t++) y[t * m.n + row] = out[t];
        }
    }
}

// v rounded to the compute dtype DT, kept in fp32 (round to nearest even, as torch's casts).
template <int DT>
static inline vfloat round_vector(vfloat v) {
    if constexpr (DT == BFLOAT16) {
        vuint u;
        std::memcpy(&u, &v, sizeof(v));
        const vuint rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
        u = (u & 0x7fffffffu) > 0x7f800000u ? u : rounded;  // NaN stays NaN
        std::memcpy(&v, &u, sizeof(v));
    } else if constexpr (DT == FLOAT16) {
        for (int j = 0; j < LANES; j++) v[j] = round_to_half(v[j]);
    }
    return v;
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
        std::vector<float> sz(2 * G);
#pragma omp for schedule(static)
        for (int64_t row = 0; row < m.n; row++) {
            scales_and_zeros(m.meta, row * G, (int)G, sz.data(), sz.data() + G);
            for_each_run(m, row, [&](int64_t p, int run, int slot, int64_t first) {
                const int shift = BITS * (PACK - 1 - slot);
                for (int gi = 0; gi < run; gi++) {
                    const float s = sz[first + gi], z = sz[G + first + gi];
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

// y [T, N] float32 = x [T, K] float32 @ W.T, for T <= MAX_TOKENS.
void gemv(const uint8_t* base, const int64_t* offsets, const int64_t* shape, const float* x, int tokens, float* y,
          int threads) {
    const Matrix m = matrix_at(base, offsets, shape);
    switch (tokens) {
        case 1: gemv_tokens<1>(m, x, y, threads); break;
        case 2: gemv_tokens<2>(m, x, y, threads); break;
        case 3: gemv_tokens<3>(m, x, y, threads); break;
        case 4: gemv_tokens<4>(m, x, y, threads); break;
    }
}

int max_tokens() { return MAX_TOKENS; }

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
