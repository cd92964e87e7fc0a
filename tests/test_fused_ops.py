"""The fused C element-wise ops (engine/kernels/fused_ops.c) against their torch references: RoPE
bit-exact, RMSNorm and SiLU-and-multiply within fp32 rounding (in bf16: within one bf16 step), the
residual sum bit-exact; and rows are computed alike whatever else is in the batch."""

from __future__ import annotations

import math

import pytest
import torch

from engine.kernels import fused_ops_kernel, ops

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _kernel_builds() -> None:
    assert fused_ops_kernel() is not None, "the fused-ops kernel did not build (a C compiler is needed)"


def _close(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-6, "rtol": 2e-6} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1.6e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 200])
def test_rms_norm_and_the_residual_sum(dtype: torch.dtype, rows: int) -> None:
    torch.manual_seed(rows)
    x, residual = torch.randn(rows, 576).to(dtype), torch.randn(rows, 576).to(dtype)
    weight = (1 + 0.1 * torch.randn(576)).to(dtype)
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-5), ops.rms_norm_reference(x, weight, 1e-5), **_close(dtype))
    expected_sum = residual + x
    normed, summed = ops.add_rms_norm(x, residual.clone(), weight, 1e-5)
    assert torch.equal(summed, expected_sum)
    torch.testing.assert_close(normed, ops.rms_norm_reference(expected_sum, weight, 1e-5), **_close(dtype))


def _round_bf16(f: torch.Tensor) -> torch.Tensor:
    """fp32 to bf16 to nearest even in integers, denormals kept, NaN made quiet (vec.h's f32_to_bf16; torch's own
    cast may take a vector instruction that flushes denormals)."""
    bits = f.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    half = torch.where(torch.isnan(f), (bits >> 16) | 0x40, rounded) & 0xFFFF
    return ((half ^ 0x8000) - 0x8000).to(torch.int16).view(torch.bfloat16)


def _rms_norm_as_the_kernel_orders_it(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                                      eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fused_ops.c's bf16 RMSNorm, one fp32 operation at a time in its order: the residual sum rounded to
    bf16, the squares summed into 8 lanes chunk by chunk of 8, then ((l0+l4)+(l1+l5))+((l2+l6)+(l3+l7)) (the
    tail past whole chunks added last), 1 / sqrt(sum / n + eps), the normed row rounded, times the weight; with a
    fp32 weight the normed row is not rounded, the product is (Gemma's order)."""
    rows, n = x.shape
    v = x.float()
    summed = None
    if residual is not None:
        summed = _round_bf16(residual.float() + v)
        v = summed.float()
    out = torch.empty_like(x)
    for r in range(rows):
        acc = torch.zeros(8)
        for c in range(n // 8):
            chunk = v[r, 8 * c:8 * c + 8]
            acc = acc + chunk * chunk
        total = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
        for i in range(n // 8 * 8, n):
            total = total + v[r, i] * v[r, i]
        inv = torch.tensor(1.0) / torch.sqrt(total / torch.tensor(float(n)) + torch.tensor(eps))
        y = v[r] * inv if weight.dtype == torch.float32 else _round_bf16(v[r] * inv).float()
        out[r] = _round_bf16(weight.float() * y)
    return out, summed


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [576, 24, 20])  # whole 16-lane vectors (AVX-512 where present), and not
def test_bf16_rms_norm_is_the_same_fp32_operations_bit_for_bit(n: int, weight_dtype: torch.dtype) -> None:
    """Both of the kernel's bf16 row paths give exactly the bits of one fixed sequence of fp32 operations,
    denormals and NaN included, with a bf16 weight and with a fp32 one."""
    torch.manual_seed(n)
    x, residual = torch.randn(5, n).to(torch.bfloat16), torch.randn(5, n).to(torch.bfloat16)
    x[1, :3] = torch.tensor([1e-39, -3e-40, 5e-41])  # fp32 denormals through the residual sum and the norm
    residual[1, :3] = 0.0
    assert (x[1, :3] != 0).all(), "the bf16 copy flushed the denormals this case is about"
    x[2, :2], residual[2, :2] = torch.tensor([1e-30, 2e-30]), torch.tensor([-1e-30, 1e-38])
    x[3, 5] = float("nan")
    weight = (1 + 0.1 * torch.randn(n)).to(weight_dtype)
    want_out, want_sum = _rms_norm_as_the_kernel_orders_it(x, residual, weight, 1e-5)
    out, summed = ops.add_rms_norm(x, residual.clone(), weight, 1e-5)
    assert want_sum is not None and torch.equal(summed.view(torch.int16), want_sum.view(torch.int16))
    assert torch.equal(out.view(torch.int16), want_out.view(torch.int16))
    alone, _ = _rms_norm_as_the_kernel_orders_it(x, None, weight, 1e-5)
    assert torch.equal(ops.rms_norm(x, weight, 1e-5).view(torch.int16), alone.view(torch.int16))


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_a_fp32_weight_norms_as_transformers_gemma_does_in_bf16(family: str) -> None:
    """Gemma's norm in a bf16 model: transformers multiplies the fp32 normed row by 1 + w (w held in bf16) in
    fp32 and casts once. The torch path with the engine's fp32 1 + w gives its bits; the C kernel the same but
    for its sum's order (within one bf16 step). A bf16 1 + w (as the engine held it before) is further off."""
    import importlib

    torch.manual_seed(3)
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    module = getattr(modeling, f"{family.capitalize()}RMSNorm")(576, eps=1e-6)
    with torch.no_grad():
        module.weight.copy_(0.3 * torch.randn(576))
    module = module.to(torch.bfloat16)
    x = (3 * torch.randn(40, 576)).to(torch.bfloat16)
    want = module(x)
    weight = 1.0 + module.weight.detach().float()  # engine.models.gemma2: fp32_parameters
    assert torch.equal(ops.rms_norm_reference(x, weight, 1e-6).view(torch.int16), want.view(torch.int16))
    got = ops.rms_norm(x, weight, 1e-6)
    steps = (got.float() - want.float()).abs() / want.float().abs().clamp_min(1e-30) * 128
    assert steps.max() <= 1.0
    rounded = ops.rms_norm(x, weight.to(torch.bfloat16), 1e-6)
    assert (rounded.float() - want.float()).abs().mean() > 2 * (got.float() - want.float()).abs().mean()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 33])
def test_silu_mul(dtype: torch.dtype, rows: int) -> None:
    torch.manual_seed(rows)
    x = (4 * torch.randn(rows, 2 * 1536)).to(dtype)
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # exp's range ends
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(ops.silu_mul(x), torch.nn.functional.silu(gate) * up, **_close(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_in_place_is_exact(dtype: torch.dtype) -> None:
    from engine.models.rope import RotaryEmbedding

    torch.manual_seed(0)
    rope = RotaryEmbedding(64, 512, 10000.0, None)
    qkv = torch.randn(40, (9 + 2 * 3) * 64).to(dtype)
    positions = torch.randint(0, 512, (40,))
    q, k, v = qkv.split((9 * 64, 3 * 64, 3 * 64), dim=-1)
    want_q, want_k = rope(positions, q, k)
    want_v = v.clone()
    assert rope.rotate_in_place(positions, qkv, 9, 3)
    assert torch.equal(q, want_q) and torch.equal(k, want_k) and torch.equal(v, want_v)


def test_rows_do_not_depend_on_the_batch() -> None:
    """A row alone and amid 63 others (parallel paths) gives the same bits."""
    torch.manual_seed(1)
    x, weight, gate_up = torch.randn(64, 576), torch.randn(576), torch.randn(64, 3072)
    assert torch.equal(ops.rms_norm(x[5:6], weight, 1e-5), ops.rms_norm(x, weight, 1e-5)[5:6])
    assert torch.equal(ops.silu_mul(gate_up[5:6]), ops.silu_mul(gate_up)[5:6])


def test_other_devices_and_dtypes_take_the_torch_path() -> None:
    x = torch.randn(3, 64, dtype=torch.float16)
    weight = torch.randn(64, dtype=torch.float16)
    assert torch.equal(ops.rms_norm(x, weight, 1e-5), ops.rms_norm_reference(x, weight, 1e-5))
    qkv = torch.randn(3, 5 * 64, dtype=torch.float16)
    assert not ops.rope_in_place(qkv, 3, 1, 64, torch.arange(3), torch.ones(8, 32), torch.zeros(8, 32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 49152), (32, 1000), (5, 7), (3, 33), (2, 50001)])
def test_argmax_rows_is_torch_argmax(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    torch.manual_seed(shape[1])
    x = torch.randn(*shape).to(dtype)
    assert ops.argmax_rows(x) == x.float().argmax(-1).tolist()


@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_rows_takes_the_first_of_tied_maxima_anywhere_in_the_row(dtype: torch.dtype) -> None:
    x = torch.randn(6, 1003)
    x[:, [10, 500, 1002]] = 50.0  # ties inside a vector block, across blocks and in the scalar tail
    x[1, 3], x[2, 1002], x[3, 999] = 60.0, 70.0, 50.5
    x[4, :] = -math.inf
    x = x.to(dtype)
    assert ops.argmax_rows(x) == [10, 3, 1002, 999, 0, 10] == x.float().argmax(-1).tolist()
