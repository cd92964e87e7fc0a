// A decoder's step of a few tokens (one decode, a few decodes, a speculative verify) as a list of kernel
// calls run from C: the CPU's counterpart of a CUDA graph. Python builds the list once (engine/step_program.py); each step it fills a StepContext and
// makes one call here instead of ~10 calls per layer through torch and ctypes, whose overhead
// (~10-30 us a call once the weights streaming through have evicted the interpreter's own data)
// was a fifth of a batch-1 step. The kernels are the very functions the eager path calls, reached
// through pointers taken from their own libraries, on the same buffers in the same order: the
// results are bit for bit those of the eager path for one token; with more, every row is computed as
// it would be alone (linears through gemm_few, gemv's per-row twin), where the eager path's oneDNN
// product rounds otherwise.
#include <stdint.h>

typedef void (*rms_norm_fn)(const void *x, void *residual, const void *weight, void *out, int64_t rows, int n,
                            float eps, int dt, int num_threads);
typedef void (*silu_mul_fn)(const void *x, void *out, int64_t rows, int n, int dt, int num_threads);
typedef void (*rope_fn)(void *x, int64_t rows, int64_t row_stride, int heads, int kv_heads, int dim,
                        const int64_t *positions, const float *cos, const float *sin, int dt, int num_threads);
typedef int (*attention_fn)(const void *qkv, int64_t row_stride, int act_dt, int64_t num_tokens, const int64_t *slots,
                            void *cache, int kv_dt, const int64_t *tables, int table_width, const int32_t *item_seq,
                            const int32_t *item_token, const int32_t *item_count, const int64_t *item_pos0,
                            int num_items, void *out, int heads, int kv_heads, int dim, int block_size, float scale,
                            int window, float softcap, int num_threads);
typedef int (*int4_fn)(const void *x, const void *packed, const float *scale, const float *offset, void *y,
                       int64_t rows, int n, int k, int dt, int num_threads);
typedef int (*int8_fn)(const void *x, const void *q, const float *scale, void *y, int64_t rows, int n, int k, int dt,
                       int num_threads);
typedef void (*gemv_fn)(const void *x, const void *w, const void *bias, void *y, int n, int k, int num_threads);
typedef void (*gemm_few_fn)(const void *x, const void *w, const void *bias, void *y, int m, int n, int k,
                            int num_threads);

// The kernels, from their libraries (engine/kernels/__init__.py), and what every step shares.
typedef struct {
    rms_norm_fn rms_norm;
    silu_mul_fn silu_mul;
    rope_fn rope;
    attention_fn attention;
    int4_fn int4_linear;
    int8_fn int8_linear;
    gemv_fn gemv;  // of the activations' dtype (f32_gemv or bf16_gemv)
    gemm_few_fn gemm_few;  // its few-row twin
    int32_t dt, kv_dt;  // DT_F32 / DT_BF16 of the activations and of the KV cache
    int32_t heads, kv_heads, head_dim, block_size;
    int64_t qkv_stride;  // elements per row of the q|k|v buffer
    float scale, softcap;
    const float *cos, *sin;  // RoPE tables, fp32 [max_positions, head_dim / 2]
} Model;

// What changes from step to step: the tokens' count and positions and the attention plan (CpuAttentionPlan).
typedef struct {
    const int64_t *positions, *slots, *tables, *item_pos0;
    const int32_t *item_seq, *item_token, *item_count;
    int32_t table_width, num_items, num_threads, rows;
} StepContext;

enum OpKind { OP_RMS_NORM = 0, OP_ROPE = 1, OP_ATTENTION = 2, OP_SILU_MUL = 3, OP_GEMV = 4, OP_INT4 = 5, OP_INT8 = 6 };

// One kernel call. in/out: activation buffers; w: its weights (rms_norm: weight; gemv: W, bias;
// int4: nibbles, scale, offset; int8: q, scale); aux: rms_norm's residual (NULL: none) or
// attention's KV cache of this layer; n, k: a linear's out and in features, a norm's or silu_mul's
// width; window: attention's sliding window (0: none); eps: the norm's.
typedef struct {
    int32_t kind, unused;
    const void *in;
    void *out;
    const void *w[3];
    void *aux;
    int64_t n, k, window;
    float eps, unused2;
} Op;

// Runs ops[0 .. count) for s->rows tokens (activation buffers hold that many rows); 0, or the 1-based index of the op that failed (a kernel that
// refused its input or found no memory), after which the outputs are undefined.
int run_step(const Model *m, const StepContext *s, const Op *ops, int count) {
    const int threads = s->num_threads, rows = s->rows;
    for (int i = 0; i < count; i++) {
        const Op *op = &ops[i];
        int status = 0;
        switch (op->kind) {
            case OP_RMS_NORM:
                m->rms_norm(op->in, op->aux, op->w[0], op->out, rows, (int)op->n, op->eps, m->dt, threads);
                break;
            case OP_ROPE:
                m->rope(op->out, rows, m->qkv_stride, m->heads, m->kv_heads, m->head_dim, s->positions, m->cos, m->sin,
                        m->dt, threads);
                break;
            case OP_ATTENTION:
                status = m->attention(op->in, m->qkv_stride, m->dt, rows, s->slots, op->aux, m->kv_dt, s->tables,
                                      s->table_width, s->item_seq, s->item_token, s->item_count, s->item_pos0,
                                      s->num_items, op->out, m->heads, m->kv_heads, m->head_dim, m->block_size,
                                      m->scale, (int)op->window, m->softcap, threads);
                break;
            case OP_SILU_MUL: m->silu_mul(op->in, op->out, rows, (int)op->n, m->dt, threads); break;
            case OP_GEMV:
                if (rows == 1) m->gemv(op->in, op->w[0], op->w[1], op->out, (int)op->n, (int)op->k, threads);
                else m->gemm_few(op->in, op->w[0], op->w[1], op->out, rows, (int)op->n, (int)op->k, threads);
                break;
            case OP_INT4:
                status = m->int4_linear(op->in, op->w[0], op->w[1], op->w[2], op->out, rows, (int)op->n, (int)op->k, m->dt,
                                        threads);
                break;
            case OP_INT8:
                status = m->int8_linear(op->in, op->w[0], op->w[1], op->out, rows, (int)op->n, (int)op->k, m->dt,
                                        threads);
                break;
            default: status = -1;
        }
        if (status != 0) return i + 1;
    }
    return 0;
}
