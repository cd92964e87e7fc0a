"""`load_model` / `load_tokenizer`: one entry point for HF checkpoint directories and GGUF files."""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass

import torch

from engine.config import ModelConfig
from engine.disk_cache import entry_lock
from engine.errors import ModelLoadError
from engine.loader.default_model import default_model_path
from engine.loader.gguf_loader import load_gguf
from engine.loader.hf_loader import load_hf
from engine.loader.weight_cache import CachedWeights, load_cached_weights, store_cached_weights
from engine.tokenizer import Tokenizer

_ACCEPTED = "a Hugging Face checkpoint directory (config.json + safetensors) or a .gguf file"


@dataclass(frozen=True)
class LoadedModel:
    """fp32 CPU weights in Hugging Face naming; `lm_head.weight` is present only when untied.

    `gguf_quant_types` maps each HF name to the ggml type it was stored in (empty for HF sources).
    """

    config: ModelConfig
    weights: dict[str, torch.Tensor]
    source: pathlib.Path
    gguf_quant_types: dict[str, int]


def resolve_model_path(path: str | os.PathLike[str] | None) -> pathlib.Path:
    """The model source `path` names (None → the default model), checked to be a kind we load."""
    if path is None:
        return default_model_path()
    resolved = pathlib.Path(path).expanduser().resolve()
    if resolved.is_dir() or (resolved.is_file() and resolved.suffix.lower() == ".gguf"):
        return resolved
    problem = "does not exist" if not resolved.exists() else "is not a directory or a .gguf file"
    raise ModelLoadError(f"model path {path} {problem}; pass {_ACCEPTED}")


def load_model(path: str | os.PathLike[str] | None = None) -> LoadedModel:
    """Load weights and config. GGUF conversions are cached on disk (see `engine.loader.weight_cache`)."""
    source = resolve_model_path(path)
    if source.is_dir():
        config, weights = load_hf(source)
        check_weights(config, weights, source)
        return LoadedModel(config, weights, source, {})
    cached = load_cached_weights(source)
    if cached is None or not _is_complete(cached, source):
        with entry_lock(source, "weights"):  # another process may be converting it right now
            cached = load_cached_weights(source)
            if cached is None or not _is_complete(cached, source):
                cached = load_gguf(source)
                check_weights(cached.config, cached.weights, source)
                store_cached_weights(source, cached)
    return LoadedModel(cached.config, cached.weights, source, cached.gguf_quant_types)


def _is_complete(cached: CachedWeights, source: pathlib.Path) -> bool:
    """Whether a cache entry describes a whole model (else it is rebuilt)."""
    try:
        check_weights(cached.config, cached.weights, source)
    except ModelLoadError:
        return False
    return True


def load_tokenizer(path: str | os.PathLike[str] | None = None) -> Tokenizer:
    return Tokenizer.from_source(resolve_model_path(path))


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a model of `config` needs, with its HF shape."""
    h, d = config.hidden_size, config.head_dim
    q, kv = config.num_heads * d, config.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        }
        shapes |= _mlp_shapes(config, i, p)
        if config.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
        if config.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (config.head_dim,),
                       p + "self_attn.k_norm.weight": (config.head_dim,)}
        if config.architecture in ("gemma2", "gemma3"):  # the MLP's own norms, before and after it
            shapes |= {p + "pre_feedforward_layernorm.weight": (h,), p + "post_feedforward_layernorm.weight": (h,)}
    return shapes


def _mlp_shapes(config: ModelConfig, layer: int, p: str) -> dict[str, tuple[int, ...]]:
    """Layer `layer`'s MLP tensors: a dense MLP, or a router and its experts (HF per-expert names)."""
    h, moe = config.hidden_size, config.moe
    if moe is None or layer in moe.dense_layers:
        inter = config.intermediate_size
        return {p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter)}
    inter = moe.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {}
    if config.architecture == "mixtral":
        shapes[p + "block_sparse_moe.gate.weight"] = (moe.num_experts, h)
        for e in range(moe.num_experts):
            base = f"{p}block_sparse_moe.experts.{e}."
            shapes |= {base + "w1.weight": (inter, h), base + "w3.weight": (inter, h), base + "w2.weight": (h, inter)}
        return shapes
    shapes[p + "mlp.gate.weight"] = (moe.num_experts, h)
    for e in range(moe.num_experts):
        base = f"{p}mlp.experts.{e}."
        shapes |= {base + "gate_proj.weight": (inter, h), base + "up_proj.weight": (inter, h),
                   base + "down_proj.weight": (h, inter)}
    return shapes


def check_weights(config: ModelConfig, weights: dict[str, torch.Tensor], source: pathlib.Path) -> None:
    """Raise ModelLoadError unless `weights` holds exactly the expected fp32 tensors and shapes."""
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ModelLoadError(
            f"{source}: weights do not match the config: missing {missing[:5]} ({len(missing)} in all), "
            f"unexpected {unexpected[:5]} ({len(unexpected)} in all)")
    for name, shape in expected.items():
        tensor = weights[name]
        if tuple(tensor.shape) != shape or tensor.dtype != torch.float32:
            raise ModelLoadError(
                f"{source}: {name} is {tuple(tensor.shape)} {tensor.dtype}, expected {shape} float32")
