// Shared helpers of the CPU kernels: 8-float vectors (GCC vector extensions: AVX2, or wider
// hardware split by the compiler), bf16 <-> fp32, and a vectorized exp.
#ifndef TANDEM_VEC_H
#define TANDEM_VEC_H

#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

enum { DT_F32 = 0, DT_BF16 = 1 };  // element types of activations and KV rows

static inline v8 load8(const float *p) {
    v8 x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline void store8(float *p, v8 x) { memcpy(p, &x, sizeof x); }

static inline v8 splat8(float x) { return (v8){x, x, x, x, x, x, x, x}; }

static inline float hsum8(v8 x) {
    return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
}

static inline float hmax8(v8 x) {
    float m = x[0];
    for (int i = 1; i < 8; i++) m = x[i] > m ? x[i] : m;
    return m;
}

// Lanes of a where mask is set (all ones), else lanes of b.
static inline v8 select8(v8i mask, v8 a, v8 b) {
    v8i ai, bi, r;
    memcpy(&ai, &a, sizeof ai);
    memcpy(&bi, &b, sizeof bi);
    r = (ai & mask) | (bi & ~mask);
    v8 out;
    memcpy(&out, &r, sizeof out);
    return out;
}

static inline float bf16_to_f32(uint16_t x) {
    uint32_t bits = ((uint32_t)x) << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

// Round to nearest even, as torch's fp32 -> bf16 cast does (NaN stays NaN).
static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

// 8 bf16 at p as fp32 (exact: a 16-bit shift).
static inline v8 load8_bf16(const uint16_t *p) {
    v8h h;
    memcpy(&h, p, sizeof h);
    v8u bits = __builtin_convertvector(h, v8u) << 16;
    v8 f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

// The bits of x rounded to bf16 (in the upper 16), lane by lane as f32_to_bf16 rounds.
static inline v8u bf16_bits8(v8 x) {
    v8u bits;
    memcpy(&bits, &x, sizeof bits);
    v8u nan = (bits & 0x7fffffffu) > 0x7f800000u;
    v8u rounded = bits + 0x7fffu + ((bits >> 16) & 1u);
    return (nan & (bits | 0x400000u)) | (~nan & rounded);
}

static inline void store8_bf16(uint16_t *p, v8 x) {
    v8h h = __builtin_convertvector(bf16_bits8(x) >> 16, v8h);
    memcpy(p, &h, sizeof h);
}

// x rounded to bf16 and back (as torch's cast to bf16 and back to fp32).
static inline v8 round8_bf16(v8 x) {
    v8u bits = bf16_bits8(x) & 0xffff0000u;
    v8 f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

// n elements of type `dt` at p (element offset `at`) as fp32, into dst.
static inline void load_row(float *dst, const void *p, int dt, int64_t at, int n) {
    if (dt == DT_F32) {
        memcpy(dst, (const float *)p + at, sizeof(float) * (size_t)n);
    } else {
        const uint16_t *src = (const uint16_t *)p + at;
        int i = 0;
        for (; i + 8 <= n; i += 8) store8(dst + i, load8_bf16(src + i));
        for (; i < n; i++) dst[i] = bf16_to_f32(src[i]);
    }
}

static inline void store_row(void *p, int dt, int64_t at, const float *src, int n) {
    if (dt == DT_F32) {
        memcpy((float *)p + at, src, sizeof(float) * (size_t)n);
    } else {
        uint16_t *dst = (uint16_t *)p + at;
        int i = 0;
        for (; i + 8 <= n; i += 8) store8_bf16(dst + i, load8(src + i));
        for (; i < n; i++) dst[i] = f32_to_bf16(src[i]);
    }
}

// Each of n floats rounded to bf16 in place (kept as fp32).
static inline void round_row_bf16(float *x, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) store8(x + i, round8_bf16(load8(x + i)));
    for (; i < n; i++) x[i] = bf16_to_f32(f32_to_bf16(x[i]));
}

#pragma GCC diagnostic ignored "-Wpsabi"  // v16 in static inline functions only: no ABI crosses a call
typedef float v16 __attribute__((vector_size(64)));  // one AVX512 register, or two AVX2 ones
typedef int32_t v16i __attribute__((vector_size(64)));

// exp(x) to about 1 ulp over the fp32 range (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6
// polynomial for exp(r), times 2^n). exp(-inf) and anything below -87.3 give exactly 0. Written once
// for vectors of float VF with int lanes VI (same size): exp8 and exp16 compute the same lanes alike.
#define VSELECT(VF, VI, mask, a, b) ((VF)(((VI)(a) & (mask)) | ((VI)(b) & ~(mask))))
#define DEFINE_EXP(NAME, VF, VI)                                                  \
    static inline VF NAME(VF x) {                                                 \
        VI zero_out = x < -87.3365447504f;                                        \
        x = VSELECT(VF, VI, x > 88.3762626647949f, (VF){} + 88.3762626647949f, x);\
        x = VSELECT(VF, VI, zero_out, (VF){} - 87.3365447504f, x);              \
        VF fx = x * 1.44269504088896341f + 0.5f;                                  \
        VI n = __builtin_convertvector(fx, VI); /* truncation: fixed below */     \
        VF nf = __builtin_convertvector(n, VF);                                   \
        n += (VI)(nf > fx); /* mask lanes are -1: one less where it rounded up */ \
        nf = __builtin_convertvector(n, VF);                                      \
        x = x - nf * 0.693359375f - nf * -2.12194440e-4f;                         \
        VF z = x * x;                                                             \
        VF y = (VF){} + 1.9875691500e-4f;                                         \
        y = y * x + 1.3981999507e-3f;                                             \
        y = y * x + 8.3334519073e-3f;                                             \
        y = y * x + 4.1665795894e-2f;                                             \
        y = y * x + 1.6666665459e-1f;                                             \
        y = y * x + 5.0000001201e-1f;                                             \
        y = y * z + x + 1.0f;                                                     \
        VF scale = (VF)((n + 127) << 23);                                         \
        return VSELECT(VF, VI, zero_out, (VF){}, y * scale);                      \
    }

DEFINE_EXP(exp8, v8, v8i)
DEFINE_EXP(exp16, v16, v16i)

#endif
