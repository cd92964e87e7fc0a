// y[M, N] = x[M, K] @ W^T for weight-only quantized W, with the activations rounded to int8 per row
// and group of 32 (xq = round(x / dx), dx = max|x| / 127), so that a group's dot product is one
// integer multiply-add over 32 bytes (AVX2 maddubs: u8 x s8). Two weight formats:
//
// int4 (groups of 32 along K, as GGUF's Q4_1): W[n, k] = q[n, k] * scale[n, g] + offset[n, g],
//   q in 0..15, g = k / 32; packed[n, g, j] (16 bytes per group) holds q[n, 32g + j] in its low
//   nibble and q[n, 32g + 16 + j] in its high nibble; scale and offset fp32 [N, K / 32].
//   y[m, n] = sum_g scale[n, g] * dx[m, g] * sum_j q * xq  +  offset[n, g] * dx[m, g] * sum_j xq
// int8 (per row): W[n, k] = q[n, k] * scale[n], q in -127..127 (int8 [N, K]), scale fp32 [N].
//   y[m, n] = scale[n] * sum_g dx[m, g] * sum_j q * xq
//
// Both are exactly W @ (xq * dx) up to fp32 summation order. In int4 both terms must see the same
// rounded x: q is not centred (0..15, offset ~ -8 * scale), so an exact sum of x in the offset term
// alone would leave offset * (x - xq) uncancelled and double the error. This is llama.cpp's
// Q4_1 x Q8_1 and Q8_0 x Q8_0 scheme in spirit; the error it adds is that of rounding x to 8 bits
// per group. Rows are independent: a row's result does not depend on M or the other rows.
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "vec.h"

#if defined(__AVX2__) && defined(__FMA__)
#define QUANT_SIMD 1
#include <immintrin.h>
#endif

#define GROUP 32
#define PARALLEL_MIN_WORK (1 << 16)  // below N * K this many, one thread beats waking the others

enum { W_INT4 = 4, W_INT8 = 8 };

// Per row m and group g of x (fp32 or bf16, `dt`): xq (int8), dx (its scale), sx = dx * sum(xq), the
// sum of x as rounded. `row` is scratch for k floats.
static void quantize_rows(const void *x, int dt, int64_t rows, int k, float *row, int8_t *xq, float *dx, float *sx) {
    int groups = k / GROUP;
    for (int64_t m = 0; m < rows; m++) {
        load_row(row, x, dt, m * k, k);
        for (int g = 0; g < groups; g++) {
            const float *v = row + (int64_t)g * GROUP;
            float amax = 0.f;
            int finite = 1;
            for (int j = 0; j < GROUP; j++) {
                float a = fabsf(v[j]);
                finite &= a <= FLT_MAX;  // false for inf and NaN
                amax = a > amax ? a : amax;
            }
            int8_t *out = xq + m * k + (int64_t)g * GROUP;
            int32_t sum = 0;
            float d;
            if (!finite || amax < FLT_MIN) {  // non-finite: the outputs become NaN, as in torch; tiny: zeros
                d = finite ? 0.f : NAN;
                for (int j = 0; j < GROUP; j++) out[j] = 0;
            } else {
                d = amax / 127.f;
                const float inv = 127.f / amax;
                for (int j = 0; j < GROUP; j++) {
                    out[j] = (int8_t)nearbyintf(v[j] * inv);  // round half to even, as lrintf
                    sum += out[j];
                }
            }
            dx[m * groups + g] = d;
            sx[m * groups + g] = d * (float)sum;
        }
    }
}

// Bytes of one row of weights, and of one group within it.
static inline int64_t row_bytes(int bits, int k) { return bits == W_INT4 ? k / 2 : k; }
static inline int group_bytes(int bits) { return bits == W_INT4 ? GROUP / 2 : GROUP; }

#ifdef QUANT_SIMD
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// One group of weights as 32 unsigned bytes for maddubs, and the sign to move onto x (int8 only:
// |w| * (x * sign(w)) = w * x).
static inline __m256i load_group(int bits, const uint8_t *p, __m256i *sign) {
    if (bits == W_INT4) {
        __m128i b = _mm_loadu_si128((const __m128i *)p);
        __m128i low = _mm_and_si128(b, _mm_set1_epi8(0x0F));
        __m128i high = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
        return _mm256_set_m128i(high, low);
    }
    *sign = _mm256_loadu_si256((const __m256i *)p);
    return _mm256_sign_epi8(*sign, *sign);
}

// The group's dot product as 8 fp32 partial sums.
static inline __m256 group_dot(int bits, __m256i w, __m256i sign, const int8_t *xq) {
    __m256i xv = _mm256_loadu_si256((const __m256i *)xq);
    if (bits == W_INT8) xv = _mm256_sign_epi8(xv, sign);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    // one VNNI instruction for maddubs + madd: the same integers (no pair of products here reaches
    // maddubs' int16 saturation: int4 15 * 127 * 2, int8 128 * 127 * 2 < 32767)
    return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), w, xv));
#else
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(w, xv), _mm256_set1_epi16(1)));
#endif
}

// One core alone keeps too few cache-line reads in flight to stream W at the memory's bandwidth
// (see gemv.c): while reading group g of columns col0.., ask for the same bytes PREFETCH_COLS
// columns ahead (this thread's next blocks), every 32 bytes of weights and of scales / offsets, so
// every 64-byte line is asked for at least once. Prefetches never fault: past W's end is harmless.
// Measured on an AMX Xeon, 120 one-row calls over the default model's int4 shapes (78 MB): 1.6x
// faster than with the prefetches pointed at the block being read. (Two groups per AVX512-VNNI
// instruction, half the instructions, measured no faster: one row is bound by memory, not compute.)
#define PREFETCH_COLS 8

static inline __attribute__((always_inline)) void prefetch_block_ahead(int bits, const uint8_t *packed,
                                                                        const float *scale, int64_t col0, int cols,
                                                                        int k, int g) {
    const int groups = k / GROUP, weight_step = bits == W_INT4 ? 2 : 1, scale_step = 32 / (int)sizeof(float);
    for (int c = 0; c < cols; c++) {
        const int64_t col = col0 + c + PREFETCH_COLS;
        if (g % weight_step == 0)
            __builtin_prefetch(packed + col * row_bytes(bits, k) + (int64_t)g * group_bytes(bits), 0, 3);
        if (bits == W_INT4 && g % scale_step == 0) __builtin_prefetch(scale + col * groups + g, 0, 3);
    }
}

// out[c][r] = sum_g wscale(c, g) * dx[r, g] * dot(c, r, g) for columns col0 + c (c < cols) and rows
// r < rows of the block, with wscale 1 for int8 (its per-row scale is applied by the caller).
// Always inlined with constant `bits`, `cols` and `rows`, so the cols x rows accumulators
// (independent FMA chains: one chain alone would wait on the FMA latency every group) live in
// registers.
static inline __attribute__((always_inline)) void dot_block(int bits, const uint8_t *packed, const float *scale,
                                                             int64_t col0, const int8_t *xq, const float *dx, int k,
                                                             int cols, int rows, float (*out)[4]) {
    int groups = k / GROUP;
    __m256 acc[4][4];
    for (int c = 0; c < cols; c++)
        for (int r = 0; r < rows; r++) acc[c][r] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m256i w[4], sign[4];
        float sc[4];
        prefetch_block_ahead(bits, packed, scale, col0, cols, k, g);
        for (int c = 0; c < cols; c++) {
            w[c] = load_group(bits, packed + (col0 + c) * row_bytes(bits, k) + (int64_t)g * group_bytes(bits),
                              &sign[c]);
            sc[c] = bits == W_INT4 ? scale[(col0 + c) * groups + g] : 1.f;
        }
        for (int r = 0; r < rows; r++) {
            const int8_t *xg = xq + (int64_t)r * k + (int64_t)g * GROUP;
            float d = dx[r * groups + g];
            for (int c = 0; c < cols; c++)
                acc[c][r] = _mm256_fmadd_ps(group_dot(bits, w[c], sign[c], xg), _mm256_set1_ps(sc[c] * d), acc[c][r]);
        }
    }
    for (int c = 0; c < cols; c++)
        for (int r = 0; r < rows; r++) out[c][r] = hsum256(acc[c][r]);
}
#else
static inline void dot_block(int bits, const uint8_t *packed, const float *scale, int64_t col0, const int8_t *xq,
                             const float *dx, int k, int cols, int rows, float (*out)[4]) {
    int groups = k / GROUP;
    for (int c = 0; c < cols; c++) {
        const uint8_t *wrow = packed + (col0 + c) * row_bytes(bits, k);
        for (int r = 0; r < rows; r++) {
            float total = 0.f;
            for (int g = 0; g < groups; g++) {
                const uint8_t *p = wrow + (int64_t)g * group_bytes(bits);
                const int8_t *v = xq + (int64_t)r * k + (int64_t)g * GROUP;
                int32_t dot = 0;
                if (bits == W_INT4) {
                    for (int j = 0; j < GROUP / 2; j++) dot += (p[j] & 0x0F) * v[j] + (p[j] >> 4) * v[j + GROUP / 2];
                } else {
                    for (int j = 0; j < GROUP; j++) dot += (int8_t)p[j] * v[j];
                }
                float sc = bits == W_INT4 ? scale[(col0 + c) * groups + g] : 1.f;
                total += (float)dot * sc * dx[r * groups + g];
            }
            out[c][r] = total;
        }
    }
}
#endif

// Blocks of 4 columns (callers guarantee N % 4 == 0) by up to 4 rows: one row gets 4 FMA chains
// through 4 columns; 3 or 4 rows go through 2 columns x 4 rows twice.
static inline __attribute__((always_inline)) void block(int bits, const uint8_t *packed, const float *scale,
                                                         int64_t col0, const int8_t *xq, const float *dx, int k,
                                                         int rows, float (*part)[4]) {
    switch (rows) {
        case 4:
            dot_block(bits, packed, scale, col0, xq, dx, k, 2, 4, part);
            dot_block(bits, packed, scale, col0 + 2, xq, dx, k, 2, 4, part + 2);
            break;
        case 3:
            dot_block(bits, packed, scale, col0, xq, dx, k, 2, 3, part);
            dot_block(bits, packed, scale, col0 + 2, xq, dx, k, 2, 3, part + 2);
            break;
        case 2: dot_block(bits, packed, scale, col0, xq, dx, k, 4, 2, part); break;
        default: dot_block(bits, packed, scale, col0, xq, dx, k, 4, 1, part); break;
    }
}

// Output columns col0 .. col0 + 3, all rows.
static inline __attribute__((always_inline)) void column_block(int bits, const uint8_t *packed, const float *scale,
                                                                const float *offset, const int8_t *xq,
                                                                const float *dx, const float *sx, void *y, int dt,
                                                                int64_t col0, int64_t rows, int n, int k) {
    int groups = k / GROUP;
    if (bits == W_INT4) {  // the offsets PREFETCH_COLS columns ahead, read after the dot products
        for (int c = 0; c < 4; c++)
            for (int g = 0; g < groups; g += 32 / (int)sizeof(float))
                __builtin_prefetch(offset + (col0 + c + PREFETCH_COLS) * groups + g, 0, 3);
    }
    for (int64_t m0 = 0; m0 < rows; m0 += 4) {
        int count = rows - m0 < 4 ? (int)(rows - m0) : 4;
        float part[4][4] = {{0.f}};
        block(bits, packed, scale, col0, xq + m0 * k, dx + m0 * groups, k, count, part);
        for (int c = 0; c < 4; c++) {
            for (int r = 0; r < count; r++) {
                float total = part[c][r];
                if (bits == W_INT4) {
                    const float *off = offset + (col0 + c) * groups, *s = sx + (m0 + r) * groups;
                    for (int g = 0; g < groups; g++) total += off[g] * s[g];
                } else {
                    total *= scale[col0 + c];
                }
                const int64_t at = (m0 + r) * n + col0 + c;
                if (dt == DT_BF16)
                    ((uint16_t *)y)[at] = f32_to_bf16(total);  // rounded once, as torch's cast of the fp32 sum
                else
                    ((float *)y)[at] = total;
            }
        }
    }
}

typedef struct {
    int8_t *xq;
    float *dx, *sx, *row;
} Rounded;

static void release(Rounded *r) { free(r->xq), free(r->dx), free(r->sx), free(r->row); }

// x rounded per row and group (see quantize_rows); 0, or -1 when out of memory (nothing to free).
static int round_activations(const void *x, int dt, int64_t rows, int k, Rounded *r) {
    int groups = k / GROUP;
    r->xq = malloc((size_t)rows * k);
    r->dx = malloc(sizeof(float) * (size_t)rows * groups);
    r->sx = malloc(sizeof(float) * (size_t)rows * groups);
    r->row = malloc(sizeof(float) * (size_t)k);
    if (r->xq == NULL || r->dx == NULL || r->sx == NULL || r->row == NULL) {
        release(r);
        return -1;
    }
    quantize_rows(x, dt, rows, k, r->row, r->xq, r->dx, r->sx);
    return 0;
}

static int threads_for(int n, int k, int num_threads) {
    return (int64_t)n * k >= PARALLEL_MIN_WORK ? num_threads : 1;
}

// x [rows, k] and y [rows, n] are both fp32 or both bf16 (`dt`, DT_F32 or DT_BF16): a bf16 y is the
// fp32 result rounded once. Both return 0, or -1 when scratch memory could not be allocated (y
// untouched). Each has its own
// parallel loop so that `bits` is a compile-time constant inside it (one shared outlined OpenMP body
// would test it at run time in the innermost loop).
int int4_linear(const void *x, const uint8_t *packed, const float *scale, const float *offset, void *y,
                int64_t rows, int n, int k, int dt, int num_threads) {
    Rounded r;
    if (rows == 0) return 0;
    if (round_activations(x, dt, rows, k, &r) != 0) return -1;
#pragma omp parallel for num_threads(threads_for(n, k, num_threads)) schedule(static)
    for (int64_t col0 = 0; col0 < n; col0 += 4)
        column_block(W_INT4, packed, scale, offset, r.xq, r.dx, r.sx, y, dt, col0, rows, n, k);
    release(&r);
    return 0;
}

int int8_linear(const void *x, const int8_t *q, const float *scale, void *y, int64_t rows, int n, int k, int dt,
                int num_threads) {
    Rounded r;
    if (rows == 0) return 0;
    if (round_activations(x, dt, rows, k, &r) != 0) return -1;
#pragma omp parallel for num_threads(threads_for(n, k, num_threads)) schedule(static)
    for (int64_t col0 = 0; col0 < n; col0 += 4)
        column_block(W_INT8, (const uint8_t *)q, scale, NULL, r.xq, r.dx, r.sx, y, dt, col0, rows, n, k);
    release(&r);
    return 0;
}

// W itself from the int4 format above, as fp32 (out_bf16 = 0) or bf16 rounded to nearest even
// (out_bf16 = 1): out[n, k] = q[n, k] * scale[n, g] + offset[n, g] in fp32, then rounded once. Used
// for many rows at a time, where a float matmul over W beats the integer kernel.
void int4_dequantize(const uint8_t *packed, const float *scale, const float *offset, void *out, int n, int k,
                     int out_bf16, int num_threads) {
    const int groups = k / GROUP;
#pragma omp parallel for num_threads(threads_for(n, k, num_threads)) schedule(static)
    for (int64_t row = 0; row < n; row++) {
        float w[GROUP];
        for (int g = 0; g < groups; g++) {
            const uint8_t *bytes = packed + row * (k / 2) + (int64_t)g * (GROUP / 2);
            const float s = scale[row * groups + g], o = offset[row * groups + g];
            for (int j = 0; j < GROUP / 2; j++) {
                w[j] = (float)(bytes[j] & 15) * s + o;
                w[j + GROUP / 2] = (float)(bytes[j] >> 4) * s + o;
            }
            const int64_t at = row * k + (int64_t)g * GROUP;
            if (out_bf16) {
                for (int j = 0; j < GROUP; j++) ((uint16_t *)out)[at + j] = f32_to_bf16(w[j]);
            } else {
                for (int j = 0; j < GROUP; j++) ((float *)out)[at + j] = w[j];
            }
        }
    }
}
