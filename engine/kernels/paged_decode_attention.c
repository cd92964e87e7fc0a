// Paged decode attention on CPU: one query token per sequence, K/V read in place from the paged
// pool (no gather copy). Layout per layer: [num_blocks, block_size, 2 (k, v), kv_heads, head_dim].
// Each sequence is one task; the query heads of a kv group share every K/V read.
// Vectorized with GCC vector extensions (8 floats; AVX2 or wider), in a fixed summation order.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_HEADS 128
#define MAX_KV_ROW 8192  // floats in one token's K (or V) row: kv_heads * head_dim

static inline float bf16_to_f32(uint16_t x) {
    uint32_t bits = ((uint32_t)x) << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float *p) {
    v8 x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline float hsum8(v8 x) {
    return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
}

// Row `which` (0 = k, 1 = v) of token t, all kv heads, as fp32 (converted into `buf` for bf16).
static inline const float *kv_row(const void *cache, int kv_is_bf16, const int64_t *table, int64_t t,
                                  int which, int kv_heads, int dim, int block_size, float *buf) {
    int64_t slot = table[t / block_size] * block_size + t % block_size;
    int64_t row = (int64_t)kv_heads * dim, base = (slot * 2 + which) * row;
    if (!kv_is_bf16) return (const float *)cache + base;
    const uint16_t *src = (const uint16_t *)cache + base;
    for (int64_t i = 0; i < row; i++) buf[i] = bf16_to_f32(src[i]);
    return buf;
}

// One sequence, one pass (online softmax): each token's K and V rows (adjacent in the pool) are
// read together once; consecutive tokens of a block are adjacent. Per head h the invariant is
// acc_h = sum_t exp(s_t - max_h) v_t and total_h = sum_t exp(s_t - max_h) over the tokens seen.
static void sequence(const float *q, const void *cache, int kv_is_bf16, const int64_t *table, int64_t len,
                     float *out, int kv_heads, int group, int dim, int block_size, float scale, v8 *acc) {
    const int lanes = dim / 8, heads = kv_heads * group;
    float kbuf[MAX_KV_ROW], vbuf[MAX_KV_ROW];
    float maxs[MAX_HEADS], totals[MAX_HEADS];
    for (int j = 0; j < heads * lanes; j++) acc[j] = (v8){0};
    for (int h = 0; h < heads; h++) {
        maxs[h] = -INFINITY;
        totals[h] = 0.f;
    }
    for (int64_t t = 0; t < len; t++) {
        const float *k = kv_row(cache, kv_is_bf16, table, t, 0, kv_heads, dim, block_size, kbuf);
        const float *v = kv_row(cache, kv_is_bf16, table, t, 1, kv_heads, dim, block_size, vbuf);
        for (int h = 0; h < heads; h++) {
            const float *kh = k + (h / group) * dim, *qh = q + (int64_t)h * dim, *vh = v + (h / group) * dim;
            v8 dot = {0};
            for (int j = 0; j < lanes; j++) dot += load8(qh + j * 8) * load8(kh + j * 8);
            float s = hsum8(dot) * scale;
            v8 *a = acc + h * lanes;
            if (s > maxs[h]) {  // rescale what was accumulated under the old maximum
                float shrink = expf(maxs[h] - s);
                totals[h] *= shrink;
                for (int j = 0; j < lanes; j++) a[j] *= shrink;
                maxs[h] = s;
            }
            float p = expf(s - maxs[h]);
            totals[h] += p;
            for (int j = 0; j < lanes; j++) a[j] += p * load8(vh + j * 8);
        }
    }
    for (int h = 0; h < heads; h++) {
        float inv = 1.f / totals[h];
        for (int j = 0; j < lanes; j++) acc[h * lanes + j] *= inv;
    }
    memcpy(out, acc, sizeof(float) * heads * dim);
}

// q, out: [batch, kv_heads * group, dim] fp32; tables: [batch, table_width]; lens: [batch].
// Returns 0, or -1 for shapes the kernel does not take (the caller falls back to torch).
int paged_decode_attention(const float *q, const void *cache, int kv_is_bf16, const int64_t *tables,
                           const int64_t *lens, float *out, int batch, int kv_heads, int group, int dim,
                           int block_size, int table_width, float scale, int num_threads) {
    const int heads = kv_heads * group;
    if (heads > MAX_HEADS || 2 * kv_heads * dim > MAX_KV_ROW || dim % 8) return -1;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        v8 *acc = aligned_alloc(32, sizeof(v8) * heads * (dim / 8));
        if (acc == NULL) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(dynamic, 1)
            for (int b = 0; b < batch; b++) {
                int64_t offset = (int64_t)b * heads * dim;
                sequence(q + offset, cache, kv_is_bf16, tables + (int64_t)b * table_width, lens[b], out + offset,
                         kv_heads, group, dim, block_size, scale, acc);
            }
        }
        free(acc);
    }
    return failed ? -1 : 0;
}
