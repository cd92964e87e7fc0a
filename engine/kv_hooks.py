"""The engine's side of KV transfer: hooks a connector plugs into the step loop.

The engine knows nothing of other processes; a connector (kv_transfer.kv_push) implements
`KVStepHook` to copy the pages a step writes to another engine while the step computes.
Invariant: `wait_for_save` returns before the step's results are committed, so no block a
transfer still reads is freed or reused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from engine.outputs import RequestOutput
    from engine.scheduler import SchedulerOutput


class KVStepHook(Protocol):
    def begin_step(self, plan: SchedulerOutput) -> bool:
        """Called before the forward; returns True to be told as each layer's KV is written."""

    def layer_written(self, layer: int) -> None:
        """Layer `layer`'s K/V of every token of this step is in the pool (the device work is done)."""

    def wait_for_save(self, plan: SchedulerOutput) -> None:
        """Called after the forward, before results are committed: finish or fail every copy."""

    def step_committed(self, outputs: list[RequestOutput]) -> None:
        """Called with the step's outputs (first tokens of finished prefills among them)."""


KVStorageAllocator = Callable[[int], torch.Tensor]  # nbytes → flat uint8 tensor the pool lives in


class ObservedAttention:
    """Wraps an attention callable: after layer i's attention has written its K/V, calls `on_layer(i)`."""

    def __init__(self, attn: Callable[..., torch.Tensor], on_layer: Callable[[int], None], cuda: bool) -> None:
        self._attn = attn
        self._on_layer = on_layer
        self._cuda = cuda

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self._attn(layer, q, k, v)
        if self._cuda:  # the transfer reads the pool outside this stream: the write must have landed
            torch.cuda.current_stream().synchronize()
        self._on_layer(layer)
        return out
