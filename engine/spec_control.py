"""When to speculate with a draft model, and how far: each step picks the k in 0..max_k (0: off) that the
measured numbers predict to give the most tokens per second.

Model, per step with `n` decoding sequences of which `b` may speculate:
- off: n tokens in T(n), the target's forward over n rows;
- k drafts: (n - b) + b * E(k) tokens in k * D(b) + T(n + b * k), where D(r) is a draft forward over r
  rows and E(k) = (1 - a^(k + 1)) / (1 - a) the expected tokens per sequence at per-draft acceptance a.
T and D are moving averages of measured forwards by row count (half-octave buckets, interpolated between
measured ones; beyond the largest, proportional to rows: pessimistic). What the two leave out (the
draft's catch-up rows, drawing the drafts, bookkeeping) is measured too: each speculative step's whole
time over the model's prediction for it, a moving factor per bucket of b that scales later predictions.
a is the per-position acceptance: kept drafts over the positions tested (the kept ones, plus the first
rejected one of each sequence; drafts after a rejection are never tested), both sums decayed by
`_ACCEPTANCE_DECAY` per step, so that one step of few positions moves it little.

Exploring: what is not measured yet is measured by running the option that needs it, at once while at most
`SMALL_BATCH` sequences decode (a speculative step costs little there). Larger batches trust the pessimistic
estimates, and while speculation is predicted to lose it is tried again after 64, 128, ... 4096 steps off (16 at most
while the batch is small), on at most `PROBE_SEQUENCES` sequences: a changed acceptance or load is noticed
at a bounded cost (with a draft of its own pool a probe also makes those sequences' draft KV catch up
with their whole context).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

_EMA = 0.2  # weight of a new measurement
_FIRST_RETRY, _LAST_RETRY = 64, 4096  # steps off before speculation is tried again (doubling)
_SMALL_BATCH_RETRY = 16
_ACCEPTANCE_DECAY = 0.9
SMALL_BATCH = 8
PROBE_SEQUENCES = 2


class CostTable:
    """Seconds of a forward by row count: a moving average per half-octave bucket. `grows_with_rows`: beyond the
    largest bucket measured a value grows in proportion to rows (seconds), else stays that bucket's (a factor)."""

    def __init__(self, grows_with_rows: bool = True) -> None:
        self.seconds: dict[int, float] = {}
        self.grows_with_rows = grows_with_rows

    @staticmethod
    def bucket(rows: int) -> int:
        return round(2 * math.log2(max(rows, 1)))

    def observe(self, rows: int, seconds: float) -> None:
        b = self.bucket(rows)
        old = self.seconds.get(b)
        self.seconds[b] = seconds if old is None else (1 - _EMA) * old + _EMA * seconds

    def knows(self, rows: int) -> bool:
        return self.bucket(rows) in self.seconds

    def estimate(self, rows: int) -> float | None:
        """Seconds for `rows` rows: the bucket's average, else linear between the nearest measured buckets
        (beyond the largest, proportional to rows); None before any measurement."""
        b = self.bucket(rows)
        if b in self.seconds:
            return self.seconds[b]
        lower = max((k for k in self.seconds if k < b), default=None)
        upper = min((k for k in self.seconds if k > b), default=None)
        if lower is None and upper is None:
            return None
        if upper is None:
            assert lower is not None
            return self.seconds[lower] * (2 ** ((b - lower) / 2) if self.grows_with_rows else 1.0)
        if lower is None:
            return self.seconds[upper]  # costs grow with rows: an upper bound
        t = (b - lower) / (upper - lower)
        return (1 - t) * self.seconds[lower] + t * self.seconds[upper]


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a sequence gains from one verify step of k drafts (the kept drafts plus one)."""
    if acceptance >= 1.0:
        return k + 1.0
    return (1 - acceptance ** (k + 1)) / (1 - acceptance)


@dataclass(frozen=True)
class Decision:
    k: int  # drafts per sequence this step; 0: no speculation
    predicted_gain: float  # predicted tokens/s with k over without (1.0 while exploring or off)
    exploring: bool
    max_sequences: int | None = None  # speculate on at most this many sequences (a probe); None: every eligible


class SpeculationControl:
    def __init__(self, max_k: int, adaptive: bool) -> None:
        self.max_k = max_k
        self.adaptive = adaptive
        self.target = CostTable()
        self.draft = CostTable()
        self.acceptance: float | None = None
        self._kept = self._tested = 0.0  # decayed sums behind `acceptance`
        # by b: a speculative step's measured seconds over the model's prediction (a factor, not seconds)
        self.overhead = CostTable(grows_with_rows=False)
        self.steps_off = 0
        self.retry_after = _FIRST_RETRY
        self.last = Decision(max_k, 1.0, True)
        self.token_budget: int | None = None

    # -- measurements ------------------------------------------------------------------------------------
    def observe_target(self, rows: int, seconds: float) -> None:
        """A target forward of only decoding sequences (no prefill chunk): `rows` rows, drafts included."""
        self.target.observe(rows, seconds)

    def observe_draft(self, rows: int, seconds: float) -> None:
        self.draft.observe(rows, seconds)

    def observe_acceptance(self, tested: int, accepted: int) -> None:
        """`accepted` drafts kept of `tested` positions (the kept ones plus one per sequence that had a rejection)."""
        if tested:
            self._kept = _ACCEPTANCE_DECAY * self._kept + accepted
            self._tested = _ACCEPTANCE_DECAY * self._tested + tested
            self.acceptance = self._kept / self._tested

    def observe_step(self, n: int, b: int, k: int, seconds: float) -> None:
        """A whole speculative step (drafting and the verify forward) of `b` of `n` decoding sequences, k drafts."""
        predicted = self._model_seconds(n, b, k)
        if predicted is not None and predicted > 0:
            self.overhead.observe(b, seconds / predicted)

    # -- the decision ------------------------------------------------------------------------------------
    def decide(self, num_decoding: int, num_eligible: int, token_budget: int | None = None) -> Decision:
        """`token_budget`: the step's tokens; k drafts go to at most (budget - n) // k sequences (`drafting`)."""
        self.token_budget = token_budget
        self.last = self._decide(num_decoding, num_eligible)
        if self.last.k == 0:
            self.steps_off += 1
        else:
            self.steps_off = 0
            if not self.last.exploring:
                self.retry_after = _FIRST_RETRY
        return self.last

    def _decide(self, n: int, b: int) -> Decision:
        if b == 0:
            return Decision(0, 1.0, False)
        if not self.adaptive:
            return Decision(self.max_k, 1.0, False)
        if not self.target.knows(n):
            return Decision(0, 1.0, True)
        verify_measured = any(bucket > CostTable.bucket(n) for bucket in self.target.seconds)
        unknown = self.acceptance is None or not self.draft.seconds or not verify_measured
        if unknown and n <= SMALL_BATCH:
            return Decision(self.max_k, 1.0, True)
        best_k, gain = 0, 1.0
        if self.acceptance is not None and self.draft.seconds:
            off_rate = n / max(self._target(n), 1e-9)
            for k in range(1, self.max_k + 1):
                drafting = self.drafting(n, b, k)
                if drafting == 0:
                    break
                seconds = self._model_seconds(n, drafting, k)
                assert seconds is not None
                seconds *= self.overhead.estimate(drafting) or 1.0
                rate = ((n - drafting) + drafting * expected_tokens(self.acceptance, k)) / max(seconds, 1e-9)
                if rate / off_rate > gain:
                    best_k, gain = k, rate / off_rate
        small = n <= SMALL_BATCH
        if best_k == 0 and self.steps_off >= (min(self.retry_after, _SMALL_BATCH_RETRY) if small else self.retry_after):
            if not small:  # a small batch's cheap probes leave a large batch's back-off alone
                self.retry_after = min(2 * self.retry_after, _LAST_RETRY)
            return Decision(self.max_k, 1.0, True, PROBE_SEQUENCES)
        return Decision(best_k, gain, False)

    def drafting(self, n: int, b: int, k: int) -> int:
        """Sequences that get k drafts: every decoding sequence's row and the drafts fit the step's token budget
        (beyond it the scheduler would drop drafts, or leave the last-ranked sequences out)."""
        return b if self.token_budget is None else max(min(b, (self.token_budget - n) // k), 0)

    def _model_seconds(self, n: int, b: int, k: int) -> float | None:
        """k draft forwards over b rows and the verify forward over n + b * k rows (None: nothing measured)."""
        draft, target = self.draft.estimate(b), self.target.estimate(n + b * k)
        return None if draft is None or target is None else k * draft + target

    def _target(self, rows: int) -> float:
        seconds = self.target.estimate(rows)
        assert seconds is not None
        return seconds
