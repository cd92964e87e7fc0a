"""The AMX prefill kernel (engine/kernels/flash_prefill.c) against attention computed in fp32 on the same
bf16 inputs: as close as torch's own bf16 flash kernel is, for head dims 32-128, grouped heads, sliding
windows, prompt lengths around its 16-row and 64-key boundaries, and strided rows; built for this CPU
(AMX tiles and AVX-512 where it has them) and as portable C (every machine runs both); and the CPU
backend sends a step's fresh bf16 prompts to it exactly where the CPU grants AMX."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.attention.cpu_backend import DENSE_PREFILL_MIN_QUERIES, CpuAttention, amx_prefill_supported
from engine.attention.metadata import AttentionShape
from engine.attention.planning import SeqSpan, attention_metadata
from engine.kernels import flash_prefill_kernel
from engine.kv_cache import KVCachePool, KVCacheSpec

# (heads, kv_heads, head_dim, prompt lengths, window)
CASES = [
    (9, 3, 64, [512, 100, 1, 17, 64], 0),
    (4, 4, 128, [130, 33, 16], 0),
    (8, 2, 32, [200, 15], 7),
    (6, 2, 96, [300, 65, 63], 100),
    (2, 1, 64, [129], 64),
]
ROW_PAD = 5  # qkv rows wider than q | k | v, and out rows wider than the heads: strides the kernel must honour


def _reference(qkv: torch.Tensor, lengths: list[int], heads: int, kv_heads: int, dim: int,
               window: int) -> torch.Tensor:
    """Each prompt's causal (windowed) attention in fp32 on the bf16 inputs."""
    outs, first = [], 0
    group = heads // kv_heads
    for n in lengths:
        rows = qkv[first:first + n].float()
        first += n
        q = rows[:, :heads * dim].view(n, heads, dim).transpose(0, 1)
        k, v = (rows[:, (heads + i * kv_heads) * dim:(heads + (i + 1) * kv_heads) * dim].view(n, kv_heads, dim)
                .transpose(0, 1).repeat_interleave(group, 0) for i in (0, 1))
        pos = torch.arange(n)
        visible = pos[None, :] <= pos[:, None]
        if window:
            visible &= pos[None, :] > pos[:, None] - window
        mask = torch.zeros(n, n).masked_fill(~visible, float("-inf"))
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=dim ** -0.5)
                    .transpose(0, 1).reshape(n, heads * dim))
    return torch.cat(outs)


def _torch_bf16(qkv: torch.Tensor, lengths: list[int], heads: int, kv_heads: int, dim: int,
                window: int) -> torch.Tensor:
    """The same through torch's CPU flash kernel in bf16 (the bar: the tile kernel is to be as close)."""
    outs, first = [], 0
    group = heads // kv_heads
    for n in lengths:
        rows = qkv[first:first + n]
        first += n
        q = rows[:, :heads * dim].view(n, heads, dim).transpose(0, 1)[None]
        k, v = (rows[:, (heads + i * kv_heads) * dim:(heads + (i + 1) * kv_heads) * dim].view(n, kv_heads, dim)
                .transpose(0, 1).repeat_interleave(group, 0)[None] for i in (0, 1))
        pos = torch.arange(n)
        visible = pos[None, :] <= pos[:, None]
        if window:
            visible &= pos[None, :] > pos[:, None] - window
        mask = torch.zeros(n, n, dtype=torch.bfloat16).masked_fill(~visible, float("-inf"))
        o = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                      scale=dim ** -0.5)[0]
        outs.append(o[0].transpose(0, 1).reshape(n, heads * dim).float())
    return torch.cat(outs)


def _run(portable: bool, qkv: torch.Tensor, lengths: list[int], heads: int, kv_heads: int, dim: int,
         window: int, out: torch.Tensor) -> int:
    lib = flash_prefill_kernel(portable)
    assert lib is not None, "the prefill kernel did not build (a C compiler is needed)"
    first = torch.tensor([sum(lengths[:i]) for i in range(len(lengths))], dtype=torch.int32)
    count = torch.tensor(lengths, dtype=torch.int32)
    return lib.flash_prefill(qkv.data_ptr(), qkv.stride(0), first.data_ptr(), count.data_ptr(), len(lengths),
                             out.data_ptr(), out.stride(0), heads, kv_heads, dim, dim ** -0.5, window,
                             torch.get_num_threads())


@pytest.mark.parametrize("portable", [False, True], ids=["as-built", "portable-c"])
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "lengths", "window"), CASES)
def test_the_kernel_is_as_close_to_fp32_as_torchs_bf16_flash(portable: bool, heads: int, kv_heads: int, dim: int,
                                                             lengths: list[int], window: int) -> None:
    torch.manual_seed(dim + window)
    width = (heads + 2 * kv_heads) * dim
    qkv = torch.randn(sum(lengths), width + ROW_PAD).to(torch.bfloat16)[:, :width]
    wide = torch.full((sum(lengths), heads * dim + ROW_PAD), float("nan"), dtype=torch.bfloat16)
    out = wide[:, :heads * dim]
    assert _run(portable, qkv, lengths, heads, kv_heads, dim, window, out) == 0
    assert wide[:, heads * dim:].isnan().all(), "the kernel wrote outside its rows' heads"
    reference = _reference(qkv, lengths, heads, kv_heads, dim, window)
    ours = (out.float() - reference).abs()
    torchs = (_torch_bf16(qkv, lengths, heads, kv_heads, dim, window) - reference).abs()
    assert not ours.isnan().any()
    # every output within a bf16 step of the fp32 result, and on average as close as torch's kernel gets
    torch.testing.assert_close(out.float(), reference, atol=1.6e-2, rtol=1e-2)
    assert ours.mean() <= 1.1 * torchs.mean(), (ours.mean().item(), torchs.mean().item())


def test_tiles_on_amx_and_in_c_agree() -> None:
    """Where the CPU has AMX and AVX-512 the two builds run different code (tiles, exp, packing); their
    outputs differ at most by fp32 rounding (the order of sums in a tile product, the exp polynomial's
    last bits), so by a bf16 step of P or O at the most."""
    heads, kv_heads, dim, lengths, window = CASES[0]
    torch.manual_seed(1)
    qkv = torch.randn(sum(lengths), (heads + 2 * kv_heads) * dim).to(torch.bfloat16)
    outs = []
    for portable in (False, True):
        out = torch.empty(sum(lengths), heads * dim, dtype=torch.bfloat16)
        assert _run(portable, qkv, lengths, heads, kv_heads, dim, window, out) == 0
        outs.append(out.float())
    torch.testing.assert_close(outs[0], outs[1], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(4, 4, 48), (6, 4, 64), (4, 4, 256)])
def test_shapes_it_does_not_take_are_refused(heads: int, kv_heads: int, dim: int) -> None:
    qkv = torch.zeros(8, (heads + 2 * kv_heads) * dim, dtype=torch.bfloat16)
    out = torch.zeros(8, heads * dim, dtype=torch.bfloat16)
    assert _run(True, qkv, [8], heads, kv_heads, dim, 0, out) == -1


def test_the_cpu_backend_sends_fresh_bf16_prompts_to_the_tiles_where_amx_is_granted() -> None:
    """Fresh prompts (>= DENSE_PREFILL_MIN_QUERIES tokens) go to the tile kernel in one call per layer
    exactly where the CPU grants AMX, and come out as the kernel computes them; a chunk after a cached
    prefix and short segments keep their paths. Elsewhere the backend never uses it."""
    lib = flash_prefill_kernel()
    assert lib is not None
    heads, kv_heads, dim, block = 9, 3, 64, 16
    shape = AttentionShape(heads, kv_heads, dim, dim ** -0.5)
    shapes = [(0, 70), (0, 1), (32, 80), (0, DENSE_PREFILL_MIN_QUERIES), (0, 130)]
    num_blocks = sum(-(-(s + c) // block) for s, c in shapes) + 2
    pool = KVCachePool(KVCacheSpec(2, num_blocks, block, kv_heads, dim, torch.bfloat16), torch.device("cpu"),
                       torch.bfloat16)
    torch.manual_seed(2)
    pool.tensor.copy_(torch.randn(pool.tensor.shape).to(torch.bfloat16))
    free = torch.randperm(num_blocks).tolist()
    spans = [SeqSpan([free.pop() for _ in range(-(-(s + c) // block))], s, c) for s, c in shapes]
    qkv = torch.randn(sum(c for _, c in shapes), (heads + 2 * kv_heads) * dim).to(torch.bfloat16)
    q, k, v = qkv.split((heads * dim, kv_heads * dim, kv_heads * dim), dim=-1)
    meta = attention_metadata(spans, block, pool.tensor.device, torch.bfloat16, cpu_kernel=True,
                              dense_min_queries=DENSE_PREFILL_MIN_QUERIES)
    attention = CpuAttention(pool, shape, meta)
    granted = lib.flash_prefill_uses_amx() == 1
    assert amx_prefill_supported(pool, shape) == granted
    assert (attention._fresh is not None) == granted
    out = attention(1, q, k, v)
    fresh = [i for i, (s, c) in enumerate(shapes) if s == 0 and c >= DENSE_PREFILL_MIN_QUERIES]
    if granted:
        assert attention._fresh is not None and attention._fresh[1].tolist() == [shapes[i][1] for i in fresh]
        starts = [sum(c for _, c in shapes[:i]) for i in range(len(shapes))]
        for i in fresh:
            rows = qkv[starts[i]:starts[i] + shapes[i][1]]
            expected = torch.empty(shapes[i][1], heads * dim, dtype=torch.bfloat16)
            assert _run(False, rows, [shapes[i][1]], heads, kv_heads, dim, 0, expected) == 0
            assert torch.equal(out[starts[i]:starts[i] + shapes[i][1]], expected)
    capped = AttentionShape(heads, kv_heads, dim, dim ** -0.5, softcap=30.0)
    assert not amx_prefill_supported(pool, capped)
    fp32_pool = KVCachePool(KVCacheSpec(2, 4, block, kv_heads, dim, torch.float32), torch.device("cpu"),
                            torch.float32)
    assert not amx_prefill_supported(fp32_pool, shape)
