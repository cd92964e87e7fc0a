"""GGUF tensor names → Hugging Face names, and the llama q/k row un-permutation.

ggml's llama converter reorders the rows of `attn_q`/`attn_k` inside each head so that its
interleaved RoPE can be used; HF checkpoints use the half-split (NeoX) order. Undoing that is a
pure row permutation, so it applies equally to dequantized weights and to per-row quantized blocks.
"""

from __future__ import annotations

import re

import numpy as np

_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm",  # Qwen3
    "attn_k_norm": "self_attn.k_norm",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

# Architectures whose GGUF converter permutes q/k rows for interleaved RoPE.
PERMUTED_QK_ARCHITECTURES = frozenset({"llama", "mistral"})


def gguf_to_hf_name(name: str) -> str | None:
    """The HF parameter name of a GGUF tensor, or None for tensors the model does not use."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    match = _LAYER_RE.match(name)
    if match is None or match.group(2) not in _LAYER_TENSORS:
        return None
    layer, kind, suffix = match.groups()
    return f"model.layers.{layer}.{_LAYER_TENSORS[kind]}.{suffix}"


def unpermute_qk_rows(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo ggml's per-head row interleave. `rows` is [out_features, ...] (any trailing shape)."""
    out = rows.shape[0]
    if out % (2 * num_heads):
        raise ValueError(f"{out} rows cannot be split into {num_heads} heads of even size")
    trailing = rows.shape[1:]
    per_head = out // num_heads
    grouped = rows.reshape(num_heads, per_head // 2, 2, *trailing)
    return np.ascontiguousarray(grouped.swapaxes(1, 2)).reshape(out, *trailing)
