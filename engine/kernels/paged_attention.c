// Paged attention on CPU for every query token of a step, prefill chunks and decodes alike, reading
// K/V in place from the pool (no gather). Pool layout per layer: [num_blocks, block_size, 2 (k, v),
// kv_heads, dim], fp32 or bf16.
//
// The step first stores its new tokens' K/V rows into their slots, then attends: the queries are cut
// into items (a run of consecutive tokens of one sequence: a decode is an item of one); query i of an
// item at position pos0 + i attends to keys 0 .. pos0 + i of its sequence (its cached prefix and the
// causal part of its own chunk). Per item, keys are visited in chunks of one block; each chunk's
// scores for every (query, head) are computed, then the online softmax (flash attention) folds them
// in: per (query, head), acc = sum_t exp(s_t - max) v_t and total = sum_t exp(s_t - max) over the keys
// seen, rescaled once per chunk when the maximum grows. Scores come four keys at a time with q held
// in registers; each accumulator row stays in registers across a chunk's keys.
#include <omp.h>
#include <stdlib.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "vec.h"

#define MAX_TILE 16        // queries per item
#define MAX_HEADS 128
#define MAX_BLOCK 64       // tokens per block (chunk)
#define MAX_DIM 256

typedef struct {
    int tile, heads, kv_heads, group, dim, block_size;
    float scale;
} Shape;

// Four dot products of q (dim floats, dim % 8 == 0) with k0..k3, as one 4-lane result.
static inline void dot4(const float *q, const float *k0, const float *k1, const float *k2, const float *k3, int dim,
                        float *out) {
    v8 a0 = splat8(0.f), a1 = a0, a2 = a0, a3 = a0;
    for (int j = 0; j < dim; j += 8) {
        v8 qj = load8(q + j);
        a0 += qj * load8(k0 + j);
        a1 += qj * load8(k1 + j);
        a2 += qj * load8(k2 + j);
        a3 += qj * load8(k3 + j);
    }
#ifdef __AVX2__
    __m256 h01 = _mm256_hadd_ps((__m256)a0, (__m256)a1), h23 = _mm256_hadd_ps((__m256)a2, (__m256)a3);
    __m256 h = _mm256_hadd_ps(h01, h23);  // [a0 a1 a2 a3 | a0 a1 a2 a3] as halves of each sum
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
#else
    out[0] = hsum8(a0);
    out[1] = hsum8(a1);
    out[2] = hsum8(a2);
    out[3] = hsum8(a3);
#endif
}

// One item: `count` queries (fp32 [count][heads][dim]) of the sequence whose block table is `table`,
// the first at position pos0. Writes out [count][heads][dim] fp32. kbuf, vbuf: room for one chunk's
// K and V rows in fp32 (used when the cache is bf16).
static void attend_item(const Shape *sh, const float *q, int count, int64_t pos0, const void *cache, int kv_dt,
                        const int64_t *table, float *out, float *scores, float *kbuf, float *vbuf) {
    const int heads = sh->heads, dim = sh->dim, bs = sh->block_size, group = sh->group;
    const int rows = count * heads;
    const int64_t row = (int64_t)sh->kv_heads * dim;  // floats of one token's K (or V), all kv heads
    float maxs[MAX_TILE * MAX_HEADS], totals[MAX_TILE * MAX_HEADS];
    const float *krows[MAX_BLOCK + 4], *vrows[MAX_BLOCK];
    for (int r = 0; r < rows; r++) {
        maxs[r] = -INFINITY;
        totals[r] = 0.f;
    }
    memset(out, 0, sizeof(float) * (size_t)rows * dim);  // the accumulators, normalized at the end
    const int64_t last = pos0 + count;  // keys 0 .. last - 1 are seen by the item's last query
    for (int64_t chunk = 0; chunk < last; chunk += bs) {
        const int n = (int)(last - chunk < bs ? last - chunk : bs);
        const int64_t base = table[chunk / bs] * bs;  // slot of the chunk's first key
        for (int t = 0; t < n; t++) {
            const int64_t at = (base + t) * 2 * row;
            if (kv_dt == DT_F32) {
                krows[t] = (const float *)cache + at;
                vrows[t] = (const float *)cache + at + row;
            } else {
                load_row(kbuf + t * row, cache, kv_dt, at, (int)row);
                load_row(vbuf + t * row, cache, kv_dt, at + row, (int)row);
                krows[t] = kbuf + t * row;
                vrows[t] = vbuf + t * row;
            }
        }
        for (int t = n; t < n + 4; t++) krows[t] = krows[0];  // padding of the last group of four
        for (int i = 0; i < count; i++) {
            const int64_t limit = pos0 + i + 1;  // keys this query sees
            const int valid = (int)(limit - chunk >= n ? n : limit - chunk);
            if (valid <= 0) continue;
            for (int h = 0; h < heads; h++) {
                const int r = i * heads + h;
                const float *qh = q + (int64_t)r * dim;
                const int64_t kv_off = (int64_t)(h / group) * dim;
                float *s = scores;
                for (int t = 0; t < valid; t += 4)
                    dot4(qh, krows[t] + kv_off, krows[t + 1] + kv_off, krows[t + 2] + kv_off, krows[t + 3] + kv_off,
                         dim, s + t);
                float m = maxs[r];
                for (int t = 0; t < valid; t++) {
                    s[t] *= sh->scale;
                    m = s[t] > m ? s[t] : m;
                }
                float *acc = out + (int64_t)r * dim;
                if (m > maxs[r]) {  // rescale what was accumulated under the old maximum
                    const float shrink = maxs[r] == -INFINITY ? 0.f : expf(maxs[r] - m);
                    totals[r] *= shrink;
                    for (int j = 0; j < dim; j += 8) store8(acc + j, load8(acc + j) * splat8(shrink));
                    maxs[r] = m;
                }
                for (int t = 0; t < valid; t += 8) {  // past `valid`: -inf, exp 0
                    float x[8];
                    for (int u = 0; u < 8; u++) x[u] = t + u < valid ? s[t + u] - m : -INFINITY;
                    store8(s + t, exp8(load8(x)));
                }
                float sum = 0.f;
                for (int t = 0; t < valid; t++) sum += s[t];
                totals[r] += sum;
                for (int j = 0; j < dim; j += 32) {  // four vectors of the accumulator in registers at a time
                    const int w = dim - j >= 32 ? 4 : (dim - j) / 8;
                    v8 a[4];
                    for (int u = 0; u < w; u++) a[u] = load8(acc + j + 8 * u);
                    for (int t = 0; t < valid; t++) {
                        const v8 p = splat8(s[t]);
                        const float *vh = vrows[t] + kv_off + j;
                        for (int u = 0; u < w; u++) a[u] += p * load8(vh + 8 * u);
                    }
                    for (int u = 0; u < w; u++) store8(acc + j + 8 * u, a[u]);
                }
            }
        }
    }
    for (int r = 0; r < rows; r++) {
        const v8 inv = splat8(1.f / totals[r]);
        for (int j = 0; j < dim; j += 8) store8(out + (int64_t)r * dim + j, load8(out + (int64_t)r * dim + j) * inv);
    }
}

// qkv: [T rows of `row_stride` elements]: q (heads * dim) at column 0, k (kv_heads * dim) after it,
// v after that, all of type `act_dt` (RoPE already applied). slots: [T] the cache slot of each new
// token. tables: [S, table_width] block tables. Items: item_seq (row of `tables`), item_token
// (first query's row in qkv), item_count (queries), item_pos0 (first query's position).
// out: [T, heads * dim] of type `act_dt`. Returns 0, or -1 for shapes it does not take.
int paged_attention(const void *qkv, int64_t row_stride, int act_dt, int64_t num_tokens, const int64_t *slots,
                    void *cache, int kv_dt, const int64_t *tables, int table_width, const int32_t *item_seq,
                    const int32_t *item_token, const int32_t *item_count, const int64_t *item_pos0, int num_items,
                    void *out, int heads, int kv_heads, int dim, int block_size, float scale, int num_threads) {
    if (heads > MAX_HEADS || dim > MAX_DIM || dim % 8 || block_size > MAX_BLOCK || kv_heads < 1 || heads % kv_heads)
        return -1;
    for (int it = 0; it < num_items; it++)
        if (item_count[it] > MAX_TILE || item_count[it] < 1) return -1;
    const int64_t row = (int64_t)kv_heads * dim;
    const int threads = num_tokens * row >= 65536 ? num_threads : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < num_tokens; t++) {  // store the new K/V rows
        float buf[2 * MAX_HEADS * MAX_DIM];
        load_row(buf, qkv, act_dt, t * row_stride + (int64_t)heads * dim, (int)(2 * row));
        store_row(cache, kv_dt, slots[t] * 2 * row, buf, (int)(2 * row));
    }
    const Shape sh = {MAX_TILE, heads, kv_heads, heads / kv_heads, dim, block_size, scale};
    int failed = 0;
#pragma omp parallel num_threads(num_items > 1 ? num_threads : 1)
    {
        float *q = malloc(sizeof(float) * MAX_TILE * heads * dim);
        float *o = malloc(sizeof(float) * MAX_TILE * heads * dim);
        float *scores = malloc(sizeof(float) * (MAX_BLOCK + 8));
        float *kbuf = malloc(sizeof(float) * (size_t)block_size * row);
        float *vbuf = malloc(sizeof(float) * (size_t)block_size * row);
        if (!q || !o || !scores || !kbuf || !vbuf) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(dynamic, 1)
            for (int it = 0; it < num_items; it++) {
                const int count = item_count[it];
                for (int i = 0; i < count; i++)
                    load_row(q + (int64_t)i * heads * dim, qkv, act_dt, (item_token[it] + i) * row_stride, heads * dim);
                attend_item(&sh, q, count, item_pos0[it], cache, kv_dt, tables + (int64_t)item_seq[it] * table_width,
                            o, scores, kbuf, vbuf);
                for (int i = 0; i < count; i++)
                    store_row(out, act_dt, (int64_t)(item_token[it] + i) * heads * dim, o + (int64_t)i * heads * dim,
                              heads * dim);
            }
        }
        free(q);
        free(o);
        free(scores);
        free(kbuf);
        free(vbuf);
    }
    return failed ? -1 : 0;
}
