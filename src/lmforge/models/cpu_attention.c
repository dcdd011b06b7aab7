/* Decoding attention on CPU: one new query per row over that row's own cached keys and values.
 *
 * For every row b and query head h (parallel over the B * H pairs):
 *     out[b, h] = softmax(q[b, h] . K[b, g, :n_b]^T / sqrt(D)) V[b, g, :n_b]
 * where g = h / (H / Hkv) is the key/value head of grouped-query attention and n_b = lengths[b] the
 * number of positions row b attends to (its filled cache positions, the new token's included).
 * Positions past n_b are never read, so a row's result does not depend on the other rows of the batch.
 * When given, the step's new key and value of each row are first written at position n_b - 1.
 *
 * Elements are bf16 (stored as uint16) or fp32; everything is computed in fp32 and the output is
 * rounded to the elements' type (round to nearest even, as torch does). Compiled at first use by
 * lmforge/models/cpu_attention.py with -O3 -march=native; the head dimension is a compile-time
 * constant for the usual sizes so that the compiler unrolls and vectorises the inner loops. On a CPU
 * with AVX512-BF16, the query-key products of bf16 caches use its dot-product instruction (exact
 * bf16 x bf16 products summed in fp32; 1.6-1.8x faster than converting the keys first).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "bf16.h"
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

/* exp(x) for x <= 0 as 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2 (Cephes' expf polynomial, relative
 * error ~1e-7); unlike libm's expf, the loop that calls it vectorises. */
static inline float exp_nonpositive(float x) {
    x = x < -87.f ? -87.f : x;
    const float n = __builtin_rintf(x * 1.44269504088896341f); /* vectorises, unlike roundf */
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

static inline __attribute__((always_inline)) float load(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* Ask for the cache lines of `bytes` bytes from p (a cached position's key or value) ahead of use. */
static inline __attribute__((always_inline)) void prefetch(const char *p, int64_t bytes) {
    for (int64_t at = 0; at < bytes; at += 64) __builtin_prefetch(p + at, 0, 3);
}

static inline __attribute__((always_inline)) void store(void *p, int64_t i, float x, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = float_to_bf16(x);
    else ((float *)p)[i] = x;
}

/* Strides are in elements. q: (B, H, D) with strides (q_sb, q_sh, 1); k_new, v_new (or NULL): (B, Hkv, D)
 * with strides (kn_sb, kn_sh, 1) and (vn_sb, vn_sh, 1); k, v: (B, Hkv, S, D) with strides (kv_sb, kv_sh,
 * kv_ss, 1); out: (B, H, D) contiguous. Inlined into each caller below with constant `bf16` and `dim`, so
 * every (type, head size) pair gets its own specialised loops. */
static inline __attribute__((always_inline)) void attend(
        const void *q, int64_t q_sb, int64_t q_sh, const void *k_new, int64_t kn_sb, int64_t kn_sh,
        const void *v_new, int64_t vn_sb, int64_t vn_sh, void *k, void *v, int64_t kv_sb, int64_t kv_sh,
        int64_t kv_ss, const int64_t *lengths, void *out, int64_t B, int64_t H, int64_t Hkv, int64_t max_len,
        int threads, int bf16, const int64_t dim) {
    const int64_t group = H / Hkv;
    const float scale = 1.f / sqrtf((float)dim);
    const size_t size = bf16 ? 2 : 4;
    #pragma omp parallel num_threads(threads)
    {
        if (k_new != NULL) {
            #pragma omp for schedule(static)
            for (int64_t bg = 0; bg < B * Hkv; bg++) {  /* then a barrier: every head reads the new keys */
                const int64_t b = bg / Hkv, g = bg % Hkv;
                if (lengths[b] < 1 || lengths[b] > max_len) continue;  /* never write outside the cache */
                const int64_t at = b * kv_sb + g * kv_sh + (lengths[b] - 1) * kv_ss;
                memcpy((char *)k + at * size, (const char *)k_new + (b * kn_sb + g * kn_sh) * size, dim * size);
                memcpy((char *)v + at * size, (const char *)v_new + (b * vn_sb + g * vn_sh) * size, dim * size);
            }
        }
        float *scores = malloc(sizeof(float) * (size_t)(max_len > 0 ? max_len : 1));
        float query[dim], acc[dim];
        #pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            const int64_t b = bh / H, h = bh % H;
            const int64_t n = lengths[b] < 0 ? 0 : lengths[b] > max_len ? max_len : lengths[b];
            const int64_t kv = b * kv_sb + (h / group) * kv_sh;
            /* Each row's keys and values are short runs that the hardware prefetchers find late: ask for
             * this pair's values while its scores are computed, and for the next pair's keys while these
             * values are summed (up to 2x faster when the cache comes from memory). */
            const char *values_at = (const char *)v + kv * size;
            const int64_t next = bh + 1 < B * H ? bh + 1 : bh, nb = next / H;
            const int64_t next_n = lengths[nb] < 0 ? 0 : lengths[nb] > max_len ? max_len : lengths[nb];
            const char *next_keys = (const char *)k + (nb * kv_sb + ((next % H) / group) * kv_sh) * size;
            const int64_t row_bytes = dim * (int64_t)size, step_bytes = kv_ss * (int64_t)size;
            for (int64_t d = 0; d < dim; d++) {
                query[d] = load(q, b * q_sb + h * q_sh + d, bf16) * scale;
                acc[d] = 0.f;
            }
            float top = -INFINITY;
#if defined(__AVX512BF16__)
            if (bf16 && dim % 32 == 0 && dim <= 256) {
                __m512bh qv[8];
                for (int64_t d = 0; d < dim; d += 32)
                    qv[d / 32] = (__m512bh)_mm512_loadu_si512((const uint16_t *)q + b * q_sb + h * q_sh + d);
                const uint16_t *keys = (const uint16_t *)k + kv;
                for (int64_t j = 0; j < n; j++) {
                    prefetch(values_at + j * step_bytes, row_bytes);
                    __m512 sum = _mm512_setzero_ps();
                    for (int64_t d = 0; d < dim; d += 32)
                        sum = _mm512_dpbf16_ps(sum, qv[d / 32], (__m512bh)_mm512_loadu_si512(keys + j * kv_ss + d));
                    const float dot = _mm512_reduce_add_ps(sum) * scale;
                    scores[j] = dot;
                    top = dot > top ? dot : top;
                }
            } else
#endif
            for (int64_t j = 0; j < n; j++) {
                prefetch(values_at + j * step_bytes, row_bytes);
                float dot = 0.f;
                #pragma omp simd reduction(+:dot)
                for (int64_t d = 0; d < dim; d++) dot += query[d] * load(k, kv + j * kv_ss + d, bf16);
                scores[j] = dot;
                top = dot > top ? dot : top;
            }
            float total = 0.f;
            #pragma omp simd reduction(+:total)
            for (int64_t j = 0; j < n; j++) {
                scores[j] = exp_nonpositive(scores[j] - top);
                total += scores[j];
            }
            for (int64_t j = 0; j < n; j++) {
                if (j < next_n) prefetch(next_keys + j * step_bytes, row_bytes);
                const float weight = scores[j];
                #pragma omp simd
                for (int64_t d = 0; d < dim; d++) acc[d] += weight * load(v, kv + j * kv_ss + d, bf16);
            }
            for (int64_t d = 0; d < dim; d++) store(out, bh * dim + d, n > 0 ? acc[d] / total : 0.f, bf16);
        }
        free(scores);
    }
}

#define ATTEND(BF16, DIM) attend(q, q_sb, q_sh, k_new, kn_sb, kn_sh, v_new, vn_sb, vn_sh, k, v, kv_sb, kv_sh, \
                                 kv_ss, lengths, out, B, H, Hkv, max_len, threads, BF16, DIM)

/* The entry point (ctypes): `bf16` is 1 for bf16 elements, 0 for fp32. */
void lmforge_decode_attention(const void *q, int64_t q_sb, int64_t q_sh, const void *k_new, int64_t kn_sb,
                              int64_t kn_sh, const void *v_new, int64_t vn_sb, int64_t vn_sh, void *k, void *v,
                              int64_t kv_sb, int64_t kv_sh, int64_t kv_ss, const int64_t *lengths, void *out,
                              int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t max_len, int threads,
                              int bf16) {
    if (bf16) {
        switch (D) {
            case 32: ATTEND(1, 32); return;
            case 64: ATTEND(1, 64); return;
            case 128: ATTEND(1, 128); return;
            default: ATTEND(1, D); return;
        }
    }
    switch (D) {
        case 32: ATTEND(0, 32); return;
        case 64: ATTEND(0, 64); return;
        case 128: ATTEND(0, 128); return;
        default: ATTEND(0, D); return;
    }
}
