"""Batched token sampling from a logits tensor [B, V], one row per sequence (vLLM semantics).

Order per row: penalties, min_tokens masking of eos/stop ids, logit_bias, allowed_token_ids, the
structured-output grammar's mask, then greedy argmax or temperature -> top-k / top-p / min-p ->
sample. Logprobs come from the raw logits.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.grammar import GrammarMasker, accept, new_matcher
from engine.kernels.ops import argmax_rows
from engine.logprobs import token_logprobs
from engine.outputs import TokenLogprobs
from engine.penalties import PenaltyState, apply_penalties
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    import xgrammar

logger = logging.getLogger(__name__)
# Top-k without top-p reads the k-th largest value with `torch.topk` up to this k; beyond it (or
# with top-p) one value sort of the rows is cheaper.
_TOPK_DIRECT_MAX = 256


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None where the request did not ask for logprobs


class SequenceSamplingState:
    """Sampling state of one request; lives as long as the request.

    Invariant: `num_generated` (and the penalty counts and grammar matcher, when the params need
    them) account for exactly the tokens passed to `append`.
    """

    def __init__(self, params: SamplingParams, prompt_token_ids: Sequence[int], vocab_size: int,
                 device: torch.device, eos_token_ids: Sequence[int],
                 grammar: xgrammar.CompiledGrammar | None = None) -> None:
        self.params = params
        self.vocab_size = vocab_size
        self.num_generated = 0
        self.penalties = (PenaltyState(prompt_token_ids, vocab_size, device)
                          if params.needs_penalties else None)
        # Token ids forbidden while num_generated < min_tokens.
        self.min_tokens_blocked: tuple[int, ...] = (
            tuple(sorted(set(eos_token_ids) | set(params.stop_token_ids))) if params.min_tokens else ())
        self.generator: torch.Generator | None = None
        if params.seed is not None and not params.is_greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)
        if (params.structured is None) != (grammar is None):
            raise ValueError("a compiled grammar is needed exactly when the params ask for structured output")
        self.matcher = new_matcher(grammar) if grammar is not None else None
        self.eos_token_ids = tuple(eos_token_ids)
        self.bias_ids = self.bias_values = torch.empty(0)  # only read for rows with a logit_bias
        if params.logit_bias:
            self.bias_ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.long, device=device)
            self.bias_values = torch.tensor([b for _, b in params.logit_bias], dtype=torch.float32, device=device)
        self.forbidden: torch.Tensor | None = None  # True at every token allowed_token_ids leaves out
        if params.allowed_token_ids is not None:
            self.forbidden = torch.ones(vocab_size, dtype=torch.bool, device=device)
            self.forbidden[torch.tensor(params.allowed_token_ids, dtype=torch.long, device=device)] = False

    def would_accept(self, token_id: int) -> bool:
        """Whether the grammar (if any) allows `token_id` next; the state is left as it was."""
        return self.grammar_prefix([token_id]) == 1

    def grammar_prefix(self, token_ids: Sequence[int]) -> int:
        """How many of `token_ids`, in order, the grammar (if any) allows next; the state is left as it was."""
        if self.matcher is None:
            return len(token_ids)
        count = 0
        while count < len(token_ids) and self.matcher.accept_token(token_ids[count]):
            count += 1
        if count:
            self.matcher.rollback(count)
        return count

    def abandon_grammar(self) -> int:
        """The grammar allows no token at all (a dead end its author wrote, such as an empty
        character class): it is dropped and the sequence ends with eos (structured output rules out
        ignore_eos and min_tokens). Returns the token to sample."""
        logger.warning("a structured-output grammar reached a dead end after %d tokens: ending the "
                       "sequence with eos", self.num_generated)
        self.matcher = None
        return self.eos_token_ids[0] if self.eos_token_ids else 0

    def append(self, token_id: int) -> None:
        """Record a generated token (O(1))."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} outside vocabulary [0, {self.vocab_size})")
        if self.matcher is not None:
            accept(self.matcher, token_id)
        self.num_generated += 1
        if self.penalties is not None:
            self.penalties.append(token_id)

    def retract(self, token_ids: Sequence[int]) -> None:
        """Undo the `append` of `token_ids`, the last tokens appended (in order): speculative decoding
        appends drafts for a moment to score each position as if the drafts before it were generated."""
        if self.matcher is not None and token_ids:
            self.matcher.rollback(len(token_ids))
        self.num_generated -= len(token_ids)
        if self.penalties is not None:
            for token_id in token_ids:
                self.penalties.retract(token_id)

    @property
    def depends_on_history(self) -> bool:
        """Whether the next position's distribution depends on the tokens generated so far (penalties,
        min_tokens still blocking, a grammar)."""
        return self.penalties is not None or self.blocks_stop_tokens or self.matcher is not None

    @property
    def blocks_stop_tokens(self) -> bool:
        return self.num_generated < self.params.min_tokens and bool(self.min_tokens_blocked)

    @property
    def is_plain_greedy(self) -> bool:
        """True when the row's token is the argmax of its raw logits and nothing else is needed."""
        return (self.params.is_greedy and self.penalties is None and self.params.logprobs is None
                and not self.blocks_stop_tokens and not self.params.edits_logits)


class Sampler:
    """Picks one token per row of a logits batch. Unseeded rows share one sampler-wide generator;
    seeded rows draw only from their own, so their tokens do not depend on the rest of the batch."""

    def __init__(self, vocab_size: int, device: torch.device, seed: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.grammar_masker: GrammarMasker | None = None  # made on the first constrained batch

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, states: Sequence[SequenceSamplingState]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(states) or logits.shape[1] != self.vocab_size:
            raise ValueError(f"logits must be [{len(states)}, {self.vocab_size}], got {list(logits.shape)}")
        batch = len(states)
        if all(s.is_plain_greedy for s in states):
            return SamplerOutput(argmax_rows(logits), [None] * batch)

        x = self._processed(logits, states)
        greedy_rows = [i for i, s in enumerate(states) if s.params.is_greedy]
        random_rows = [i for i, s in enumerate(states) if not s.params.is_greedy]
        tokens = torch.empty(batch, dtype=torch.long, device=x.device)
        if greedy_rows:
            _put(tokens, greedy_rows, _take(x, greedy_rows).argmax(dim=-1))
        if random_rows:
            _put(tokens, random_rows, self._sample(_take(x, random_rows), [states[i] for i in random_rows]))
        token_ids = tokens.tolist()
        return SamplerOutput(token_ids, _logprobs(logits, token_ids, states))

    def _processed(self, logits: torch.Tensor, states: Sequence[SequenceSamplingState]) -> torch.Tensor:
        """The rows' logits after every edit the params ask for (penalties, min_tokens, logit_bias,
        allowed_token_ids, grammar), in fp32 (a copy wherever one is edited)."""
        needs_edit = any(s.penalties is not None or s.blocks_stop_tokens or s.params.edits_logits for s in states)
        x = logits.to(torch.float32, copy=needs_edit)
        self._penalize(x, states)
        self._mask_stop_tokens(x, states)
        self._bias(x, states)
        self._mask_disallowed(x, states)
        self._mask_grammar(x, states)
        self._end_dead_grammars(x, states)
        return x

    @torch.inference_mode()
    def distributions(self, logits: torch.Tensor, states: Sequence[SequenceSamplingState]) -> torch.Tensor:
        """The distribution each row's token is drawn from [B, V] fp32, as `__call__` draws it: one-hot
        at the processed argmax for greedy rows; else softmax of the processed logits / temperature,
        filtered by top-k / top-p / min-p (speculative decoding's rejection sampling reads these)."""
        x = self._processed(logits, states)
        probs = torch.zeros_like(x)
        greedy_rows = [i for i, s in enumerate(states) if s.params.is_greedy]
        random_rows = [i for i, s in enumerate(states) if not s.params.is_greedy]
        if greedy_rows:
            best = _take(x, greedy_rows).argmax(dim=-1)
            probs[_index(greedy_rows, x.device), best] = 1.0
        if random_rows:
            _put(probs, random_rows, self._filtered_probs(_take(x, random_rows), [states[i] for i in random_rows]))
        return probs

    def draw(self, probs: torch.Tensor, state: SequenceSamplingState) -> int:
        """One token from the distribution `probs` [V] (not necessarily normalized), with the request's
        own generator when seeded, else the sampler's."""
        cdf = probs.to(torch.float32).cumsum(dim=-1)
        total = cdf[-1:]
        uniform = self.uniforms(1, state)
        target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
        return int(torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1))

    def uniforms(self, count: int, state: SequenceSamplingState) -> torch.Tensor:
        """`count` draws from U[0, 1), from the request's generator when seeded, else the sampler's."""
        return torch.rand(count, generator=state.generator or self.generator, device=self.device)

    @torch.inference_mode()
    def verify_greedy_drafts(self, logits: torch.Tensor, state: SequenceSamplingState,
                             draft_token_ids: Sequence[int]) -> list[int]:
        """Greedy verification of one sequence's drafts (logits [len(drafts) + 1, V], row j scoring
        the token after drafts[:j]): the drafts that agree with each row's pick, then that row's own
        pick. With a grammar each row is masked by the grammar's state after the drafts before it, so
        the result is what plain greedy decoding under the grammar gives."""
        if state.matcher is None:
            best = logits.argmax(dim=-1).tolist()
            dead = [False] * len(best)
        else:
            x = logits.to(torch.float32, copy=True)
            if self.grammar_masker is None:
                self.grammar_masker = GrammarMasker()
            self.grammar_masker.apply_along(x, state.matcher, draft_token_ids)
            top = x.max(dim=-1)
            best, dead = top.indices.tolist(), torch.isneginf(top.values).tolist()
        accepted = 0
        while accepted < len(draft_token_ids) and draft_token_ids[accepted] == best[accepted]:
            accepted += 1
        last = state.abandon_grammar() if dead[accepted] else best[accepted]
        return [*draft_token_ids[:accepted], last]

    def _penalize(self, x: torch.Tensor, states: Sequence[SequenceSamplingState]) -> None:
        rows = [i for i, s in enumerate(states) if s.penalties is not None]
        if not rows:
            return
        tracked = [s.penalties for s in states if s.penalties is not None]
        params = [states[i].params for i in rows]
        repetition = [p.repetition_penalty for p in params]
        frequency = [p.frequency_penalty for p in params]
        presence = [p.presence_penalty for p in params]
        use_repetition = any(r != 1.0 for r in repetition)
        x[_index(rows, x.device)] = apply_penalties(
            _take(x, rows),
            torch.stack([p.prompt_mask for p in tracked]) if use_repetition else None,
            torch.stack([p.output_counts for p in tracked]),
            _floats(repetition, x.device) if use_repetition else None,
            _floats(frequency, x.device) if any(frequency) else None,
            _floats(presence, x.device) if any(presence) else None)

    def _mask_stop_tokens(self, x: torch.Tensor, states: Sequence[SequenceSamplingState]) -> None:
        rows: list[int] = []
        cols: list[int] = []
        for i, s in enumerate(states):
            if s.blocks_stop_tokens:
                rows.extend([i] * len(s.min_tokens_blocked))
                cols.extend(s.min_tokens_blocked)
        if rows:
            x[_index(rows, x.device), _index(cols, x.device)] = -math.inf

    def _bias(self, x: torch.Tensor, states: Sequence[SequenceSamplingState]) -> None:
        rows = [i for i, s in enumerate(states) if s.params.logit_bias]
        if rows:
            row_ids = torch.cat([torch.full_like(states[i].bias_ids, i) for i in rows])
            x.index_put_((row_ids, torch.cat([states[i].bias_ids for i in rows])),
                         torch.cat([states[i].bias_values for i in rows]), accumulate=True)

    def _mask_disallowed(self, x: torch.Tensor, states: Sequence[SequenceSamplingState]) -> None:
        rows = [i for i, s in enumerate(states) if s.forbidden is not None]
        if rows:
            forbidden = torch.stack([f for i in rows if (f := states[i].forbidden) is not None])
            index = _index(rows, x.device)
            x[index] = x.index_select(0, index).masked_fill_(forbidden, -math.inf)

    def _mask_grammar(self, x: torch.Tensor, states: Sequence[SequenceSamplingState]) -> None:
        matchers = [(i, s.matcher) for i, s in enumerate(states) if s.matcher is not None]
        if matchers:
            if self.grammar_masker is None:
                self.grammar_masker = GrammarMasker()
            self.grammar_masker.apply(x, [i for i, _ in matchers], [m for _, m in matchers])

    def _end_dead_grammars(self, x: torch.Tensor, states: Sequence[SequenceSamplingState]) -> None:
        """A constrained row whose every token is masked would sample garbage (argmax 0, or NaN):
        its grammar is abandoned and the row can only end the sequence."""
        rows = [i for i, s in enumerate(states) if s.matcher is not None]
        if not rows:
            return
        dead = torch.isneginf(x.index_select(0, _index(rows, x.device)).amax(dim=-1)).tolist()
        for i, is_dead in zip(rows, dead, strict=True):
            if is_dead:
                x[i, states[i].abandon_grammar()] = 0.0

    def _sample(self, x: torch.Tensor, states: Sequence[SequenceSamplingState]) -> torch.Tensor:
        """Token ids [R] sampled from rows x [R, V] by inverse CDF with one uniform per row."""
        cdf = self._filtered_probs(x, states).cumsum(dim=-1)
        total = cdf[:, -1:]
        uniform = torch.rand(len(states), generator=self.generator, device=x.device)
        for j, s in enumerate(states):
            if s.generator is not None:
                uniform[j] = torch.rand((), generator=s.generator, device=x.device)
        # target < total, so the first cdf entry above it belongs to a token of nonzero probability.
        target = torch.minimum(uniform.unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=x.shape[1] - 1)

    @staticmethod
    def _filtered_probs(x: torch.Tensor, states: Sequence[SequenceSamplingState]) -> torch.Tensor:
        """Softmax of rows x [R, V] / temperature after top-k / top-p / min-p."""
        x = x / _floats([s.params.temperature for s in states], x.device).unsqueeze(1)
        threshold = _filter_thresholds(x, [s.params for s in states])
        if threshold is not None:
            x.masked_fill_(x < threshold.unsqueeze(1), -math.inf)
        return x.softmax(dim=-1)


def _filter_thresholds(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor | None:
    """Per-row logit threshold [R] below which tokens are dropped (top-k, top-p, min-p), or None.

    Tokens tied with the threshold are kept. min-p compares probabilities to the row's largest,
    which in logit space is `max + log(min_p)`; it commutes with top-k/top-p, which keep the max.
    """
    vocab = x.shape[1]
    kp_rows = [j for j, p in enumerate(params) if 0 < p.top_k < vocab or p.top_p < 1.0]
    use_min_p = any(p.min_p > 0 for p in params)
    if not kp_rows and not use_min_p:
        return None
    if use_min_p:
        threshold = x.amax(dim=-1) + torch.log(_floats([p.min_p for p in params], x.device))
    else:
        threshold = torch.full((len(params),), -math.inf, device=x.device)
    if kp_rows:
        sub = [params[j] for j in kp_rows]
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in sub]
        top_p = [p.top_p if p.top_p < 1.0 else math.inf for p in sub]
        idx = _index(kp_rows, x.device)
        kp_threshold = _top_k_top_p_threshold(_take(x, kp_rows), top_k, top_p)
        threshold[idx] = torch.maximum(threshold[idx], kp_threshold)
    return threshold


def _top_k_top_p_threshold(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Smallest kept logit per row [N]: top-k first, then the smallest prefix of the (renormalized)
    top-k whose probability reaches top_p. top_k == V and top_p == inf mean off."""
    k = _index(top_k, x.device).unsqueeze(1)
    if all(math.isinf(p) for p in top_p) and max(top_k) <= _TOPK_DIRECT_MAX:
        return x.topk(max(top_k), dim=-1).values.gather(1, k - 1).squeeze(1)
    ranked = _sorted_descending(x)
    positions = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
    ranked.masked_fill_(positions >= k, -math.inf)
    mass = ranked.softmax(dim=-1).cumsum(dim=-1)
    # mass_before[i] = probability of the tokens ranked above i; nondecreasing, so `keep` is a prefix.
    mass_before = torch.cat([torch.zeros_like(mass[:, :1]), mass[:, :-1]], dim=1)
    keep = mass_before < _floats(top_p, x.device).unsqueeze(1)
    n_keep = torch.minimum(keep.sum(dim=-1, keepdim=True).clamp_(min=1), k)
    return ranked.gather(1, n_keep - 1).squeeze(1)


def _sorted_descending(x: torch.Tensor) -> torch.Tensor:
    """Row values sorted descending (a new tensor). On CPU, numpy's value-only sort is ~20x
    faster than `torch.sort`, which also computes indices."""
    if x.device.type == "cpu":
        return torch.from_numpy(-np.sort(-x.numpy(), axis=-1))
    return torch.sort(x, dim=-1, descending=True).values


def _logprobs(logits: torch.Tensor, token_ids: list[int],
              states: Sequence[SequenceSamplingState]) -> list[TokenLogprobs | None]:
    rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
    result: list[TokenLogprobs | None] = [None] * len(states)
    if rows:
        found = token_logprobs(_take(logits, rows), [token_ids[i] for i in rows],
                               [states[i].params.logprobs or 0 for i in rows])
        for i, lp in zip(rows, found, strict=True):
            result[i] = lp
    return result


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _floats(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def _take(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Rows of x in the given (ascending, unique) order; x itself when that is every row."""
    return x if len(rows) == x.shape[0] else x[_index(rows, x.device)]


def _put(out: torch.Tensor, rows: list[int], values: torch.Tensor) -> None:
    out[_index(rows, out.device)] = values
