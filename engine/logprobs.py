"""Logprobs of given tokens from rows of logits: the one computation behind sampled-token and
prompt logprobs (both from the raw logits, in fp32)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from engine.outputs import TokenLogprobs

# Rows log-softmaxed at once: bounds the fp32 copy of a long prompt's logits to this many rows.
PROMPT_ROWS_PER_CHUNK = 128


def token_logprobs(logits: torch.Tensor, token_ids: Sequence[int], num_top: Sequence[int]) -> list[TokenLogprobs]:
    """Row i's logprob of token_ids[i] and its num_top[i] most likely (token, logprob), best first."""
    lp = logits.float().log_softmax(dim=-1)
    index = torch.tensor(list(token_ids), dtype=torch.long, device=lp.device).unsqueeze(1)
    chosen = lp.gather(1, index).squeeze(1).tolist()
    top_values: list[list[float]] = [[] for _ in token_ids]
    top_ids: list[list[int]] = [[] for _ in token_ids]
    if max(num_top, default=0):
        values, ids = lp.topk(max(num_top), dim=-1)
        top_values, top_ids = values.tolist(), ids.tolist()
    return [TokenLogprobs(token, logprob, tuple(zip(ids[:n], values[:n], strict=True)))
            for token, logprob, ids, values, n in zip(token_ids, chosen, top_ids, top_values, num_top, strict=True)]


def prompt_row_chunks(rows: int) -> list[tuple[int, int]]:
    """The (start, stop) runs of `rows` prompt rows whose logits are computed at once (the memory they take)."""
    return [(start, min(start + PROMPT_ROWS_PER_CHUNK, rows)) for start in range(0, rows, PROMPT_ROWS_PER_CHUNK)]


def prompt_token_logprobs(hidden: torch.Tensor, next_token_ids: Sequence[int], num_top: int,
                          compute_logits: Callable[[torch.Tensor], torch.Tensor]) -> list[TokenLogprobs]:
    """For each row of `hidden` (one prompt position), the logprob of the prompt token after it,
    `PROMPT_ROWS_PER_CHUNK` rows of logits at a time."""
    result: list[TokenLogprobs] = []
    for start, stop in prompt_row_chunks(hidden.shape[0]):
        result += token_logprobs(compute_logits(hidden[start:stop]), next_token_ids[start:stop],
                                 [num_top] * (stop - start))
    return result
