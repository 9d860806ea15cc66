/*
 * Decode attention of the dolly-v2-3b shape (32 layers, 32 heads of 80, F16 K/V cache in
 * llama.cpp's layout) on one of ggml's CPU backend modules: the ops llama.cpp runs per
 * generated token without flash attention (K.q over a strided view of the K cache, soft max,
 * V.kq over the transposed V cache), or with FA=1 ggml_flash_attn_ext. Not a test. Times a
 * graph of the 32 layers' attention, each layer with its own 2048-position cache (so that
 * the K/V read come from memory, as in decoding), after streaming 256 MB to evict caches.
 *
 *   LIB=.venv/lib/python3.11/site-packages/llama_cpp/lib
 *   INC=<llama-cpp-python 0.3.36 sdist>/vendor/llama.cpp/ggml/include
 *   gcc -O2 -o /tmp/decode_attention benchmarks/kernels/decode_attention.c -I$INC \
 *       -L$LIB -lggml -lggml-base -Wl,-rpath,$LIB
 *   /tmp/decode_attention $LIB/libggml-cpu-haswell.so [N_KV=450] [ITERS=50] [THREADS=2]
 *   ONLY_KQ=1 ...   (K.q and soft max only)     FA=1 ...   (flash attention)
 *
 * Prints the best and mean milliseconds per token and a checksum of the outputs, which must
 * not change between two builds of the module that change no arithmetic.
 */
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { LAYERS = 32, HEADS = 32, HEAD = 80, WIDTH = HEADS * HEAD, CTX = 2048 };

typedef void (*set_n_threads_t)(ggml_backend_t, int);

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static float uniform(void) { return rand() / (float) RAND_MAX - 0.5f; }

int main(int argc, char ** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s libggml-cpu-VARIANT.so [N_KV] [ITERS] [THREADS]\n", argv[0]);
        return 2;
    }
    const int n_kv = argc > 2 ? atoi(argv[2]) : 450;
    const int iters = argc > 3 ? atoi(argv[3]) : 50;
    const int threads = argc > 4 ? atoi(argv[4]) : 2;
    const int fa = getenv("FA") != NULL, only_kq = getenv("ONLY_KQ") != NULL;
    if (n_kv < 1 || n_kv > CTX || iters < 1 || threads < 1) {
        fprintf(stderr, "N_KV must be 1..%d, ITERS and THREADS >= 1\n", CTX);
        return 2;
    }

    ggml_backend_reg_t reg = ggml_backend_load(argv[1]);
    if (reg == NULL) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    ggml_backend_t backend = ggml_backend_dev_init(ggml_backend_reg_dev_get(reg, 0), NULL);
    set_n_threads_t set_threads =
        (set_n_threads_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads");
    set_threads(backend, threads);

    struct ggml_init_params params = {64u << 20, NULL, true};
    struct ggml_context * ctx = ggml_init(params);
    struct ggml_tensor *k_cache[LAYERS], *v_cache[LAYERS], *q[LAYERS], *out[LAYERS];
    for (int l = 0; l < LAYERS; l++) {
        k_cache[l] = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, WIDTH, CTX);  // a row per position
        v_cache[l] = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, CTX, WIDTH);  // transposed
        q[l] = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, HEAD, 1, HEADS);
    }
    struct ggml_cgraph * graph = ggml_new_graph_custom(ctx, 4096, false);
    for (int l = 0; l < LAYERS; l++) {
        // as llama.cpp views its caches: [head dim, positions, heads]
        struct ggml_tensor * k =
            ggml_view_3d(ctx, k_cache[l], HEAD, n_kv, HEADS, WIDTH * 2, HEAD * 2, 0);
        if (fa) {
            struct ggml_tensor * v =
                ggml_view_3d(ctx, v_cache[l], HEAD, n_kv, HEADS, WIDTH * 2, HEAD * 2, 0);
            out[l] = ggml_flash_attn_ext(ctx, q[l], k, v, NULL, 0.11f, 0.0f, 0.0f);
        } else {
            struct ggml_tensor * kq = ggml_mul_mat(ctx, k, q[l]);
            kq = ggml_soft_max_ext(ctx, kq, NULL, 0.11f, 0.0f);
            struct ggml_tensor * v =
                ggml_view_3d(ctx, v_cache[l], n_kv, HEAD, HEADS, CTX * 2, HEAD * CTX * 2, 0);
            out[l] = only_kq ? kq : ggml_mul_mat(ctx, v, kq);
        }
        ggml_build_forward_expand(graph, out[l]);
    }
    ggml_backend_buffer_t buffer = ggml_backend_alloc_ctx_tensors(ctx, backend);

    srand(1);
    const size_t cache_elems = (size_t) WIDTH * CTX;
    ggml_fp16_t * half = malloc(cache_elems * sizeof *half);
    float qv[HEAD * HEADS];
    for (int l = 0; l < LAYERS; l++) {
        for (size_t i = 0; i < cache_elems; i++) half[i] = ggml_fp32_to_fp16(uniform());
        ggml_backend_tensor_set(k_cache[l], half, 0, cache_elems * sizeof *half);
        ggml_backend_tensor_set(v_cache[l], half, 0, cache_elems * sizeof *half);
        for (int i = 0; i < HEAD * HEADS; i++) qv[i] = uniform();
        ggml_backend_tensor_set(q[l], qv, 0, sizeof qv);
    }
    free(half);

    const size_t evict_bytes = 256u << 20;
    volatile char * evict = malloc(evict_bytes);
    memset((char *) evict, 1, evict_bytes);
    double best = 1e30, total = 0;
    long sink = 0;
    for (int it = 0; it < iters; it++) {
        for (size_t i = 0; i < evict_bytes; i += 64) sink += evict[i];
        const double t0 = now();
        ggml_backend_graph_compute(backend, graph);
        const double dt = now() - t0;
        total += dt;
        best = dt < best ? dt : best;
    }

    double checksum = 0;
    for (int l = 0; l < LAYERS; l++) {
        const size_t n = ggml_nelements(out[l]);
        float * o = malloc(n * sizeof *o);
        ggml_backend_tensor_get(out[l], o, 0, n * sizeof *o);
        for (size_t i = 0; i < n; i++) checksum += o[i];
        free(o);
    }
    printf("n_kv %d, %d threads%s: best %.3f ms, mean %.3f ms per token (%d layers); "
           "checksum %.9g (%ld)\n",
           n_kv, threads, fa ? ", flash attention" : only_kq ? ", K.q only" : "", best * 1e3,
           total / iters * 1e3, LAYERS, checksum, sink % 2);
    ggml_backend_buffer_free(buffer);
    ggml_backend_free(backend);
    ggml_free(ctx);
    return 0;
}
