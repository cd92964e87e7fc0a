"""What a simulated engine knows of the hardware it stands for: step times measured on a real engine
(`python -m bench.sim_profile`) or written from published figures (then `source` says so).

A step's time is modelled as the sum of a prefill part, interpolated in the step's new prompt tokens, a
decode part, interpolated in its decode rows (measured with `decode_context` tokens of context per row),
and a context part, linear in the context the decode rows attend to beyond that. Below its first point a
curve runs straight to (0, 0); past its last it extends the last segment's slope (never a falling one).
The times are the model's forward and sampling only: the simulated engine's own scheduling is real."""

from __future__ import annotations

import bisect
import itertools
import json
import pathlib
from dataclasses import asdict, dataclass
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

    def __post_init__(self) -> None:
        if self.context_s_per_token < 0 or self.decode_context < 0:
            raise ValueError("context_s_per_token and decode_context must be >= 0")

    def step_seconds(self, prefill_tokens: int, decode_rows: int, context_tokens: int) -> float:
        """The modelled time of a step with these many new prompt tokens and decode rows, the decode rows
        attending to `context_tokens` positions in all."""
        seconds = 0.0
        if prefill_tokens:
            seconds += _interpolate(self.prefill, prefill_tokens)
        if decode_rows:
            seconds += _interpolate(self.decode, decode_rows)
            seconds += self.context_s_per_token * (context_tokens - decode_rows * self.decode_context)
        return max(seconds, 0.0)

    @classmethod
    def load(cls, path: str | pathlib.Path) -> SimulationProfile:
        try:
            raw = json.loads(pathlib.Path(path).read_text())
            return cls(name=str(raw["name"]), source=str(raw["source"]),
                       model=config_from_json(json.dumps(raw["model"])), tokenizer=raw.get("tokenizer"),
                       prefill=_curve("prefill", raw["prefill"]), decode=_curve("decode", raw["decode"]),
                       context_s_per_token=float(raw.get("context_s_per_token", 0.0)),
                       decode_context=int(raw.get("decode_context", 0)))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"simulation profile {path}: {type(e).__name__}: {e}") from e

    def to_json(self) -> str:
        fields = asdict(self)
        fields["prefill"], fields["decode"] = [list(p) for p in self.prefill], [list(p) for p in self.decode]
        return json.dumps(fields, indent=1)
