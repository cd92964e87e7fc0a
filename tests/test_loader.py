"""Model loading: HF directories, GGUF files (every supported tensor type), errors, the weight cache."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from engine.errors import ModelLoadError
from engine.loader.api import LoadedModel, load_model
from engine.loader.gguf_loader import llama3_rope_divisors
from engine.loader.gguf_names import unpermute_qk_rows
from engine.loader.weight_cache import cache_dir

# --- a minimal GGUF writer, independent of the loader under test ----------------------------------------

_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}


def to_gguf_name(hf: str) -> str:
    if hf in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf]
    _, _, layer, *module, suffix = hf.split(".")
    return f"blk.{layer}.{_LAYER_NAMES['.'.join(module)]}.{suffix}"


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert script does to q/k rows (HF half-split → ggml interleaved)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: pathlib.Path, arch: str, meta: dict[str, Any], tensors: dict[str, tuple[np.ndarray, Q]],
               extra_tensors: dict[str, np.ndarray] | None = None,
               configure: Callable[[gguf.GGUFWriter], None] | None = None) -> None:
    """`tensors`: GGUF name → (float32 values, or raw uint8 bytes when the type cannot be quantized here);
    `configure` adds a family's own metadata."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(meta["layers"])
    writer.add_context_length(meta.get("context", 256))
    writer.add_embedding_length(meta["hidden"])
    writer.add_feed_forward_length(meta["ffn"])
    writer.add_head_count(meta["heads"])
    writer.add_head_count_kv(meta["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(meta.get("theta", 10000.0))
    if "experts" in meta:
        writer.add_expert_count(meta["experts"])
    if "head_dim" in meta:
        writer.add_key_length(meta["head_dim"])
        writer.add_value_length(meta["head_dim"])
    writer.add_eos_token_id(2)
    writer.add_name("tiny")
    if configure is not None:
        configure(writer)
    for name, (array, qtype) in tensors.items():
        if array.dtype == np.uint8:
            writer.add_tensor(name, array, raw_dtype=qtype)
        elif qtype == Q.F32:
            writer.add_tensor(name, array.astype(np.float32))
        elif qtype == Q.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array.astype(np.float32), qtype), raw_dtype=qtype)
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


TINY_META = {"layers": 2, "hidden": 64, "ffn": 128, "heads": 4, "kv_heads": 2}


def tiny_state_dict(seed: int = 0, tied: bool = False) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    state = LlamaForCausalLM(config).state_dict()
    # Non-trivial norms so that a wrong mapping cannot pass by accident.
    return {k: (v + torch.rand_like(v) if "norm" in k else v).numpy() for k, v in state.items()
            if not (tied and k == "lm_head.weight")}


def write_tiny_llama_gguf(path: pathlib.Path, state: dict[str, np.ndarray], qtype: Q) -> None:
    tensors: dict[str, tuple[np.ndarray, Q]] = {}
    for hf, w in state.items():
        if "q_proj" in hf:
            w = permute_qk(w, TINY_META["heads"])
        elif "k_proj" in hf:
            w = permute_qk(w, TINY_META["kv_heads"])
        tensors[to_gguf_name(hf)] = (w, qtype if w.ndim == 2 else Q.F32)
    write_gguf(path, "llama", TINY_META, tensors)


# --- the default model ------------------------------------------------------------------------------------

DefaultLoads = tuple[LoadedModel, LoadedModel, float, float]


@pytest.fixture(scope="module")
def default_loads(default_model_path: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[DefaultLoads]:
    """(first load, second load, seconds of each) in an empty cache directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TANDEM_CACHE_DIR", str(tmp_path_factory.mktemp("default_cache")))
        started = time.perf_counter()
        first = load_model(None)
        first_s = time.perf_counter() - started
        started = time.perf_counter()
        second = load_model(default_model_path)
        second_s = time.perf_counter() - started
        yield first, second, first_s, second_s


def test_default_model_config(default_loads: DefaultLoads) -> None:
    model = default_loads[0]
    c = model.config
    assert (c.architecture, c.num_layers, c.hidden_size, c.intermediate_size) == ("llama", 30, 576, 1536)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.tie_word_embeddings and "lm_head.weight" not in model.weights
    assert c.rope_theta == 1e5 and c.rope_scaling is None and c.eos_token_ids == (2,)
    assert c.max_position_embeddings == 8192 and not c.attention_bias
    assert model.gguf_quant_types["model.embed_tokens.weight"] == int(Q.Q8_0)
    assert model.gguf_quant_types["model.layers.0.self_attn.q_proj.weight"] == int(Q.Q4_1)
    assert model.gguf_quant_types["model.norm.weight"] == int(Q.F32)


def test_default_model_second_load_comes_from_cache(
        default_loads: DefaultLoads) -> None:
    first, second, first_s, second_s = default_loads
    print(f"default model: first load {first_s:.2f} s, second (cached) load {second_s:.3f} s")
    assert second.config == first.config and second.gguf_quant_types == first.gguf_quant_types
    assert second.weights.keys() == first.weights.keys()
    assert all(torch.equal(first.weights[k], second.weights[k]) for k in first.weights)
    assert second_s < first_s / 5


@pytest.mark.slow  # transformers' own GGUF conversion takes 20-45 s here
def test_default_model_equals_transformers_gguf_load(
        default_model_path: pathlib.Path, default_loads: DefaultLoads) -> None:
    ours = default_loads[0].weights
    hf = AutoModelForCausalLM.from_pretrained(
        str(default_model_path.parent), gguf_file=default_model_path.name, dtype=torch.float32).state_dict()
    assert set(hf) - set(ours) == {"lm_head.weight"}  # tied: transformers exposes the shared tensor twice
    for name, tensor in ours.items():
        assert torch.equal(tensor, hf[name]), name


# --- Hugging Face directories -----------------------------------------------------------------------------

def test_tiny_llama_dir(tiny_llama_dir: pathlib.Path) -> None:
    model = load_model(tiny_llama_dir)
    c = model.config
    assert (c.architecture, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (
        "llama", 64, 2, 4, 2, 16)
    assert (c.vocab_size, c.intermediate_size, c.max_position_embeddings) == (512, 128, 256)
    assert c.rope_theta == 10000.0 and c.rope_scaling is None and c.eos_token_ids == (2,)
    assert not c.tie_word_embeddings and not c.attention_bias and c.rms_norm_eps == 1e-5
    assert model.gguf_quant_types == {} and model.source == tiny_llama_dir.resolve()
    stored = load_file(str(tiny_llama_dir / "model.safetensors"))
    assert model.weights.keys() == stored.keys() and "lm_head.weight" in model.weights
    assert all(torch.equal(model.weights[k], stored[k]) for k in stored)


def test_tiny_qwen2_dir(tiny_qwen2_dir: pathlib.Path) -> None:
    model = load_model(str(tiny_qwen2_dir))
    c = model.config
    assert c.architecture == "qwen2" and c.attention_bias and c.tie_word_embeddings and c.rope_theta == 1e6
    assert "lm_head.weight" not in model.weights
    assert model.weights["model.layers.1.self_attn.k_proj.bias"].shape == (32,)
    stored = load_file(str(tiny_qwen2_dir / "model.safetensors"))
    assert all(torch.equal(model.weights[k], stored[k]) for k in model.weights)


def test_sharded_bf16_checkpoint(tmp_path: pathlib.Path, tiny_llama_dir: pathlib.Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.bfloat16)
    model.save_pretrained(str(tmp_path), max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    loaded = load_model(tmp_path)
    expected = model.state_dict()
    assert loaded.weights.keys() == expected.keys()
    for name, tensor in loaded.weights.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, expected[name].float()), name


def _edit_config(directory: pathlib.Path, source: pathlib.Path, **changes: Any) -> None:
    directory.mkdir(exist_ok=True)
    for file in source.iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    config = json.loads((source / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_hf_config_variants(tmp_path: pathlib.Path, tiny_llama_dir: pathlib.Path) -> None:
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 128, "rope_theta": 5e5}
    _edit_config(tmp_path / "new", tiny_llama_dir, rope_parameters=llama3, eos_token_id=[2, 1])
    (tmp_path / "new" / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 0]}))
    config = load_model(tmp_path / "new").config
    assert config.rope_theta == 5e5 and config.eos_token_ids == (2, 1, 0)
    assert config.rope_scaling is not None and config.rope_scaling.factor == 8.0
    assert config.rope_scaling.original_max_position_embeddings == 128

    old_style = {k: v for k, v in llama3.items() if k != "rope_theta"}
    _edit_config(tmp_path / "old", tiny_llama_dir, rope_parameters=None, rope_scaling=old_style,
                 rope_theta=2e4, architectures=["MistralForCausalLM"], sliding_window=None)
    config = load_model(tmp_path / "old").config
    assert config.architecture == "mistral" and config.rope_theta == 2e4 and config.rope_scaling is not None

    _edit_config(tmp_path / "yarn", tiny_llama_dir, rope_parameters={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ModelLoadError, match="yarn"):
        load_model(tmp_path / "yarn")
    _edit_config(tmp_path / "arch", tiny_llama_dir, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel"):
        load_model(tmp_path / "arch")
    _edit_config(tmp_path / "head_dim", tiny_llama_dir, head_dim=32)  # shapes no longer match the weights
    with pytest.raises(ModelLoadError, match="q_proj"):
        load_model(tmp_path / "head_dim")


# --- GGUF files -------------------------------------------------------------------------------------------

# Worst-case |error| relative to the tensor's max |value| for each type.
TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 8e-3, Q.Q8_0: 1e-2, Q.Q5_0: 0.05, Q.Q5_1: 0.05,
             Q.Q4_0: 0.1, Q.Q4_1: 0.1}


@pytest.mark.parametrize("qtype", list(TOLERANCE), ids=lambda q: q.name)
def test_gguf_types_dequantize_and_unpermute(qtype: Q, tmp_path: pathlib.Path,
                                             cache_tmp: pathlib.Path) -> None:
    state = tiny_state_dict()
    write_tiny_llama_gguf(tmp_path / "tiny.gguf", state, qtype)
    model = load_model(tmp_path / "tiny.gguf")
    c = model.config
    assert (c.architecture, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (
        "llama", 2, 64, 4, 2, 512)
    assert not c.tie_word_embeddings and c.eos_token_ids == (2,) and c.name == "tiny"
    assert model.weights.keys() == state.keys()
    for name, original in state.items():
        loaded = model.weights[name].numpy()
        error = np.abs(loaded - original).max() / np.abs(original).max()
        assert error <= TOLERANCE[qtype] if original.ndim == 2 else error == 0, (name, error)
        expected_type = qtype if original.ndim == 2 else Q.F32
        assert model.gguf_quant_types[name] == int(expected_type)


def test_gguf_qwen2_is_not_unpermuted(tmp_path: pathlib.Path, cache_tmp: pathlib.Path) -> None:
    state = tiny_state_dict(seed=3, tied=True)
    for i in range(2):
        for proj, rows in (("q", 64), ("k", 32), ("v", 32)):
            state[f"model.layers.{i}.self_attn.{proj}_proj.bias"] = np.random.default_rng(i).standard_normal(
                rows).astype(np.float32)
    write_gguf(tmp_path / "q.gguf", "qwen2", {**TINY_META, "theta": 1e6},
               {to_gguf_name(k): (v, Q.F32) for k, v in state.items()})
    model = load_model(tmp_path / "q.gguf")
    assert model.config.architecture == "qwen2" and model.config.attention_bias
    assert model.config.tie_word_embeddings and model.config.rope_theta == 1e6
    assert model.weights.keys() == state.keys()
    assert all(np.array_equal(model.weights[k].numpy(), v) for k, v in state.items())


def causal_attention(head_dim: int):  # type: ignore[no-untyped-def]
    """A whole-sequence causal attention function for calling a model outside the engine."""

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        heads = [t.reshape(t.shape[0], -1, head_dim).transpose(0, 1) for t in (q, k, v)]
        out = torch.nn.functional.scaled_dot_product_attention(*heads, is_causal=True, enable_gqa=True)
        return out.transpose(0, 1).reshape(q.shape)

    return attend


def test_gguf_qwen3_loads_like_its_safetensors_twin(tiny_qwen3_dir: pathlib.Path, tmp_path: pathlib.Path,
                                                   cache_tmp: pathlib.Path) -> None:
    """The tiny Qwen3 checkpoint written as GGUF (F32, as llama.cpp's converter names it, q/k rows
    not permuted): the same config and weights, and the same logits through the engine's model."""
    from safetensors.numpy import load_file

    from engine.loader.engine_parts import build_model
    from engine.platform import detect_platform

    state = load_file(str(tiny_qwen3_dir / "model.safetensors"))
    write_gguf(tmp_path / "q3.gguf", "qwen3", {**TINY_META, "theta": 1e6, "head_dim": 32},
               {to_gguf_name(k): (v, Q.F32) for k, v in state.items()})
    from_gguf, from_hf = load_model(tmp_path / "q3.gguf"), load_model(tiny_qwen3_dir)
    for c in (from_gguf.config, from_hf.config):
        assert c.architecture == "qwen3" and c.qk_norm and not c.attention_bias and c.head_dim == 32
    assert from_gguf.weights.keys() == from_hf.weights.keys()
    assert all(torch.equal(from_gguf.weights[k], from_hf.weights[k]) for k in from_hf.weights)
    platform = detect_platform("cpu")
    ids = torch.arange(3, 40)
    outputs = []
    for loaded in (from_gguf, from_hf):
        model = build_model(loaded, platform, torch.float32)
        outputs.append(model.compute_logits(model(ids, torch.arange(len(ids)), causal_attention(32))))
    assert torch.equal(outputs[0], outputs[1])


def test_gguf_k_quants_match_gguf_dequantize(tmp_path: pathlib.Path, cache_tmp: pathlib.Path) -> None:
    """The gguf package cannot quantize K types: write random blocks and compare with its dequantize."""
    rng = np.random.default_rng(0)
    meta = {"layers": 1, "hidden": 256, "ffn": 256, "heads": 4, "kv_heads": 2}
    shapes = {"token_embd.weight": (512, 256), "blk.0.attn_q.weight": (256, 256),
              "blk.0.attn_k.weight": (128, 256), "blk.0.attn_v.weight": (128, 256),
              "blk.0.attn_output.weight": (256, 256), "blk.0.ffn_gate.weight": (256, 256),
              "blk.0.ffn_up.weight": (256, 256), "blk.0.ffn_down.weight": (256, 256)}
    kinds = [Q.Q4_K, Q.Q6_K, Q.Q5_K]
    tensors: dict[str, tuple[np.ndarray, Q]] = {}
    for i, (name, (rows, cols)) in enumerate(shapes.items()):
        qtype = kinds[i % 3]
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (rows, cols // block_elems * block_bytes), dtype=np.uint8)
        raw.view(np.uint16)[:] &= 0xBFFF  # every 2-byte field, f16 scales included, is finite (|x| < 2)
        tensors[name] = (raw, qtype)
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        tensors[name] = (rng.standard_normal(256).astype(np.float32), Q.F32)
    write_gguf(tmp_path / "k.gguf", "llama", meta, tensors)
    model = load_model(tmp_path / "k.gguf")
    for name, (raw, qtype) in tensors.items():
        hf = model.weights[to_hf(name)].numpy()
        expected = gguf.quants.dequantize(raw, qtype) if raw.dtype == np.uint8 else raw
        if ".attn_q." in name or ".attn_k." in name:
            expected = unpermute_qk_rows(expected, 4 if ".attn_q." in name else 2)
        np.testing.assert_array_equal(hf, expected, err_msg=name)
        assert model.gguf_quant_types[to_hf(name)] == int(qtype)


def to_hf(gguf_name: str) -> str:
    inverse = {v: k for k, v in _GLOBAL_NAMES.items()}
    if gguf_name in inverse:
        return inverse[gguf_name]
    _, layer, kind, suffix = gguf_name.split(".")
    module = {v: k for k, v in _LAYER_NAMES.items()}[kind]
    return f"model.layers.{layer}.{module}.{suffix}"


def test_gguf_unsupported_type(tmp_path: pathlib.Path, cache_tmp: pathlib.Path) -> None:
    state = tiny_state_dict()
    tensors = {to_gguf_name(k): (v, Q.F32) for k, v in state.items()}
    tensors["blk.0.ffn_up.weight"] = (np.zeros((128, 256 // 256 * 84), np.uint8), Q.Q2_K)  # [128, 256] Q2_K
    write_gguf(tmp_path / "q2k.gguf", "llama", TINY_META, tensors)
    with pytest.raises(ModelLoadError, match="Q2_K"):
        load_model(tmp_path / "q2k.gguf")


def test_gguf_llama3_rope_freqs(tmp_path: pathlib.Path, cache_tmp: pathlib.Path) -> None:
    from engine.config import RopeScaling

    state = tiny_state_dict()
    tensors = {to_gguf_name(k): (v, Q.F32) for k, v in state.items()}
    scaling = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)
    divisors = llama3_rope_divisors(scaling, head_dim=16, theta=5e5)
    assert divisors.min() == 1.0 and divisors.max() == 32.0 and len(set(divisors.tolist())) > 2
    write_gguf(tmp_path / "l3.gguf", "llama", {**TINY_META, "theta": 5e5}, tensors,
               {"rope_freqs.weight": divisors})
    assert load_model(tmp_path / "l3.gguf").config.rope_scaling == scaling
    write_gguf(tmp_path / "bad.gguf", "llama", {**TINY_META, "theta": 5e5}, tensors,
               {"rope_freqs.weight": divisors[::-1].copy()})
    with pytest.raises(ModelLoadError, match="rope_freqs"):
        load_model(tmp_path / "bad.gguf")


# --- errors -----------------------------------------------------------------------------------------------

def test_corrupt_gguf_files(tmp_path: pathlib.Path, cache_tmp: pathlib.Path) -> None:
    write_tiny_llama_gguf(tmp_path / "whole.gguf", tiny_state_dict(), Q.Q8_0)
    data = (tmp_path / "whole.gguf").read_bytes()
    cases = {"truncated.gguf": data[: len(data) // 2], "header_only.gguf": data[:200],
             "random.gguf": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
             "empty.gguf": b""}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ModelLoadError, match=name):
            load_model(tmp_path / name)


def test_bad_paths(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"weights\.bin.*\.gguf"):
        load_model(tmp_path / "weights.bin")


def test_hf_dir_without_safetensors(tmp_path: pathlib.Path, tiny_llama_dir: pathlib.Path) -> None:
    (tmp_path / "config.json").write_bytes((tiny_llama_dir / "config.json").read_bytes())
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(tmp_path)


# --- the weight cache -------------------------------------------------------------------------------------

def test_cache_hit_corruption_and_invalidation(tmp_path: pathlib.Path, cache_tmp: pathlib.Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path, tiny_state_dict(), Q.Q4_1)
    first = load_model(path)
    entries = list(cache_dir().glob("weights-*.safetensors"))
    assert cache_dir() == cache_tmp and len(entries) == 1

    import engine.loader.api as api

    def no_conversion(_: pathlib.Path) -> None:
        raise AssertionError("converted again instead of reading the cache")

    with monkeypatch.context() as mp:
        mp.setattr(api, "load_gguf", no_conversion)
        cached = load_model(path)
    assert cached.config == first.config and cached.gguf_quant_types == first.gguf_quant_types
    assert all(torch.equal(first.weights[k], cached.weights[k]) for k in first.weights)

    for garbage in (b"not a safetensors file", entries[0].read_bytes()[:1000]):
        entries[0].write_bytes(garbage)
        rebuilt = load_model(path)
        assert all(torch.equal(first.weights[k], rebuilt.weights[k]) for k in first.weights)
        assert entries[0].stat().st_size > 100_000  # rewritten whole

    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file "changed": a new key
    load_model(path)
    now = list(cache_dir().glob("weights-*.safetensors"))
    assert len(now) == 1 and now != entries
    assert not list(cache_dir().glob(".*.tmp"))


def test_unwritable_cache_still_loads(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(blocker / "cache"))
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path, tiny_state_dict(), Q.F16)
    assert load_model(path).config.num_layers == 2


def test_moe_configs_as_the_hub_writes_them(tmp_path: pathlib.Path) -> None:
    """Qwen3-MoE's hub spelling (`num_experts`), sparse every second layer but one listed dense;
    a Qwen3 with attention biases and an MoE GGUF are refused by name; MoE configs survive the
    weight cache's JSON."""
    from engine.loader.hf_loader import load_hf_config
    from engine.loader.weight_cache import config_from_json, config_to_json

    raw = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
           "max_position_embeddings": 256, "num_experts": 128, "num_experts_per_tok": 8,
           "moe_intermediate_size": 24, "norm_topk_prob": True, "decoder_sparse_step": 2, "mlp_only_layers": [3],
           "use_sliding_window": False, "sliding_window": None}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = load_hf_config(tmp_path)
    assert config.architecture == "qwen3_moe" and config.qk_norm and config.head_dim == 32
    assert config.moe is not None and (config.moe.num_experts, config.moe.top_k) == (128, 8)
    assert config.moe.normalize_top_k and config.moe.intermediate_size == 24
    assert config.moe.dense_layers == (0, 2, 3, 4)  # (i + 1) % 2 != 0, and layer 3 listed
    assert config_from_json(config_to_json(config)) == config

    (tmp_path / "config.json").write_text(json.dumps({**raw, "architectures": ["Qwen3ForCausalLM"],
                                                      "attention_bias": True}))
    with pytest.raises(ModelLoadError, match="attention_bias on qwen3"):
        load_hf_config(tmp_path)

    state = tiny_state_dict()
    write_gguf(tmp_path / "m.gguf", "llama", {**TINY_META, "experts": 8},
               {to_gguf_name(k): (v, Q.F32) for k, v in state.items()})
    with pytest.raises(ModelLoadError, match=r"m\.gguf: required GGUF metadata field 'llama\.expert_used_count'"):
        load_model(tmp_path / "m.gguf")  # experts without a top-k (test_gguf_families loads whole MoE files)


def test_deterministic_mode_refuses_gemma(tiny_gemma2_dir) -> None:
    from engine import LLM

    with pytest.raises(ModelLoadError, match=r"deterministic mode does not cover gemma2 yet .*gelu"):
        LLM(str(tiny_gemma2_dir), num_kv_blocks=32, dtype="float32", deterministic=True)


def test_sliding_windows_as_configs_write_them(tmp_path: pathlib.Path) -> None:
    """Mistral windows every layer; Qwen only with `use_sliding_window`, from `max_window_layers` on
    (or as `layer_types` says); Gemma 2 its even layers, with its scale and caps; a window below 1, a
    `layer_types` of the wrong length or another activation is refused; all survive the weight
    cache's JSON."""
    from engine.loader.hf_loader import load_hf_config
    from engine.loader.weight_cache import config_from_json, config_to_json

    base = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}

    def windows(**raw: object) -> tuple[int, ...]:
        (tmp_path / "config.json").write_text(json.dumps({**base, **raw}))
        return load_hf_config(tmp_path).sliding_windows

    assert windows(architectures=["MistralForCausalLM"], sliding_window=32) == (32, 32, 32, 32)
    assert windows(architectures=["MistralForCausalLM"], sliding_window=None) == ()
    assert windows(architectures=["MistralForCausalLM"]) == (4096,) * 4  # transformers' default when left out
    assert windows(architectures=["MixtralForCausalLM"], sliding_window=16, num_local_experts=4, num_experts_per_tok=2,
                   layer_types=["full_attention"] * 4) == (16,) * 4  # transformers ignores layer_types there
    assert windows(architectures=["LlamaForCausalLM"], sliding_window=32) == ()  # Llama has no window
    assert windows(architectures=["Qwen3MoeForCausalLM"], sliding_window=32, use_sliding_window=True,
                   num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, max_window_layers=2) == (32,) * 4
    assert windows(architectures=["Qwen2ForCausalLM"], sliding_window=32, use_sliding_window=True) == ()  # 28 layers
    assert windows(architectures=["Qwen2ForCausalLM"], sliding_window=32, use_sliding_window=False) == ()
    assert windows(architectures=["Qwen2ForCausalLM"], sliding_window=32, use_sliding_window=True,
                   max_window_layers=3) == (0, 0, 0, 32)
    layer_types = ["sliding_attention", "full_attention"] * 2
    assert windows(architectures=["Qwen3ForCausalLM"], sliding_window=8, use_sliding_window=True,
                   layer_types=layer_types) == (8, 0, 8, 0)
    config = load_hf_config(tmp_path)
    assert config_from_json(config_to_json(config)) == config
    gemma = {"architectures": ["Gemma2ForCausalLM"], "sliding_window": 8, "query_pre_attn_scalar": 64,
             "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
    assert windows(**gemma) == (8, 0, 8, 0)  # without layer_types: even layers windowed
    config = load_hf_config(tmp_path)
    assert (config.attention_scale, config.attn_logit_softcap, config.final_logit_softcap) == (0.125, 50.0, 30.0)
    assert config.tie_word_embeddings and config_from_json(config_to_json(config)) == config
    with pytest.raises(ModelLoadError, match="hidden_activation 'relu' is not supported for gemma2"):
        windows(**gemma, hidden_activation="relu")
    with pytest.raises(ModelLoadError, match="bidirectional attention"):
        windows(**gemma, use_bidirectional_attention=True)
    assert windows(architectures=["Gemma2ForCausalLM"]) == (4096, 0, 4096, 0)  # transformers' defaults throughout
    config = load_hf_config(tmp_path)
    assert (config.head_dim, config.attention_scale, config.attn_logit_softcap, config.final_logit_softcap) == (
        256, 1 / 16, 50.0, 30.0)
    # Gemma 3 as the hub's configs (transformers 4) write it: five windowed layers in six, two RoPE bases
    gemma3 = {**gemma, "architectures": ["Gemma3ForCausalLM"], "num_hidden_layers": 12, "rope_theta": 1e6,
              "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
              "attn_logit_softcapping": None, "final_logit_softcapping": None}
    assert windows(**gemma3) == (8, 8, 8, 8, 8, 0) * 2
    config = load_hf_config(tmp_path)
    assert (config.rope_theta, config.local_rope_theta, config.qk_norm) == (1e6, 1e4, True)
    assert config.rope_scaling is not None and (config.rope_scaling.rope_type, config.rope_scaling.factor) == (
        "linear", 8.0)
    assert (config.attn_logit_softcap, config.final_logit_softcap) == (0.0, 0.0)
    assert config_from_json(config_to_json(config)) == config
    with pytest.raises(ModelLoadError, match="sliding_window must be >= 1"):
        windows(architectures=["MistralForCausalLM"], sliding_window=0)
    with pytest.raises(ModelLoadError, match="layer_types"):
        windows(architectures=["Qwen3ForCausalLM"], sliding_window=8, use_sliding_window=True,
                layer_types=layer_types[:3])


def test_phi3_configs_and_fused_tensors(tmp_path: pathlib.Path, tiny_phi3_dir: pathlib.Path) -> None:
    """Phi-3 as transformers 5 writes it, and as older configs do ("su", factors and the original
    context at the top level); its fused tensors split into Llama's; misfits refused by name."""
    config = load_model(tiny_phi3_dir).config
    scaling = config.rope_scaling
    assert config.architecture == "phi3" and config.rotary_dim == 12 and config.sliding_windows == (12, 12)
    assert scaling is not None and scaling.rope_type == "longrope" and scaling.original_max_position_embeddings == 64
    assert scaling.factor == 8.0
    assert scaling.attention_factor == pytest.approx(math.sqrt(1 + math.log(8) / math.log(64)))
    assert not scaling.use_long and config.for_context(65).rope_scaling.use_long  # type: ignore[union-attr]
    assert not config.for_context(64).rope_scaling.use_long  # type: ignore[union-attr]

    raw = json.loads((tiny_phi3_dir / "config.json").read_text())
    legacy = {"type": "su", "short_factor": raw["rope_parameters"]["short_factor"],
              "long_factor": raw["rope_parameters"]["long_factor"], "attention_factor": 1.5}
    _edit_config(tmp_path / "old", tiny_phi3_dir, rope_parameters=None, rope_scaling=legacy, rope_theta=2e4)
    old = load_model(tmp_path / "old").config
    assert old.rope_theta == 2e4 and old.rotary_dim == 12 and old.rope_scaling == dataclasses.replace(
        scaling, attention_factor=1.5)

    short = {**raw["rope_parameters"], "short_factor": [1.0] * 5, "long_factor": [2.0] * 5}
    _edit_config(tmp_path / "factors", tiny_phi3_dir, rope_parameters=short)
    with pytest.raises(ModelLoadError, match="6 factors"):
        load_model(tmp_path / "factors")

    from safetensors.torch import save_file
    state = load_file(str(tiny_phi3_dir / "model.safetensors"))
    assert "model.layers.0.self_attn.qkv_proj.weight" in state
    loaded = load_model(tiny_phi3_dir).weights
    k = state["model.layers.0.self_attn.qkv_proj.weight"].split((64, 32, 32))[1]
    assert torch.equal(loaded["model.layers.0.self_attn.k_proj.weight"], k)
    up = state["model.layers.1.mlp.gate_up_proj.weight"].chunk(2)[1]
    assert torch.equal(loaded["model.layers.1.mlp.up_proj.weight"], up)
    _edit_config(tmp_path / "cut", tiny_phi3_dir)
    state["model.layers.1.self_attn.qkv_proj.weight"] = state["model.layers.1.self_attn.qkv_proj.weight"][:100]
    save_file(state, str(tmp_path / "cut" / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"model.layers.1.self_attn.qkv_proj.weight: shape \(100, 64\)"):
        load_model(tmp_path / "cut")


def test_gemma_norms_stay_fp32_in_a_bf16_model(tiny_gemma3_dir: pathlib.Path) -> None:
    """A bf16 Gemma keeps every norm's 1 + w in fp32, w rounded to bf16 as transformers' bf16 model holds it
    (its norms multiply in fp32: engine.kernels.ops.rms_norm); in fp32 the weights are the checkpoint's."""
    from engine import LLM, SamplingParams

    raw = load_file(str(tiny_gemma3_dir / "model.safetensors"))
    for dtype in (torch.bfloat16, torch.float32):
        llm = LLM(str(tiny_gemma3_dir), dtype=str(dtype).removeprefix("torch."), num_kv_blocks=32)
        model = llm.engine.parts.model
        norms = {name: p for name, p in model.named_parameters() if name.endswith("norm.weight")}
        assert len(norms) == 3 * 6 + 1 and all(p.dtype == torch.float32 for p in norms.values())
        w = raw["model.layers.1.self_attn.q_norm.weight"]
        assert torch.equal(norms["layers.1.self_attn.q_norm.weight"], 1.0 + w.to(dtype).float())
        assert model.embed_tokens.weight.dtype == dtype
        out = llm.generate([[5, 6, 7] * 10], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
        assert len(out.token_ids) == 6
        llm.engine.check_integrity()
