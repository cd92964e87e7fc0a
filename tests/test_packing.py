"""Linears packed at load (engine/loader/packing.py): oneDNN's packed weight for several rows, and the
C matrix-vector kernel (engine/kernels/gemv.c) for one row, against torch's own linear."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.kernels import gemv_kernel
from engine.loader.packing import ROW_TILE, PackedLinear, make_batch_invariant, onednn_packs, pack_linears


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


def _gemv(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The C matrix-vector kernel of the weight's dtype, called directly (whether or not oneDNN can pack
    that dtype on this CPU, which PackedLinear needs)."""
    lib = gemv_kernel()
    assert lib is not None  # a C compiler is part of the set-up
    fn = lib.f32_gemv if weight.dtype == torch.float32 else lib.bf16_gemv
    y = torch.empty(weight.shape[0], dtype=weight.dtype)
    fn(x.contiguous().data_ptr(), weight.contiguous().data_ptr(), None if bias is None else bias.data_ptr(),
       y.data_ptr(), weight.shape[0], weight.shape[1], torch.get_num_threads())
    return y


@pytest.mark.parametrize(("n", "k"), [(48, 64), (50, 37), (3, 8), (1, 200), (576, 1536), (70, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_one_bf16_row_is_its_dot_product_rounded_once(n: int, k: int, bias: bool) -> None:
    """The bf16 matrix-vector kernel (AVX512-BF16 pairs, or widened lanes): each output is the row's
    fp32 sum rounded to bf16 once, so within half a bf16 step (plus the fp32 sum's order) of the exact
    product."""
    torch.manual_seed(0)
    w = torch.randn(n, k).to(torch.bfloat16)
    b = torch.randn(n).to(torch.bfloat16) if bias else None
    x = torch.randn(k).to(torch.bfloat16)
    exact = w.double() @ x.double() + (0 if b is None else b.double())
    got = _gemv(w, x, b).double()
    half_step = exact.abs() * 2.0 ** -8 + 1e-6 * k * (w.double().abs() @ x.double().abs())  # rounding + sum order
    assert ((got - exact).abs() <= half_step + 1e-30).all()


def test_bf16_one_row_through_packed_linear_uses_the_kernel() -> None:
    linear = nn.Linear(64, 48).to(torch.bfloat16)
    if not onednn_packs(torch.bfloat16):  # no packing here: pack_linears leaves bf16 linears to torch
        assert pack_linears(nn.Sequential(linear), deterministic=False) == 0
        return
    packed = PackedLinear(linear, single_row=True)
    assert packed.gemv is not None and packed.one_row is not None
    assert packed.one_row.data_ptr() == linear.weight.data_ptr()  # W itself, no copy
    x = torch.randn(1, 64).to(torch.bfloat16)
    assert torch.equal(packed(x)[0], _gemv(linear.weight.detach(), x[0], linear.bias.detach()))
    torch.testing.assert_close(packed(x.repeat(3, 1)), linear(x.repeat(3, 1)), rtol=2e-2, atol=2e-2)  # oneDNN


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_is_its_own_dot_product_whatever_the_thread_count(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    w = torch.randn(1030, 96).to(dtype)
    x = torch.randn(96).to(dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = _gemv(w, x)
        torch.set_num_threads(max(2, threads))
        together = _gemv(w, x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(together, alone)
    for row in (0, 1029):  # a row of W alone gives the same bits as amid the others (and in the last, short block)
        assert torch.equal(_gemv(w[row:row + 1], x)[0], together[row])


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
    assert tiled in (0, 2)  # both or neither: one shape caught tiles its whole dtype
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


def _mlp(dtype: torch.dtype) -> nn.Module:
    from engine.config import ModelConfig
    from engine.models.llama import MLP
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=96, intermediate_size=160,
                         num_layers=1, num_heads=4, num_kv_heads=2, head_dim=24, max_position_embeddings=64,
                         rms_norm_eps=1e-5, rope_theta=10000.0)
    torch.manual_seed(3)
    mlp = MLP(config).to(dtype)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return mlp


def test_bf16_silu_mlp_fuses_silu_mul_into_the_matmuls() -> None:
    """Fused where oneDNN takes the post-ops (AVX512-BF16/AMX CPUs); elsewhere (an AVX2-only CI runner) the MLP
    stays as it was and computes the same product: checked either way, never skipped."""
    from engine.loader.packing import FusedGateUp, onednn_fuses_silu_mul
    mlp = _mlp(torch.bfloat16)
    x = torch.randn(40, 96)
    gate, up = (x @ mlp.gate_up_proj.weight.float().t()).chunk(2, dim=-1)
    exact = torch.nn.functional.silu(gate) * up  # in fp32: what both roundings approximate
    plain = mlp.gate_up_proj(x.bfloat16())
    pack_linears(mlp, deterministic=False)
    if not onednn_fuses_silu_mul(torch.bfloat16):
        assert not isinstance(mlp.gate_up_proj, FusedGateUp)
        unfused = torch.nn.functional.silu(plain[:, :160].float()) * plain[:, 160:].float()
        torch.testing.assert_close(unfused, exact, rtol=2e-2, atol=2e-2)
        return
    assert isinstance(mlp.gate_up_proj, FusedGateUp) and mlp.gate_up_proj.packed.numel() == 0
    for rows in (40, 1):  # many rows in oneDNN's post-ops; one through W, the C gemv and ops.silu_mul
        fused = mlp.gate_up_proj.silu_mul(x[:rows].bfloat16()).float()
        torch.testing.assert_close(fused, exact[:rows], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(mlp.gate_up_proj(x.bfloat16()), plain, rtol=0, atol=0)  # the plain product still


def test_fp32_and_deterministic_mlps_keep_torch_order() -> None:
    from engine.loader.packing import FusedGateUp
    fp32 = _mlp(torch.float32)
    pack_linears(fp32, deterministic=False)
    assert type(fp32.gate_up_proj) is PackedLinear  # fp32 outputs are pinned to transformers' order of roundings
    bf16 = _mlp(torch.bfloat16)
    pack_linears(bf16, deterministic=True)
    assert not isinstance(bf16.gate_up_proj, FusedGateUp)


def test_a_decode_step_reads_the_one_row_weights_only() -> None:
    """bench.bandwidth's floor counts W once per linear, not the packed copies batches read."""
    from bench.bandwidth import step_weight_bytes
    mlp = _mlp(torch.bfloat16)
    expected = sum(p.numel() * p.element_size() for p in mlp.parameters())
    pack_linears(mlp, deterministic=False)
    assert step_weight_bytes(mlp) == expected


@pytest.mark.parametrize("fixture", ["tiny_mixtral_dir", "tiny_qwen3_moe_dir"])
def test_bf16_moe_experts_fuse_and_score_prompts_like_fp32(fixture: str, request: pytest.FixtureRequest) -> None:
    """MoE experts are SiLU MLPs too: fused in bf16 (where oneDNN can), each prompt token's logprob stays within
    bf16 rounding of the fp32 engine's (a prompt's prefill runs the experts on many rows, the fused path)."""
    from engine import LLM, SamplingParams
    from engine.loader.packing import FusedGateUp, onednn_fuses_silu_mul
    path = str(request.getfixturevalue(fixture))
    prompt = [(11 * j) % 400 + 3 for j in range(40)]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    scores = {}
    for dtype in ("float32", "bfloat16"):
        llm = LLM(path, num_kv_blocks=32, dtype=dtype)
        experts = [m for m in llm.engine.parts.model.modules() if isinstance(m, FusedGateUp)]
        assert bool(experts) == (dtype == "bfloat16" and onednn_fuses_silu_mul(torch.bfloat16))
        out = llm.generate([prompt], params)[0]
        assert out.prompt_logprobs is not None
        scores[dtype] = [lp.logprob for lp in out.prompt_logprobs[1:] if lp is not None]
    assert len(scores["bfloat16"]) == len(prompt) - 1
    torch.testing.assert_close(torch.tensor(scores["bfloat16"]), torch.tensor(scores["float32"]), atol=0.1, rtol=0.02)
