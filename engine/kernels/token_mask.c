// Apply structured-output token bitmasks to fp32 logits in place.
// Row r of the batch (rows[i], i < n) is masked by bitmask row i: bit j of 32-bit word w allows
// token 32*w + j; every token of the vocabulary whose bit is 0 becomes -inf. A word of all ones
// (the common case: most tokens allowed, or none) costs one compare.
#include <math.h>
#include <stdint.h>

void apply_token_bitmask(float *logits, int64_t row_stride, const int64_t *rows, const int32_t *bitmask,
                         int64_t words_per_row, int64_t n, int64_t vocab) {
    for (int64_t i = 0; i < n; i++) {
        float *x = logits + rows[i] * row_stride;
        const uint32_t *mask = (const uint32_t *)(bitmask + i * words_per_row);
        for (int64_t w = 0; w < words_per_row && w * 32 < vocab; w++) {
            uint32_t allowed = mask[w];
            if (allowed == 0xFFFFFFFFu) continue;
            int64_t base = w * 32;
            int64_t end = vocab - base < 32 ? vocab - base : 32;
            for (int64_t j = 0; j < end; j++) {
                if (!((allowed >> j) & 1u)) x[base + j] = -INFINITY;
            }
        }
    }
}
