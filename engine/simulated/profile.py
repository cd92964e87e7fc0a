"""What a simulated engine knows of the hardware it stands for: step times measured on a real engine
(`python -m bench.sim_profile`) or written from published figures (then `source` says so).

A step's time is modelled as the sum of
- a prefill part: the prefill curve, interpolated in the step's new prompt tokens (measured on prompts of
  `prefill_prompt` tokens packed into one step), plus `attention_s_per_pair` for each (new token, position
  it attends to) pair beyond what such prompts have: a long prompt's attention grows with its square;
- a decode part: the decode curve, interpolated in the step's decode rows (measured with `decode_context`
  tokens of context per row), plus `context_s_per_token` per token of context beyond that. Beside a
  prefill, the step's fixed cost (the decode curve's intercept: the weights read once) is paid once, so
  adding prompt tokens to a decode step never makes it cheaper.
Below its first point a curve runs straight to (0, 0); past its last it extends the last segment's slope
(never a falling one). The times are the model's forward and sampling only: the simulated engine's own
scheduling is real.

A prefill worker's KV push (optional: `kv_s_per_byte` and `kv_transfer_latency_s`, both 0 when not measured,
as in profiles written before them) is modelled on the link, for the bytes of the *real* model's KV (layers x
KV heads x head_dim x 2 (K, V) x dtype size per token, engine.kv_cache.KVCacheSpec), see `kv_push_seconds`."""

from __future__ import annotations

import bisect
import itertools
import json
import pathlib
from dataclasses import asdict, dataclass, replace
from typing import Any

from engine.config import ModelConfig
from engine.loader.weight_cache import config_from_json

Curve = tuple[tuple[int, float], ...]  # (count, seconds), counts strictly increasing


def _interpolate(curve: Curve, x: int) -> float:
    """Piecewise linear through (0, 0) and `curve`; past its last point, its last segment's slope if rising."""
    points = ((0, 0.0), *curve)
    (x0, y0), (x1, y1) = points[-2], points[-1]
    if x >= x1:
        return y1 + max(y1 - y0, 0.0) * (x - x1) / (x1 - x0)
    i = max(bisect.bisect_left([p[0] for p in points], x), 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _curve(name: str, raw: Any) -> Curve:
    try:
        curve = tuple((int(n), float(s)) for n, s in raw)
    except (TypeError, ValueError):
        curve = ()
    if len(curve) < 2 or any(n < 1 or s < 0 for n, s in curve) or any(
            a[0] >= b[0] for a, b in itertools.pairwise(curve)):
        raise ValueError(f"profile {name}: need [[count, seconds], ...] of at least two points, counts >= 1 "
                         f"strictly increasing and seconds >= 0, got {raw!r}")
    return curve


@dataclass(frozen=True)
class SimulationProfile:
    name: str
    source: str  # how the figures were obtained: "measured: <cpu>, <date>, <command>" or "published: <where>"
    model: ModelConfig  # the architecture simulated (vocabulary, layers, KV heads: the KV layout follows it)
    tokenizer: str | None  # the checkpoint whose tokenizer the workers use; None: the default model's
    prefill: Curve  # new prompt tokens in a step -> seconds
    decode: Curve  # decode rows in a step -> seconds
    context_s_per_token: float = 0.0  # per token of context a decode row attends to beyond decode_context
    decode_context: int = 0  # tokens of context per row the decode curve was measured with
    attention_s_per_pair: float = 0.0  # per attention pair of a prefill beyond prompts of prefill_prompt tokens
    prefill_prompt: int = 0  # tokens of each prompt the prefill curve was measured with (0: not recorded)
    kv_s_per_byte: float = 0.0  # KV push P -> D: link seconds per byte of the real model's KV (0: not modelled)
    kv_transfer_latency_s: float = 0.0  # KV push P -> D: fixed seconds a step's push adds (the fit's intercept)

    def __post_init__(self) -> None:
        if min(self.context_s_per_token, self.decode_context, self.attention_s_per_pair, self.prefill_prompt,
               self.kv_s_per_byte, self.kv_transfer_latency_s) < 0:
            raise ValueError("context_s_per_token, decode_context, attention_s_per_pair, prefill_prompt, "
                             "kv_s_per_byte and kv_transfer_latency_s must be >= 0")
        if self.attention_s_per_pair and not self.prefill_prompt:
            raise ValueError("attention_s_per_pair needs the prefill_prompt the prefill curve was measured with")

    @property
    def decode_intercept_s(self) -> float:
        """The decode curve's first segment extended to 0 rows: the part of a step that does not grow
        with its rows (at most the first point's time, never below 0)."""
        (x0, y0), (x1, y1) = self.decode[0], self.decode[1]
        return min(max(y0 - x0 * (y1 - y0) / (x1 - x0), 0.0), y0)

    def step_seconds(self, prefill_tokens: int, decode_rows: int, context_tokens: int,
                     prefill_pairs: int | None = None) -> float:
        """The modelled time of a step with these many new prompt tokens and decode rows, the decode rows
        attending to `context_tokens` positions in all and the prompt tokens to `prefill_pairs` (None: as
        many as the prefill curve's own prompts had)."""
        prefill = 0.0
        if prefill_tokens:
            prefill = _interpolate(self.prefill, prefill_tokens)
            if prefill_pairs is not None and self.attention_s_per_pair:
                own = prefill_tokens * (self.prefill_prompt + 1) / 2  # pairs of the curve's prompts, per token
                prefill += self.attention_s_per_pair * (prefill_pairs - own)
        seconds = prefill
        if decode_rows:
            # the fixed cost both parts carry is paid once: a step costs at least the decode curve's
            shared = min(self.decode_intercept_s, max(prefill, 0.0))
            seconds += max(_interpolate(self.decode, decode_rows) - shared, 0.0)
            seconds += self.context_s_per_token * (context_tokens - decode_rows * self.decode_context)
        return max(seconds, 0.0)

    @property
    def models_kv_transfer(self) -> bool:
        return bool(self.kv_s_per_byte or self.kv_transfer_latency_s)

    def kv_push_seconds(self, step_seconds: float, num_layers: int, layer_bytes: int) -> float:
        """When a step's layer-wise KV push has landed, in seconds from the step's start: its layers are
        computed evenly over `step_seconds` (layer i done at step_seconds * (i + 1) / num_layers), each layer's
        pages (`layer_bytes` of the real KV) leave no sooner than their layer is done and after the previous
        layer's have left (one link, serialized), taking layer_bytes * kv_s_per_byte; the last lands
        kv_transfer_latency_s after it left. So the push overlaps the compute, and what the link cannot hide
        is paid after it: max(T + t, T / L + L * t) + latency for per-layer link time t. Never before the
        step's end (the prefill worker commits a step once its pushes are done); the step's end when the
        profile models no transfer or nothing is pushed."""
        if not (self.models_kv_transfer and layer_bytes and num_layers):
            return step_seconds
        link = 0.0  # when the link is free
        per_layer = layer_bytes * self.kv_s_per_byte
        for layer in range(num_layers):
            link = max(link, step_seconds * (layer + 1) / num_layers) + per_layer
        return link + self.kv_transfer_latency_s  # >= step_seconds: the last layer is done then

    def slowed(self, factor: float) -> SimulationProfile:
        """The same hardware `factor` times slower: every step time times `factor` (a simulation run in
        dilated time, so that the real processes' own CPU time stays small beside the modelled steps)."""
        if not factor > 0:
            raise ValueError(f"slowdown factor must be > 0, got {factor}")
        return replace(self, name=f"{self.name} x{factor:g} slower", source=f"{self.source}; times x{factor:g}",
                       prefill=tuple((n, s * factor) for n, s in self.prefill),
                       decode=tuple((n, s * factor) for n, s in self.decode),
                       context_s_per_token=self.context_s_per_token * factor,
                       attention_s_per_pair=self.attention_s_per_pair * factor,
                       kv_s_per_byte=self.kv_s_per_byte * factor,
                       kv_transfer_latency_s=self.kv_transfer_latency_s * factor)

    @classmethod
    def load(cls, path: str | pathlib.Path) -> SimulationProfile:
        try:
            raw = json.loads(pathlib.Path(path).read_text())
            return cls(name=str(raw["name"]), source=str(raw["source"]),
                       model=config_from_json(json.dumps(raw["model"])), tokenizer=raw.get("tokenizer"),
                       prefill=_curve("prefill", raw["prefill"]), decode=_curve("decode", raw["decode"]),
                       context_s_per_token=float(raw.get("context_s_per_token", 0.0)),
                       decode_context=int(raw.get("decode_context", 0)),
                       attention_s_per_pair=float(raw.get("attention_s_per_pair", 0.0)),
                       prefill_prompt=int(raw.get("prefill_prompt", 0)),
                       kv_s_per_byte=float(raw.get("kv_s_per_byte", 0.0)),
                       kv_transfer_latency_s=float(raw.get("kv_transfer_latency_s", 0.0)))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"simulation profile {path}: {type(e).__name__}: {e}") from e

    def to_json(self) -> str:
        fields = asdict(self)
        fields["prefill"], fields["decode"] = [list(p) for p in self.prefill], [list(p) for p in self.decode]
        return json.dumps(fields, indent=1)
