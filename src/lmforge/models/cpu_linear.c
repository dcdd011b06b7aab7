/* Small-batch linear layers on CPU in bf16: y[M, N] = x[M, K] W[N, K]^T (+ b[N]).
 *
 * For the few rows of a decoding step (M <= a few dozen), oneDNN spends more time setting up each
 * product than multiplying, and torch's own bf16 kernels are slower still from 4 rows up (measured in
 * docs/benchmarks.md). This kernel reads the weight in place, in torch's own (N, K) row-major layout:
 * nothing is packed or copied. Each output is a dot product along K: tiles of MR rows of x by NR rows
 * of W keep MR x NR accumulators of 16 fp32 lanes in registers, and AVX512-BF16's vdpbf16ps multiplies
 * 32 bf16 pairs per instruction, exactly, summing in fp32. Every output's sum runs in the same order
 * whatever M and the tiling are, so a row's result does not depend on the other rows of the batch
 * (bit-identical alone or batched). The sum, plus the bias, is rounded to bf16 (to nearest even).
 *
 * Threads (OpenMP, the same runtime as torch's) split the output columns; small products run on one
 * thread. Compiled at first use by lmforge/models/native.py with -O3 -march=native; without AVX512-BF16
 * lmforge_linear_supported() is 0 and lmforge uses torch's kernels.
 */
#include <stdint.h>
#include <string.h>
#include "bf16.h"
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define MR 4 /* rows of x per tile */
#define NR 6 /* rows of W per tile: 4 x 6 accumulators + 6 weight registers + 1 for x = 31 of 32 */
#define PREFETCH_TILES 8 /* weight rows are asked for this many tiles ahead of use */
#define MIN_MACS_PER_THREAD (1 << 17) /* below this many multiply-adds per thread, fewer threads */

int lmforge_linear_supported(void) {
#if defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512BF16__)
/* (sum(p), sum(q), sum(r), sum(s)) of four 16-lane vectors, in 13 instructions rather than 4 x 8. */
static inline __m128 sum4(__m512 p, __m512 q, __m512 r, __m512 s) {
    /* in each 128-bit lane: (p0+p2, q0+q2, p1+p3, q1+q3) and the same for r, s */
    const __m512 pq = _mm512_add_ps(_mm512_unpacklo_ps(p, q), _mm512_unpackhi_ps(p, q));
    const __m512 rs = _mm512_add_ps(_mm512_unpacklo_ps(r, s), _mm512_unpackhi_ps(r, s));
    /* in each 128-bit lane: (p, q, r, s) partial sums */
    const __m512 all = _mm512_add_ps(_mm512_shuffle_ps(pq, rs, 0x44), _mm512_shuffle_ps(pq, rs, 0xee));
    const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(all), _mm512_extractf32x8_ps(all, 1));
    return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

/* One tile: rows x[0..mr) by weight rows w[0..NR) (pointers; a tile past N repeats a valid row and its
 * sums are not stored), over all K. Writes the mr x NR sums to out. Inlined with a constant mr. */
static inline __attribute__((always_inline)) void tile(const int mr, const uint16_t *x, int64_t ldx,
                                                        const uint16_t *const w[NR], int64_t K, int ahead,
                                                        float out[MR][NR]) { /* sums written in 4s: may fill 2 spare entries */
    __m512 acc[MR][NR];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512bh wv[NR];
        for (int j = 0; j < NR; j++) wv[j] = (__m512bh)_mm512_loadu_si512(w[j] + k);
        if (ahead) /* the weight rows PREFETCH_TILES tiles on (never faults, even past the end) */
            for (int j = 0; j < NR; j++) __builtin_prefetch(w[j] + k + PREFETCH_TILES * NR * K, 0, 3);
        for (int i = 0; i < mr; i++) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i * ldx + k);
            for (int j = 0; j < NR; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
        }
    }
    if (k < K) { /* the last K % 32 elements; masked-off lanes load as zeros */
        const __mmask32 mask = (__mmask32)((1u << (K - k)) - 1u);
        __m512bh wv[NR];
        for (int j = 0; j < NR; j++) wv[j] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w[j] + k);
        for (int i = 0; i < mr; i++) {
            const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + i * ldx + k);
            for (int j = 0; j < NR; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
        }
    }
    /* the sums of 4 accumulators at a time (mr * NR is even; a lone pair is padded with zeros) */
    float *sums = &out[0][0];
    for (int a = 0; a < mr * NR; a += 4) {
        const __m512 zero = _mm512_setzero_ps();
        const __m512 p = acc[a / NR][a % NR], q = acc[(a + 1) / NR][(a + 1) % NR];
        const __m512 r = a + 2 < mr * NR ? acc[(a + 2) / NR][(a + 2) % NR] : zero;
        const __m512 s = a + 3 < mr * NR ? acc[(a + 3) / NR][(a + 3) % NR] : zero;
        _mm_storeu_ps(sums + a, sum4(p, q, r, s));
    }
}

/* Output columns [n0, n1) for all M rows. */
static void columns(const uint16_t *x, int64_t ldx, const uint16_t *w, const uint16_t *bias, uint16_t *y,
                    int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
    float sums[MR][NR];
    for (int64_t n = n0; n < n1; n += NR) {
        const uint16_t *rows[NR];
        const int nr = n1 - n < NR ? (int)(n1 - n) : NR;
        for (int j = 0; j < NR; j++) rows[j] = w + (n + (j < nr ? j : 0)) * K;
        float b[NR] = {0};
        if (bias)
            for (int j = 0; j < nr; j++) b[j] = bf16_to_float(bias[n + j]);
        for (int64_t m = 0; m < M; m += MR) {
            const int64_t left = M - m;
            const uint16_t *xm = x + m * ldx;
            switch (left >= MR ? MR : (int)left) { /* constant mr: each call is specialised */
            case 4: tile(4, xm, ldx, rows, K, m == 0, sums); break;
            case 3: tile(3, xm, ldx, rows, K, m == 0, sums); break;
            case 2: tile(2, xm, ldx, rows, K, m == 0, sums); break;
            default: tile(1, xm, ldx, rows, K, m == 0, sums); break;
            }
            const int mr = left >= MR ? MR : (int)left;
            for (int i = 0; i < mr; i++)
                for (int j = 0; j < nr; j++) y[(m + i) * N + n + j] = float_to_bf16(sums[i][j] + b[j]);
        }
    }
}
#endif

/* y (M, N) contiguous = x (M, K; row stride ldx) W (N, K contiguous)^T + bias (N, or NULL); bf16. */
void lmforge_linear(const uint16_t *x, int64_t ldx, const uint16_t *w, const uint16_t *bias, uint16_t *y,
                    int64_t M, int64_t N, int64_t K, int threads) {
#if defined(__AVX512BF16__)
    const int64_t tiles = (N + NR - 1) / NR;
    int64_t useful = (M * N * K) / MIN_MACS_PER_THREAD;
    if (useful < 1) useful = 1;
    if (threads > useful) threads = (int)useful;
    if (threads > tiles) threads = (int)tiles;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    {
        int t = 0, T = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        T = omp_get_num_threads();
#endif
        /* contiguous runs of whole tiles per thread */
        const int64_t n0 = (tiles * t / T) * NR, n1 = (tiles * (t + 1) / T) * NR;
        columns(x, ldx, w, bias, y, M, N, K, n0, n1 < N ? n1 : N);
    }
#else
    (void)x; (void)ldx; (void)w; (void)bias; (void)y; (void)M; (void)N; (void)K; (void)threads;
#endif
}
