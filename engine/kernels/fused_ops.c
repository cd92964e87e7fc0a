// Fused element-wise ops of the decoder layers, one pass each over rows of activations (fp32 or
// bf16): RMSNorm (optionally adding the residual first), SiLU(gate) * up, and RoPE on q and k in
// place. Each follows torch's eager op order and roundings (in bf16: the same intermediate casts):
// RoPE is bit-exact in fp32; RMSNorm differs only by its sum's order, SiLU by exp's last ulp.
#include <omp.h>

#include "vec.h"

#define PARALLEL_MIN_ELEMENTS 4096  // below this one thread beats waking the others

#define NO_CONTRACT __attribute__((optimize("fp-contract=off")))  // a*b - c*d rounded as torch's ops are

// out = weight * norm(x) with norm(x) = x * rsqrt(mean(x^2) + eps) computed in fp32 and cast to the
// activation type; with `residual`: residual += x first (rounded to the activation type), and the
// norm is taken of that sum. Rows of `n` elements; `out` may not alias `x` or `residual`.
// rms_norm_fp32_weight: the weight is fp32 and the product is taken in fp32 before the one cast to the
// activation type (Gemma's order: transformers' Gemma norms compute norm(x) * (1 + w) in fp32).
#if defined(__AVX512F__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define RMS_NORM_BF16_ROW 1
static inline __m512 load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
// Rounded to nearest even, NaN kept quiet: f32_to_bf16's bits, denormals included. AVX512-BF16's
// vcvtneps2bf16 gives those bits for every lane but fp32 denormals (which it flushes to zero): it serves
// vectors without one, integer rounding the rest.
static inline __m256i bf16_of16(__m512 x) {
#ifdef __AVX512BF16__
    const __m512 magnitude = _mm512_abs_ps(x);
    if (!(_mm512_cmp_ps_mask(magnitude, _mm512_set1_ps(1.17549435e-38f), _CMP_LT_OQ) &
          _mm512_cmp_ps_mask(magnitude, _mm512_setzero_ps(), _CMP_NEQ_OQ)))
        return (__m256i)_mm512_cvtneps_pbh(x);
#endif
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    const __m512i quiet = _mm512_or_si512(bits, _mm512_set1_epi32(0x400000));
    const __m512i chosen = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), quiet);
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(chosen, 16));
}
static inline __m512 widen16_bf16(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// One bf16 row of rms_norm below with AVX-512 conversions, n a multiple of 16: the same operations in the
// same order (the squares summed into 8 lanes chunk by chunk of 8, then hsum8, no fused multiply-add), so
// the same bits (tests/test_fused_ops.py checks both against one sequence of fp32 operations).
NO_CONTRACT static void rms_norm_row_bf16(const uint16_t *x, uint16_t *residual, const void *weight, uint16_t *out, int n,
                              float eps, int weight_fp32) {
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        __m512 v = load16_bf16(x + i);
        if (residual != NULL) {
            const __m256i summed = bf16_of16(_mm512_add_ps(load16_bf16(residual + i), v));
            _mm256_storeu_si256((__m256i *)(residual + i), summed);
            v = widen16_bf16(summed);
        }
        const __m256 lo = _mm512_castps512_ps256(v), hi = _mm512_extractf32x8_ps(v, 1);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(lo, lo));
        acc = _mm256_add_ps(acc, _mm256_mul_ps(hi, hi));
    }
    v8 lanes;
    memcpy(&lanes, &acc, sizeof lanes);
    const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(hsum8(lanes) / (float)n + eps));
    const uint16_t *normed = residual != NULL ? residual : x;
    for (int i = 0; i < n; i += 16) {
        const __m512 y = _mm512_mul_ps(load16_bf16(normed + i), inv);
        const __m512 product = weight_fp32 ? _mm512_mul_ps(_mm512_loadu_ps((const float *)weight + i), y)
                                           : _mm512_mul_ps(load16_bf16((const uint16_t *)weight + i), widen16_bf16(bf16_of16(y)));
        _mm256_storeu_si256((__m256i *)(out + i), bf16_of16(product));
    }
}
#else
#define RMS_NORM_BF16_ROW 0
#endif

NO_CONTRACT static void rms_norm_rows(const void *x, void *residual, const void *weight, void *out, int64_t rows,
                                      int n, float eps, int dt, int num_threads, int weight_fp32) {
    int threads = rows * n >= PARALLEL_MIN_ELEMENTS ? num_threads : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
#if RMS_NORM_BF16_ROW
        if (dt == DT_BF16 && n % 16 == 0) {
            const int64_t at = r * n;
            rms_norm_row_bf16((const uint16_t *)x + at, residual == NULL ? NULL : (uint16_t *)residual + at,
                              weight, (uint16_t *)out + at, n, eps, weight_fp32);
            continue;
        }
#endif
        float row[n], w[n];
        int64_t at = r * n;
        load_row(row, x, dt, at, n);
        if (residual != NULL) {
            float res[n];
            load_row(res, residual, dt, at, n);
            for (int i = 0; i < n; i++) row[i] = res[i] + row[i];
            store_row(residual, dt, at, row, n);
            load_row(row, residual, dt, at, n);  // the sum as stored (rounded in bf16)
        }
        v8 acc = splat8(0.f);
        int i = 0;
        for (; i + 8 <= n; i += 8) {
            v8 v = load8(row + i);
            acc += v * v;
        }
        float sum = hsum8(acc);
        for (; i < n; i++) sum += row[i] * row[i];
        float inv = 1.0f / sqrtf(sum / (float)n + eps);
        for (i = 0; i < n; i++) row[i] = row[i] * inv;
        if (dt == DT_BF16 && !weight_fp32) {
            round_row_bf16(row, n);
        }
        load_row(w, weight, weight_fp32 ? DT_F32 : dt, 0, n);
        for (i = 0; i < n; i++) row[i] = w[i] * row[i];
        store_row(out, dt, at, row, n);
    }
}

NO_CONTRACT void rms_norm(const void *x, void *residual, const void *weight, void *out, int64_t rows, int n,
                          float eps, int dt, int num_threads) {
    rms_norm_rows(x, residual, weight, out, rows, n, eps, dt, num_threads, 0);
}

NO_CONTRACT void rms_norm_fp32_weight(const void *x, void *residual, const float *weight, void *out, int64_t rows,
                                      int n, float eps, int dt, int num_threads) {
    rms_norm_rows(x, residual, weight, out, rows, n, eps, dt, num_threads, 1);
}

// out[r, :] = silu(x[r, :n]) * x[r, n:2n], silu(g) = g / (1 + exp(-g)) (cast to the activation type
// before the product, as torch's separate ops do).
void silu_mul(const void *x, void *out, int64_t rows, int n, int dt, int num_threads) {
    int threads = rows * n >= PARALLEL_MIN_ELEMENTS ? num_threads : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float gate[n], up[n];
        load_row(gate, x, dt, r * 2 * n, n);
        load_row(up, x, dt, r * 2 * n + n, n);
        int i = 0;
        for (; i + 16 <= n; i += 16) {  // 16 lanes: a whole AVX512 register where there is one
            v16 g;
            memcpy(&g, gate + i, sizeof g);
            g = g / (1.f + exp16(-g));
            memcpy(gate + i, &g, sizeof g);
        }
        for (; i + 8 <= n; i += 8) {
            v8 g = load8(gate + i);
            store8(gate + i, g / (splat8(1.f) + exp8(-g)));
        }
        for (; i < n; i++) gate[i] = gate[i] / (1.f + expf(-gate[i]));
        if (dt == DT_BF16) {
            round_row_bf16(gate, n);
        }
        for (i = 0; i < n; i++) gate[i] = gate[i] * up[i];
        store_row(out, dt, r * n, gate, n);
    }
}

// Rotary embedding (half-split / NeoX order) in place on the q and k heads of each row: row r holds
// `heads` query heads then `kv_heads` key heads of `dim` elements from `x + r * row_stride`.
// cos, sin: fp32 [max_positions, dim / 2]. Per pair: (x1 cos - x2 sin, x2 cos + x1 sin) in fp32.
NO_CONTRACT void rope(void *x, int64_t rows, int64_t row_stride, int heads, int kv_heads, int dim,
                      const int64_t *positions, const float *cos, const float *sin, int dt, int num_threads) {
    const int half = dim / 2, width = (heads + kv_heads) * dim;
    int threads = rows * width >= PARALLEL_MIN_ELEMENTS ? num_threads : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float row[width];
        load_row(row, x, dt, r * row_stride, width);
        const float *c = cos + positions[r] * half, *s = sin + positions[r] * half;
        for (int h = 0; h < heads + kv_heads; h++) {
            float *x1 = row + h * dim, *x2 = x1 + half;
            for (int i = 0; i < half; i++) {
                float a = x1[i], b = x2[i];
                float a_cos = a * c[i], b_sin = b * s[i], b_cos = b * c[i], a_sin = a * s[i];
                x1[i] = a_cos - b_sin;
                x2[i] = b_cos + a_sin;
            }
        }
        store_row(x, dt, r * row_stride, row, width);
    }
}

// 8 elements of an fp32 or bf16 row from element i, as fp32.
static inline v8 load8_dt(const void *row, int dt, int i) {
    return dt == DT_BF16 ? load8_bf16((const uint16_t *)row + i) : load8((const float *)row + i);
}

static inline float element_dt(const void *row, int dt, int i) {
    return dt == DT_BF16 ? bf16_to_f32(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}

// The largest value of row[0:n) (fp32 or bf16), NaN skipped (-inf for a row of NaN).
static float row_max(const void *row, int dt, int n) {
    v8 b0 = splat8(-INFINITY), b1 = b0, b2 = b0, b3 = b0;
    int i = 0;
    for (; i + 32 <= n; i += 32) {  // four chains: the compare-select latency, not the loads, bounds one
        v8 x0 = load8_dt(row, dt, i), x1 = load8_dt(row, dt, i + 8);
        v8 x2 = load8_dt(row, dt, i + 16), x3 = load8_dt(row, dt, i + 24);
        b0 = select8(x0 > b0, x0, b0);
        b1 = select8(x1 > b1, x1, b1);
        b2 = select8(x2 > b2, x2, b2);
        b3 = select8(x3 > b3, x3, b3);
    }
    b0 = select8(b1 > b0, b1, b0);
    b2 = select8(b3 > b2, b3, b2);
    float top = hmax8(select8(b2 > b0, b2, b0));
    for (; i < n; i++) {
        float v = element_dt(row, dt, i);
        top = v > top ? v : top;
    }
    return top;
}

// The first index of row[0:n) equal to top (0 if none).
static int64_t first_equal(const void *row, int dt, int n, float top) {
    v8 t = splat8(top);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        v8i eq = load8_dt(row, dt, i) == t;
        if (eq[0] | eq[1] | eq[2] | eq[3] | eq[4] | eq[5] | eq[6] | eq[7]) break;
    }
    for (; i < n; i++) {
        if (element_dt(row, dt, i) == top) return i;
    }
    return 0;
}

// out[r] = the first index of the largest value of row r of x [rows, n] (fp32 or bf16): torch.argmax's
// answer on rows without NaN (NaN never wins here; a row of NaN gives 0). One vector pass finds the
// largest value, a second the first place holding it (the row is still in cache).
void argmax_rows(const void *x, int64_t *out, int64_t rows, int n, int dt, int num_threads) {
    int threads = rows * n >= PARALLEL_MIN_ELEMENTS ? (rows < num_threads ? (int)rows : num_threads) : 1;
    size_t item = dt == DT_BF16 ? 2 : 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const char *row = (const char *)x + (size_t)r * n * item;
        out[r] = first_equal(row, dt, n, row_max(row, dt, n));
    }
}
