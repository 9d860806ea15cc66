/*
 * Q8_0 weights times 1-8 Q8_0 activation rows (a decode step of a token and its speculative
 * proposals, or of several studies): the patch's several-row kernel as in `.6` against `.7`,
 * which converts the activations' fp16 scales to fp32 once per matrix instead of once per
 * weight block and row. The measurement behind scripts/patches/llama-cpp-python-0.3.36.patch
 * (docs/cpu-engine.md, "Decode steps of several tokens"). Not a test.
 *
 *   gcc -O3 -fopenmp -march=native -o /tmp/q8_0_cols benchmarks/kernels/q8_0_cols.c
 *   OMP_NUM_THREADS=2 /tmp/q8_0_cols [ROWS=327680] [REPEATS=5]
 *
 * ROWS weight rows of 2560 (dolly-v2-3b's width; 327680 rows = 891 MB, far beyond any
 * cache, as in decoding; 2048 rows = 5.6 MB fits L2 + L3 and shows the arithmetic alone),
 * rows split over the OpenMP threads, best of REPEATS passes, the two kernels alternating.
 * Per row and block both run ggml's mul_sum_i8_pairs_float (vpdpbusd with AVX512-VNNI/VL
 * or AVX-VNNI, else vpmaddubsw + vpmaddwd) and one fused multiply-add by the fp32 product
 * of the two scales: the same arithmetic in the same order, so the program checks that
 * the results are equal bit for bit.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "q8_0_common.h"

enum { WIDTH = 2560, NB = WIDTH / QK, MAXC = 8 };

/* the patch's q8_0_q8_0_cols (`.6`) */
static inline __attribute__((always_inline)) void cols_v6(const block_q8_0 *x, const block_q8_0 *y,
                                                          float *s, int nc) {
    __m256 acc[MAXC];
    for (int c = 0; c < nc; ++c) acc[c] = _mm256_setzero_ps();
    for (int ib = 0; ib < NB; ++ib) {
        _mm_prefetch((const char *)(x + ib) + 4096, _MM_HINT_T0);
        const float dx = _cvtsh_ss(x[ib].d);
        const __m256i qx = _mm256_loadu_si256((const __m256i *)x[ib].qs);
        for (int c = 0; c < nc; ++c) {
            const block_q8_0 *yc = y + c * NB + ib;
            const __m256 d = _mm256_set1_ps(dx * _cvtsh_ss(yc->d));
            const __m256i qy = _mm256_loadu_si256((const __m256i *)yc->qs);
            acc[c] = _mm256_fmadd_ps(d, mul_sum_i8_pairs_float(qx, qy), acc[c]);
        }
    }
    for (int c = 0; c < nc; ++c) s[c] = hsum_float_8(acc[c]);
}

/* the patch's kernel in `.7`: dy[c * NB + ib] = activation row c's scale of block ib, fp32 */
static inline __attribute__((always_inline)) void cols_v7(const block_q8_0 *x, const block_q8_0 *y,
                                                          const float *dy, float *s, int nc) {
    __m256 acc[MAXC];
    for (int c = 0; c < nc; ++c) acc[c] = _mm256_setzero_ps();
    for (int ib = 0; ib < NB; ++ib) {
        _mm_prefetch((const char *)(x + ib) + 4096, _MM_HINT_T0);
        const __m256 dx = _mm256_set1_ps(_cvtsh_ss(x[ib].d));
        const __m256i qx = _mm256_loadu_si256((const __m256i *)x[ib].qs);
        for (int c = 0; c < nc; ++c) {
            const __m256 d = _mm256_mul_ps(dx, _mm256_broadcast_ss(dy + c * NB + ib));
            const __m256i qy = _mm256_loadu_si256((const __m256i *)y[c * NB + ib].qs);
            acc[c] = _mm256_fmadd_ps(d, mul_sum_i8_pairs_float(qx, qy), acc[c]);
        }
    }
    for (int c = 0; c < nc; ++c) s[c] = hsum_float_8(acc[c]);
}

static void fill(block_q8_0 *b, size_t n) {
    for (size_t i = 0; i < n; i++) {
        b[i].d = (uint16_t)(0x2000 + rand() % 0x0c00); /* fp16 in [0.0078, 0.05] */
        for (int j = 0; j < QK; j++) b[i].qs[j] = (int8_t)(rand() % 255 - 127);
    }
}

/* one pass: every weight row against nc activation rows; `.7` converts the activations'
   scales once per pass per thread, as the patch does once per matrix per thread */
static void pass(int v7, long rows, int nc, const block_q8_0 *w, const block_q8_0 *y, float *out) {
#pragma omp parallel
    {
        float dy[MAXC * NB];
        if (v7)
            for (int i = 0; i < nc * NB; i++) dy[i] = _cvtsh_ss(y[i].d);
#pragma omp for schedule(static)
        for (long i = 0; i < rows; i++) {
            const block_q8_0 *x = w + (size_t)i * NB;
            float s[MAXC] = {0};
            switch (v7 * 16 + nc) { /* specialised per row count, as in the patch */
#define KERNELS(n)                                   \
    case n: cols_v6(x, y, s, n); break;              \
    case 16 + n: cols_v7(x, y, dy, s, n); break;
                KERNELS(1) KERNELS(2) KERNELS(3) KERNELS(4) KERNELS(5) KERNELS(6) KERNELS(7) KERNELS(8)
#undef KERNELS
            }
            for (int c = 0; c < nc; c++) out[(size_t)c * rows + i] = s[c];
        }
    }
}

int main(int argc, char **argv) {
    const long rows = argc > 1 ? atol(argv[1]) : 327680;
    const int repeats = argc > 2 ? atoi(argv[2]) : 5;
    const size_t bytes = (size_t)rows * NB * sizeof(block_q8_0);
    block_q8_0 *w = malloc(bytes), *y = malloc(MAXC * NB * sizeof(block_q8_0));
    float *a = malloc(MAXC * rows * sizeof(float)), *b = malloc(MAXC * rows * sizeof(float));
    if (!w || !y || !a || !b) return 1;
    srand(1);
    fill(w, (size_t)rows * NB);
    fill(y, MAXC * NB);
    printf("%ld weight rows of %d (%.0f MB), best of %d passes\n", rows, WIDTH, bytes / 1e6, repeats);
    printf("rows  .6 ms  .7 ms  .6 x 1 row  .7 x 1 row (.6)  .7/.6  equal\n");
    double one_v6 = 0;
    for (int nc = 1; nc <= MAXC; nc++) {
        double best[2] = {1e30, 1e30};
        for (int r = 0; r < repeats; r++) /* alternate, so both see the same host */
            for (int v7 = 0; v7 < 2; v7++) {
                const double t0 = now();
                pass(v7, rows, nc, w, y, v7 ? b : a);
                const double t = now() - t0;
                if (t < best[v7]) best[v7] = t;
            }
        if (nc == 1) one_v6 = best[0];
        const int equal = memcmp(a, b, (size_t)nc * rows * sizeof(float)) == 0;
        printf("%4d %6.2f %6.2f %11.2f %16.2f %6.2f  %s\n", nc, best[0] * 1e3, best[1] * 1e3,
               best[0] / one_v6, best[1] / one_v6, best[1] / best[0], equal ? "yes" : "NO");
        if (!equal) return 2;
    }
    free(w);
    free(y);
    free(a);
    free(b);
    return 0;
}
