"""Load a llama/qwen2/qwen3/mistral GGUF file into fp32 tensors with Hugging Face names and a ModelConfig."""

from __future__ import annotations

import math
import pathlib
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from engine.config import ModelConfig, RopeScaling
from engine.errors import ModelLoadError
from engine.gguf_file import open_gguf
from engine.loader.gguf_names import PERMUTED_QK_ARCHITECTURES, gguf_to_hf_name, unpermute_qk_rows
from engine.loader.weight_cache import CachedWeights

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")
SUPPORTED_TENSOR_TYPES = frozenset({
    GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1,
    GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K,
})
# llama.cpp stores Llama-3 rope scaling only as a `rope_freqs` tensor of per-frequency divisors; these
# are the parameters every Llama 3.x release uses besides `factor`, checked against the tensor.
_LLAMA3_LOW_FREQ_FACTOR = 1.0
_LLAMA3_HIGH_FREQ_FACTOR = 4.0
_LLAMA3_ORIGINAL_CONTEXT = 8192


def load_gguf(path: pathlib.Path) -> CachedWeights:
    """Dequantize every tensor the model uses to fp32; q/k rows are put back into HF (half-split) order."""
    reader = open_gguf(path)
    fields = _Fields(reader, path)
    config = _config(fields, reader, path)
    weights: dict[str, torch.Tensor] = {}
    quant_types: dict[str, int] = {}
    for tensor in reader.tensors:
        hf_name = gguf_to_hf_name(tensor.name)
        if hf_name is None:
            continue
        qtype = GGMLQuantizationType(tensor.tensor_type)
        if qtype not in SUPPORTED_TENSOR_TYPES:
            supported = ", ".join(sorted(t.name for t in SUPPORTED_TENSOR_TYPES))
            raise ModelLoadError(
                f"{path}: tensor {tensor.name} has type {qtype.name}, which is not supported; "
                f"re-quantize the model to one of {supported}")
        try:
            array = np.asarray(dequantize(tensor.data, qtype), dtype=np.float32)
            array = _unpermute(array, hf_name, config)
        except (ValueError, IndexError) as exc:
            raise ModelLoadError(f"{path}: tensor {tensor.name} cannot be decoded: {exc}") from exc
        # memmap-backed arrays (F32 tensors) are read-only views of the file: copy them.
        weights[hf_name] = torch.from_numpy(np.array(array, dtype=np.float32, copy=not array.flags.writeable))
        quant_types[hf_name] = int(qtype)
    return CachedWeights(config, weights, quant_types)


def _unpermute(array: np.ndarray, hf_name: str, config: ModelConfig) -> np.ndarray:
    if config.architecture not in PERMUTED_QK_ARCHITECTURES:
        return array
    if ".self_attn.q_proj." in hf_name:
        return unpermute_qk_rows(array, config.num_heads)
    if ".self_attn.k_proj." in hf_name:
        return unpermute_qk_rows(array, config.num_kv_heads)
    return array


class _Fields:
    """Typed access to GGUF metadata; a missing required key is a ModelLoadError naming the file."""

    def __init__(self, reader: GGUFReader, path: pathlib.Path) -> None:
        self._reader = reader
        self._path = path

    def get(self, key: str, default: Any = None) -> Any:
        field = self._reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as exc:  # malformed field payloads surface as assorted numpy/struct errors
            raise ModelLoadError(f"{self._path}: metadata field {key} is unreadable: {exc}") from exc

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ModelLoadError(f"{self._path}: required GGUF metadata field {key!r} is missing")
        return value


def _config(fields: _Fields, reader: GGUFReader, path: pathlib.Path) -> ModelConfig:
    arch = fields.require("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise ModelLoadError(f"{path}: GGUF architecture {arch!r} is not supported; use one of {supported}")
    if int(fields.get(f"{arch}.expert_count", 0) or 0) > 0:
        raise ModelLoadError(f"{path}: mixture-of-experts GGUF files (Mixtral, Qwen3-MoE) are not supported yet; "
                             "load the model's Hugging Face folder")
    names = {t.name for t in reader.tensors}
    hidden = int(fields.require(f"{arch}.embedding_length"))
    num_heads = int(fields.require(f"{arch}.attention.head_count"))
    head_dim = int(fields.get(f"{arch}.attention.key_length", hidden // num_heads))
    rope_theta = float(fields.get(f"{arch}.rope.freq_base", 10000.0))
    vocab = fields.get(f"{arch}.vocab_size")
    if vocab is None:
        tokens = fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens is not None else _embedding_rows(reader, path)
    eos_ids = tuple(dict.fromkeys(
        int(v) for v in (fields.get("tokenizer.ggml.eos_token_id"), fields.get("tokenizer.ggml.eot_token_id"))
        if v is not None))
    try:
        return ModelConfig(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(fields.require(f"{arch}.feed_forward_length")),
            num_layers=int(fields.require(f"{arch}.block_count")),
            num_heads=num_heads,
            num_kv_heads=int(fields.get(f"{arch}.attention.head_count_kv", num_heads)),
            head_dim=head_dim,
            max_position_embeddings=int(fields.require(f"{arch}.context_length")),
            rms_norm_eps=float(fields.require(f"{arch}.attention.layer_norm_rms_epsilon")),
            rope_theta=rope_theta,
            rope_scaling=_rope_scaling(fields, reader, arch, head_dim, rope_theta, path),
            tie_word_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
            qk_norm=arch == "qwen3",
            name=str(fields.get("general.name", path.stem)),
            eos_token_ids=eos_ids,
        )
    except ValueError as exc:
        raise ModelLoadError(f"{path}: inconsistent model metadata: {exc}") from exc


def _embedding_rows(reader: GGUFReader, path: pathlib.Path) -> int:
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight":
            return int(tensor.shape[-1])  # ggml order: [hidden, vocab]
    raise ModelLoadError(f"{path}: no vocabulary size in metadata and no token_embd.weight tensor")


def _rope_scaling(fields: _Fields, reader: GGUFReader, arch: str, head_dim: int, theta: float,
                  path: pathlib.Path) -> RopeScaling | None:
    kind = fields.get(f"{arch}.rope.scaling.type", "none")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if kind == "llama3":
        return RopeScaling(
            factor=float(fields.require(f"{arch}.rope.scaling.factor")),
            low_freq_factor=_LLAMA3_LOW_FREQ_FACTOR,
            high_freq_factor=_LLAMA3_HIGH_FREQ_FACTOR,
            original_max_position_embeddings=int(fields.get(
                f"{arch}.rope.scaling.original_context_length", _LLAMA3_ORIGINAL_CONTEXT)))
    if kind != "none":
        raise ModelLoadError(f"{path}: rope scaling type {kind!r} is not supported (only Llama-3 scaling is)")
    if freqs is None:
        return None
    divisors = np.asarray(dequantize(freqs.data, GGMLQuantizationType(freqs.tensor_type)), np.float64).ravel()
    scaling = RopeScaling(
        factor=float(divisors.max()),
        low_freq_factor=_LLAMA3_LOW_FREQ_FACTOR,
        high_freq_factor=_LLAMA3_HIGH_FREQ_FACTOR,
        original_max_position_embeddings=int(fields.get(
            f"{arch}.rope.scaling.original_context_length", _LLAMA3_ORIGINAL_CONTEXT)))
    expected = llama3_rope_divisors(scaling, head_dim, theta)
    if expected.shape != divisors.shape or not np.allclose(divisors, expected, rtol=1e-4):
        raise ModelLoadError(
            f"{path}: rope_freqs.weight does not match Llama-3 scaling with factor {scaling.factor}; "
            "this rope scaling is not supported")
    return scaling


def llama3_rope_divisors(scaling: RopeScaling, head_dim: int, theta: float) -> np.ndarray:
    """Per-frequency divisors llama.cpp writes as `rope_freqs.weight` for Llama-3 scaling."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    smooth = ((scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    between = 1.0 / ((1 - smooth) / scaling.factor + smooth)
    return np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, scaling.factor, between))
