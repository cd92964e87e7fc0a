"""Linears packed at load (engine/loader/packing.py): oneDNN's packed weight for several rows, and the
C matrix-vector kernel (engine/kernels/gemv.c) for one row, against torch's own linear."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.loader.packing import ROW_TILE, PackedLinear, make_batch_invariant, pack_linears


@pytest.mark.parametrize(("n", "k"), [(48, 64), (50, 37), (3, 8), (1, 200), (576, 1536)])
@pytest.mark.parametrize("bias", [False, True])
def test_one_row_and_many_rows_match_torch(n: int, k: int, bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=bias)
    packed = PackedLinear(linear, single_row=True)
    assert packed.gemv is not None  # a C compiler is part of the set-up
    assert packed.one_row is not None and packed.one_row.data_ptr() == linear.weight.data_ptr()  # no copy
    for rows in (1, 2, 7):
        x = torch.randn(rows, k)
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("n", "k"), [(48, 64), (50, 37), (3, 8), (1, 200), (576, 1536), (70, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_one_bf16_row_is_its_dot_product_rounded_once(n: int, k: int, bias: bool) -> None:
    """The bf16 matrix-vector kernel (AVX512-BF16 pairs, or widened lanes): each output is the row's
    fp32 sum rounded to bf16 once, so within one bf16 rounding (and the fp32 sum's order) of the
    exact product; several rows still go through oneDNN."""
    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=bias).to(torch.bfloat16)
    packed = PackedLinear(linear, single_row=True)
    assert packed.gemv is not None and packed.one_row is not None
    assert packed.one_row.data_ptr() == linear.weight.data_ptr()
    for rows in (1, 3):
        x = torch.randn(rows, k).to(torch.bfloat16)
        exact = x.double() @ linear.weight.double().T + (0 if linear.bias is None else linear.bias.double())
        got = packed(x)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), exact, rtol=2 ** -8, atol=1e-5 * k)
        if rows == 1:
            assert torch.equal(got, exact.float().to(torch.bfloat16)) or (got.double() - exact).abs().max() < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_is_its_own_dot_product_whatever_the_thread_count(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 1030, bias=False).to(dtype)
    packed = PackedLinear(linear, single_row=True)
    x = torch.randn(1, 96).to(dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = packed(x)
        torch.set_num_threads(max(2, threads))
        together = packed(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(together, alone)
    for row in (0, 1029):  # a row of W alone gives the same bits as amid the others (and in the last, short block)
        one = nn.Linear(96, 1, bias=False).to(dtype)
        one.weight.data.copy_(linear.weight.data[row:row + 1])
        assert torch.equal(PackedLinear(one, single_row=True)(x)[0, 0], together[0, row])


def test_a_tied_lm_head_shares_the_embedding() -> None:
    model = nn.Module()
    model.embed = nn.Embedding(40, 16)
    model.lm_head = nn.Linear(16, 40, bias=False)
    model.lm_head.weight = model.embed.weight
    assert pack_linears(model, deterministic=False) == 1
    assert isinstance(model.lm_head, PackedLinear)
    assert model.lm_head.one_row.data_ptr() == model.embed.weight.data_ptr()
    x = torch.randn(1, 16)
    torch.testing.assert_close(model.lm_head(x), x @ model.embed.weight.detach().T, rtol=1e-5, atol=1e-5)


def test_deterministic_packing_has_no_one_row_path() -> None:
    model = nn.Sequential(nn.Linear(16, 32))
    pack_linears(model, deterministic=True)
    assert isinstance(model[0], PackedLinear) and model[0].one_row is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_linears_compute_every_row_as_alone(dtype: torch.dtype) -> None:
    """After make_batch_invariant every row of any batch (every place in it, up to the most rows a step
    feeds) equals that row computed alone, bit for bit: on an AMX Xeon oneDNN computes rows past the
    32nd of a bf16 batch differently, so there those linears run in calls of ROW_TILE rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(576, 960, bias=False), nn.Linear(1536, 576, bias=True)).to(dtype)
    pack_linears(model, deterministic=True)
    tiled = make_batch_invariant(model, max_rows=300, max_logit_rows=300)
    assert all(m.row_tile in (0, ROW_TILE) for m in model)
    assert tiled == sum(m.row_tile > 0 for m in model)
    for linear in model:
        x = torch.randn(97, linear.in_features).to(dtype)
        alone = torch.cat([linear(x[i:i + 1]) for i in range(97)])
        for rows in (2, 31, 32, 33, 64, 97):
            assert torch.equal(linear(x[:rows]), alone[:rows]), f"{rows} rows"


def test_a_tiled_linear_equals_the_untiled_one_to_rounding() -> None:
    torch.manual_seed(0)
    packed = PackedLinear(nn.Linear(64, 40), single_row=False)
    x = torch.randn(100, 64)
    whole = packed(x)
    packed.row_tile = ROW_TILE
    torch.testing.assert_close(packed(x), whole, rtol=1e-5, atol=1e-5)
