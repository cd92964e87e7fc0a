"""Prompt-lookup drafts: if the last n tokens appeared before, propose what followed them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def propose_ngram_drafts(token_ids: Sequence[int], num_drafts: int, ngram_max: int, ngram_min: int) -> list[int]:
    """Up to `num_drafts` tokens following the most recent earlier occurrence of the longest
    suffix n-gram (n from ngram_max down to ngram_min); [] when no suffix n-gram recurs."""
    tokens = np.asarray(token_ids, dtype=np.int64)
    total = len(tokens)
    for n in range(min(ngram_max, total - 1), ngram_min - 1, -1):
        suffix = tokens[total - n:]
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:total - 1], n)
        matches = np.flatnonzero((windows == suffix).all(axis=1))
        if len(matches):
            start = int(matches[-1]) + n
            return tokens[start:start + num_drafts].tolist()
    return []
