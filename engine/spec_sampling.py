"""Speculative sampling: drafts drawn from a draft model's distribution q, kept or replaced so that every
emitted token is distributed exactly as the target's own sampling would draw it (Leviathan et al. 2023,
Chen et al. 2023).

Draft j is kept with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection the token is drawn
from the residual max(0, p_j - q_j) (renormalized), and if every draft is kept one more token is drawn
from p_k. p_j is the target's distribution for the position after drafts[:j] under the request's
sampling params (penalties, min_tokens and logit_bias counted as if drafts[:j] were generated), as
`Sampler.distributions` gives it. Greedy rows are one-hot, so the rule keeps a draft exactly when it is
the target's pick: greedy output stays token-for-token that of plain decoding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.sampler import Sampler, SequenceSamplingState


def positional_distributions(sampler: Sampler, logits: torch.Tensor, state: SequenceSamplingState,
                             draft_token_ids: Sequence[int]) -> torch.Tensor:
    """p_j for rows j of `logits` [n, V] (n <= len(drafts) + 1): row j scored as if drafts[:j] were generated.
    The state is as it was on return."""
    rows = logits.shape[0]
    if not state.depends_on_history:
        return sampler.distributions(logits, [state] * rows)
    out = []
    appended: list[int] = []
    try:
        for j in range(rows):
            out.append(sampler.distributions(logits[j:j + 1], [state])[0])
            if j < rows - 1:
                state.append(draft_token_ids[j])
                appended.append(draft_token_ids[j])
    finally:
        state.retract(appended)
    return torch.stack(out)


@torch.inference_mode()
def verify_by_rejection(sampler: Sampler, logits: torch.Tensor, state: SequenceSamplingState,
                        draft_token_ids: Sequence[int], draft_probs: torch.Tensor) -> list[int]:
    """The tokens a verify step emits: the kept drafts, then one token drawn by the rule above.
    `logits` [k + 1, V] are the target's rows (row j scores the token after drafts[:j]); `draft_probs`
    [k, V] the distributions the drafts were drawn from."""
    k = len(draft_token_ids)
    if logits.shape[0] != k + 1 or draft_probs.shape[0] != k:
        raise ValueError(f"{k} drafts need {k + 1} logits rows and {k} draft rows, got "
                         f"{logits.shape[0]} and {draft_probs.shape[0]}")
    p = positional_distributions(sampler, logits, state, draft_token_ids)
    if state.params.is_greedy:
        best = p.argmax(dim=-1).tolist()
        kept = 0
        while kept < k and draft_token_ids[kept] == best[kept]:
            kept += 1
        return [*draft_token_ids[:kept], best[kept]]
    drafts = torch.tensor(list(draft_token_ids), dtype=torch.long, device=p.device)
    rows = torch.arange(k, device=p.device)
    p_draft = p[rows, drafts]
    q_draft = draft_probs[rows, drafts].to(torch.float32)
    uniform = sampler.uniforms(k, state)
    # keep iff u < p/q, written without the division; p == 0 is never kept (u == 0 is possible)
    keep = ((uniform * q_draft < p_draft) & (p_draft > 0)).tolist()
    kept = next((j for j, ok in enumerate(keep) if not ok), k)
    if kept == k:
        return [*draft_token_ids, sampler.draw(p[k], state)]
    residual = (p[kept] - draft_probs[kept].to(torch.float32)).clamp_(min=0.0)
    if not float(residual.sum()) > 0.0:  # p == q up to rounding: the residual is p itself
        residual = p[kept]
    return [*draft_token_ids[:kept], sampler.draw(residual, state)]
