"""Quantized layers straight from GGUF blocks, for the merged projections of our model.

Q4_0/Q4_1 tensors become int4 layers without a float round trip (exactly the file's values, up to
the kernel's bf16 scales); a Q8_0 embedding tied to the output gives the lm_head its int8 weights.
The lm_head stays int8 even in int4 mode: logits are the most precision-sensitive matmul.
"""

from __future__ import annotations

import logging
import pathlib

from gguf import GGMLQuantizationType, GGUFReader
from torch import nn

from engine.config import ModelConfig
from engine.loader.gguf_names import PERMUTED_QK_ARCHITECTURES, gguf_to_hf_name, unpermute_qk_rows
from engine.quant import Int4Weights, Int8Weights, QuantMethod, int4_from_gguf, int8_from_gguf_q8_0
from engine.quant_layers import quantize_model

log = logging.getLogger(__name__)
_Q4 = {GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1}


def _gguf_int4_blocks(path: pathlib.Path, config: ModelConfig) -> dict[str, Int4Weights | Int8Weights]:
    """HF name → quantized weights for every Q4_0/Q4_1 tensor (q/k rows un-permuted) and a Q8_0
    embedding (as `lm_head.weight` when the output is tied to it)."""
    out: dict[str, Int4Weights | Int8Weights] = {}
    for tensor in GGUFReader(path).tensors:
        name = gguf_to_hf_name(tensor.name)
        qtype = GGMLQuantizationType(tensor.tensor_type)
        if name is None or len(tensor.shape) != 2:
            continue
        shape = (int(tensor.shape[1]), int(tensor.shape[0]))  # ggml lists dimensions innermost first
        if qtype in _Q4:
            weights = int4_from_gguf(tensor.data, qtype, shape)
            if config.architecture in PERMUTED_QK_ARCHITECTURES and ".q_proj." in name:
                weights = weights.map_rows(lambda a: unpermute_qk_rows(a, config.num_heads))
            elif config.architecture in PERMUTED_QK_ARCHITECTURES and ".k_proj." in name:
                weights = weights.map_rows(lambda a: unpermute_qk_rows(a, config.num_kv_heads))
            out[name] = weights
        elif qtype == GGMLQuantizationType.Q8_0 and name in ("model.embed_tokens.weight", "lm_head.weight"):
            target = "lm_head.weight" if config.tie_word_embeddings or name == "lm_head.weight" else None
            if target is not None:
                out[target] = int8_from_gguf_q8_0(tensor.data, shape)
    return out


def _merged(blocks: dict[str, Int4Weights | Int8Weights], config: ModelConfig) -> dict[str, Int4Weights | Int8Weights]:
    """Our module name → weights, concatenating rows where our model merges projections."""
    merged: dict[str, Int4Weights | Int8Weights] = {}
    for i in range(config.num_layers):
        pre = f"model.layers.{i}"
        groups = {
            f"layers.{i}.self_attn.qkv_proj": [f"{pre}.self_attn.{p}_proj.weight" for p in "qkv"],
            f"layers.{i}.self_attn.o_proj": [f"{pre}.self_attn.o_proj.weight"],
            f"layers.{i}.mlp.gate_up_proj": [f"{pre}.mlp.gate_proj.weight", f"{pre}.mlp.up_proj.weight"],
            f"layers.{i}.mlp.down_proj": [f"{pre}.mlp.down_proj.weight"],
        }
        for module, names in groups.items():
            parts = [blocks.get(n) for n in names]
            if all(isinstance(p, Int4Weights) for p in parts):
                merged[module] = Int4Weights.concat(parts)  # type: ignore[arg-type]
    if isinstance(blocks.get("lm_head.weight"), Int8Weights):
        merged["lm_head"] = blocks["lm_head.weight"]
    return merged


def quantize_loaded_model(model: nn.Module, method: QuantMethod, source: pathlib.Path,
                          prebuilt: bool = True) -> list[str]:
    """Quantize `model` in place with `method`, taking prebuilt weights from a GGUF source when it
    stores them in a matching format (and `prebuilt`). Returns the names of the quantized layers."""
    config: ModelConfig = model.config  # type: ignore[assignment]
    blocks: dict[str, Int4Weights | Int8Weights] = {}
    if method == "int4" and source.suffix == ".gguf" and prebuilt:
        blocks = _merged(_gguf_int4_blocks(source, config), config)
        log.info("int4 from GGUF blocks: %d layers", len(blocks))
    if method == "int8":
        return quantize_model(model, "int8", skip=_is_router)
    head = {k: v for k, v in blocks.items() if k == "lm_head"}
    body = {k: v for k, v in blocks.items() if k != "lm_head"}
    names = quantize_model(model, "int4", skip=lambda n: n == "lm_head" or _is_router(n), prebuilt=body)
    return names + quantize_model(model, "int8", skip=lambda n: n != "lm_head", prebuilt=head)


def _is_router(name: str) -> bool:
    """An MoE router (engine.models.moe.SparseMoE.gate) stays float: quantizing it moves tokens
    between experts. The experts are quantized as dense MLPs are."""
    return name.endswith(".mlp.gate")
