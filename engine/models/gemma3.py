"""Gemma 3 (text): Gemma 2's layers with Qwen3's per-head q/k RMSNorm before RoPE (a (1 + w) norm,
folded at load as Gemma 2's), no score or logit caps by default, five windowed layers to one
global, and two RoPE bases: `local_rope_theta` for the windowed layers, `rope_theta` (with its
scaling, linear in the larger models) for the global ones."""

from __future__ import annotations

from engine.config import ModelConfig
from engine.models.gemma2 import Gemma2DecoderLayer, Gemma2ForCausalLM
from engine.models.llama import DecoderLayer
from engine.models.qwen3 import Qwen3Attention
from engine.models.rope import RotaryEmbedding


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    extra_weights = (*Gemma2ForCausalLM.extra_weights, ("self_attn.q_norm", "self_attn.q_norm"),
                     ("self_attn.k_norm", "self_attn.k_norm"))

    def _layer(self, config: ModelConfig, layer: int, rope: RotaryEmbedding) -> DecoderLayer:
        windowed = bool(config.sliding_windows) and config.sliding_windows[layer] > 0
        if windowed and config.local_rope_theta is not None:
            if not hasattr(self, "local_rope"):
                self.local_rope = RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                                                  config.local_rope_theta, None)
            rope = self.local_rope
        return Gemma2DecoderLayer(config, layer, rope, Qwen3Attention)
