// Paged decode attention on CPU: one query token per sequence, K/V read in place from the paged
// pool (no gather copy). Layout per layer: [num_blocks, block_size, 2 (k, v), kv_heads, head_dim].
// Each (sequence, kv head) pair is one task: its `group` query heads share every K/V read.
// Two passes over the context (scores, then weighted V) so each K and V row is read once.
// Reductions use `omp simd` (vectorized, order fixed by the compiler), no -ffast-math.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_GROUP 16
#define MAX_HEAD_DIM 256

static inline float bf16_to_f32(uint16_t x) {
    uint32_t bits = ((uint32_t)x) << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static void task(const float *q, const void *cache, int kv_is_bf16, const int64_t *table, int64_t len,
                 float *out, int kv_head, int kv_heads, int group, int dim, int block_size, float scale,
                 float *scores) {
    const int64_t token_stride = 2LL * kv_heads * dim;  // elements between consecutive slots
    float kbuf[MAX_HEAD_DIM];
    float acc[MAX_GROUP * MAX_HEAD_DIM];
    float maxs[MAX_GROUP];
    for (int g = 0; g < group; g++) maxs[g] = -INFINITY;
    for (int64_t t = 0; t < len; t++) {
        int64_t slot = table[t / block_size] * block_size + t % block_size;
        int64_t base = slot * token_stride + (int64_t)kv_head * dim;
        const float *k;
        if (kv_is_bf16) {
            const uint16_t *src = (const uint16_t *)cache + base;
            for (int i = 0; i < dim; i++) kbuf[i] = bf16_to_f32(src[i]);
            k = kbuf;
        } else {
            k = (const float *)cache + base;
        }
        for (int g = 0; g < group; g++) {
            const float *qg = q + (int64_t)g * dim;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int i = 0; i < dim; i++) s += qg[i] * k[i];
            s *= scale;
            scores[(int64_t)g * len + t] = s;
            if (s > maxs[g]) maxs[g] = s;
        }
    }
    for (int g = 0; g < group; g++) {
        float total = 0.f;
        float *sg = scores + (int64_t)g * len;
        for (int64_t t = 0; t < len; t++) {
            sg[t] = expf(sg[t] - maxs[g]);
            total += sg[t];
        }
        float inv = 1.f / total;
        for (int64_t t = 0; t < len; t++) sg[t] *= inv;
    }
    memset(acc, 0, sizeof(float) * group * dim);
    for (int64_t t = 0; t < len; t++) {
        int64_t slot = table[t / block_size] * block_size + t % block_size;
        int64_t base = slot * token_stride + (int64_t)kv_heads * dim + (int64_t)kv_head * dim;
        const float *v;
        if (kv_is_bf16) {
            const uint16_t *src = (const uint16_t *)cache + base;
            for (int i = 0; i < dim; i++) kbuf[i] = bf16_to_f32(src[i]);
            v = kbuf;
        } else {
            v = (const float *)cache + base;
        }
        for (int g = 0; g < group; g++) {
            float p = scores[(int64_t)g * len + t];
            float *a = acc + g * dim;
#pragma omp simd
            for (int i = 0; i < dim; i++) a[i] += p * v[i];
        }
    }
    memcpy(out, acc, sizeof(float) * group * dim);
}

// q, out: [batch, kv_heads * group, dim] fp32; tables: [batch, table_width]; lens: [batch].
// Returns 0, or -1 for shapes the kernel does not take (the caller falls back to torch).
int paged_decode_attention(const float *q, const void *cache, int kv_is_bf16, const int64_t *tables,
                           const int64_t *lens, float *out, int batch, int kv_heads, int group, int dim,
                           int block_size, int table_width, float scale, int num_threads) {
    if (group > MAX_GROUP || dim > MAX_HEAD_DIM) return -1;
    int64_t max_len = 0;
    for (int b = 0; b < batch; b++) max_len = lens[b] > max_len ? lens[b] : max_len;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float *scores = malloc(sizeof(float) * group * (max_len > 0 ? max_len : 1));
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for collapse(2) schedule(dynamic, 1)
            for (int b = 0; b < batch; b++) {
                for (int h = 0; h < kv_heads; h++) {
                    int64_t offset = ((int64_t)b * kv_heads + h) * group * dim;
                    task(q + offset, cache, kv_is_bf16, tables + (int64_t)b * table_width, lens[b], out + offset,
                         h, kv_heads, group, dim, block_size, scale, scores);
                }
            }
            free(scores);
        }
    }
    return failed ? -1 : 0;
}
