"""engine.kv_hooks.ObservedAttention: the observer hears of each layer after its attention wrote the layer's KV,
with what a device recorded after those writes (or nothing on a CPU), and the host never waits for the device."""

from __future__ import annotations

import torch

from engine.kv_hooks import LayerReady, ObservedAttention


class _Recorded:
    def __init__(self, log: list[str], layer: int) -> None:
        self.layer = layer
        log.append(f"record {layer}")

    def synchronize(self) -> None:  # (nothing here may call it: the push waits, off the engine's thread)
        raise AssertionError("the forward waited for the device")


def test_each_layer_is_observed_after_its_attention_with_the_event_recorded_then() -> None:
    log: list[str] = []
    layer_now = [0]

    def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        log.append(f"attention {layer}")
        layer_now[0] = layer
        return q

    def observer(layer: int, ready: LayerReady | None) -> None:
        assert isinstance(ready, _Recorded) and ready.layer == layer
        log.append(f"observed {layer}")

    observed = ObservedAttention(attention, observer, lambda: _Recorded(log, layer_now[0]))
    x = torch.zeros(1, 4)
    for layer in range(2):
        assert observed(layer, x, x, x) is x
    assert log == ["attention 0", "record 0", "observed 0", "attention 1", "record 1", "observed 1"]

    seen: list[tuple[int, LayerReady | None]] = []
    ObservedAttention(attention, lambda layer, ready: seen.append((layer, ready)))(3, x, x, x)  # a CPU: no event
    assert seen == [(3, None)]
