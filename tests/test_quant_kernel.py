"""The C int4 / int8 kernels (engine/kernels/quant_matmul.c) against their definition in torch.

The kernels compute W @ (xq * dx): x rounded to int8 per row and group of 32 (dx = max|x| / 127),
so they must equal that product, built here in fp32 from the same rounding, up to summation order.
"""

from __future__ import annotations

import pytest
import torch

import engine.quant_layers as quant_layers
from engine.quant import Int4Weights, Int8Weights, quantize_int4, quantize_int8
from engine.quant_layers import Int4Linear, Int8Linear


def _dequantized(w: Int4Weights) -> torch.Tensor:
    n, k = w.shape
    groups = (w.q.float() - 8).view(n, -1, w.group_size) * w.scale[..., None] + w.zero[..., None]
    return groups.view(n, k)


def _int8(weights: Int4Weights) -> Int8Weights:
    q = quantize_int8(_dequantized(weights))
    q.q[0, :5] = torch.tensor([-127, 127, 0, -1, 1], dtype=torch.int8)  # extremes and signs
    return q


def _rounded_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel rounds it: xq = round_half_even(x * (127 / amax)) per group, times amax / 127."""
    groups = x.float().reshape(-1, x.shape[-1] // 32, 32)
    amax = groups.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(groups * inv) * (amax / 127)).reshape(x.shape)


@pytest.fixture(scope="module")
def weights() -> Int4Weights:
    torch.manual_seed(0)
    return quantize_int4(torch.randn(48, 96) * 0.05, 32)


def test_the_c_kernel_is_what_cpu_layers_use(weights: Int4Weights) -> None:
    assert Int4Linear(weights).c_kernel is not None  # a C compiler is part of the set-up
    assert Int8Linear(_int8(weights)).c_kernel is not None
    assert Int4Linear(quantize_int4(torch.randn(16, 128), 64)).c_kernel is None  # groups of 32 only
    assert Int8Linear(quantize_int8(torch.randn(16, 40))).c_kernel is None  # K not a multiple of 32


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 33])
def test_kernel_equals_its_definition(weights: Int4Weights, bits: int, rows: int) -> None:
    torch.manual_seed(rows)
    x = torch.randn(rows, 96) * torch.logspace(-2, 1, 96)  # groups of very different magnitudes
    x[0, 32:64] = 0  # an all-zero group: dx = 0 must not divide by zero
    layer, w = ((Int4Linear(weights), _dequantized(weights)) if bits == 4
                else (Int8Linear(_int8(weights)), _int8(weights).dequantize()))
    expected = _rounded_activations(x) @ w.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_rows_do_not_depend_on_the_batch(weights: Int4Weights, bits: int) -> None:
    layer = Int4Linear(weights) if bits == 4 else Int8Linear(_int8(weights))
    torch.manual_seed(1)
    x = torch.randn(37, 96)
    together = layer(x)
    for i in (0, 3, 4, 36):
        assert torch.equal(layer(x[i:i + 1])[0], together[i])


@pytest.mark.parametrize("bits", [4, 8])
def test_threads_and_block_shapes_do_not_change_a_row(bits: int) -> None:
    """A layer big enough for the kernel's threads (N * K >= 65536): rows 38 and 39 end in blocks of
    2 and 3 rows; every row equals itself computed alone, on one thread, and the definition."""
    torch.manual_seed(2)
    w4 = quantize_int4(torch.randn(256, 384) * 0.05, 32)
    layer, w = (Int4Linear(w4), _dequantized(w4)) if bits == 4 else (Int8Linear(_int8(w4)), _int8(w4).dequantize())
    x = torch.randn(39, 384)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, threads))
        together = layer(x)
        torch.set_num_threads(1)
        alone = [layer(x[i:i + 1])[0] for i in (0, 36, 37, 38)]
    finally:
        torch.set_num_threads(threads)
    for got, i in zip(alone, (0, 36, 37, 38), strict=True):
        assert torch.equal(got, together[i])
    torch.testing.assert_close(together, _rounded_activations(x) @ w.T, rtol=1e-5, atol=1e-5)


def test_non_finite_inputs_give_non_finite_outputs(weights: Int4Weights) -> None:
    x = torch.randn(3, 96)
    x[1, 5] = float("nan")
    x[2, 70] = float("inf")
    for layer in (Int4Linear(weights), Int8Linear(_int8(weights))):
        y = layer(x)
        assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all() and not torch.isfinite(y[2]).any()


@pytest.mark.parametrize("bits", [4, 8])
def test_bf16_and_leading_dimensions(weights: Int4Weights, bits: int) -> None:
    def build() -> Int4Linear | Int8Linear:
        return Int4Linear(weights) if bits == 4 else Int8Linear(_int8(weights))

    layer = build()
    torch.manual_seed(4)
    x = torch.randn(2, 3, 96).to(torch.bfloat16)
    y = layer(x)  # bf16 in and out of the C kernel: the fp32 result rounded once
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 48)
    assert torch.equal(y, layer(x.float()).to(torch.bfloat16))
    assert torch.equal(layer(x.transpose(0, 1)), y.transpose(0, 1))  # a strided input is copied first
    assert layer(torch.zeros(0, 96)).shape == (0, 48)
    with pytest.raises(ValueError, match="last dimension 96"):
        layer(torch.zeros(1, 64))
    cast = build().double()  # its fp32 scale (and offset) no longer fit the kernel
    with pytest.raises(RuntimeError, match="quantize the model where and in the dtype it will run"):
        cast(torch.zeros(1, 96))
    if bits == 4:  # the many-rows path dequantizes in C from the same buffers: refused alike
        with pytest.raises(RuntimeError, match="quantize the model where and in the dtype it will run"):
            cast(torch.zeros(128, 96))
    assert torch.equal(cast.float()(x), y)  # cast back exactly: new fp32 buffers, bound again


@pytest.mark.parametrize("bits", [4, 8])
def test_close_to_the_torch_kernel(weights: Int4Weights, bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    def build() -> Int4Linear | Int8Linear:
        return Int4Linear(weights) if bits == 4 else Int8Linear(_int8(weights))

    torch.manual_seed(3)
    x = torch.randn(9, 96)
    c_path = build()(x)
    monkeypatch.setattr(quant_layers, "quant_matmul_kernel", lambda: None)
    torch_layer = build()
    assert torch_layer.c_kernel is None
    exact = x @ (_dequantized(weights) if bits == 4 else _int8(weights).dequantize()).T
    scale = exact.norm()
    assert (c_path - exact).norm() / scale < 0.02  # 8-bit activations
    assert (torch_layer(x) - exact).norm() / scale < 0.02  # bf16 activations


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [None, 5])
def test_many_rows_multiply_the_dequantized_weight(weights: Int4Weights, bits: int, dtype: torch.dtype,
                                                   chunk_rows: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """From INT4/INT8_DEQUANTIZE_MIN_ROWS rows a layer dequantizes W (int4: in C) and runs torch's float
    matmul: x itself, not x rounded to int8, meets W; below that the integer kernel runs. W is
    dequantized a block of output rows at a time (here also 5 rows: 48 = 9 x 5 + 3)."""
    if chunk_rows is not None:
        monkeypatch.setattr(quant_layers, "DEQUANTIZE_CHUNK_ELEMENTS", chunk_rows * weights.shape[1])
    layer, w = ((Int4Linear(weights), _dequantized(weights)) if bits == 4
                else (Int8Linear(_int8(weights)), _int8(weights).dequantize()))
    rows = (quant_layers.INT4_DEQUANTIZE_MIN_ROWS if bits == 4 else quant_layers.INT8_DEQUANTIZE_MIN_ROWS)[dtype]
    torch.manual_seed(1)
    x = (torch.randn(rows, 96) * torch.logspace(-2, 1, 96)).to(dtype)
    got = layer(x)
    assert got.dtype == dtype
    exact = x.double() @ w.double().T
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, _rounded_activations(x) @ w.T, rtol=1e-6, atol=1e-6)  # x was not rounded
    else:  # W rounded to bf16, the product rounded to bf16
        torch.testing.assert_close(got, torch.nn.functional.linear(x, w.to(dtype)), rtol=2e-2, atol=2e-2)
    few = layer(x[:rows - 1])  # one row fewer: the integer kernel, x rounded per group
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(few.double(), (_rounded_activations(x[:rows - 1]) @ w.T).double(),
                               rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("out_bf16", [0, 1])
def test_int4_dequantize_is_the_weights_definition(weights: Int4Weights, out_bf16: int) -> None:
    layer = Int4Linear(weights)
    n, k = weights.shape
    dtype = torch.bfloat16 if out_bf16 else torch.float32
    out = torch.empty(n, k, dtype=dtype)
    layer.c_kernel.int4_dequantize(layer.nibbles.data_ptr(), layer.scale.data_ptr(), layer.offset.data_ptr(),
                                   out.data_ptr(), n, k, out_bf16, 2)
    # q * scale + offset with offset = zero - 8 * scale: the same value as (q - 8) * scale + zero to fp32 rounding
    reference = (weights.q.float().view(n, -1, 32) * layer.scale[..., None] + layer.offset[..., None]).view(n, k)
    assert torch.equal(out, reference.to(dtype)) or torch.allclose(out.float(), reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.float(), _dequantized(weights).to(dtype).float(), rtol=1e-2, atol=1e-6)
