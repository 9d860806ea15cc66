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
 * rows split over the OpenMP threads, best of REPEATS passes, the kernels alternating.
 * Per row and block both run ggml's mul_sum_i8_pairs_float (vpdpbusd with AVX512-VNNI/VL
 * or AVX-VNNI, else vpmaddubsw + vpmaddwd) and one fused multiply-add by the fp32 product
 * of the two scales: the same arithmetic in the same order, so the program checks that
 * the results are equal bit for bit.
 *
 * With AVX512-VNNI/VL or AVX-VNNI, a third kernel (tried, not in the patch): the
 * activations made unsigned once per matrix (a ^ 0x80 = a + 128) against the signed
 * weights, each weight block's -128 x its 4-byte sums formed once for all rows and used as
 * every row's vpdpbusd accumulator. The same int32 sums without the sign trick's per-row
 * vpsignb, so it is checked bit for bit against `.7` too.
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

#ifdef DPBUSD
/* the VNNI form: yu = the activations' quants xor 0x80 (their scales unchanged) */
static inline __attribute__((always_inline)) void cols_vnni(const block_q8_0 *x, const block_q8_0 *yu,
                                                            const float *dy, float *s, int nc) {
    __m256 acc[MAXC];
    const __m256i m128 = _mm256_set1_epi8((char)0x80);
    for (int c = 0; c < nc; ++c) acc[c] = _mm256_setzero_ps();
    for (int ib = 0; ib < NB; ++ib) {
        _mm_prefetch((const char *)(x + ib) + 4096, _MM_HINT_T0);
        const __m256 dx = _mm256_set1_ps(_cvtsh_ss(x[ib].d));
        const __m256i qx = _mm256_loadu_si256((const __m256i *)x[ib].qs);
        /* sum((a + 128) * w) - 128 * sum(w) = sum(a * w), exactly, in every int32 lane */
        const __m256i corr =
            _mm256_sub_epi32(_mm256_setzero_si256(), DPBUSD(_mm256_setzero_si256(), m128, qx));
        for (int c = 0; c < nc; ++c) {
            const __m256 d = _mm256_mul_ps(dx, _mm256_broadcast_ss(dy + c * NB + ib));
            const __m256i uy = _mm256_loadu_si256((const __m256i *)yu[c * NB + ib].qs);
            acc[c] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(DPBUSD(corr, uy, qx)), acc[c]);
        }
    }
    for (int c = 0; c < nc; ++c) s[c] = hsum_float_8(acc[c]);
}
#define VARIANTS 3
#else
#define VARIANTS 2
#endif

static void fill(block_q8_0 *b, size_t n) {
    for (size_t i = 0; i < n; i++) {
        b[i].d = (uint16_t)(0x2000 + rand() % 0x0c00); /* fp16 in [0.0078, 0.05] */
        for (int j = 0; j < QK; j++) b[i].qs[j] = (int8_t)(rand() % 255 - 127);
    }
}

/* one pass: every weight row against nc activation rows; `.7` (v 1) and the VNNI form (v 2)
   prepare the activations once per pass per thread, as the patch does once per matrix per
   thread */
static void pass(int v, long rows, int nc, const block_q8_0 *w, const block_q8_0 *y, float *out) {
#pragma omp parallel
    {
        float dy[MAXC * NB];
        block_q8_0 yu[MAXC * NB];
        if (v >= 1)
            for (int i = 0; i < nc * NB; i++) dy[i] = _cvtsh_ss(y[i].d);
        if (v == 2)
            for (int i = 0; i < nc * NB; i++) {
                const __m256i q = _mm256_loadu_si256((const __m256i *)y[i].qs);
                _mm256_storeu_si256((__m256i *)yu[i].qs, _mm256_xor_si256(q, _mm256_set1_epi8((char)0x80)));
            }
#pragma omp for schedule(static)
        for (long i = 0; i < rows; i++) {
            const block_q8_0 *x = w + (size_t)i * NB;
            float s[MAXC] = {0};
            switch (v * 16 + nc) { /* specialised per row count, as in the patch */
#ifdef DPBUSD
#define VNNI(n) case 32 + n: cols_vnni(x, yu, dy, s, n); break;
#else
#define VNNI(n)
#endif
#define KERNELS(n)                                   \
    case n: cols_v6(x, y, s, n); break;              \
    case 16 + n: cols_v7(x, y, dy, s, n); break;     \
    VNNI(n)
                KERNELS(1) KERNELS(2) KERNELS(3) KERNELS(4) KERNELS(5) KERNELS(6) KERNELS(7) KERNELS(8)
#undef KERNELS
#undef VNNI
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
    float *out[VARIANTS];
    for (int v = 0; v < VARIANTS; v++) out[v] = malloc(MAXC * rows * sizeof(float));
    if (!w || !y) return 1;
    for (int v = 0; v < VARIANTS; v++)
        if (!out[v]) return 1;
    srand(1);
    fill(w, (size_t)rows * NB);
    fill(y, MAXC * NB);
    printf("%ld weight rows of %d (%.0f MB), best of %d passes\n", rows, WIDTH, bytes / 1e6, repeats);
    printf("rows  .6 ms  .7 ms  .6 x 1 row  .7 x 1 row (.6)  .7/.6%s  equal\n",
           VARIANTS > 2 ? "  vnni ms  vnni/.7" : "");
    double one_v6 = 0;
    for (int nc = 1; nc <= MAXC; nc++) {
        double best[VARIANTS];
        for (int v = 0; v < VARIANTS; v++) best[v] = 1e30;
        for (int r = 0; r < repeats; r++) /* alternate, so all see the same host */
            for (int v = 0; v < VARIANTS; v++) {
                const double t0 = now();
                pass(v, rows, nc, w, y, out[v]);
                const double t = now() - t0;
                if (t < best[v]) best[v] = t;
            }
        if (nc == 1) one_v6 = best[0];
        int equal = 1;
        for (int v = 1; v < VARIANTS; v++)
            equal &= memcmp(out[0], out[v], (size_t)nc * rows * sizeof(float)) == 0;
        printf("%4d %6.2f %6.2f %11.2f %16.2f %6.2f", nc, best[0] * 1e3, best[1] * 1e3,
               best[0] / one_v6, best[1] / one_v6, best[1] / best[0]);
        if (VARIANTS > 2) printf(" %8.2f %8.2f", best[2] * 1e3, best[2] / best[1]);
        printf("  %s\n", equal ? "yes" : "NO");
        if (!equal) return 2;
    }
    free(w);
    free(y);
    for (int v = 0; v < VARIANTS; v++) free(out[v]);
    return 0;
}
