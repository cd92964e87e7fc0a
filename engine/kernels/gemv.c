// y = W x (+ bias) for one row x [K] and a row-major weight W [N, K], fp32 or bf16: the batch-1
// decode product, where the whole weight streams from memory once per token and nothing is reused.
// The few-row variant (the step program's small batches: a few decodes, a speculative verify) runs two
// x rows per pass over each 4-row block of W, the block staying in L1/L2 between passes, so W still
// streams from memory once; each row's y is computed exactly as the one-row kernel computes it.
// Four output rows at a time share each load of x and keep four read streams open per thread;
// threads split the output rows. Each y[n] is one row's dot product in a fixed order (vector lanes,
// then a fixed tree, then the tail, then the bias), whatever N, the thread count or the other rows.
// bf16: y is rounded to bf16 once from the fp32 sum (as torch's bf16 linear does); with AVX512-BF16
// each instruction multiplies 32 weight/x pairs exactly and adds them pairwise into 16 fp32 lanes
// (vdpbf16ps), elsewhere bf16 widens to fp32 (a 16-bit shift) and lanes of 8 accumulate.
#include <omp.h>

#include "vec.h"
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#define PARALLEL_MIN_WORK (1 << 16)  // below N * K this many, one thread beats waking the others
// One core alone keeps too few cache-line reads in flight to reach the memory's bandwidth (measured
// on an AMX Xeon: ~9 GB/s per core without, ~11 with, 20-22 GB/s on two cores): each 64-byte line
// loaded also asks for the line this many rows ahead: the next 4-row block of this thread's
// contiguous share. (Prefetches never fault, so running past W's end is harmless.)
#define PREFETCH_ROWS 4

static inline void prefetch_ahead(const void *p) { __builtin_prefetch(p, 0, 3); }

// fp32: lanes of 8.
#define F32_LANES 8
typedef v8 f32_acc;
static inline f32_acc f32_acc_zero(void) { return splat8(0.f); }
static inline f32_acc f32_step(f32_acc acc, const float *w, const float *x) { return acc + load8(w) * load8(x); }
static inline float f32_acc_sum(f32_acc acc) { return hsum8(acc); }
static inline float f32_value(float v) { return v; }
static inline float f32_result(float v) { return v; }

#if defined(__AVX512BF16__)
#define BF16_LANES 32
typedef __m512 bf16_acc;
static inline bf16_acc bf16_acc_zero(void) { return _mm512_setzero_ps(); }
static inline bf16_acc bf16_step(bf16_acc acc, const uint16_t *w, const uint16_t *x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(w), (__m512bh)_mm512_loadu_si512(x));
}
static inline float bf16_acc_sum(bf16_acc acc) { return _mm512_reduce_add_ps(acc); }
#else
#define BF16_LANES 8
typedef v8 bf16_acc;
static inline bf16_acc bf16_acc_zero(void) { return splat8(0.f); }
static inline bf16_acc bf16_step(bf16_acc acc, const uint16_t *w, const uint16_t *x) {
    return acc + load8_bf16(w) * load8_bf16(x);
}
static inline float bf16_acc_sum(bf16_acc acc) { return hsum8(acc); }
#endif
static inline float bf16_value(uint16_t v) { return bf16_to_f32(v); }
static inline uint16_t bf16_result(float v) { return f32_to_bf16(v); }

// NAME(x, w, bias, y, n, k, num_threads) over elements of type T, with P's accumulator and helpers.
#define DEFINE_GEMV(NAME, T, P, LANES)                                                                        \
    void NAME(const T *x, const T *w, const T *bias, T *y, int n, int k, int num_threads) {                  \
        const int body = k - k % LANES, line = 64 / (int)sizeof(T);                                          \
        const int threads = (int64_t)n * k >= PARALLEL_MIN_WORK ? num_threads : 1;                          \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                    \
        for (int r0 = 0; r0 < n; r0 += 4) {                                                                  \
            const int rows = n - r0 < 4 ? n - r0 : 4;                                                        \
            const T *wr[4];                                                                                  \
            P##_acc acc[4];                                                                                  \
            for (int r = 0; r < 4; r++) {                                                                    \
                wr[r] = w + (int64_t)(r < rows ? r0 + r : r0) * k; /* past the end: repeat row r0, unused */ \
                acc[r] = P##_acc_zero();                                                                     \
            }                                                                                                \
            for (int j = 0; j < body; j += LANES) {                                                          \
                if (j % line == 0) {                                                                         \
                    _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++)                                      \
                        prefetch_ahead(wr[r] + (int64_t)PREFETCH_ROWS * k + j);                              \
                }                                                                                            \
                _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++) acc[r] = P##_step(acc[r], wr[r] + j, x + j); \
            }                                                                                                \
            for (int r = 0; r < rows; r++) {                                                                 \
                float s = P##_acc_sum(acc[r]), tail = 0.f;                                                   \
                for (int j = body; j < k; j++) tail += P##_value(wr[r][j]) * P##_value(x[j]);                \
                s += tail;                                                                                   \
                y[r0 + r] = P##_result(bias != NULL ? s + P##_value(bias[r0 + r]) : s);                      \
            }                                                                                                \
        }                                                                                                    \
    }

DEFINE_GEMV(f32_gemv, float, f32, F32_LANES)
DEFINE_GEMV(bf16_gemv, uint16_t, bf16, BF16_LANES)

// NAME(x [M, K], w, bias, y [M, N], m, n, k, num_threads): DEFINE_GEMV's product for each of the m rows, two
// x rows per pass (each W vector loaded once for both); an odd last row is paired with itself and its
// duplicate discarded. Each W block's next-block prefetches are spread over the passes.
#define DEFINE_GEMM_FEW(NAME, T, P, LANES)                                                                    \
    void NAME(const T *x, const T *w, const T *bias, T *y, int m, int n, int k, int num_threads) {           \
        const int body = k - k % LANES, line = 64 / (int)sizeof(T), passes = (m + 1) / 2;                   \
        const int threads = (int64_t)n * k >= PARALLEL_MIN_WORK ? num_threads : 1;                          \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                    \
        for (int r0 = 0; r0 < n; r0 += 4) {                                                                  \
            const int rows = n - r0 < 4 ? n - r0 : 4;                                                        \
            const T *wr[4];                                                                                  \
            for (int r = 0; r < 4; r++) wr[r] = w + (int64_t)(r < rows ? r0 + r : r0) * k;                   \
            for (int pass = 0; pass < passes; pass++) {                                                      \
                const int i0 = 2 * pass, pair = m - i0 < 2 ? 1 : 2;                                          \
                const T *xs[2] = {x + (int64_t)i0 * k, x + (int64_t)(i0 + pair - 1) * k};                    \
                P##_acc acc[4][2];                                                                           \
                for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = P##_acc_zero();                          \
                for (int j = 0; j < body; j += LANES) {                                                      \
                    if (j % line == 0 && (j / line) % passes == pass) {                                      \
                        _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++)                                  \
                            prefetch_ahead(wr[r] + (int64_t)PREFETCH_ROWS * k + j);                          \
                    }                                                                                        \
                    _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++) {                                    \
                        acc[r][0] = P##_step(acc[r][0], wr[r] + j, xs[0] + j);                               \
                        acc[r][1] = P##_step(acc[r][1], wr[r] + j, xs[1] + j);                               \
                    }                                                                                        \
                }                                                                                            \
                for (int q = 0; q < pair; q++) {                                                             \
                    for (int r = 0; r < rows; r++) {                                                         \
                        float s = P##_acc_sum(acc[r][q]), tail = 0.f;                                        \
                        for (int j = body; j < k; j++) tail += P##_value(wr[r][j]) * P##_value(xs[q][j]);    \
                        s += tail;                                                                           \
                        T *out = y + (int64_t)(i0 + q) * n + r0 + r;                                         \
                        *out = P##_result(bias != NULL ? s + P##_value(bias[r0 + r]) : s);                   \
                    }                                                                                        \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
    }

DEFINE_GEMM_FEW(f32_gemm_few, float, f32, F32_LANES)
DEFINE_GEMM_FEW(bf16_gemm_few, uint16_t, bf16, BF16_LANES)
