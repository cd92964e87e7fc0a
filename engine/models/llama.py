"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2) in plain torch, and the layers other
families share (engine.models.registry).

The model knows nothing of serving: it sees a flat list of token ids, their positions and an
attention function; the paged cache, batching and sampling live outside it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from engine.attention.metadata import AttentionFn
from engine.config import ModelConfig
from engine.kernels import ops
from engine.models.rope import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x); `residual` may be updated in place."""
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.rope = rope

    def forward(self, positions: torch.Tensor, x: torch.Tensor, attn: AttentionFn) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        if not self.rope.rotate_in_place(positions, qkv, self.num_heads, self.num_kv_heads):
            q, k = self.rope(positions, q, k)
        return self.o_proj(attn(self.layer, q, k, v))


class MLP(nn.Module):
    """[gate | up] in one matmul, SiLU(gate) * up, down; of `intermediate` width (default the model's:
    an MoE expert is one of these, engine.models.moe)."""

    def __init__(self, config: ModelConfig, intermediate: int | None = None) -> None:
        super().__init__()
        self.intermediate = config.intermediate_size if intermediate is None else intermediate
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * self.intermediate, bias=False)
        self.down_proj = nn.Linear(self.intermediate, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = getattr(self.gate_up_proj, "silu_mul", None)  # a projection that applies SiLU * up itself
        return self.down_proj(fused(x) if fused is not None else ops.silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, rope: RotaryEmbedding,
                 attention: type[Attention] = Attention, mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention(config, layer, rope)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp if mlp is not None else MLP(config)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                attn: AttentionFn) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it): the sum of the two is the
        layer's output, which the next layer's norm (or the final one) adds up, fused with its norm."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.self_attn(positions, h, attn)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """Also the base of the other families: they set their attention class (engine.models.qwen3),
    their MLPs (engine.models.moe), and the further per-layer weights they load."""

    attention: type[Attention] = Attention
    mlp_factory: Callable[[ModelConfig, int], nn.Module] | None = None  # None: the dense MLP in every layer
    # (HF name, our name) of further per-layer weights a family adds, both under the layer's prefix
    extra_weights: tuple[tuple[str, str], ...] = ()
    # a step's work depends only on its shapes (no host read-back of data): CUDA graphs may replay it
    supports_cuda_graphs: bool = True
    # why --deterministic cannot promise batch invariance for this family (None: it can; its linears
    # are all nn.Linear modules, which packing checks, and its other ops are row-invariant)
    not_batch_invariant: str | None = None
    # a change of the family's computation that its KV shows outside fp32 (engine.loader.fingerprint: peers of
    # another build refuse each other's KV instead of decoding from KV computed another way); "" for none
    kv_numerics: str = ""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.rope = rope = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                           config.rope_scaling, config.rotary_dim)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self._layer(config, i, rope) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _layer(self, config: ModelConfig, layer: int, rope: RotaryEmbedding) -> DecoderLayer:
        """Layer `layer` (a family with another layer structure overrides this: engine.models.gemma2)."""
        factory = self.mlp_factory
        return DecoderLayer(config, layer, rope, self.attention, None if factory is None else factory(config, layer))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionFn) -> torch.Tensor:
        """Hidden states `[T, hidden]` of a flat batch of T tokens."""
        x, residual = self.embed(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, attn)
        assert residual is not None, "a model has at least one layer"
        return self.norm.add_forward(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def sampling_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for the sampler: the lm_head's output in its own dtype where `compute_logits` only casts
        it to fp32 (an exact cast, so both rank tokens alike and a greedy pick needs no fp32 copy); a
        family that changes `compute_logits` gets exactly that."""
        if type(self).compute_logits is not LlamaForCausalLM.compute_logits:
            return self.compute_logits(hidden)
        return self.lm_head(hidden)

    def load_mlp(self, layer: int, weights: Mapping[str, torch.Tensor],
                 put: Callable[[str, torch.Tensor], None]) -> None:
        """Layer `layer`'s MLP weights (the dense MLP; MoE families override this)."""
        pre = f"model.layers.{layer}.mlp"
        put(f"layers.{layer}.mlp.gate_up_proj.weight",
            torch.cat([weights[f"{pre}.gate_proj.weight"], weights[f"{pre}.up_proj.weight"]]))
        put(f"layers.{layer}.mlp.down_proj.weight", weights[f"{pre}.down_proj.weight"])

    def fp32_parameters(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Parameters (by name) that stay fp32 in a model of compute dtype `dtype`, with their values: none here."""
        return {}

    def load_hf_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Load a Hugging Face-named state dict, merging q/k/v and gate/up into one matrix each."""
        own = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()

        def put(name: str, value: torch.Tensor) -> None:
            if name not in own:
                raise KeyError(f"checkpoint tensor {name} has no place in the model")
            param = own[name]
            if param.shape != value.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} != model {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(value)
            loaded.add(name)

        for i in range(self.config.num_layers):
            pre = f"model.layers.{i}"
            for suffix in ("weight", "bias") if self.config.attention_bias else ("weight",):
                parts = [weights[f"{pre}.self_attn.{p}_proj.{suffix}"] for p in "qkv"]
                put(f"layers.{i}.self_attn.qkv_proj.{suffix}", torch.cat(parts))
            self.load_mlp(i, weights, put)
            for hf, ours in (("self_attn.o_proj", "self_attn.o_proj"), ("input_layernorm", "input_layernorm"),
                             ("post_attention_layernorm", "post_attention_layernorm"), *self.extra_weights):
                put(f"layers.{i}.{ours}.weight", weights[f"{pre}.{hf}.weight"])
        if self.config.tie_word_embeddings:  # re-tie: moving modules (e.g. `to_empty`) may have split them
            self.lm_head.weight = self.embed_tokens.weight
        put("embed_tokens.weight", weights["model.embed_tokens.weight"])
        put("norm.weight", weights["model.norm.weight"])
        if not self.config.tie_word_embeddings:
            put("lm_head.weight", weights["lm_head.weight"])
        missing = set(own) - loaded - ({"lm_head.weight"} if self.config.tie_word_embeddings else set())
        if missing:
            raise ValueError(f"checkpoint lacks tensors for: {sorted(missing)[:5]}")
