// Copy n byte ranges: dst[dst_off[i] .. +len[i]) <- src[src_off[i] .. +len[i]).
// Ranges are cut into pieces of at most PIECE bytes so that even one large range spreads over
// all threads. Callers guarantee that destination ranges do not overlap.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PIECE ((int64_t)1 << 20)

void copy_ranges(uint8_t *dst, const uint8_t *src, const int64_t *dst_off, const int64_t *src_off,
                 const int64_t *len, int64_t n, int num_threads) {
    // first_piece[i] = index of range i's first piece; first_piece[n] = number of pieces.
    int64_t *first_piece = malloc((size_t)(n + 1) * sizeof(int64_t));
    if (first_piece == NULL) {
        for (int64_t i = 0; i < n; i++) memcpy(dst + dst_off[i], src + src_off[i], (size_t)len[i]);
        return;
    }
    first_piece[0] = 0;
    for (int64_t i = 0; i < n; i++) first_piece[i + 1] = first_piece[i] + (len[i] + PIECE - 1) / PIECE;
    int64_t total = first_piece[n];
    #pragma omp parallel for schedule(dynamic, 8) num_threads(num_threads)
    for (int64_t p = 0; p < total; p++) {
        int64_t lo = 0, hi = n - 1;  // the range i with first_piece[i] <= p < first_piece[i + 1]
        while (lo < hi) {
            int64_t mid = (lo + hi + 1) / 2;
            if (first_piece[mid] <= p) lo = mid; else hi = mid - 1;
        }
        int64_t start = (p - first_piece[lo]) * PIECE;
        int64_t k = len[lo] - start < PIECE ? len[lo] - start : PIECE;
        memcpy(dst + dst_off[lo] + start, src + src_off[lo] + start, (size_t)k);
    }
    free(first_piece);
}
