"""Load a Hugging Face checkpoint directory (config.json + safetensors) into fp32 tensors."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from engine.config import Architecture, ModelConfig, MoEConfig, RopeScaling
from engine.errors import ModelLoadError
from engine.loader.tensor_layouts import split_phi3_fused_weights

_ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3",
}
_GEMMA = ("gemma2", "gemma3")
# the MLP activation each family must have (transformers' name; gelu_pytorch_tanh is gelu's tanh form)
_ACTIVATIONS = {arch: ("hidden_activation", "gelu_pytorch_tanh") for arch in _GEMMA}
# Gemma 3's windowed layers: five of every six unless the config lists its layer types
_GEMMA3_WINDOW_PATTERN = 6
# the families transformers gives sliding windows
_WINDOWED = ("mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "phi3", *_GEMMA)
# transformers' defaults for fields a config may leave out, where they change what the model computes
_DEFAULTS: dict[str, dict[str, Any]] = {
    "mistral": {"sliding_window": 4096},
    "qwen2": {"sliding_window": 4096, "max_window_layers": 28},
    "qwen3": {"sliding_window": 4096, "max_window_layers": 28},
    "qwen3_moe": {"sliding_window": 4096},
    "gemma2": {"sliding_window": 4096, "head_dim": 256, "query_pre_attn_scalar": 256,
               "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "gemma3": {"sliding_window": 4096, "head_dim": 256, "query_pre_attn_scalar": 256},
}
_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
# Non-parameter buffers some checkpoints carry; the model recomputes them.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not a readable JSON file: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def load_hf_config(directory: pathlib.Path) -> ModelConfig:
    """ModelConfig from config.json (plus generation_config.json's eos ids, which generation uses)."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{directory} has no config.json; pass a Hugging Face checkpoint directory")
    raw = read_json(config_path)
    archs = raw.get("architectures") or []
    arch = next((_ARCHITECTURES[a] for a in archs if a in _ARCHITECTURES), None)
    if arch is None:
        raise ModelLoadError(
            f"{config_path}: architectures {archs} not supported; use one of {', '.join(_ARCHITECTURES)}")
    raw = {**_DEFAULTS.get(arch, {}), **raw}
    if raw.get("use_bidirectional_attention"):
        raise ModelLoadError(f"{config_path}: bidirectional attention (use_bidirectional_attention) is not supported")
    key, activation = _ACTIVATIONS.get(arch, ("hidden_act", "silu"))
    if raw.get(key, activation) != activation:
        raise ModelLoadError(f"{config_path}: {key} {raw[key]!r} is not supported for {arch} (only {activation})")
    if arch in ("qwen3", "qwen3_moe") and raw.get("attention_bias"):
        raise ModelLoadError(f"{config_path}: attention_bias on {arch} (biases on q/k/v and o_proj) is not supported")
    try:
        hidden = int(raw["hidden_size"])
        num_heads = int(raw["num_attention_heads"])
        rope, local_theta = _gemma3_ropes(raw) if arch == "gemma3" else (_rope_parameters(raw), None)
        max_positions = int(raw["max_position_embeddings"])
        generation_path = directory / "generation_config.json"
        generation = read_json(generation_path) if generation_path.is_file() else {}
        return ModelConfig(
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(raw.get("head_dim") or hidden // num_heads),
            max_position_embeddings=max_positions,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling(rope, max_positions, config_path),
            partial_rotary_factor=float(rope.get("partial_rotary_factor", 1.0)),
            local_rope_theta=local_theta,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", arch in _GEMMA)),
            attention_bias=arch == "qwen2" or bool(raw.get("attention_bias", False)),
            qk_norm=arch in ("qwen3", "qwen3_moe", "gemma3"),
            moe=_moe(raw, arch),
            sliding_windows=_sliding_windows(raw, arch),
            attn_logit_softcap=float(raw.get("attn_logit_softcapping") or 0.0),
            final_logit_softcap=float(raw.get("final_logit_softcapping") or 0.0),
            attention_scale=(float(raw["query_pre_attn_scalar"]) ** -0.5 if arch in _GEMMA else None),
            name=directory.resolve().name,
            eos_token_ids=_eos_ids(raw.get("eos_token_id"), generation.get("eos_token_id")),
        )
    except KeyError as exc:
        raise ModelLoadError(f"{config_path}: required field {exc.args[0]!r} is missing") from exc
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{config_path}: invalid value: {exc}") from exc


def _sliding_windows(raw: dict[str, Any], arch: str) -> tuple[int, ...]:
    """Each layer's window, as transformers 5 reads the config (() when no layer has one): Mistral
    and Mixtral window every layer (`layer_types` is ignored there); Qwen2/Qwen3 follow `layer_types`,
    else window the layers from `max_window_layers` on, and Qwen3-MoE every layer, all only with
    `use_sliding_window`; Gemma follows `layer_types`, else its pattern. Llama has no window."""
    window = raw.get("sliding_window")
    layers = int(raw["num_hidden_layers"])
    if arch.startswith("qwen") and not raw.get("use_sliding_window", False):
        window = None
    if window is None or arch not in _WINDOWED:
        return ()
    if int(window) < 1:
        raise ValueError(f"sliding_window must be >= 1, got {window}")
    if raw.get("layer_types") and arch in ("qwen2", "qwen3", *_GEMMA):
        kinds = list(raw["layer_types"])
        if len(kinds) != layers or not set(kinds) <= {"sliding_attention", "full_attention"}:
            raise ValueError(f"layer_types must name sliding_attention or full_attention for each of {layers} "
                             f"layers, got {kinds}")
        windows = tuple(int(window) if kind == "sliding_attention" else 0 for kind in kinds)
    elif arch in _GEMMA:  # transformers' defaults: Gemma 2 every other layer global, Gemma 3 every sixth
        pattern = 2 if arch == "gemma2" else int(raw.get("sliding_window_pattern", _GEMMA3_WINDOW_PATTERN))
        windows = tuple(int(window) if (i + 1) % pattern else 0 for i in range(layers))
    elif arch in ("qwen2", "qwen3"):
        first = int(raw["max_window_layers"])
        windows = tuple(int(window) if i >= first else 0 for i in range(layers))
    else:
        windows = (int(window),) * layers
    return windows if any(windows) else ()


def _moe(raw: dict[str, Any], arch: str) -> MoEConfig | None:
    """Mixtral: every layer sparse, top-k renormalised. Qwen3-MoE: sparse every `decoder_sparse_step`
    layers but those in `mlp_only_layers`, renormalised when `norm_topk_prob`."""
    if arch == "mixtral":
        return MoEConfig(num_experts=int(raw["num_local_experts"]), top_k=int(raw["num_experts_per_tok"]),
                         intermediate_size=int(raw["intermediate_size"]), normalize_top_k=True)
    if arch != "qwen3_moe":
        return None
    layers, step = int(raw["num_hidden_layers"]), int(raw.get("decoder_sparse_step", 1))
    only_mlp = {int(i) for i in raw.get("mlp_only_layers") or ()}
    return MoEConfig(num_experts=int(raw.get("num_experts") or raw["num_local_experts"]),
                     top_k=int(raw["num_experts_per_tok"]), intermediate_size=int(raw["moe_intermediate_size"]),
                     normalize_top_k=bool(raw.get("norm_topk_prob", False)),
                     dense_layers=tuple(i for i in range(layers) if i in only_mlp or (i + 1) % step))


def _rope_parameters(raw: dict[str, Any]) -> dict[str, Any]:
    """transformers >= 5 writes `rope_parameters`; older configs have `rope_theta` + `rope_scaling`."""
    params = dict(raw.get("rope_scaling") or {})
    params.update(raw.get("rope_parameters") or {})
    for key in ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings"):  # older top-level fields
        if raw.get(key) is not None and key not in params:
            params[key] = raw[key]
    return params


def _gemma3_ropes(raw: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """Gemma 3's global RoPE (base and scaling) and its windowed layers' base: per layer type in
    `rope_parameters` (transformers >= 5), else `rope_theta` + `rope_scaling` and `rope_local_base_freq`."""
    params = raw.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    else:
        full, local = dict(raw.get("rope_scaling") or {}), {}
    full.setdefault("rope_theta", raw.get("rope_theta") or 1_000_000.0)  # (written as null by transformers 5)
    local.setdefault("rope_theta", raw.get("rope_local_base_freq") or 10_000.0)
    if local.get("rope_type", "default") != "default":
        raise ValueError(f"Gemma 3's windowed layers take plain RoPE, got {local['rope_type']!r}")
    return full, float(local["rope_theta"])


def _rope_scaling(rope: dict[str, Any], max_positions: int, config_path: pathlib.Path) -> RopeScaling | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return RopeScaling(factor=float(rope["factor"]), rope_type="linear")
    if kind in ("longrope", "su"):  # "su": the name early Phi-3 configs use
        return _longrope(rope, max_positions)
    if kind != "llama3":
        raise ModelLoadError(f"{config_path}: rope scaling type {kind!r} is not supported "
                             "(llama3, linear and longrope are)")
    return RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
    )


def _longrope(rope: dict[str, Any], max_positions: int) -> RopeScaling:
    """LongRoPE as transformers reads it: `factor` defaults to max_position_embeddings over the original
    length, and `attention_factor` to sqrt(1 + ln(factor) / ln(original)) (1 where factor <= 1)."""
    original = int(rope.get("original_max_position_embeddings") or max_positions)
    factor = float(rope.get("factor") or max_positions / original)
    attention = rope.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeScaling(factor=factor, rope_type="longrope", original_max_position_embeddings=original,
                       short_factor=tuple(rope["short_factor"]), long_factor=tuple(rope["long_factor"]),
                       attention_factor=float(attention))


def _eos_ids(*values: int | list[int] | None) -> tuple[int, ...]:
    ids: list[int] = []
    for value in values:
        if value is None:
            continue
        ids.extend([value] if isinstance(value, int) else [int(v) for v in value])
    return tuple(dict.fromkeys(ids))


def safetensors_files(directory: pathlib.Path) -> list[pathlib.Path]:
    index_path = directory / _INDEX_FILE
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index_path} has no weight_map")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index_path} names shard files that do not exist: {', '.join(missing)}")
        return files
    if (directory / _SINGLE_FILE).is_file():
        return [directory / _SINGLE_FILE]
    raise ModelLoadError(
        f"{directory} has no {_SINGLE_FILE} or {_INDEX_FILE}; only safetensors checkpoints are supported")


def load_hf(directory: pathlib.Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and fp32 weights; a tied model's stored `lm_head.weight`, if any, is dropped."""
    config = load_hf_config(directory)
    weights: dict[str, torch.Tensor] = {}
    for file in safetensors_files(directory):
        try:
            shard = load_file(str(file))
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{file} is not a readable safetensors file: {exc}") from exc
        for name, tensor in shard.items():
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            if name in weights:
                raise ModelLoadError(f"{file}: tensor {name} appears in more than one shard")
            weights[name] = tensor.to(torch.float32)
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    if config.architecture == "phi3":
        split_phi3_fused_weights(config, weights)
    return config, weights
