"""The weights fingerprint KV peers compare (engine/loader/fingerprint.py)."""

from __future__ import annotations

import dataclasses
import pathlib

import torch

from engine import LLM
from engine.config import ModelConfig
from engine.loader.api import load_model
from engine.loader.fingerprint import weights_fingerprint

CONFIG = ModelConfig(architecture="llama", vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=1,
                     num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5,
                     rope_theta=10000.0)


def test_the_same_weights_agree_and_other_weights_configs_dtypes_or_quantizations_do_not() -> None:
    torch.manual_seed(0)
    weights = {"a.weight": torch.randn(64, 32), "b.weight": torch.randn(100_000), "norm.weight": torch.ones(32)}
    base = weights_fingerprint(weights, CONFIG, torch.float32, None)
    shuffled = {k: v.clone() for k, v in reversed(weights.items())}
    assert base == weights_fingerprint(shuffled, CONFIG, torch.float32, None)
    assert base.endswith("|float32|none")
    fine_tuned = {**weights, "a.weight": weights["a.weight"] + 1e-3}
    assert weights_fingerprint(fine_tuned, CONFIG, torch.float32, None) != base
    reshaped = {**weights, "a.weight": weights["a.weight"].reshape(32, 64)}
    assert weights_fingerprint(reshaped, CONFIG, torch.float32, None) != base
    renamed = {("c.weight" if k == "a.weight" else k): v for k, v in weights.items()}
    assert weights_fingerprint(renamed, CONFIG, torch.float32, None) != base
    assert weights_fingerprint(weights, CONFIG, torch.bfloat16, None) != base
    assert weights_fingerprint(weights, CONFIG, torch.float32, "int4") != base
    other_rope = dataclasses.replace(CONFIG, rope_theta=500000.0)  # same shapes, other positions in the KV
    assert weights_fingerprint(weights, other_rope, torch.float32, None) != base


def test_an_engine_carries_its_checkpoints_fingerprint(tiny_llama_dir: pathlib.Path,
                                                       tiny_qwen2_dir: pathlib.Path) -> None:
    parts = LLM(str(tiny_llama_dir), num_kv_blocks=16, dtype="float32").engine.parts
    loaded = load_model(str(tiny_llama_dir))
    expected = weights_fingerprint(loaded.weights, loaded.config, torch.float32, None)
    assert parts.weights_fingerprint == expected
    other = LLM(str(tiny_qwen2_dir), num_kv_blocks=16, dtype="float32").engine.parts
    assert other.weights_fingerprint != expected


def test_a_bf16_gemma_names_its_norm_numerics(tiny_gemma2_dir: pathlib.Path) -> None:
    """Gemma's bf16 norms multiply by a fp32 1 + w (engine.models.gemma2): its fingerprint says so, so that a peer
    of a build that computed them otherwise is refused; in fp32 nothing changed and the fingerprint neither."""
    bf16 = LLM(str(tiny_gemma2_dir), num_kv_blocks=16, dtype="bfloat16").engine.parts.weights_fingerprint
    fp32 = LLM(str(tiny_gemma2_dir), num_kv_blocks=16, dtype="float32").engine.parts.weights_fingerprint
    assert bf16.endswith("|bfloat16|none|gemma-norms-fp32") and fp32.endswith("|float32|none")


def test_longrope_engines_of_other_contexts_do_not_agree(tiny_phi3_dir: pathlib.Path) -> None:
    """A Phi-3 engine's context picks its LongRoPE set, so its KV: a short-context engine and a long one
    must refuse each other's KV; engines of the same set agree, whatever their context."""
    def fingerprint(max_model_len: int) -> str:
        llm = LLM(str(tiny_phi3_dir), num_kv_blocks=32, dtype="float32", max_model_len=max_model_len)
        return llm.engine.parts.weights_fingerprint

    short = fingerprint(64)
    assert short == fingerprint(32) and short != fingerprint(65)
