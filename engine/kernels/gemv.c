// y = W x (+ bias) for one fp32 row x [K] and a row-major fp32 weight W [N, K]: the batch-1 decode
// product, where the whole weight streams from memory once per token and nothing is reused. Four
// output rows at a time share each load of x and keep four read streams open per thread; threads
// split the output rows. Each y[n] is one row's dot product in a fixed order (lanes of 8, then a
// fixed tree), whatever N, the thread count or the other rows.
#include <omp.h>

#include "vec.h"

#define PARALLEL_MIN_WORK (1 << 16)  // below N * K this many, one thread beats waking the others

static inline float dot_tail(const float *w, const float *x, int from, int k) {
    float s = 0.f;
    for (int j = from; j < k; j++) s += w[j] * x[j];
    return s;
}

void f32_gemv(const float *x, const float *w, const float *bias, float *y, int n, int k, int num_threads) {
    const int body = k - k % 8;
    const int threads = (int64_t)n * k >= PARALLEL_MIN_WORK ? num_threads : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int r0 = 0; r0 < n; r0 += 4) {
        const int rows = n - r0 < 4 ? n - r0 : 4;
        const float *wr[4];
        v8 acc[4];
        for (int r = 0; r < 4; r++) {
            wr[r] = w + (int64_t)(r < rows ? r0 + r : r0) * k;  // past the end: repeat row r0, unused
            acc[r] = splat8(0.f);
        }
        for (int j = 0; j < body; j += 8) {
            const v8 xj = load8(x + j);
            _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++) acc[r] += load8(wr[r] + j) * xj;
        }
        for (int r = 0; r < rows; r++) {
            const float s = hsum8(acc[r]) + dot_tail(wr[r], x, body, k);
            y[r0 + r] = bias != NULL ? s + bias[r0 + r] : s;
        }
    }
}
