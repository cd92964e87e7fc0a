"""GGUF files of the families beyond Llama's layers (Phi-3, Gemma 2 and 3, Mixtral, Qwen3-MoE), written
as llama.cpp's converter lays them out, load as their safetensors twins: the same config and the same
model (Gemma's norms are stored as 1 + w, so compared as the model folds them), hence the same logits."""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Callable
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file

from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.loader.api import load_model
from engine.loader.engine_parts import build_model
from engine.loader.gguf_loader import load_gguf
from engine.platform import detect_platform
from tests.test_loader import causal_attention, permute_qk, write_gguf

LLAMA_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
GEMMA_LAYER = {**LLAMA_LAYER, "post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
PHI3_LAYER = {**LLAMA_LAYER, "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}
GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}
EXPERTS = {"mixtral": ("block_sparse_moe.gate", ("w1", "w3", "w2")),
           "qwen3_moe": ("mlp.gate", ("gate_proj", "up_proj", "down_proj"))}


def convert(state: dict[str, np.ndarray], layer_names: dict[str, str], *, plus_one_norms: bool = False,
            permute_heads: tuple[int, int] | None = None,
            experts: str | None = None) -> dict[str, tuple[np.ndarray, Q]]:
    """What llama.cpp's convert script writes for a HF state dict (F32 tensors)."""
    out: dict[str, np.ndarray] = {}
    stacks: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name, array in state.items():
        array = array.astype(np.float32)
        if plus_one_norms and name.endswith("norm.weight"):
            array = array + np.float32(1.0)
        if name in GLOBAL:
            out[GLOBAL[name]] = array
            continue
        _, _, layer, rest = name.split(".", 3)
        module = rest.removesuffix(".weight")
        if experts is not None:
            router, parts = EXPERTS[experts]
            if module == router:
                out[f"blk.{layer}.ffn_gate_inp.weight"] = array
                continue
            if ".experts." in module:
                expert, part = module.split(".experts.")[1].split(".")
                kind = ("gate", "up", "down")[parts.index(part)]
                stacks.setdefault((layer, kind), {})[int(expert)] = array
                continue
        if permute_heads is not None and module in ("self_attn.q_proj", "self_attn.k_proj"):
            array = permute_qk(array, permute_heads[module == "self_attn.k_proj"])
        out[f"blk.{layer}.{layer_names[module]}.weight"] = array
    for (layer, kind), by_expert in stacks.items():
        out[f"blk.{layer}.ffn_{kind}_exps.weight"] = np.stack([by_expert[e] for e in sorted(by_expert)])
    return {name: (array, Q.F32) for name, array in out.items()}


def _phi3(w: gguf.GGUFWriter, raw: dict[str, Any]) -> None:
    rope = raw["rope_parameters"]
    w.add_rope_dimension_count(12)
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(8) / math.log(64)))
    w.add_sliding_window(raw["sliding_window"])


def _gemma(w: gguf.GGUFWriter, raw: dict[str, Any]) -> None:
    w.add_sliding_window(raw["sliding_window"])
    w.add_attention_scale(raw["query_pre_attn_scalar"] ** -0.5)  # the tiny twins' 24 is not llama.cpp's default
    if raw.get("attn_logit_softcapping"):
        w.add_attn_logit_softcapping(raw["attn_logit_softcapping"])
        w.add_final_logit_softcapping(raw["final_logit_softcapping"])
    if "layer_types" in raw:
        w.add_sliding_window_pattern([kind == "sliding_attention" for kind in raw["layer_types"]])
    if "full_attention" in raw.get("rope_parameters", {}):  # Gemma 3: linear scaling on the global layers
        full = raw["rope_parameters"]["full_attention"]
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(full["factor"])


def _moe(w: gguf.GGUFWriter, raw: dict[str, Any]) -> None:
    w.add_expert_count(raw.get("num_local_experts") or raw["num_experts"])
    w.add_expert_used_count(raw["num_experts_per_tok"])
    if "moe_intermediate_size" in raw:
        w.add_expert_feed_forward_length(raw["moe_intermediate_size"])
        w.add_expert_weights_norm(raw["norm_topk_prob"])


# fixture, GGUF architecture, layer names, converter options, metadata
FAMILIES: dict[str, tuple[str, dict[str, str], dict[str, Any], Callable[[gguf.GGUFWriter, dict[str, Any]], None]]] = {
    "tiny_phi3_dir": ("phi3", PHI3_LAYER, {}, _phi3),
    "tiny_gemma2_dir": ("gemma2", GEMMA_LAYER, {"plus_one_norms": True}, _gemma),
    "tiny_gemma3_dir": ("gemma3", GEMMA_LAYER, {"plus_one_norms": True}, _gemma),
    "tiny_mixtral_dir": ("llama", LLAMA_LAYER, {"permute_heads": (4, 2), "experts": "mixtral"}, _moe),
    "tiny_qwen3_moe_dir": ("qwen3moe", LLAMA_LAYER, {"experts": "qwen3_moe"}, _moe),
}


def write_twin(directory: pathlib.Path, fixture: str, path: pathlib.Path) -> None:
    import json
    arch, layer_names, options, family_meta = FAMILIES[fixture]
    raw = json.loads((directory / "config.json").read_text())
    rope = raw.get("rope_parameters") or {}
    theta = rope.get("full_attention", rope).get("rope_theta", 10000.0)
    meta = {"layers": raw["num_hidden_layers"], "hidden": raw["hidden_size"], "heads": raw["num_attention_heads"],
            "kv_heads": raw["num_key_value_heads"], "ffn": raw["intermediate_size"], "theta": theta,
            "context": raw["max_position_embeddings"], "head_dim": raw.get("head_dim") or 16}
    state = load_file(str(directory / "model.safetensors"))
    extra = {}
    if arch == "phi3":
        extra = {f"rope_factors_{kind}.weight": np.array(rope[f"{kind}_factor"], np.float32)
                 for kind in ("long", "short")}
    write_gguf(path, arch, meta, convert(state, layer_names, **options), extra,
               configure=lambda w: family_meta(w, raw))


def _as_float32(config: ModelConfig) -> Any:
    """The config with every float as the fp32 value the model computes with (GGUF metadata is fp32) and no name."""
    def cast(value: Any) -> Any:
        if isinstance(value, float):
            return float(np.float32(value))
        if isinstance(value, (list, tuple)):
            return tuple(cast(v) for v in value)
        if isinstance(value, dict):
            return {k: cast(v) for k, v in value.items()}
        return value
    return cast({**dataclasses.asdict(config), "name": None})


def _folded(config: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model multiplies by: Gemma's norms as 1 + w."""
    if config.architecture not in ("gemma2", "gemma3"):
        return weights
    return {k: 1.0 + v if k.endswith("norm.weight") else v for k, v in weights.items()}


@pytest.mark.parametrize("fixture", list(FAMILIES))
def test_gguf_twin_loads_as_the_safetensors_checkpoint(fixture: str, request: pytest.FixtureRequest,
                                                       tmp_path: pathlib.Path, cache_tmp: pathlib.Path) -> None:
    directory = request.getfixturevalue(fixture)
    write_twin(directory, fixture, tmp_path / "twin.gguf")
    from_gguf, from_hf = load_model(tmp_path / "twin.gguf"), load_model(directory)
    assert _as_float32(from_gguf.config) == _as_float32(from_hf.config)
    assert from_gguf.weights.keys() == from_hf.weights.keys()
    ours, theirs = _folded(from_gguf.config, from_gguf.weights), _folded(from_hf.config, from_hf.weights)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert set(from_gguf.gguf_quant_types) == set(from_gguf.weights)
    platform, ids = detect_platform("cpu"), torch.arange(3, 60)
    logits = []
    for loaded in (from_gguf, from_hf):
        model = build_model(loaded, platform, torch.float32)
        hidden = model(ids, torch.arange(len(ids)), causal_attention(loaded.config.head_dim))
        logits.append(model.compute_logits(hidden))
    assert torch.equal(logits[0], logits[1])


def test_gguf_gemma_attention_scale_defaults_to_llama_cpps(tiny_gemma2_dir: pathlib.Path, tmp_path: pathlib.Path,
                                                           cache_tmp: pathlib.Path) -> None:
    """Without `attention.scale` a Gemma file is scaled as llama.cpp does: 1/sqrt(head_dim); without caps, Gemma 2
    caps as llama.cpp does (50 and 30), and without a window it has llama.cpp's (4096)."""
    state = load_file(str(tiny_gemma2_dir / "model.safetensors"))
    meta = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 128, "head_dim": 16}
    write_gguf(tmp_path / "g.gguf", "gemma2", meta, convert(state, GEMMA_LAYER, plus_one_norms=True),
               configure=lambda w: w.add_sliding_window(6))
    config = load_gguf(tmp_path / "g.gguf").config
    assert config.attention_scale == 16 ** -0.5 and config.sliding_windows == (6, 0)
    assert (config.attn_logit_softcap, config.final_logit_softcap) == (50.0, 30.0)
    write_gguf(tmp_path / "w.gguf", "gemma2", meta, convert(state, GEMMA_LAYER, plus_one_norms=True))
    assert load_gguf(tmp_path / "w.gguf").config.sliding_windows == (4096, 0)


def test_gguf_experts_of_the_wrong_shape_or_family_are_refused(tiny_qwen3_moe_dir: pathlib.Path,
                                                              tmp_path: pathlib.Path, cache_tmp: pathlib.Path) -> None:
    state = load_file(str(tiny_qwen3_moe_dir / "model.safetensors"))
    tensors = convert(state, LLAMA_LAYER, experts="qwen3_moe")
    meta = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 128, "head_dim": 16}
    name = "blk.1.ffn_up_exps.weight"
    tensors[name] = (tensors[name][0][:5], Q.F32)  # five experts of six
    raw = {"num_experts": 6, "num_experts_per_tok": 3, "moe_intermediate_size": 48, "norm_topk_prob": False}
    write_gguf(tmp_path / "m.gguf", "qwen3moe", meta, tensors, configure=lambda w: _moe(w, raw))
    with pytest.raises(ModelLoadError, match=r"layer 1's up_exps: shape \(5, 48, 64\) is not \[6 experts"):
        load_model(tmp_path / "m.gguf")
    write_gguf(tmp_path / "p.gguf", "phi3", meta, tensors, configure=lambda w: _moe(w, raw))
    with pytest.raises(ModelLoadError, match="experts in a phi3 file are not supported"):
        load_model(tmp_path / "p.gguf")
