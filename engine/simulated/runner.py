"""The simulated model: a step takes the profile's time for its shape, and the model's next token is a
deterministic function of the context (its length and last two tokens), given as logits with all their
mass on that token. The real sampler reads those logits, so temperature, seeds, penalties, logit_bias,
grammars and logprobs behave as they would on a model that is certain of its next token.

The simulated model never picks an end-of-sequence token: a request runs to its max_tokens (or a stop
string, or the context length). A prefill worker's KV hook is told of each layer in turn over the step's
time, so the real push path moves the (token-sized, engine.simulated.parts) pages layer by layer.

The KV transfer's time is modelled, then waited on the real control path: when a KV hook watches the step
(a prefill worker's kv_transfer.kv_push.KVPusher) and the profile models the link, the step is held until
the real model's pages would have landed (SimulationProfile.kv_push_seconds, for the blocks the pusher sends
this step at the real KVCacheSpec's bytes). The real pusher's WRITEs of the placeholder pages go out at each
layer's modelled end as before; the engine calls the hook's `wait_for_save` and commits the step (and the
pusher sends the final note that makes the decode worker's sequence ready, with the first token) only after
`execute` returns, as a real prefill worker does once its pushes are done. So the decode side's first token
is late by what the link could not hide behind the compute, and the prefill worker's next step waits too."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

import torch

from engine.kv_cache import KVCacheSpec
from engine.kv_hooks import LayerObserver
from engine.logprobs import prompt_token_logprobs
from engine.model_runner import SequenceResult
from engine.sampler import Sampler
from engine.scheduler import ScheduledSequence, SchedulerOutput
from engine.simulated.profile import SimulationProfile

# the chosen token's logit over every other's 0: at temperature 2 the rest of a 152k vocabulary holds ~1e-8
CERTAINTY = 60.0


def simulated_next_token(length: int, last: int, previous: int, vocab_size: int, avoid: Collection[int]) -> int:
    """The simulated model's choice after a context of `length` tokens ending in `previous`, `last`: an id
    below `vocab_size` (the tokenizer's: ids past it would decode to nothing) and not in `avoid`."""
    x = (length * 0x9E3779B1 + last * 0x85EBCA77 + previous * 0xC2B2AE3D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
    x ^= x >> 12
    token = x % vocab_size
    while token in avoid:
        token = (token + 1) % vocab_size
    return token


def simulated_continuation(token_ids: list[int], count: int, vocab_size: int, avoid: Collection[int]) -> list[int]:
    """The `count` tokens the simulated model picks greedily after `token_ids` (what tests expect)."""
    tokens = list(token_ids)
    for _ in range(count):
        tokens.append(simulated_next_token(len(tokens), tokens[-1], tokens[-2] if len(tokens) > 1 else 0,
                                           vocab_size, avoid))
    return tokens[len(token_ids):]


class SimulatedRunner:
    """Stands where engine.model_runner.ModelRunner stands (the engine calls `execute` and sets
    `layer_observer`)."""

    def __init__(self, profile: SimulationProfile, sampler: Sampler, num_layers: int, choices: int,
                 avoid: Collection[int], clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, real_kv: KVCacheSpec | None = None) -> None:
        """`choices`: the model picks ids below it (the tokenizer's vocabulary) and never one in `avoid` (the
        end-of-sequence and other special ids). `real_kv`: the simulated model's real KV layout (its block size
        is the pool's), whose bytes a KV push would move; None: pushes take no modelled time."""
        self.profile = profile
        self.sampler = sampler
        self.vocab_size = profile.model.vocab_size
        self.choices = choices
        self.num_layers = num_layers
        self.avoid = frozenset(avoid)
        self.layer_observer: LayerObserver | None = None
        self.clock, self.sleep = clock, sleep  # replaceable: a test drives the runner on its own clock
        self.real_kv = real_kv

    def continuation(self, token_ids: list[int], count: int) -> list[int]:
        """The `count` tokens this model picks greedily after `token_ids`."""
        return simulated_continuation(token_ids, count, self.choices, self.avoid)

    def step_seconds(self, out: SchedulerOutput) -> float:
        context = sum(item.start + item.num_tokens for item in out.decodes)
        # a chunk of n new tokens after `start` cached ones: token i attends to start + i positions
        pairs = sum(item.num_tokens * item.start + item.num_tokens * (item.num_tokens + 1) // 2
                    for item in out.segments)
        return self.profile.step_seconds(sum(item.num_tokens for item in out.segments), len(out.decodes), context,
                                         pairs)

    def pushed_layer_bytes(self, out: SchedulerOutput) -> int:
        """Bytes of one layer of the real KV a push hook sends for this step, as kv_transfer.kv_push.KVPusher
        picks blocks: for each sequence, from the block holding its first new token (re-sent when partial) to
        the one holding its last, and from block 0 on its first chunk (a prefix cached here is sent too), no
        further than the prompt's blocks (what the decode side reserved: a token decoded here is not sent).
        Not modelled: a sequence the pusher has no target for (every one has, on a prefill worker)."""
        if self.real_kv is None:
            return 0
        size = self.real_kv.block_size
        blocks = 0
        for item in out.scheduled:
            end = min(item.start + item.num_tokens - len(item.draft_token_ids), item.seq.num_prompt_tokens)
            first = 0 if item.start <= item.seq.num_cached_tokens else item.start // size
            blocks += max(-(-end // size) - first, 0)
        return blocks * size * self.real_kv.bytes_per_token_per_layer

    def execute(self, out: SchedulerOutput) -> dict[str, SequenceResult]:
        started = self.clock()
        seconds = self.step_seconds(out)
        if any(item.draft_token_ids for item in out.scheduled):
            raise ValueError("a simulated engine verifies no drafts (speculation is refused with simulate)")
        results = self._sample([item for item in out.scheduled if item.samples])
        for item in out.scheduled:
            if item.seq.needs_prompt_logits:
                self._add_prompt_logprobs(results, item)
        observer = self.layer_observer
        for layer in range(self.num_layers if observer is not None else 0):
            self._wait_until(started + seconds * (layer + 1) / self.num_layers)
            observer(layer, None)  # type: ignore[misc]  # checked above; a layer's pages are "written" now
        if observer is not None:  # a push hook watches: the step ends when the real KV would have landed
            seconds = self.profile.kv_push_seconds(seconds, self.num_layers, self.pushed_layer_bytes(out))
        self._wait_until(started + seconds)
        return results

    def _wait_until(self, moment: float) -> None:
        left = moment - self.clock()
        if left > 0:
            self.sleep(left)

    def _choice(self, tokens: list[int], length: int) -> int:
        """The simulated model's next token after the first `length` of `tokens`."""
        return simulated_next_token(length, tokens[length - 1], tokens[length - 2] if length > 1 else 0,
                                    self.choices, self.avoid)

    def logits(self, chosen: torch.Tensor) -> torch.Tensor:
        """`[rows, vocab]` fp32 logits with the mass of row i on token chosen[i]."""
        rows = torch.zeros((chosen.shape[0], self.vocab_size), dtype=torch.float32)
        return rows.scatter_(1, chosen.view(-1, 1), CERTAINTY)

    def _sample(self, items: list[ScheduledSequence]) -> dict[str, SequenceResult]:
        if not items:
            return {}
        chosen = [self._choice(item.seq.token_ids, item.start + item.num_tokens) for item in items]
        sampled = self.sampler(self.logits(torch.tensor(chosen)), [item.seq.sampling_state for item in items])
        return {item.seq.request_id: SequenceResult([token], [lp])
                for item, token, lp in zip(items, sampled.token_ids, sampled.logprobs, strict=True)}

    def _add_prompt_logprobs(self, results: dict[str, SequenceResult], item: ScheduledSequence) -> None:
        """Row p of the chunk scores prompt token p + 1 (engine.model_runner's convention)."""
        seq = item.seq
        count = min(item.start + item.num_tokens, seq.num_prompt_tokens - 1) - item.start
        if count <= 0:
            return
        chosen = torch.tensor([self._choice(seq.token_ids, p + 1) for p in range(item.start, item.start + count)])
        found = prompt_token_logprobs(chosen, seq.prompt_token_ids[item.start + 1:item.start + 1 + count],
                                      seq.params.prompt_logprobs or 0, self.logits)
        sampled = results.get(seq.request_id, SequenceResult([], []))
        results[seq.request_id] = SequenceResult(sampled.token_ids, sampled.logprobs, tuple(found), item.start + 1)
