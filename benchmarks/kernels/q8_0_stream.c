/*
 * Streaming Q8_0 matrix-vector product: ggml's AVX2 loop with and without a software
 * prefetch, the measurement behind scripts/patches/llama-cpp-python-0.3.36.patch
 * (docs/cpu-engine.md, "The decode patch"). Not a test.
 *
 *   gcc -O3 -fopenmp -mavx2 -mfma -mf16c -o /tmp/q8_0_stream benchmarks/kernels/q8_0_stream.c
 *   OMP_NUM_THREADS=2 /tmp/q8_0_stream [ROWS=81920] [REPEATS=5]
 *
 * ROWS rows of 2560 weights (dolly-v2-3b's width; 81920 rows = 223 MB, far beyond any
 * cache) are multiplied by one Q8_0 vector, rows split over the OpenMP threads, best of
 * REPEATS. The row's prefetch distance is 0 (the stock loop), 1, 2, 4 and 8 KiB. Every
 * variant must print the same checksum: a prefetch changes no arithmetic.
 */
#include <stdio.h>
#include <stdlib.h>

#include "q8_0_common.h"

enum { WIDTH = 2560 };

/* ggml_vec_dot_q8_0_q8_0's AVX2 loop (llama.cpp vendored by llama-cpp-python 0.3.36),
   plus the patch's prefetch when distance > 0 */
static float vec_dot_q8_0(int nb, const block_q8_0 *x, const block_q8_0 *y, int distance) {
    __m256 acc = _mm256_setzero_ps();
    for (int ib = 0; ib < nb; ++ib) {
        if (distance) _mm_prefetch((const char *)(x + ib) + distance, _MM_HINT_T0);
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(x[ib].d) * _cvtsh_ss(y[ib].d));
        const __m256i qx = _mm256_loadu_si256((const __m256i *)x[ib].qs);
        const __m256i qy = _mm256_loadu_si256((const __m256i *)y[ib].qs);
        acc = _mm256_fmadd_ps(d, mul_sum_i8_pairs_float(qx, qy), acc);
    }
    return hsum_float_8(acc);
}

static void fill(block_q8_0 *b, size_t n) {
    for (size_t i = 0; i < n; i++) {
        b[i].d = 0x2c00; /* fp16 0.0625 */
        for (int j = 0; j < QK; j++) b[i].qs[j] = (int8_t)(rand() % 255 - 127);
    }
}

int main(int argc, char **argv) {
    const long rows = argc > 1 ? atol(argv[1]) : 81920;
    const int repeats = argc > 2 ? atoi(argv[2]) : 5;
    const int nb = WIDTH / QK;
    const size_t bytes = (size_t)rows * nb * sizeof(block_q8_0);
    block_q8_0 *w = malloc(bytes), *y = malloc(nb * sizeof(block_q8_0));
    float *out = malloc(rows * sizeof(float));
    if (!w || !y || !out) return 1;
    srand(1);
    fill(w, (size_t)rows * nb);
    fill(y, nb);
    const int distances[] = {0, 1024, 2048, 4096, 8192};
    for (size_t v = 0; v < sizeof distances / sizeof distances[0]; v++) {
        const int dist = distances[v];
        double best = 1e30;
        for (int r = 0; r < repeats; r++) {
            const double t0 = now();
#pragma omp parallel for schedule(static)
            for (long i = 0; i < rows; i++) out[i] = vec_dot_q8_0(nb, w + (size_t)i * nb, y, dist);
            const double t = now() - t0;
            if (t < best) best = t;
        }
        double check = 0;
        for (long i = 0; i < rows; i++) check += out[i];
        printf("prefetch %5d B: %6.2f GB/s over %.0f MB, checksum %.6e\n", dist, bytes / best / 1e9,
               bytes / 1e6, check);
    }
    free(w);
    free(y);
    free(out);
    return 0;
}
