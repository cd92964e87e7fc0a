"""What a simulated engine knows of the hardware it stands for: step times measured on a real engine
(`python -m bench.sim_profile`) or written from published figures (then `source` says so).

A step's time is modelled as the sum of a prefill part, interpolated in the step's new prompt tokens, a
decode part, interpolated in its decode rows, and a context part, linear in the context the decode rows
attend to. Outside the measured points the curves extend linearly from their last two points."""

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
    """Piecewise linear through `curve` (through (0, 0) below its first point), linear past its last two."""
    points = ((0, 0.0), *curve) if curve[0][0] > 0 else curve
    i = min(max(bisect.bisect_left([p[0] for p in points], x), 1), len(points) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return max(y0 + (y1 - y0) * (x - x0) / (x1 - x0), 0.0)


def _curve(name: str, raw: Any) -> Curve:
    try:
        curve = tuple((int(n), float(s)) for n, s in raw)
    except (TypeError, ValueError):
        curve = ()
    if not curve or any(n < 1 or s < 0 for n, s in curve) or any(a[0] >= b[0] for a, b in itertools.pairwise(curve)):
        raise ValueError(f"profile {name}: need [[count, seconds], ...] with counts >= 1 strictly increasing "
                         f"and seconds >= 0, got {raw!r}")
    return curve


@dataclass(frozen=True)
class SimulationProfile:
    name: str
    source: str  # how the figures were obtained: "measured: <cpu>, <date>, <command>" or "published: <where>"
    model: ModelConfig  # the architecture simulated (vocabulary, layers, KV heads: the KV layout follows it)
    tokenizer: str | None  # the checkpoint whose tokenizer the workers use; None: the default model's
    prefill: Curve  # new prompt tokens in a step -> seconds
    decode: Curve  # decode rows in a step -> seconds
    context_s_per_token: float = 0.0  # per token of context a decode row attends to

    def __post_init__(self) -> None:
        if self.context_s_per_token < 0:
            raise ValueError("context_s_per_token must be >= 0")

    def step_seconds(self, prefill_tokens: int, decode_rows: int, context_tokens: int) -> float:
        """The modelled time of a step with these many new prompt tokens and decode rows, the decode rows
        attending to `context_tokens` positions in all."""
        seconds = self.context_s_per_token * context_tokens
        if prefill_tokens:
            seconds += _interpolate(self.prefill, prefill_tokens)
        if decode_rows:
            seconds += _interpolate(self.decode, decode_rows)
        return seconds

    @classmethod
    def load(cls, path: str | pathlib.Path) -> SimulationProfile:
        try:
            raw = json.loads(pathlib.Path(path).read_text())
            return cls(name=str(raw["name"]), source=str(raw["source"]),
                       model=config_from_json(json.dumps(raw["model"])), tokenizer=raw.get("tokenizer"),
                       prefill=_curve("prefill", raw["prefill"]), decode=_curve("decode", raw["decode"]),
                       context_s_per_token=float(raw.get("context_s_per_token", 0.0)))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"simulation profile {path}: {type(e).__name__}: {e}") from e

    def to_json(self) -> str:
        fields = asdict(self)
        fields["prefill"], fields["decode"] = [list(p) for p in self.prefill], [list(p) for p in self.decode]
        return json.dumps(fields, indent=1)
