"""Qwen3 (dense): the Llama layers, no q/k/v bias, and an RMSNorm over each head's query and key
(weights of `head_dim`, shared by the heads) before RoPE."""

from __future__ import annotations

import torch

from engine.attention.metadata import AttentionFn
from engine.config import ModelConfig
from engine.models.llama import Attention, LlamaForCausalLM, RMSNorm
from engine.models.rope import RotaryEmbedding


class Qwen3Attention(Attention):
    def __init__(self, config: ModelConfig, layer: int, rope: RotaryEmbedding) -> None:
        super().__init__(config, layer, rope)
        self.head_dim = config.head_dim
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, attn: AttentionFn) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        tokens = x.shape[0]
        q = self.q_norm(q.reshape(-1, self.head_dim)).view(tokens, self.q_size)
        k = self.k_norm(k.reshape(-1, self.head_dim)).view(tokens, self.kv_size)
        q, k = self.rope(positions, q, k)
        return self.o_proj(attn(self.layer, q, k, v))


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention = Qwen3Attention
    extra_weights = (("self_attn.q_norm", "self_attn.q_norm"), ("self_attn.k_norm", "self_attn.k_norm"))
