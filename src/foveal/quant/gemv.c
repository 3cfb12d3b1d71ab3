/* Matrix-vector products for decode (one row of activations) with int8 weights.

   y[n] = bf16(scale[n] * sum_k w[n, k] * x[k])  for an int8 weight [N, K] (row-major), bf16 x, scales, y.

   Why it exists: decode reads every weight once per token, so its speed is how fast the weight
   streams through. PyTorch's `_weight_int8pack_mm` reads an int8 weight at 12-15 GB/s on this
   project's machine (it is compute bound on one row); this loop reads it at ~22 GB/s, the speed
   PyTorch's own bf16 gemv reads a bf16 weight. foveal compiles it on first use with the system C
   compiler for the machine it runs on (`quant/native.py`); without a compiler foveal uses PyTorch's
   kernel.

   Accumulation is in float32, as the dequantize-and-matmul fallback does; only the order of the sum
   differs. Rows are split between `threads` OpenMP threads in contiguous blocks, so each thread
   streams one region of the weight. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {   /* round to nearest even, as PyTorch rounds; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 64);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static float dot_i8(const int8_t* w, const float* x, int64_t K) {
    int64_t k = 0;
    float acc = 0.f;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; k + 32 <= K; k += 32) {
        __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + k))));
        __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + k + 16))));
        a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + k), a0);
        a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + k + 16), a1);
    }
    acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
    float tail = 0.f;
    for (; k < K; ++k) tail += (float)w[k] * x[k];
    return acc + tail;
}

/* Returns 0, or 1 when the scratch buffer could not be allocated (y is then untouched). */
int foveal_gemv_int8_bf16(const int8_t* w, const uint16_t* scales, const uint16_t* x, uint16_t* y,
                          int64_t N, int64_t K, int threads) {
    float* xf = (float*)malloc((size_t)(K > 0 ? K : 1) * sizeof(float));
    if (!xf) return 1;
    for (int64_t k = 0; k < K; ++k) xf[k] = bf16_to_f32(x[k]);
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        int64_t n0 = N * t / nt, n1 = N * (t + 1) / nt;
        for (int64_t n = n0; n < n1; ++n)
            y[n] = f32_to_bf16(dot_i8(w + n * K, xf, K) * bf16_to_f32(scales[n]));
    }
    free(xf);
    return 0;
}
