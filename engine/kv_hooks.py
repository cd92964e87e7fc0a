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


class LayerReady(Protocol):
    """A layer's writes queued on a device (a CUDA event recorded after them)."""

    def synchronize(self) -> None:
        """Return once they have landed."""


# told as each layer's KV is written: (layer, None) once it is in the pool (CPU), or (layer, ready) once its
# writes are queued on the device, to be waited on before anything reads the pool outside the device's stream
LayerObserver = Callable[[int, LayerReady | None], None]


class KVStepHook(Protocol):
    def begin_step(self, plan: SchedulerOutput) -> bool:
        """Called before the forward; returns True to be told as each layer's KV is written."""

    def layer_written(self, layer: int, ready: LayerReady | None = None) -> None:
        """Layer `layer`'s K/V of every token of this step is in the pool, or (`ready` given) queued on the device:
        whatever reads them waits on `ready` first, off the engine's thread."""

    def wait_for_save(self, plan: SchedulerOutput) -> None:
        """Called after the forward, before results are committed: finish or fail every copy."""

    def step_committed(self, outputs: list[RequestOutput]) -> None:
        """Called with the step's outputs (first tokens of finished prefills among them)."""


KVStorageAllocator = Callable[[int], torch.Tensor]  # nbytes → flat uint8 tensor the pool lives in


class ObservedAttention:
    """Wraps an attention callable: after layer i's attention has written its K/V, calls `on_layer(i, ready)`, where
    `ready` is what `record` (on a device) recorded after those writes, or None (on a CPU the writes are done). The
    host does not wait for the device here: the forward's kernels keep being queued while a layer's push waits."""

    def __init__(self, attn: Callable[..., torch.Tensor], on_layer: LayerObserver,
                 record: Callable[[], LayerReady] | None = None) -> None:
        self._attn = attn
        self._on_layer = on_layer
        self._record = record

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self._attn(layer, q, k, v)
        self._on_layer(layer, None if self._record is None else self._record())
        return out


def cuda_layer_event() -> LayerReady:
    """A CUDA event recorded on the current stream: the layer's KV writes queued before it have landed once it has."""
    event = torch.cuda.Event()
    event.record()
    return event
