"""Load a GGUF file (llama and Mixtral, mistral, qwen2, qwen3, qwen3moe, gemma2, gemma3, phi3) into fp32
tensors with Hugging Face names and a ModelConfig.

What llama.cpp's files leave out is taken as llama.cpp takes it: Gemma's window (4096), its windowed-layer
pattern (every other layer for Gemma 2, five in six for Gemma 3 unless the file lists it), Gemma 2's caps
(50 on scores, 30 on logits), Gemma 3's windowed layers' RoPE base (10000 unless given) and Gemma's
attention scale (1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B models, unless the file gives
`attention.scale`)."""

from __future__ import annotations

import math
import pathlib
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from engine.config import Architecture, ModelConfig, MoEConfig, RopeScaling
from engine.errors import ModelLoadError
from engine.gguf_file import open_gguf
from engine.loader.gguf_names import PERMUTED_QK_ARCHITECTURES, gguf_to_hf_name, unpermute_qk_rows
from engine.loader.tensor_layouts import split_phi3_fused_weights, unfold_gemma_norms, unstack_experts
from engine.loader.weight_cache import CachedWeights

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "qwen3moe", "gemma2", "gemma3", "phi3")
_GEMMA = ("gemma2", "gemma3")
_QK_NORM = ("qwen3", "qwen3moe", "gemma3")
# llama.cpp's Gemma defaults: windowed layers (i + 1) % pattern != 0; block counts of the 27B models, whose
# attention scale is 1/sqrt(hidden / heads) instead of 1/sqrt(head_dim)
_GEMMA_WINDOW_PATTERN = {"gemma2": 2, "gemma3": 6}
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_GEMMA_WINDOW = 4096  # llama.cpp's (and transformers') Gemma window where a file gives none
# llama.cpp's score and logit caps where a Gemma 2 file gives none
_GEMMA2_CAPS = {"gemma2": (50.0, 30.0)}
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
    arch = fields.require("general.architecture")
    config = _config(fields, reader, path)
    weights: dict[str, torch.Tensor] = {}
    quant_types: dict[str, int] = {}
    for tensor in reader.tensors:
        hf_name = gguf_to_hf_name(tensor.name, arch)
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
            array = _unpermute(array, hf_name, arch, config)
        except (ValueError, IndexError) as exc:
            raise ModelLoadError(f"{path}: tensor {tensor.name} cannot be decoded: {exc}") from exc
        # memmap-backed arrays (F32 tensors) are read-only views of the file: copy them.
        weights[hf_name] = torch.from_numpy(np.array(array, dtype=np.float32, copy=not array.flags.writeable))
        quant_types[hf_name] = int(qtype)
    try:
        _to_hf_layout(arch, config, weights, quant_types)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    return CachedWeights(config, weights, quant_types)


def _to_hf_layout(arch: str, config: ModelConfig, weights: dict[str, torch.Tensor],
                  quant_types: dict[str, int]) -> None:
    """The family's GGUF tensors renamed and reshaped into HF's (engine.loader.tensor_layouts); every HF
    tensor keeps the ggml type of the tensor it came from."""
    if arch in _GEMMA:
        unfold_gemma_norms(weights)
    origins = split_phi3_fused_weights(config, weights) if arch == "phi3" else {}
    origins |= unstack_experts(config, weights)
    for new, old in origins.items():
        quant_types[new] = quant_types[old]
    for old in set(origins.values()):
        quant_types.pop(old, None)


def _unpermute(array: np.ndarray, hf_name: str, arch: str, config: ModelConfig) -> np.ndarray:
    if arch not in PERMUTED_QK_ARCHITECTURES:
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
    names = {t.name for t in reader.tensors}
    hidden = int(fields.require(f"{arch}.embedding_length"))
    num_heads = int(fields.require(f"{arch}.attention.head_count"))
    layers = int(fields.require(f"{arch}.block_count"))
    head_dim = int(fields.get(f"{arch}.attention.key_length", hidden // num_heads))
    rope_theta = float(fields.get(f"{arch}.rope.freq_base", 10000.0))
    vocab = fields.get(f"{arch}.vocab_size")
    if vocab is None:
        tokens = fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens is not None else _embedding_rows(reader, path)
    eos_ids = tuple(dict.fromkeys(
        int(v) for v in (fields.get("tokenizer.ggml.eos_token_id"), fields.get("tokenizer.ggml.eot_token_id"))
        if v is not None))
    architecture, moe = _moe(fields, arch, layers, names, path)
    caps = _GEMMA2_CAPS.get(arch, (0.0, 0.0))
    try:
        return ModelConfig(
            architecture=architecture,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(fields.get(f"{arch}.feed_forward_length") or (moe and moe.intermediate_size) or 0),
            num_layers=layers,
            num_heads=num_heads,
            num_kv_heads=int(fields.get(f"{arch}.attention.head_count_kv", num_heads)),
            head_dim=head_dim,
            max_position_embeddings=int(fields.require(f"{arch}.context_length")),
            rms_norm_eps=float(fields.require(f"{arch}.attention.layer_norm_rms_epsilon")),
            rope_theta=rope_theta,
            rope_scaling=_rope_scaling(fields, reader, arch, head_dim, rope_theta, path),
            local_rope_theta=float(fields.get(f"{arch}.rope.freq_base_swa", 10000.0)) if arch == "gemma3" else None,
            tie_word_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
            qk_norm=arch in _QK_NORM,
            moe=moe,
            sliding_windows=_sliding_windows(fields, arch, layers),
            attn_logit_softcap=float(fields.get(f"{arch}.attn_logit_softcapping", caps[0])),
            final_logit_softcap=float(fields.get(f"{arch}.final_logit_softcapping", caps[1])),
            attention_scale=_attention_scale(fields, arch, layers, hidden, num_heads, head_dim),
            partial_rotary_factor=int(fields.get(f"{arch}.rope.dimension_count", head_dim)) / head_dim,
            name=str(fields.get("general.name", path.stem)),
            eos_token_ids=eos_ids,
        )
    except ValueError as exc:
        raise ModelLoadError(f"{path}: inconsistent model metadata: {exc}") from exc


def _moe(fields: _Fields, arch: str, layers: int, names: set[str],
         path: pathlib.Path) -> tuple[Architecture, MoEConfig | None]:
    """The engine's architecture and MoE config: llama.cpp writes Mixtral as `llama` with experts, and
    renormalises Qwen3-MoE's top-k weights unless `expert_weights_norm` is false. A layer without a
    router (`ffn_gate_inp`) is dense (Qwen3-MoE's mlp_only_layers)."""
    experts = int(fields.get(f"{arch}.expert_count", 0) or 0)
    if not experts:
        if arch == "qwen3moe":
            raise ModelLoadError(f"{path}: a qwen3moe file without {arch}.expert_count")
        return arch, None  # type: ignore[return-value]  # SUPPORTED_ARCHITECTURES' dense names are ours
    if arch not in ("llama", "qwen3moe"):
        raise ModelLoadError(f"{path}: experts in a {arch} file are not supported (Mixtral and Qwen3-MoE are)")
    top_k = int(fields.require(f"{arch}.expert_used_count"))
    dense = tuple(i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in names)
    if arch == "llama":
        return "mixtral", MoEConfig(num_experts=experts, top_k=top_k, normalize_top_k=True, dense_layers=dense,
                                    intermediate_size=int(fields.require(f"{arch}.feed_forward_length")))
    return "qwen3_moe", MoEConfig(
        num_experts=experts, top_k=top_k, normalize_top_k=bool(fields.get(f"{arch}.expert_weights_norm", True)),
        intermediate_size=int(fields.require(f"{arch}.expert_feed_forward_length")), dense_layers=dense)


def _sliding_windows(fields: _Fields, arch: str, layers: int) -> tuple[int, ...]:
    """Phi-3: every layer; Gemma: by `attention.sliding_window_pattern` (a period, or a flag per layer),
    else llama.cpp's period. Other files carry no window (llama.cpp's Mistral files have none)."""
    window = int(fields.get(f"{arch}.attention.sliding_window", _GEMMA_WINDOW if arch in _GEMMA else 0) or 0)
    if window <= 0 or arch not in ("phi3", *_GEMMA):
        return ()
    if arch == "phi3":
        return (window,) * layers
    pattern = fields.get(f"{arch}.attention.sliding_window_pattern", _GEMMA_WINDOW_PATTERN[arch])
    if isinstance(pattern, list):
        if len(pattern) != layers:
            raise ValueError(f"sliding_window_pattern lists {len(pattern)} layers of {layers}")
        return tuple(window if flag else 0 for flag in pattern)
    return tuple(window if (i + 1) % int(pattern) else 0 for i in range(layers))


def _attention_scale(fields: _Fields, arch: str, layers: int, hidden: int, num_heads: int,
                     head_dim: int) -> float | None:
    """Gemma's query scale (transformers' query_pre_attn_scalar ** -0.5), which llama.cpp's files leave
    out: `attention.scale` where given, else llama.cpp's rule. Other families: None (head_dim ** -0.5)."""
    if arch not in _GEMMA:
        return None
    given = fields.get(f"{arch}.attention.scale")
    if given is not None:
        return float(given)
    return (hidden // num_heads if layers == _GEMMA_27B_LAYERS[arch] else head_dim) ** -0.5


def _embedding_rows(reader: GGUFReader, path: pathlib.Path) -> int:
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight":
            return int(tensor.shape[-1])  # ggml order: [hidden, vocab]
    raise ModelLoadError(f"{path}: no vocabulary size in metadata and no token_embd.weight tensor")


def _rope_scaling(fields: _Fields, reader: GGUFReader, arch: str, head_dim: int, theta: float,
                  path: pathlib.Path) -> RopeScaling | None:
    kind = fields.get(f"{arch}.rope.scaling.type", "none")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    factors = {t.name: t for t in reader.tensors if t.name in ("rope_factors_long.weight", "rope_factors_short.weight")}
    if factors:
        return _longrope(fields, arch, factors, path)
    if kind == "linear":
        return RopeScaling(factor=float(fields.require(f"{arch}.rope.scaling.factor")), rope_type="linear")
    if kind == "llama3":
        return RopeScaling(
            factor=float(fields.require(f"{arch}.rope.scaling.factor")),
            low_freq_factor=_LLAMA3_LOW_FREQ_FACTOR,
            high_freq_factor=_LLAMA3_HIGH_FREQ_FACTOR,
            original_max_position_embeddings=int(fields.get(
                f"{arch}.rope.scaling.original_context_length", _LLAMA3_ORIGINAL_CONTEXT)))
    if kind != "none":
        raise ModelLoadError(f"{path}: rope scaling type {kind!r} is not supported "
                             "(Llama-3, linear and LongRoPE factor tensors are)")
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


def _longrope(fields: _Fields, arch: str, tensors: dict[str, Any], path: pathlib.Path) -> RopeScaling:
    """Phi-3's LongRoPE: llama.cpp writes the two factor sets as tensors and the attention factor it computed."""
    if len(tensors) != 2:
        raise ModelLoadError(f"{path}: LongRoPE needs both rope_factors_long and rope_factors_short tensors, "
                             f"got {sorted(tensors)}")

    def factors(kind: str) -> list[float]:
        tensor = tensors[f"rope_factors_{kind}.weight"]
        values = dequantize(tensor.data, GGMLQuantizationType(tensor.tensor_type))
        return [float(v) for v in np.asarray(values, np.float32).ravel()]

    long, short = factors("long"), factors("short")
    original = int(fields.require(f"{arch}.rope.scaling.original_context_length"))
    factor = int(fields.require(f"{arch}.context_length")) / original
    attention = fields.get(f"{arch}.rope.scaling.attn_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeScaling(factor=factor, rope_type="longrope", original_max_position_embeddings=original,
                       short_factor=tuple(short), long_factor=tuple(long), attention_factor=float(attention))


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
