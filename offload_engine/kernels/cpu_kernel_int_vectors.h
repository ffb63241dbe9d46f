// The integer-vector primitives cpu_kernel_int.h's GEMV is written in, one set per ISA (AVX-512BW, with VNNI
// where present, or AVX2): loads, masks, the block transpose into lane order and the dot products. Included by
// cpu_kernel_int.h where INT_ISA_LANES > 0, after ivec and INT_LANES are defined.
#pragma once

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

