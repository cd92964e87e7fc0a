// Prefill attention in bf16 on AMX tiles (flash attention: scores and the weighted sum of V as tile
// matmuls, the online softmax in fp32 vectors) for the sequences of a step that feed many tokens.
//
// A sequence's new tokens are consecutive rows of the step's [q | k | v] projection (bf16, `row_stride`
// elements apart, q heads x dim first) at positions start .. start + count - 1; its K/V, the cached prefix
// and the new rows alike, are read from the KV pool (one layer: [blocks][block_size][2][kv_heads][dim],
// bf16), where the paged kernel stored the step's rows before, through its block table. Query position p
// attends to keys 0 .. p (with a sliding window w > 0, keys p - w + 1 .. p, as transformers masks it).
// The output rows are written as bf16, `out_stride` apart.
//
// First every (sequence, kv head)'s visible K and V are packed into the layouts a tile matmul takes as
// its right operand (pairs of bf16 along the reduced dimension, zero-padded to whole chunks); then each
// work item (sequence, query head, 16 query rows) walks its visible keys in chunks of 64:
//   S = Q K^T (fp32 tiles), masked and scaled; running max m, P = exp(S - m) rounded to bf16, the sum
//   of P in fp32 (as torch's CPU flash kernel orders it); O = O * exp(m_old - m_new) + P V.
// and writes O / sum. Causal work is skipped chunk by chunk (torch's kernel computes every key of a
// 512-key block, visible or not).
//
// Without AMX (or built with TANDEM_PORTABLE_C, for the tests) the same algorithm runs with each tile
// operation done in plain C (a tile dot product adds each pair's products into the fp32 accumulator;
// AMX's internal order of those sums may differ in the last bits), slowly: the engine uses this kernel
// only where `flash_prefill_uses_amx()` (AMX compiled in and tile data granted by the OS), the tests
// call it everywhere.
#include <omp.h>
#include <stdlib.h>
#include <string.h>
// TANDEM_PORTABLE_C (the tests' second build): no AMX, no AVX-512 intrinsics, every step in plain C
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && !defined(TANDEM_PORTABLE_C)
#define USE_AVX512 1
#else
#define USE_AVX512 0
#endif
#if USE_AVX512 || defined(__AMX_TILE__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && !defined(TANDEM_PORTABLE_C)
#include <sys/syscall.h>
#include <unistd.h>
#define HAVE_AMX 1
#else
#define HAVE_AMX 0
#endif

#include "vec.h"

#define ROWS 16       // query rows per work item: one tile's rows
#define CHUNK 64      // keys per softmax step: four 16-key score tiles, two 32-key P tiles
#define MAX_DIM 128   // head dims of 32, 64, 96 or 128: up to four Q tiles

typedef struct {
    int heads, kv_heads, group, dim, window;
    int64_t row_stride, out_stride;
    float scale;
} Shape;

// ---- tile operations: AMX, or the same arithmetic in C --------------------------------------------
// Tiles used (each 16 rows x 64 bytes): 0 accumulator, 1 right operand, 2..5 Q, 6..7 P.
#if HAVE_AMX
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

static int amx_granted = -1;  // the process asked the kernel for tile data once (Linux: per process)

static int amx_permission(void) {
    if (amx_granted < 0) amx_granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18) == 0;
    return amx_granted;
}

static void tiles_begin(void) {
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
}
static void tiles_end(void) { _tile_release(); }
typedef int Tiles;  // the tile registers themselves
// The intrinsics are asm without a memory clobber: the barriers keep the buffers' stores before a
// tile load and their loads after a tile store.
#define BARRIER() __asm__ volatile("" ::: "memory")
#define TILE_ZERO(T, t) _tile_zero(t)
#define TILE_LOAD(T, t, p, stride) do { BARRIER(); _tile_loadd(t, p, stride); } while (0)
#define TILE_STORE(T, t, p, stride) do { _tile_stored(t, p, stride); BARRIER(); } while (0)
#define TILE_DP(T, c, a, b) _tile_dpbf16ps(c, a, b)
#else
typedef struct {
    uint8_t reg[8][ROWS * 64];
} Tiles;
static void tiles_begin(void) {}
static void tiles_end(void) {}
static void tile_load(Tiles *T, int t, const void *p, int64_t stride) {
    for (int r = 0; r < ROWS; r++) memcpy(T->reg[t] + r * 64, (const uint8_t *)p + r * stride, 64);
}
static void tile_store(Tiles *T, int t, void *p, int64_t stride) {
    for (int r = 0; r < ROWS; r++) memcpy((uint8_t *)p + r * stride, T->reg[t] + r * 64, 64);
}
// C[m][n] += sum over pairs k of A[m][2k] B[k][n][0] + A[m][2k+1] B[k][n][1] (fp32 C, bf16 A and B)
static void tile_dp(Tiles *T, int c, int a, int b) {
    float *C = (float *)T->reg[c];
    const uint16_t *A = (const uint16_t *)T->reg[a], *B = (const uint16_t *)T->reg[b];
    for (int m = 0; m < ROWS; m++)
        for (int k = 0; k < 16; k++) {
            float a0 = bf16_to_f32(A[m * 32 + 2 * k]), a1 = bf16_to_f32(A[m * 32 + 2 * k + 1]);
            for (int n = 0; n < 16; n++)
                C[m * 16 + n] += a0 * bf16_to_f32(B[k * 32 + 2 * n]) + a1 * bf16_to_f32(B[k * 32 + 2 * n + 1]);
        }
}
#define TILE_ZERO(T, t) memset((T)->reg[t], 0, ROWS * 64)
#define TILE_LOAD(T, t, p, stride) tile_load(T, t, p, stride)
#define TILE_STORE(T, t, p, stride) tile_store(T, t, p, stride)
#define TILE_DP(T, c, a, b) tile_dp(T, c, a, b)
#endif

// AMX names tile registers by literal numbers: OP(t, j) for Q tile j (dims 32j .. 32j + 31) in register t.
#define FOR_Q_TILES(n, OP)       \
    do {                         \
        OP(2, 0);                \
        if ((n) > 1) OP(3, 1);   \
        if ((n) > 2) OP(4, 2);   \
        if ((n) > 3) OP(5, 3);   \
    } while (0)

// ---- packing ----------------------------------------------------------------------------------------
// Where one sequence's K or V rows of one kv head lie in the pool: key t's row is at
// base + (table[t / block_size] * block_size + t % block_size) * token_stride.
typedef struct {
    const uint16_t *base;  // the layer's pool, offset to K or V of the kv head
    const int64_t *table;  // the sequence's block table
    int block_size;
    int64_t token_stride;  // 2 * kv_heads * dim
} Rows;

static inline const uint16_t *row_of(const Rows *r, int t) {
    return r->base + (r->table[t / r->block_size] * r->block_size + t % r->block_size) * r->token_stride;
}

// Keys first .. first + padded - 1 of K, per 16-key block: [dim / 2 pairs][16 keys][2]: the right operand
// of S = Q K^T for dims 32j .. 32j + 31 is the block's pairs 16j .. 16j + 15 (64 bytes a row). Keys from
// n on are zeros.
static void pack_k(const Rows *k, int first, int n, int padded, int dim, uint16_t *dst) {
    for (int b = 0; b < padded / 16; b++) {
        uint32_t *blk = (uint32_t *)(dst + (int64_t)b * 16 * dim);  // a pair of bf16 is one 32-bit lane
        const int t0 = first + b * 16, keys = n - t0 < 0 ? 0 : (n - t0 < 16 ? n - t0 : 16);
#if USE_AVX512
        // 16 keys of one pool block are token_stride apart: one gather per pair of dims
        if (keys > 0 && t0 / k->block_size == (t0 + keys - 1) / k->block_size) {
            const __m512i offsets = _mm512_mullo_epi32(
                _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                _mm512_set1_epi32((int)k->token_stride));  // in bf16
            const __mmask16 live = (__mmask16)((1u << keys) - 1u);
            const uint16_t *base = row_of(k, t0);
            for (int p = 0; p < dim / 2; p++)
                _mm512_storeu_si512(blk + p * 16, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, offsets,
                                                                              base + 2 * p, 2));
            continue;
        }
#endif
        for (int key = 0; key < 16; key++) {
            const uint16_t *row = key < keys ? row_of(k, t0 + key) : NULL;
            for (int p = 0; p < dim / 2; p++) {
                uint32_t pair = 0;
                if (row != NULL) memcpy(&pair, row + 2 * p, sizeof pair);
                blk[p * 16 + key] = pair;
            }
        }
    }
}

// Keys first .. first + padded - 1 of V, per 32-key block and 16-dim block: [16 key pairs][16 dims][2]:
// the right operand of O += P V for those keys and dims. Keys from n on are zeros.
static void pack_v(const Rows *v, int first, int n, int padded, int dim, uint16_t *dst) {
    static const uint16_t zeros[MAX_DIM];
    for (int b = 0; b < padded / 32; b++)
        for (int p = 0; p < 16; p++) {
            const int t = first + b * 32 + 2 * p;
            const uint16_t *even = t < n ? row_of(v, t) : zeros, *odd = t + 1 < n ? row_of(v, t + 1) : zeros;
            for (int d = 0; d < dim / 16; d++) {
                uint16_t *row = dst + (int64_t)b * 32 * dim + d * 512 + p * 32;
#if USE_AVX512
                const __m512i index = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                                       39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
                const __m512i lo = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(even + d * 16)));
                const __m512i hi = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(odd + d * 16)));
                _mm512_storeu_si512(row, _mm512_permutex2var_epi16(lo, index, hi));
#else
                for (int c = 0; c < 16; c++) {
                    row[c * 2] = even[d * 16 + c];
                    row[c * 2 + 1] = odd[d * 16 + c];
                }
#endif
            }
        }
}

// ---- one work item ----------------------------------------------------------------------------------
static inline void store16_bf16(uint16_t *p, v16 x) {  // rounded to nearest even, as torch casts
#if USE_AVX512
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh((__m512)x));
    return;
#endif
    v8 lo, hi;
    memcpy(&lo, &x, sizeof lo);
    memcpy(&hi, (const char *)&x + sizeof lo, sizeof hi);
    store8_bf16(p, lo);
    store8_bf16(p + 8, hi);
}

// Folds one query row's scores of a chunk (keys c .. c + 16 ktiles - 1; those outside lo .. pos masked)
// into its running max and sum: P = exp(scale S - max) as bf16 (0 past the scores, up to CHUNK), the
// sum of P in fp32 before rounding, kept in 16 lanes (`sum`: lane l adds the keys at l mod 16) and
// added up once at the end. Returns the factor the row's O must be multiplied by (1: none).
#if USE_AVX512
// exp(x) for x <= 0 (an fp32 score minus the row's max): x = n ln2 + r with n = round(x / ln2), exp(r)
// by Cephes' degree-6 polynomial, times 2^n by scalef (0 below the fp32 range, no clamps needed).
static inline __m512 exp_nonpositive16(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(y, n);
}

static inline float fold_row(const float *srow, int c, int ktiles, int pos, int lo, float scale, float *max,
                             float *sum, uint16_t *prow) {
    __m512 s[CHUNK / 16];
    __mmask16 visible[CHUNK / 16];
    __m512 top = _mm512_set1_ps(-INFINITY);
    const __m512 vscale = _mm512_set1_ps(scale);
    const int whole = c >= lo && c + 16 * ktiles - 1 <= pos;  // every key of the chunk visible
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int t = 0; t < ktiles; t++) {
        if (whole) {
            visible[t] = 0xffff;
        } else {
            const __m512i key = _mm512_add_epi32(lane, _mm512_set1_epi32(c + 16 * t));
            visible[t] = _mm512_cmple_epi32_mask(key, _mm512_set1_epi32(pos)) &
                         _mm512_cmpge_epi32_mask(key, _mm512_set1_epi32(lo));
        }
        s[t] = _mm512_mul_ps(_mm512_loadu_ps(srow + 16 * t), vscale);
        top = _mm512_mask_max_ps(top, visible[t], top, s[t]);
    }
    const float chunk_max = _mm512_reduce_max_ps(top), old = *max;
    const float m_new = chunk_max > old ? chunk_max : old;
    if (m_new == -INFINITY) {  // nothing visible yet (a padded row): P = 0, O stays 0
        memset(prow, 0, sizeof(uint16_t) * CHUNK);
        return 1.f;
    }
    const __m512 shift = _mm512_set1_ps(m_new);
    const float alpha = old == -INFINITY ? 0.f : (old == m_new ? 1.f : expf(old - m_new));
    __m512 total = _mm512_mul_ps(_mm512_loadu_ps(sum), _mm512_set1_ps(alpha));
    for (int t = 0; t < ktiles; t++) {
        const __m512 p = _mm512_maskz_mov_ps(visible[t], exp_nonpositive16(_mm512_sub_ps(s[t], shift)));
        total = _mm512_add_ps(total, p);
        _mm256_storeu_si256((__m256i *)(prow + 16 * t), (__m256i)_mm512_cvtneps_pbh(p));
    }
    memset(prow + 16 * ktiles, 0, sizeof(uint16_t) * (CHUNK - 16 * ktiles));
    _mm512_storeu_ps(sum, total);
    *max = m_new;
    return alpha;
}
#else
static inline float fold_row(const float *srow, int c, int ktiles, int pos, int lo, float scale, float *max,
                             float *sum, uint16_t *prow) {
    const v16i lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    v16 s[CHUNK / 16];
    float top = -INFINITY;
    for (int t = 0; t < ktiles; t++) {
        v16 x;
        memcpy(&x, srow + 16 * t, sizeof x);
        v16i key = lane + (c + 16 * t);
        v16i visible = (key <= pos) & (key >= lo);
        s[t] = VSELECT(v16, v16i, visible, x * scale, (v16){} - INFINITY);
        for (int l = 0; l < 16; l++) top = s[t][l] > top ? s[t][l] : top;
    }
    const float old = *max, m_new = top > old ? top : old;
    if (m_new == -INFINITY) {  // nothing visible yet (a padded row): P = 0, O stays 0
        memset(prow, 0, sizeof(uint16_t) * CHUNK);
        return 1.f;
    }
    const float alpha = old == -INFINITY ? 0.f : (old == m_new ? 1.f : expf(old - m_new));
    v16 total;
    memcpy(&total, sum, sizeof total);
    total *= alpha;
    for (int t = 0; t < ktiles; t++) {
        v16 p = exp16(s[t] - m_new);
        total += p;
        store16_bf16(prow + 16 * t, p);
    }
    memset(prow + 16 * ktiles, 0, sizeof(uint16_t) * (CHUNK - 16 * ktiles));
    memcpy(sum, &total, sizeof total);
    *max = m_new;
    return alpha;
}
#endif

// Query rows r0 .. r0 + rows - 1 of one sequence (its first row at q, at position start) for query head
// h; kp and vp hold its keys from kbase on.
static void attend_rows(Tiles *T, const Shape *sh, const uint16_t *q, int start, int r0, int rows, int kbase,
                        const uint16_t *kp, const uint16_t *vp, int h, uint16_t *out) {
    const int dim = sh->dim, qtiles = dim / 32;
    float S[ROWS * CHUNK], O[ROWS * MAX_DIM], maxs[ROWS], sums[ROWS * 16];
    uint16_t P[ROWS * CHUNK], qpad[ROWS * MAX_DIM];
    const uint16_t *qrows = q + (int64_t)r0 * sh->row_stride + h * dim;
    int64_t qstride = sh->row_stride * 2;
    if (rows < ROWS) {  // the last rows of a prompt: zero-padded, so no tile reads past the step
        memset(qpad, 0, sizeof qpad);
        for (int i = 0; i < rows; i++) memcpy(qpad + i * dim, qrows + i * sh->row_stride, dim * 2);
        qrows = qpad;
        qstride = dim * 2;
    }
#define LOAD_Q(t, j) TILE_LOAD(T, t, qrows + 32 * (j), qstride)
    FOR_Q_TILES(qtiles, LOAD_Q);
    for (int i = 0; i < ROWS; i++) maxs[i] = -INFINITY;
    memset(sums, 0, sizeof sums);
    const int end = start + r0 + rows;  // keys visible to some row of the item: first .. end - 1
    int first = sh->window > 0 ? start + r0 - sh->window + 1 : 0;
    if (first < 0) first = 0;
    for (int c = first & ~(CHUNK - 1), fresh = 1; c < end; c += CHUNK, fresh = 0) {  // O is garbage until fresh's P V
        const int keys = end - c < CHUNK ? end - c : CHUNK, ktiles = (keys + 15) / 16, ptiles = (keys + 31) / 32;
        for (int t = 0; t < ktiles; t++) {  // S[:, 16t ..] = Q K[c + 16t ..]^T
            const uint16_t *kb = kp + (int64_t)((c - kbase) / 16 + t) * 16 * dim;
            TILE_ZERO(T, 0);
#define SCORE_Q(t, j)                                  \
    do {                                               \
        TILE_LOAD(T, 1, kb + (j) * 16 * 32, 64);       \
        TILE_DP(T, 0, t, 1);                           \
    } while (0)
            FOR_Q_TILES(qtiles, SCORE_Q);
            TILE_STORE(T, 0, S + 16 * t, CHUNK * 4);
        }
        for (int i = 0; i < ROWS; i++) {
            const int pos = start + r0 + i, lo = sh->window > 0 ? pos - sh->window + 1 : 0;
            const float alpha = fold_row(S + i * CHUNK, c, ktiles, pos, lo, sh->scale, maxs + i, sums + 16 * i, P + i * CHUNK);
            if (alpha != 1.f && !fresh) {
                float *o = O + i * dim;
                for (int d = 0; d < dim; d += 16) {
                    v16 x;
                    memcpy(&x, o + d, sizeof x);
                    x *= alpha;
                    memcpy(o + d, &x, sizeof x);
                }
            }
        }
        TILE_LOAD(T, 6, P, CHUNK * 2);
        if (ptiles > 1) TILE_LOAD(T, 7, P + 32, CHUNK * 2);
        for (int d = 0; d < dim / 16; d++) {  // O[:, 16d ..] += P V[c .., 16d ..]
            const uint16_t *vb = vp + (int64_t)((c - kbase) / 32) * 32 * dim + d * 512;
            if (fresh) {
                TILE_ZERO(T, 0);
            } else {
                TILE_LOAD(T, 0, O + 16 * d, dim * 4);
            }
            TILE_LOAD(T, 1, vb, 64);
            TILE_DP(T, 0, 6, 1);
            if (ptiles > 1) {
                TILE_LOAD(T, 1, vb + 32 * dim, 64);
                TILE_DP(T, 0, 7, 1);
            }
            TILE_STORE(T, 0, O + 16 * d, dim * 4);
        }
    }
    for (int i = 0; i < rows; i++) {
        float total = 0.f;
        for (int l = 0; l < 16; l++) total += sums[16 * i + l];
        const float inv = 1.f / total;
        uint16_t *dst = out + (int64_t)(r0 + i) * sh->out_stride + h * dim;
        for (int d = 0; d < dim; d += 16) {
            v16 x;
            memcpy(&x, O + i * dim + d, sizeof x);
            store16_bf16(dst + d, x * inv);
        }
    }
}

// ---- entry points -----------------------------------------------------------------------------------
// 1 where the tile operations run on AMX (the OS granted tile data), else 0 (the C emulation).
int flash_prefill_uses_amx(void) {
#if HAVE_AMX
    return amx_permission();
#else
    return 0;
#endif
}

// The first key any query of a sequence can see, rounded down to a chunk: where its packed keys begin.
static inline int first_packed_key(int64_t start, int window) {
    const int64_t first = window > 0 && start - window + 1 > 0 ? start - window + 1 : 0;
    return (int)(first & ~(int64_t)(CHUNK - 1));
}

// The keys packed for a sequence from first_packed_key on: up to its last position, padded to whole chunks.
static inline int padded_keys(int64_t start, int count, int window) {
    return (int)((start + count - first_packed_key(start, window) + CHUNK - 1) / CHUNK * CHUNK);
}

// The bf16 elements of packed K/V that flash_prefill needs for these sequences (its `scratch`): with
// window 0 the most any window needs.
int64_t flash_prefill_scratch(const int32_t *count, const int64_t *start, int num_seqs, int kv_heads, int dim,
                              int window) {
    int64_t total = 0;
    for (int s = 0; s < num_seqs; s++) {
        total += 2 * (int64_t)padded_keys(start[s], count[s], window) * kv_heads * dim;
    }
    return total;
}

// Attends `num_seqs` sequences: sequence s feeds rows first[s] .. first[s] + count[s] - 1 of qkv (and of
// out) at positions start[s] ..; its block table is row seq[s] of `tables` (table_width entries each),
// over the layer's pool `cache`, which holds every key up to its last position. The packed K/V go to
// `scratch` (at least flash_prefill_scratch elements; a step's layers share one), or
// to memory of its own where it is NULL. Returns 0, or -1 for shapes it does not take (dim not
// 32/64/96/128, heads not a multiple of kv_heads), -2 when memory for the packed K/V cannot be had,
// -3 where AMX is compiled in but refused.
int flash_prefill(const uint16_t *qkv, int64_t row_stride, const int32_t *first, const int32_t *count,
                  const int64_t *start, const int32_t *seq, int num_seqs, const uint16_t *cache,
                  const int64_t *tables, int table_width, int block_size, uint16_t *out, int64_t out_stride,
                  int heads, int kv_heads, int dim, float scale, int window, uint16_t *scratch,
                  int num_threads) {
    if (dim % 32 != 0 || dim > MAX_DIM || kv_heads <= 0 || heads % kv_heads != 0) return -1;
#if HAVE_AMX
    if (!amx_permission()) return -3;
#endif
    const Shape sh = {heads, kv_heads, heads / kv_heads, dim, window, row_stride, out_stride, scale};
    int64_t *packed_at = malloc(sizeof(int64_t) * (num_seqs + 1));  // element offset of sequence s's K/V
    int64_t *items_at = malloc(sizeof(int64_t) * (num_seqs + 1));   // first work item of sequence s
    if (packed_at == NULL || items_at == NULL) {
        free(packed_at);
        free(items_at);
        return -2;
    }
    packed_at[0] = items_at[0] = 0;
    for (int s = 0; s < num_seqs; s++) {
        packed_at[s + 1] = packed_at[s] + 2 * (int64_t)padded_keys(start[s], count[s], window) * kv_heads * dim;
        items_at[s + 1] = items_at[s] + (int64_t)heads * ((count[s] + ROWS - 1) / ROWS);
    }
    uint16_t *owned = scratch != NULL ? NULL : aligned_alloc(64, (size_t)(packed_at[num_seqs] * 2 + 64) / 64 * 64);
    uint16_t *packed = scratch != NULL ? scratch : owned;
    if (packed == NULL) {
        free(packed_at);
        free(items_at);
        return -2;
    }
    const int pack_jobs = num_seqs * kv_heads;
    const int64_t token_stride = 2 * (int64_t)kv_heads * dim;
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(dynamic, 1)
        for (int job = 0; job < pack_jobs; job++) {
            const int s = job / kv_heads, g = job % kv_heads;
            const int n = (int)(start[s] + count[s]), kbase = first_packed_key(start[s], window);
            const int padded = padded_keys(start[s], count[s], window);
            const int64_t *table = tables + (int64_t)seq[s] * table_width;
            const Rows k = {cache + (int64_t)g * dim, table, block_size, token_stride};
            const Rows v = {cache + (int64_t)(kv_heads + g) * dim, table, block_size, token_stride};
            uint16_t *kp = packed + packed_at[s] + (int64_t)2 * g * padded * dim;
            pack_k(&k, kbase, n, padded, dim, kp);
            pack_v(&v, kbase, n, padded, dim, kp + (int64_t)padded * dim);
        }
        Tiles tiles;
        tiles_begin();
        // the last query blocks of a sequence see the most keys: hand them out first
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items_at[num_seqs]; item++) {
            int s = 0;
            while (items_at[s + 1] <= item) s++;
            const int blocks = (count[s] + ROWS - 1) / ROWS;
            const int64_t local = item - items_at[s];
            const int block = blocks - 1 - (int)(local / heads), h = (int)(local % heads);
            const int kbase = first_packed_key(start[s], window), padded = padded_keys(start[s], count[s], window);
            const int g = h / sh.group;
            const uint16_t *kp = packed + packed_at[s] + (int64_t)2 * g * padded * dim;
            const int r0 = block * ROWS;
            attend_rows(&tiles, &sh, qkv + (int64_t)first[s] * row_stride, (int)start[s], r0,
                        count[s] - r0 < ROWS ? count[s] - r0 : ROWS, kbase, kp, kp + (int64_t)padded * dim, h,
                        out + (int64_t)first[s] * out_stride);
        }
        tiles_end();
        (void)tiles;
    }
    free(owned);
    free(packed_at);
    free(items_at);
    return 0;
}
