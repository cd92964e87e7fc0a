// Paged attention on CPU for the query tokens of a step it is given (decodes and prefill chunks; the
// caller may leave long prompts to another kernel, but every new token's K/V is stored here), reading
// K/V in place from the pool (no gather). Pool layout per layer: [num_blocks, block_size, 2 (k, v),
// kv_heads, dim], fp32 or bf16.
//
// The step first stores its new tokens' K/V rows into their slots, then attends: the queries are cut
// into items (a run of consecutive tokens of one sequence: a decode is an item of one); query i of an
// item at position pos0 + i attends to keys 0 .. pos0 + i of its sequence (its cached prefix and the
// causal part of its own chunk); with a sliding window w > 0, to keys pos0 + i - w + 1 .. pos0 + i only
// (as transformers masks it). With softcap > 0 the scaled scores become softcap * tanh(score / softcap). Per item, keys are visited in chunks of whole blocks; each chunk's
// scores for every (query, head) are computed, then the online softmax (flash attention) folds them
// in: per (query, head), acc = sum_t exp(s_t - max) v_t and total = sum_t exp(s_t - max) over the keys
// seen, rescaled once per chunk when the maximum grows. The query heads of one kv group go together
// (up to HEAD_BLOCK), so each K and V vector loaded feeds all of them; accumulators stay in registers
// across a chunk's keys.
#include <omp.h>
#include <stdlib.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

#include "vec.h"

#define MAX_TILE 16        // queries per item
#define MAX_HEADS 128
#define MAX_BLOCK 64       // tokens per block
#define CHUNK_KEYS 64      // keys folded into the softmax at once (whole blocks)
#define MAX_DIM 256

typedef struct {
    int tile, heads, kv_heads, group, dim, block_size;
    float scale;
    int window;     // 0: every key up to the query's own
    float softcap;  // 0: none
} Shape;

#define HEAD_BLOCK 3  // query heads of one kv group done together: each K/V load feeds all of them

typedef struct {
    float *maxs, *totals;  // per row (query, head): running maximum and sum of exp
} Softmax;

// Lane u of the result: the sum of the 8 lanes of acc[u] (a fixed tree, whatever the keys' place).
static inline v8 sum_lanes8x8(const v8 *acc) {
#ifdef __AVX__
    __m256 t0 = _mm256_hadd_ps((__m256)acc[0], (__m256)acc[1]), t1 = _mm256_hadd_ps((__m256)acc[2], (__m256)acc[3]);
    __m256 t2 = _mm256_hadd_ps((__m256)acc[4], (__m256)acc[5]), t3 = _mm256_hadd_ps((__m256)acc[6], (__m256)acc[7]);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return (v8)_mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
#else
    v8 r;
    for (int u = 0; u < 8; u++) r[u] = hsum8(acc[u]);
    return r;
#endif
}

// Scores of one query head (q, dim floats) against keys first .. valid-1 (krows[t] + kv_off), eight
// keys at a time so that each key's dot product is reduced inside one vector (no per-key horizontal
// sum): s[t] for t from first rounded down to 8 up to valid rounded up to 8 (krows must hold that many
// rows; scores outside [first, valid) are unused). A key's score does not depend on where it starts.
static void head_scores(const float *q, const float *const *krows, int64_t kv_off, int first, int valid, int dim,
                        float scale, float *s) {
    for (int t = first & ~7; t < valid; t += 8) {
        const float *k[8];
        v8 acc[8];
        for (int u = 0; u < 8; u++) {
            k[u] = krows[t + u] + kv_off;
            acc[u] = splat8(0.f);
        }
        for (int j = 0; j < dim; j += 8) {
            const v8 qj = load8(q + j);
            _Pragma("GCC unroll 8") for (int u = 0; u < 8; u++) acc[u] += qj * load8(k[u] + j);
        }
        store8(s + t, sum_lanes8x8(acc) * splat8(scale));
    }
}

// Folds one row's scores s[first .. valid) into its running softmax: rescales the accumulator `acc`
// when the maximum grows, turns s into exp(s - max) (0 outside [first, valid)) and adds their sum to
// the total. s has room for valid rounded up to 8; first < valid.
static inline void fold_softmax(float *s, int first, int valid, float *max, float *total, float *acc, int dim) {
    float m = *max;
    for (int t = first; t < valid; t++) m = s[t] > m ? s[t] : m;
    if (m > *max) {
        const float shrink = *max == -INFINITY ? 0.f : expf(*max - m);
        *total *= shrink;
        for (int j = 0; j < dim; j += 8) store8(acc + j, load8(acc + j) * splat8(shrink));
        *max = m;
    }
    const v8i lanes = {0, 1, 2, 3, 4, 5, 6, 7};
    v8 sum = splat8(0.f);
    for (int t = first & ~7; t < valid; t += 8) {  // before `first` (out of the window) or past `valid`: exp 0
        const v8i inside = ((lanes + t) < valid) & ((lanes + t) >= first);
        const v8 e = exp8(select8(inside, load8(s + t) - splat8(m), splat8(-INFINITY)));
        store8(s + t, e);
        sum += e;
    }
    *total += hsum8(sum);
}

// acc[a] += sum_t p[a * stride + t] v_t over t in [first, valid) for NH rows, 32 floats of the head at a time held in
// registers across the chunk's keys (then 8 at a time for a rest): each V vector load feeds all NH heads.
#define DEFINE_BLOCK_VALUES(NH)                                                                              \
    static void block_values_##NH(float *const *accs, const float *p, int stride, const float *const *vrows,  \
                                  int64_t kv_off, int first, int valid, int dim) {                           \
        int j = 0;                                                                                           \
        for (; j + 32 <= dim; j += 32) {                                                                     \
            v8 acc[NH][4];                                                                                   \
            _Pragma("GCC unroll 4") for (int a = 0; a < NH; a++)                                             \
                _Pragma("GCC unroll 4") for (int u = 0; u < 4; u++) acc[a][u] = load8(accs[a] + j + 8 * u);  \
            for (int t = first; t < valid; t++) {                                                            \
                const float *vh = vrows[t] + kv_off + j;                                                     \
                const v8 v0 = load8(vh), v1 = load8(vh + 8), v2 = load8(vh + 16), v3 = load8(vh + 24);        \
                _Pragma("GCC unroll 4") for (int a = 0; a < NH; a++) {                                       \
                    const v8 pa = splat8(p[a * stride + t]);                                                 \
                    acc[a][0] += pa * v0;                                                                    \
                    acc[a][1] += pa * v1;                                                                    \
                    acc[a][2] += pa * v2;                                                                    \
                    acc[a][3] += pa * v3;                                                                    \
                }                                                                                            \
            }                                                                                                \
            _Pragma("GCC unroll 4") for (int a = 0; a < NH; a++)                                             \
                _Pragma("GCC unroll 4") for (int u = 0; u < 4; u++) store8(accs[a] + j + 8 * u, acc[a][u]);  \
        }                                                                                                    \
        for (; j < dim; j += 8) {                                                                            \
            v8 acc[NH];                                                                                      \
            _Pragma("GCC unroll 4") for (int a = 0; a < NH; a++) acc[a] = load8(accs[a] + j);                \
            for (int t = first; t < valid; t++) {                                                            \
                const v8 v = load8(vrows[t] + kv_off + j);                                                   \
                _Pragma("GCC unroll 4") for (int a = 0; a < NH; a++) acc[a] += splat8(p[a * stride + t]) * v; \
            }                                                                                                \
            _Pragma("GCC unroll 4") for (int a = 0; a < NH; a++) store8(accs[a] + j, acc[a]);                \
        }                                                                                                    \
    }

DEFINE_BLOCK_VALUES(1)
DEFINE_BLOCK_VALUES(2)
DEFINE_BLOCK_VALUES(3)

// Heads h0 .. h0+nh-1 (one kv group) of query i against keys first .. valid-1 of one chunk.
static void head_block(const Shape *sh, const float *q, int i, int h0, int nh, const float *const *krows,
                       const float *const *vrows, int first, int valid, float *out, Softmax sm, float *scores) {
    const int dim = sh->dim, stride = CHUNK_KEYS;
    const int64_t kv_off = (int64_t)(h0 / sh->group) * dim;
    const float *qs[HEAD_BLOCK];
    float *accs[HEAD_BLOCK];
    for (int a = 0; a < nh; a++) {
        const int r = i * sh->heads + h0 + a;
        qs[a] = q + (int64_t)r * dim;
        accs[a] = out + (int64_t)r * dim;
    }
    for (int a = 0; a < nh; a++)
        head_scores(qs[a], krows, kv_off, first, valid, dim, sh->scale, scores + a * stride);
    if (sh->softcap > 0.f) {
        const float cap = sh->softcap, inv = 1.f / sh->softcap;
        for (int a = 0; a < nh; a++)
            for (int t = first; t < valid; t++) scores[a * stride + t] = cap * tanhf(scores[a * stride + t] * inv);
    }
    for (int a = 0; a < nh; a++) {
        const int r = i * sh->heads + h0 + a;
        fold_softmax(scores + a * stride, first, valid, sm.maxs + r, sm.totals + r, accs[a], dim);
    }
    if (nh == 3)
        block_values_3(accs, scores, stride, vrows, kv_off, first, valid, dim);
    else if (nh == 2)
        block_values_2(accs, scores, stride, vrows, kv_off, first, valid, dim);
    else
        block_values_1(accs, scores, stride, vrows, kv_off, first, valid, dim);
}

// One item: `count` queries (fp32 [count][heads][dim]) of the sequence whose block table is `table`,
// the first at position pos0. Writes out [count][heads][dim] fp32. kbuf, vbuf: room for one chunk's
// K and V rows in fp32 (used when the cache is bf16); scores: HEAD_BLOCK * CHUNK_KEYS floats.
static void attend_item(const Shape *sh, const float *q, int count, int64_t pos0, const void *cache, int kv_dt,
                        const int64_t *table, float *out, float *scores, float *kbuf, float *vbuf) {
    const int heads = sh->heads, dim = sh->dim, bs = sh->block_size, group = sh->group;
    const int rows = count * heads;
    const int64_t row = (int64_t)sh->kv_heads * dim;  // floats of one token's K (or V), all kv heads
    float maxs[MAX_TILE * MAX_HEADS], totals[MAX_TILE * MAX_HEADS];
    const float *krows[CHUNK_KEYS + 7], *vrows[CHUNK_KEYS];
    const Softmax sm = {maxs, totals};
    for (int r = 0; r < rows; r++) {
        maxs[r] = -INFINITY;
        totals[r] = 0.f;
    }
    memset(out, 0, sizeof(float) * (size_t)rows * dim);  // the accumulators, normalized at the end
    const int64_t last = pos0 + count;  // keys 0 .. last - 1 are seen by the item's last query
    const int chunk_keys = (CHUNK_KEYS / bs) * bs;  // whole blocks per chunk
    const int window = sh->window;
    // the item's first query sees the earliest key; chunks wholly before it are skipped
    const int64_t lowest = window > 0 && pos0 + 1 - window > 0 ? pos0 + 1 - window : 0;
    for (int64_t chunk = lowest / chunk_keys * chunk_keys; chunk < last; chunk += chunk_keys) {
        const int n = (int)(last - chunk < chunk_keys ? last - chunk : chunk_keys);
        for (int t = 0; t < n; t++) {
            const int64_t key = chunk + t;
            const int64_t at = (table[key / bs] * bs + key % bs) * 2 * row;
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
        for (int t = n; t < n + 7; t++) krows[t] = krows[0];  // fill the last group of 8 (scores unused)
        for (int i = 0; i < count; i++) {
            const int64_t limit = pos0 + i + 1;  // keys this query sees: from `low` to limit - 1
            const int64_t low = window > 0 && limit - window > 0 ? limit - window : 0;
            const int valid = (int)(limit - chunk >= n ? n : limit - chunk);
            const int first = (int)(low - chunk > 0 ? low - chunk : 0);
            if (valid <= 0 || first >= valid) continue;
            for (int h0 = 0; h0 < heads; h0 += group) {  // one kv group at a time, in blocks of HEAD_BLOCK
                for (int b = 0; b < group; b += HEAD_BLOCK) {
                    const int nh = group - b < HEAD_BLOCK ? group - b : HEAD_BLOCK;
                    head_block(sh, q, i, h0 + b, nh, krows, vrows, first, valid, out, sm, scores);
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
                    void *out, int heads, int kv_heads, int dim, int block_size, float scale, int window,
                    float softcap, int num_threads) {
    if (heads > MAX_HEADS || dim > MAX_DIM || dim % 8 || block_size > MAX_BLOCK || kv_heads < 1 || heads % kv_heads ||
        window < 0 || softcap < 0.f)
        return -1;
    for (int it = 0; it < num_items; it++)
        if (item_count[it] > MAX_TILE || item_count[it] < 1) return -1;
    const int64_t row = (int64_t)kv_heads * dim;
    const int threads = num_tokens * row >= 65536 ? num_threads : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < num_tokens; t++) {  // store the new K/V rows
        float buf[2 * row];  // at most 2 * MAX_HEADS * MAX_DIM, but only what this model needs on the stack
        load_row(buf, qkv, act_dt, t * row_stride + (int64_t)heads * dim, (int)(2 * row));
        store_row(cache, kv_dt, slots[t] * 2 * row, buf, (int)(2 * row));
    }
    const Shape sh = {MAX_TILE, heads, kv_heads, heads / kv_heads, dim, block_size, scale, window, softcap};
    int failed = 0;
#pragma omp parallel num_threads(num_items > 1 ? num_threads : 1)
    {
        float *q = malloc(sizeof(float) * MAX_TILE * heads * dim);
        float *o = malloc(sizeof(float) * MAX_TILE * heads * dim);
        float *scores = malloc(sizeof(float) * HEAD_BLOCK * CHUNK_KEYS);
        float *kbuf = malloc(sizeof(float) * (size_t)CHUNK_KEYS * row);
        float *vbuf = malloc(sizeof(float) * (size_t)CHUNK_KEYS * row);
        const int ready = q && o && scores && kbuf && vbuf;
        if (!ready) {
#pragma omp atomic write
            failed = 1;
        }
        // Every thread of the team must reach the worksharing loop; one without buffers skips its items
        // (the call then fails as a whole).
#pragma omp for schedule(dynamic, 1)
        for (int it = 0; it < num_items; it++) {
            if (!ready) continue;
            const int count = item_count[it];
            for (int i = 0; i < count; i++)
                load_row(q + (int64_t)i * heads * dim, qkv, act_dt, (item_token[it] + i) * row_stride, heads * dim);
            attend_item(&sh, q, count, item_pos0[it], cache, kv_dt, tables + (int64_t)item_seq[it] * table_width,
                        o, scores, kbuf, vbuf);
            for (int i = 0; i < count; i++)
                store_row(out, act_dt, (int64_t)(item_token[it] + i) * heads * dim, o + (int64_t)i * heads * dim,
                          heads * dim);
        }
        free(q);
        free(o);
        free(scores);
        free(kbuf);
        free(vbuf);
    }
    return failed ? -1 : 0;
}
