"""Gemma 2: the Llama layers with a GeGLU MLP (gelu's tanh form), four RMSNorms per layer (the
attention's and the MLP's outputs are normed before they join the residual), norms that scale by
(1 + w), the embedding scaled by sqrt(hidden), attention scaled by `query_pre_attn_scalar`, and
soft-capped attention scores and logits; even layers attend within a sliding window. The norm's
(1 + w) is folded into the weight at load and kept in fp32 whatever the compute dtype, as transformers
computes it (1 + w, w in the compute dtype, times the normed row in fp32, cast once: the norm kernels' fp32-weight
order, engine.kernels.ops.rms_norm)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from engine.attention.metadata import AttentionFn
from engine.config import ModelConfig
from engine.models.llama import MLP, Attention, DecoderLayer, LlamaForCausalLM, RMSNorm
from engine.models.rope import RotaryEmbedding


class GegluMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Gemma2DecoderLayer(DecoderLayer):
    def __init__(self, config: ModelConfig, layer: int, rope: RotaryEmbedding,
                 attention: type[Attention] = Attention) -> None:
        super().__init__(config, layer, rope, attention, mlp=GegluMLP(config))
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                attn: AttentionFn) -> tuple[torch.Tensor, torch.Tensor]:
        """As DecoderLayer's: (the MLP's normed output, the residual stream before it)."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.post_attention_layernorm(self.self_attn(positions, h, attn))
        h, residual = self.pre_feedforward_layernorm.add_forward(h, residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual


class Gemma2ForCausalLM(LlamaForCausalLM):
    not_batch_invariant = ("torch's tanh-form gelu computes a row's elements on vector or scalar paths by where "
                           "they fall, so a row's bits can depend on the batch")
    kv_numerics = "gemma-norms-fp32"  # (norms multiply by a fp32 1 + w since 2026-12-07)
    extra_weights: tuple[tuple[str, str], ...] = (("pre_feedforward_layernorm", "pre_feedforward_layernorm"),
                     ("post_feedforward_layernorm", "post_feedforward_layernorm"))

    def _layer(self, config: ModelConfig, layer: int, rope: RotaryEmbedding) -> DecoderLayer:
        return Gemma2DecoderLayer(config, layer, rope)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        return x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = self.config.final_logit_softcap
        return torch.tanh(logits / cap) * cap if cap > 0 else logits

    def fp32_parameters(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Every norm's 1 + w, with w rounded to `dtype` as transformers' model in that dtype holds it (w read back
        as (1 + w) - 1: within fp32's step at 1 of the checkpoint's; in fp32 the weights stay as loaded)."""
        if dtype == torch.float32:
            return {}
        return {name: 1.0 + (param.detach().float() - 1.0).to(dtype).float()
                for name, param in self.named_parameters() if name.endswith("norm.weight")}

    def load_hf_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Norm weights w become 1 + w (what Gemma's norm multiplies by)."""
        super().load_hf_weights({name: 1.0 + w.float() if name.endswith("norm.weight") else w
                                 for name, w in weights.items()})
