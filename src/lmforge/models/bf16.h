/* bf16 <-> fp32 for lmforge's C kernels (included by models/*.c; part of their compile-cache key). */
#ifndef LMFORGE_BF16_H
#define LMFORGE_BF16_H
#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Rounded to nearest even, as torch does. */
static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);                 /* round to nearest even */
    return (uint16_t)(bits >> 16);
}
#endif
