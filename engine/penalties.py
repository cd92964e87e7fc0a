"""Repetition / presence / frequency penalties (vLLM semantics), kept incrementally per sequence."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.errors import InvalidRequestError


class PenaltyState:
    """Dense per-sequence token statistics over the vocabulary.

    Invariant: `output_counts[t]` is the number of times token t was generated so far and
    `prompt_mask[t]` is True iff t occurs in the prompt. Updated in O(1) per generated token, under
    `torch.inference_mode` so the update works whichever mode created the tensors.
    """

    def __init__(self, prompt_token_ids: Sequence[int], vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.prompt_mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        if len(prompt_token_ids):
            if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab_size:
                raise InvalidRequestError(
                    f"prompt token ids must be in [0, {vocab_size}), got min {min(prompt_token_ids)} "
                    f"max {max(prompt_token_ids)}")
            ids = torch.tensor(list(prompt_token_ids), dtype=torch.long, device=device)
            self.prompt_mask[ids] = True
        # float32 so the frequency penalty needs no conversion; exact up to 2**24 repeats.
        self.output_counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)

    @torch.inference_mode()
    def append(self, token_id: int) -> None:
        self.output_counts[token_id] += 1

    @torch.inference_mode()
    def retract(self, token_id: int) -> None:
        """Undo one `append` of `token_id`."""
        self.output_counts[token_id] -= 1


def apply_penalties(logits: torch.Tensor, prompt_mask: torch.Tensor | None, output_counts: torch.Tensor,
                    repetition: torch.Tensor | None, frequency: torch.Tensor | None,
                    presence: torch.Tensor | None) -> torch.Tensor:
    """Penalized copy of `logits` [N, V] (`logits` itself when every penalty is None).

    `prompt_mask` bool [N, V] (needed with `repetition`), `output_counts` float [N, V];
    `repetition`, `frequency`, `presence` float [N], or None where no row uses that penalty.
    Repetition applies to tokens seen in the prompt or the output (positive logits are divided by
    it, others multiplied); frequency subtracts count * f and presence subtracts p for every token
    generated at least once. Neutral values (1, 0, 0) leave a row bit-identical.
    """
    out = logits
    if repetition is not None:
        assert prompt_mask is not None, "repetition penalty needs the prompt mask"
        rep = repetition.unsqueeze(1)
        seen = prompt_mask | (output_counts > 0)
        out = torch.where(seen, torch.where(out > 0, out / rep, out * rep), out)
    if frequency is not None:
        out = out - frequency.unsqueeze(1) * output_counts
    if presence is not None:
        out = out - presence.unsqueeze(1) * (output_counts > 0)
    return out
