"""Linears packed at load (engine/loader/packing.py): oneDNN's packed weight for several rows, and the
C matrix-vector kernel (engine/kernels/gemv.c) for one row, against torch's own linear."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.loader.packing import PackedLinear, pack_linears


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


def test_one_row_is_its_own_dot_product_whatever_the_thread_count() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 1030, bias=False)
    packed = PackedLinear(linear, single_row=True)
    x = torch.randn(1, 96)
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
        one = nn.Linear(96, 1, bias=False)
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
