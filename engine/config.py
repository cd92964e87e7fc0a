"""Frozen configuration dataclasses. Values measured at start-up live in `engine.platform`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

RopeScalingType = Literal["llama3"]


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (the only scaling the Llama family ships with)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: RopeScalingType = "llama3"


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family model, independent of where the weights came from."""

    architecture: Literal["llama", "qwen2", "mistral"]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    name: str = "model"
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for attr in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, attr) < 1:
                raise ValueError(f"ModelConfig.{attr} must be >= 1, got {getattr(self, attr)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads
