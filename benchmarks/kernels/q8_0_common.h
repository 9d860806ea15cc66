/*
 * What the Q8_0 kernel benchmarks share (q8_0_stream.c, q8_0_cols.c): ggml's block layout
 * and the helpers of its x86 Q8_0 dot product (llama.cpp vendored by llama-cpp-python
 * 0.3.36), and a clock. Not a test.
 */
#ifndef CXR_NODE_Q8_0_COMMON_H
#define CXR_NODE_Q8_0_COMMON_H

#include <immintrin.h>
#include <stdint.h>
#include <time.h>

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DPBUSD _mm256_dpbusd_epi32
#elif defined(__AVXVNNI__)
#define DPBUSD _mm256_dpbusd_avx_epi32
#endif

enum { QK = 32 };

/* ggml's block_q8_0: an fp16 scale and 32 int8 quants, 34 bytes, packed */
typedef struct {
    uint16_t d;
    int8_t qs[QK];
} __attribute__((packed)) block_q8_0;

/* ggml's mul_sum_i8_pairs_float: vpdpbusd with AVX512-VNNI/VL or AVX-VNNI, else AVX2's
   vpmaddubsw + vpmaddwd (the same int32 lane sums either way) */
static inline __m256 mul_sum_i8_pairs_float(__m256i x, __m256i y) {
    const __m256i ax = _mm256_sign_epi8(x, x);
    const __m256i sy = _mm256_sign_epi8(y, x);
#ifdef DPBUSD
    return _mm256_cvtepi32_ps(DPBUSD(_mm256_setzero_si256(), ax, sy));
#else
    const __m256i dot = _mm256_maddubs_epi16(ax, sy);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(dot, _mm256_set1_epi16(1)));
#endif
}

static inline float hsum_float_8(__m256 x) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

static inline double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#endif
