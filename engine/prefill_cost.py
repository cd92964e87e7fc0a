"""What computing a prompt token costs on this engine, measured on its own prefill steps (for pricing a second-tier
KV load against recomputing the block, engine.kv_offload)."""

from __future__ import annotations

from engine.scheduler import SchedulerOutput

MIN_PREFILL_TOKENS = 32  # steps with fewer prompt tokens than this are decode steps: not measured
SMOOTHING = 0.2  # weight of the newest step in the moving average


class PrefillCost:
    """A moving average of seconds per token over steps that prefill (a step's whole time over all its tokens:
    decode rows batched beside a prefill are priced like prompt tokens). Written by the thread that runs the
    forward, read by any (one float)."""

    def __init__(self) -> None:
        self.seconds_per_token = 0.0  # 0: no prefill measured yet
        self._warmed_up = False  # the first prefill step pays one-time costs (buffers, caches): not measured

    def observe(self, plan: SchedulerOutput, seconds: float) -> None:
        if sum(s.num_tokens for s in plan.segments if not s.draft_token_ids) < MIN_PREFILL_TOKENS:
            return
        if not self._warmed_up:
            self._warmed_up = True
            return
        sample = seconds / plan.num_tokens
        last = self.seconds_per_token
        self.seconds_per_token = sample if last == 0.0 else (1 - SMOOTHING) * last + SMOOTHING * sample
