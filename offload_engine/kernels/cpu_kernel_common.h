// What cpu_kernel.cpp's paths share: the build's constants, float16/bfloat16 conversions and the scales and zeros
// of a run of groups. See cpu_kernel.cpp for the layout and the build.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#ifndef WORD
#error "build with -DWORD=... -DBITS=... -DPACK=... -DGROUP=... (see cpu.py)"
#endif

#if defined(__AVX512F__)
constexpr int NATIVE_LANES = 16;
constexpr int ACCUMULATORS = 16;  // vector registers the GEMV may hold accumulators in (of 32)
#else
constexpr int NATIVE_LANES = 8;
constexpr int ACCUMULATORS = 8;  // of 16 (AVX2)
#endif
constexpr int largest_pow2_divisor(int v) { return v & -v; }
// Lanes per vector: the machine's float vector width, or fewer when the group is narrower.
constexpr int LANES = largest_pow2_divisor(GROUP) < NATIVE_LANES ? largest_pow2_divisor(GROUP) : NATIVE_LANES;
constexpr int MASK = (1 << BITS) - 1;
constexpr int SCALE_GROUP = 128;  // scales sharing one (min, step) pair (quantize.py)
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

// The bfloat16 nearest to v (ties to even, as torch's casts; NaN stays NaN), as its bits.
static inline uint16_t bfloat16_bits(float v) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float bfloat16_to_float(uint16_t bits) {
    const uint32_t u = (uint32_t)bits << 16;
    float v;
    std::memcpy(&v, &u, 4);
    return v;
}

// count activations of `dtype` at `in` as fp32 into out (exact: every float16 and bfloat16 is a float).
static void to_float(const void* in, int dtype, int64_t count, float* out) {
    int64_t j = 0;
    if (dtype == BFLOAT16) {
        const uint16_t* bits = (const uint16_t*)in;
        for (; j < count; j++) out[j] = bfloat16_to_float(bits[j]);
    } else if (dtype == FLOAT16) {
        const uint16_t* bits = (const uint16_t*)in;
#if defined(__F16C__)
        for (; j + 8 <= count; j += 8)
            _mm256_storeu_ps(out + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(bits + j))));
#endif
        for (; j < count; j++) out[j] = half_to_float(bits[j]);
    } else {
        std::memcpy(out, in, count * sizeof(float));
    }
}

// y[at] = v in `dtype` (rounded to nearest even, as torch's casts).
static inline void store_as(void* y, int64_t at, float v, int dtype) {
    if (dtype == FLOAT32) ((float*)y)[at] = v;
    else if (dtype == BFLOAT16) ((uint16_t*)y)[at] = bfloat16_bits(v);
    else ((uint16_t*)y)[at] = half_bits(v);
}

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

// How far ahead of its loads the GEMV asks for the codes (~1 KB): the hardware prefetcher alone left ~20 % of
// a single thread's time waiting on memory.
constexpr int PREFETCH_WORDS = 1024 / sizeof(WORD);

// Asks for the scale/zero codes of groups [first, first + count) ahead of use: they are streams of their own
// beside the codes (a third of a 2-bit g16 matrix's bytes), which the hardware prefetchers follow poorly.
static inline void prefetch_meta(const Meta& m, int64_t first, int64_t count) {
    if (!m.scale_q) return;
    for (int64_t j = 0; j < count; j += 64) {
        __builtin_prefetch(m.scale_q + first + j);
        __builtin_prefetch(m.zero_q + first + j);
    }
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

// The sum of v's lanes, as a tree of shuffles and adds where the ISA has them (a chain of LANES dependent adds,
// per row and token, was ~10 % of a 4096-wide row's time at one token).
static inline float horizontal_sum(vfloat v) {
#if defined(__AVX512F__)
    if constexpr (LANES == 16) {
        __m512 w;
        std::memcpy(&w, &v, sizeof(w));
        return _mm512_reduce_add_ps(w);
    }
#endif
#if defined(__AVX__)
    if constexpr (LANES == 8) {
        __m256 w;
        std::memcpy(&w, &v, sizeof(w));
        const __m128 half = _mm_add_ps(_mm256_castps256_ps128(w), _mm256_extractf128_ps(w, 1));
        const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
        return _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
    }
#endif
    float total = 0.f;
    for (int j = 0; j < LANES; j++) total += v[j];
    return total;
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
#if defined(__AVX512F__)
        if constexpr (LANES == 16) {
            __m512 w;
            std::memcpy(&w, &v, sizeof(w));
            w = _mm512_cvtph_ps(_mm512_cvtps_ph(w, 0));  // 0: to nearest even
            std::memcpy(&v, &w, sizeof(w));
            return v;
        }
#endif
#if defined(__F16C__)
        if constexpr (LANES == 8) {
            __m256 w;
            std::memcpy(&w, &v, sizeof(w));
            w = _mm256_cvtph_ps(_mm256_cvtps_ph(w, 0));
            std::memcpy(&v, &w, sizeof(w));
            return v;
        }
#endif
        for (int j = 0; j < LANES; j++) v[j] = round_to_half(v[j]);
    }
    return v;
}

// LANES 8-bit codes as floats.
static inline vfloat byte_codes(const uint8_t* at) {
    vuint w;
#if defined(__AVX512F__)
    if constexpr (LANES == 16) {
        const __m512i wide = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)at));
        std::memcpy(&w, &wide, sizeof(wide));
        return __builtin_convertvector((vint)w, vfloat);
    }
#endif
#if defined(__AVX2__)
    if constexpr (LANES == 8) {
        const __m256i wide = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)at));
        std::memcpy(&w, &wide, sizeof(wide));
        return __builtin_convertvector((vint)w, vfloat);
    }
#endif
    for (int j = 0; j < LANES; j++) w[j] = at[j];
    return __builtin_convertvector((vint)w, vfloat);
}

// a * b + c with the product rounded before the add, as two torch ops round it: GCC would otherwise contract
// the two into one FMA (clang does not contract across statements). The empty asm makes the product a value.
static inline vfloat multiply_then_add(vfloat a, vfloat b, vfloat c) {
    vfloat product = a * b;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __asm__("" : "+v"(product));
#else
    __asm__("" : "+m"(product));
#endif
    return product + c;
}

// Reads scales and zeros a vector of groups at a time, keeping the matrix's zero range and the current scale
// range's (min, step) in registers (a new pair every SCALE_GROUP groups).
struct ScaleReader {
    Meta m;
    vfloat zero_step, zero_min, step, low;
    int64_t range = -1;

    ScaleReader() = default;
    explicit ScaleReader(const Meta& meta) : m(meta) {
        if (m.scale_q) zero_step = vfloat{} + m.zero_range[1], zero_min = vfloat{} + m.zero_range[0];
    }

    // The scales s and zeros z of groups at + [0, LANES) (of which n < LANES are real: the rest read no byte
    // and hold values of code 0) in fp32, rebuilt as quantize.dequantize does before it casts to the compute
    // dtype: fp32 arithmetic, a multiply and an add, each rounded.
    inline void read(int64_t at, int n, vfloat& s, vfloat& z) {
        if (!m.scale_q) {
            for (int l = 0; l < LANES; l++) {
                s[l] = l < n ? half_to_float(m.scale16[at + l]) : 0.f;
                z[l] = l < n ? half_to_float(m.zero16[at + l]) : 0.f;
            }
            return;
        }
        vfloat scale_codes, zero_codes;
        if (n == LANES) {
            scale_codes = byte_codes(m.scale_q + at), zero_codes = byte_codes(m.zero_q + at);
        } else {  // the last vector of a matrix
            uint8_t scale_tail[LANES] = {}, zero_tail[LANES] = {};
            std::memcpy(scale_tail, m.scale_q + at, n);
            std::memcpy(zero_tail, m.zero_q + at, n);
            scale_codes = byte_codes(scale_tail), zero_codes = byte_codes(zero_tail);
        }
        if (at / SCALE_GROUP == (at + LANES - 1) / SCALE_GROUP) {  // one (min, step) pair for every lane
            if (at / SCALE_GROUP != range) {
                range = at / SCALE_GROUP;
                step = vfloat{} + half_to_float(m.scale_range[2 * range + 1]);
                low = vfloat{} + half_to_float(m.scale_range[2 * range]);
            }
            s = multiply_then_add(scale_codes, step, low);
        } else {
            vfloat lane_step, lane_low;
            for (int l = 0; l < LANES; l++) {
                const int64_t lane_range = (at + std::min(l, n - 1)) / SCALE_GROUP;
                lane_step[l] = half_to_float(m.scale_range[2 * lane_range + 1]);
                lane_low[l] = half_to_float(m.scale_range[2 * lane_range]);
            }
            s = multiply_then_add(scale_codes, lane_step, lane_low);
        }
        z = multiply_then_add(zero_codes, zero_step, zero_min);
    }
};

// Calls emit(j, s, z) for j = 0, LANES, 2 LANES, ... < count with the scales and zeros of groups
// first + j + [0, LANES) (ScaleReader) rounded to the compute dtype DT.
template <int DT, typename Emit>
static void for_each_scale_vector(const Meta& m, int64_t first, int count, Emit emit) {
    ScaleReader reader(m);
    for (int j = 0; j < count; j += LANES) {
        vfloat s, z;
        reader.read(first + j, std::min(LANES, count - j), s, z);
        emit(j, round_vector<DT>(s), round_vector<DT>(z));
    }
}

static inline void store_floats(float* at, vfloat v) { std::memcpy(at, &v, sizeof(v)); }

// Scales and zeros of groups [first, first + count) into s and z (room for count rounded up to LANES).
template <int DT>
static void scales_and_zeros(const Meta& m, int64_t first, int count, float* s, float* z) {
    for_each_scale_vector<DT>(m, first, count, [&](int j, vfloat sv, vfloat zv) {
        store_floats(s + j, sv);
        store_floats(z + j, zv);
    });
}

static inline int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// A float buffer aligned to a cache line: the vector loads from it never straddle two lines (x's rows, as torch
// allocates them, are aligned too).
struct AlignedFloats {
    std::unique_ptr<float[]> storage;
    float* data;
    explicit AlignedFloats(int64_t count) : storage(new float[count + 16]) {
        data = storage.get() + (16 - ((uintptr_t)storage.get() / sizeof(float)) % 16) % 16;
    }
};

struct Matrix {
    const WORD* codes;  // [S, GROUP] words
    Meta meta;
    int64_t n, k, packed_rows;  // N, K, S
};
