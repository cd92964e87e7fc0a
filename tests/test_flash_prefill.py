"""The AMX prefill kernel (engine/kernels/flash_prefill.c) against attention computed in fp32 on the same
bf16 inputs: as close as torch's own bf16 flash kernel is, for head dims 32-128, grouped heads, sliding
windows, fresh prompts and chunks after cached prefixes (K/V read from the pool through block tables),
lengths around its 16-row and 64-key boundaries, and strided rows; built for this CPU (AMX tiles and
AVX-512 where it has them) and as portable C (every machine runs both); and the CPU backend sends a
step's long bf16 segments to it exactly where the CPU grants AMX."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from engine.attention import cpu_backend
from engine.attention.cpu_backend import (
    AMX_PREFILL_MIN_QUERIES,
    DENSE_MAX_CONTEXT_PER_QUERY,
    DENSE_PREFILL_MIN_QUERIES,
    CpuAttention,
    tiles_take,
)
from engine.attention.metadata import AttentionShape
from engine.attention.planning import SeqSpan, attention_metadata
from engine.kernels import flash_prefill_kernel
from engine.kv_cache import KVCachePool, KVCacheSpec

# (heads, kv_heads, head_dim, block size, (cached prefix, new tokens) per sequence, window)
CASES = [
    (9, 3, 64, 16, [(0, 512), (0, 100), (0, 1), (0, 17), (0, 64)], 0),
    (4, 4, 128, 16, [(0, 130), (0, 33), (40, 16), (200, 70)], 0),
    (8, 2, 32, 8, [(0, 200), (0, 15), (13, 50)], 7),
    (6, 2, 96, 24, [(0, 300), (0, 65), (150, 63)], 100),
    (2, 1, 64, 64, [(0, 129), (300, 64)], 64),
]
ROW_PAD = 5  # qkv rows wider than q | k | v, and out rows wider than the heads: strides the kernel must honour


@dataclass
class Step:
    """One layer's pool holding every sequence's K/V up to its last new position, their block tables,
    and the step's qkv rows (new tokens' k/v equal to what the pool holds for them)."""

    heads: int
    kv_heads: int
    dim: int
    block: int
    spans: list[tuple[int, int]]
    window: int
    cache: torch.Tensor  # [blocks, block, 2, kv_heads, dim]
    tables: torch.Tensor  # [sequences, width] int64
    qkv: torch.Tensor  # [new tokens, (heads + 2 kv_heads) dim], rows strided

    @staticmethod
    def build(heads: int, kv_heads: int, dim: int, block: int, spans: list[tuple[int, int]], window: int) -> Step:
        torch.manual_seed(dim + window + len(spans))
        need = [-(-(s + c) // block) for s, c in spans]
        cache = torch.randn(sum(need) + 3, block, 2, kv_heads, dim).to(torch.bfloat16)
        order = torch.randperm(cache.shape[0]).tolist()
        tables = torch.zeros(len(spans), max(need), dtype=torch.int64)
        for i, n in enumerate(need):
            tables[i, :n] = torch.tensor([order.pop() for _ in range(n)])
        width = (heads + 2 * kv_heads) * dim
        qkv = torch.randn(sum(c for _, c in spans), width + ROW_PAD).to(torch.bfloat16)[:, :width]
        step = Step(heads, kv_heads, dim, block, spans, window, cache, tables, qkv)
        row = 0
        for i, (start, count) in enumerate(spans):  # the new tokens' K/V as the paged kernel stores them
            for t in range(start, start + count):
                slot = cache[tables[i, t // block], t % block]
                slot[0] = qkv[row, heads * dim:(heads + kv_heads) * dim].view(kv_heads, dim)
                slot[1] = qkv[row, (heads + kv_heads) * dim:].view(kv_heads, dim)
                row += 1
        return step

    def keys(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence i's K and V, [kv_heads, positions, dim], from the pool."""
        start, count = self.spans[i]
        slots = torch.stack([self.cache[self.tables[i, t // self.block], t % self.block]
                             for t in range(start + count)])
        return slots[:, 0].transpose(0, 1), slots[:, 1].transpose(0, 1)

    def reference(self, fp32: bool = True) -> torch.Tensor:
        """Each sequence's attention in fp32 (or through torch's bf16 flash kernel), rows in step order."""
        outs, row, group, dim = [], 0, self.heads // self.kv_heads, self.dim
        for i, (start, count) in enumerate(self.spans):
            q = self.qkv[row:row + count, :self.heads * dim].view(count, self.heads, dim).transpose(0, 1)
            row += count
            k, v = (t.repeat_interleave(group, 0) for t in self.keys(i))
            pos, keys = torch.arange(start, start + count)[:, None], torch.arange(start + count)[None, :]
            visible = keys <= pos
            if self.window:
                visible &= keys > pos - self.window
            if fp32:
                mask = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))
                o = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=dim ** -0.5)
            else:
                mask = torch.zeros(visible.shape, dtype=torch.bfloat16).masked_fill(~visible, float("-inf"))
                o = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q[None], k[None], v[None], 0.0, False, attn_mask=mask, scale=dim ** -0.5)[0][0]
            outs.append(o.transpose(0, 1).reshape(count, self.heads * dim).float())
        return torch.cat(outs)

    def scratch_size(self, window: int) -> int:
        lib = flash_prefill_kernel()
        assert lib is not None
        count = torch.tensor([c for _, c in self.spans], dtype=torch.int32)
        start = torch.tensor([s for s, _ in self.spans], dtype=torch.int64)
        return int(lib.flash_prefill_scratch(count.data_ptr(), start.data_ptr(), len(self.spans), self.kv_heads,
                                             self.dim, window))

    def run(self, portable: bool, out: torch.Tensor, scratch: torch.Tensor | None = None) -> int:
        lib = flash_prefill_kernel(portable)
        assert lib is not None, "the prefill kernel did not build (a C compiler is needed)"
        counts = [c for _, c in self.spans]
        first = torch.tensor([sum(counts[:i]) for i in range(len(counts))], dtype=torch.int32)
        count = torch.tensor(counts, dtype=torch.int32)
        start = torch.tensor([s for s, _ in self.spans], dtype=torch.int64)
        seq = torch.arange(len(self.spans), dtype=torch.int32)
        return lib.flash_prefill(self.qkv.data_ptr(), self.qkv.stride(0), first.data_ptr(), count.data_ptr(),
                                 start.data_ptr(), seq.data_ptr(), len(counts), self.cache.data_ptr(),
                                 self.tables.data_ptr(), self.tables.shape[1], self.block, out.data_ptr(),
                                 out.stride(0), self.heads, self.kv_heads, self.dim, self.dim ** -0.5, self.window,
                                 None if scratch is None else scratch.data_ptr(), torch.get_num_threads())


def _refused(status: int, portable: bool) -> bool:
    """The as-built kernel has AMX compiled in and the OS refused tile data (-3): the engine never calls that
    build here (flash_prefill_uses_amx() says 0), and the portable build's cases cover the algorithm."""
    lib = flash_prefill_kernel()
    if status != -3:
        return False
    assert not portable and lib is not None and lib.flash_prefill_uses_amx() == 0
    return True


@pytest.mark.parametrize("portable", [False, True], ids=["as-built", "portable-c"])
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "block", "spans", "window"), CASES)
def test_the_kernel_is_as_close_to_fp32_as_torchs_bf16_flash(portable: bool, heads: int, kv_heads: int, dim: int,
                                                             block: int, spans: list[tuple[int, int]],
                                                             window: int) -> None:
    step = Step.build(heads, kv_heads, dim, block, spans, window)
    wide = torch.full((step.qkv.shape[0], heads * dim + ROW_PAD), float("nan"), dtype=torch.bfloat16)
    out = wide[:, :heads * dim]
    status = step.run(portable, out)
    if _refused(status, portable):
        return
    assert status == 0
    assert wide[:, heads * dim:].isnan().all(), "the kernel wrote outside its rows' heads"
    reference = step.reference()
    ours = (out.float() - reference).abs()
    torchs = (step.reference(fp32=False) - reference).abs()
    assert not ours.isnan().any()
    # every output within a bf16 step of the fp32 result, and on average as close as torch's kernel gets
    torch.testing.assert_close(out.float(), reference, atol=1.6e-2, rtol=1e-2)
    assert ours.mean() <= 1.1 * torchs.mean(), (ours.mean().item(), torchs.mean().item())


def test_tiles_on_amx_and_in_c_agree() -> None:
    """Where the CPU has AMX and AVX-512 the two builds run different code (tiles, exp, packing); their
    outputs differ at most by fp32 rounding (the order of sums in a tile product, the exp polynomial's
    last bits), so by a bf16 step of P or O at the most."""
    step = Step.build(*CASES[1])
    outs = []
    for portable in (False, True):
        out = torch.empty(step.qkv.shape[0], step.heads * step.dim, dtype=torch.bfloat16)
        status = step.run(portable, out)
        if _refused(status, portable):
            return
        assert status == 0
        outs.append(out.float())
    torch.testing.assert_close(outs[0], outs[1], atol=1e-2, rtol=1e-2)


def test_a_scratch_of_the_reported_size_is_enough_and_serves_every_window() -> None:
    """The packed K/V fit the size flash_prefill_scratch reports (a canary after it stays untouched), the
    size without a window bounds every window's, and the results equal the kernel's own allocation's."""
    step = Step.build(*CASES[4])  # a window, a cached prefix past it
    size, windowed = step.scratch_size(0), step.scratch_size(step.window)
    assert 0 < windowed < size
    canary = 4096
    scratch = torch.full((windowed + canary,), 7.0, dtype=torch.bfloat16)
    outs = []
    for buffer in (scratch, None):
        out = torch.empty(step.qkv.shape[0], step.heads * step.dim, dtype=torch.bfloat16)
        status = step.run(True, out, buffer)
        assert status == 0
        outs.append(out)
    assert (scratch[windowed:] == 7.0).all(), "the kernel packed past the size it reported"
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(4, 4, 48), (6, 4, 64), (4, 4, 256)])
def test_shapes_it_does_not_take_are_refused(heads: int, kv_heads: int, dim: int) -> None:
    step = Step.build(heads, kv_heads, dim, 16, [(0, 8)], 0)
    out = torch.zeros(8, heads * dim, dtype=torch.bfloat16)
    assert step.run(True, out) == -1


@pytest.fixture(params=["as-built", "portable-c"])
def tiles_on(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Whether the engine takes the tile path: as built (where the CPU grants AMX), or forced on with the
    portable build on every machine, so that the backend's and the runner's glue runs everywhere."""
    if request.param == "as-built":
        lib = flash_prefill_kernel()
        assert lib is not None
        return bool(lib.flash_prefill_uses_amx() == 1)
    portable = flash_prefill_kernel(True)
    monkeypatch.setattr("engine.attention.cpu_backend.flash_prefill_kernel", lambda: portable)
    monkeypatch.setattr("engine.attention.cpu_backend.amx_prefill_supported", tiles_take)
    monkeypatch.setattr("engine.model_runner.amx_prefill_supported", tiles_take)
    return True


@pytest.mark.parametrize("window", [0, 40])  # 40: every layer's window, so the step's scratch is sized by it
def test_the_cpu_backend_sends_long_bf16_segments_to_the_tiles_where_amx_is_granted(tiles_on: bool,
                                                                                    window: int) -> None:
    """Where the CPU grants AMX, sequences feeding >= AMX_PREFILL_MIN_QUERIES tokens, whatever their cached
    context (fresh prompts, chunks after a long prefix), go to the tile kernel in one call per layer with
    their own rows, positions and block tables: each comes out as fp32 attention over the pool's K/V (the
    step's rows stored first) within a bf16 step; the other segments keep the paged kernel's results bit for
    bit. Elsewhere (another CPU, fp32, capped scores) the backend never uses it, and torch's flash kernel's
    rule applies (>= 64 tokens, a context at most 4x that)."""
    granted = tiles_on
    heads, kv_heads, dim, block = 9, 3, 64, 16
    shape = AttentionShape(heads, kv_heads, dim, dim ** -0.5, (window, window) if window else ())
    shapes = [(0, 70), (0, 1), (32, 80), (0, DENSE_PREFILL_MIN_QUERIES), (5, 20), (300, 16), (0, 15), (0, 130)]
    num_blocks = sum(-(-(s + c) // block) for s, c in shapes) + 2
    pool = KVCachePool(KVCacheSpec(2, num_blocks, block, kv_heads, dim, torch.bfloat16), torch.device("cpu"),
                       torch.bfloat16)
    torch.manual_seed(2)
    pool.tensor.copy_(torch.randn(pool.tensor.shape).to(torch.bfloat16))
    before = pool.tensor.clone()
    free = torch.randperm(num_blocks).tolist()
    spans = [SeqSpan([free.pop() for _ in range(-(-(s + c) // block))], s, c) for s, c in shapes]
    qkv = torch.randn(sum(c for _, c in shapes), (heads + 2 * kv_heads) * dim).to(torch.bfloat16)
    q, k, v = qkv.split((heads * dim, kv_heads * dim, kv_heads * dim), dim=-1)
    min_queries, max_ratio = ((AMX_PREFILL_MIN_QUERIES, 0) if granted
                              else (DENSE_PREFILL_MIN_QUERIES, DENSE_MAX_CONTEXT_PER_QUERY))
    outs = {}
    for dense_min in (0, min_queries):
        pool.tensor.copy_(before)
        meta = attention_metadata(spans, block, pool.tensor.device, torch.bfloat16, cpu_kernel=True,
                                  dense_min_queries=dense_min, dense_max_context_per_query=max_ratio)
        attention = CpuAttention(pool, shape, meta)
        outs[dense_min] = attention(1, q, k, v)
    dense = [i for i, (s, c) in enumerate(shapes) if c >= min_queries and (not max_ratio or s + c <= max_ratio * c)]
    assert dense == ([0, 2, 3, 4, 5, 7] if granted else [0, 2, 3, 7])
    assert meta.cpu is not None and [p.seq for p in meta.cpu.dense] == dense
    starts = [sum(c for _, c in shapes[:i]) for i in range(len(shapes))]
    kept = [r for i, (_, c) in enumerate(shapes) if i not in dense for r in range(starts[i], starts[i] + c)]
    assert torch.equal(outs[0][kept], outs[min_queries][kept])
    assert cpu_backend.amx_prefill_supported(pool, shape) == granted
    assert (attention._tiles is not None) == granted
    if granted:
        layer = pool.tensor[1]
        for i in dense:
            s, c = shapes[i]
            keys = torch.stack([layer[spans[i].block_table[t // block], t % block] for t in range(s + c)])
            kk, vv = (keys[:, j].transpose(0, 1).repeat_interleave(heads // kv_heads, 0).float() for j in (0, 1))
            qq = q[starts[i]:starts[i] + c].view(c, heads, dim).transpose(0, 1).float()
            keys_at, positions = torch.arange(s + c)[None, :], torch.arange(s, s + c)[:, None]
            hidden = keys_at > positions
            if window:
                hidden |= keys_at <= positions - window
            mask = torch.zeros(c, s + c).masked_fill(hidden, float("-inf"))
            expected = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=dim ** -0.5)
            torch.testing.assert_close(outs[min_queries][starts[i]:starts[i] + c].float(),
                                       expected.transpose(0, 1).reshape(c, heads * dim), atol=1.6e-2, rtol=1e-2)
    capped = AttentionShape(heads, kv_heads, dim, dim ** -0.5, softcap=30.0)
    assert not cpu_backend.amx_prefill_supported(pool, capped)
    fp32_pool = KVCachePool(KVCacheSpec(2, 4, block, kv_heads, dim, torch.float32), torch.device("cpu"),
                            torch.float32)
    assert not cpu_backend.amx_prefill_supported(fp32_pool, shape)


def test_the_runner_picks_the_tiles_rule_where_amx_is_granted(head_dim_32_llama_dir: pathlib.Path,
                                                               tiles_on: bool) -> None:
    """A bf16 engine on a CPU granting AMX leaves segments of >= AMX_PREFILL_MIN_QUERIES tokens to the tiles
    whatever their context; elsewhere (fp32 here, or no AMX) torch's flash kernel's rule; deterministic mode
    neither."""
    from engine import LLM

    granted = tiles_on
    model = str(head_dim_32_llama_dir)
    bf16 = LLM(model, num_kv_blocks=64, dtype="bfloat16").engine.runner
    assert (bf16.dense_min_queries, bf16.dense_max_context_per_query) == (
        (AMX_PREFILL_MIN_QUERIES, 0) if granted else (DENSE_PREFILL_MIN_QUERIES, DENSE_MAX_CONTEXT_PER_QUERY))
    fp32 = LLM(model, num_kv_blocks=64, dtype="float32").engine.runner
    assert (fp32.dense_min_queries, fp32.dense_max_context_per_query) == (DENSE_PREFILL_MIN_QUERIES,
                                                                          DENSE_MAX_CONTEXT_PER_QUERY)
    fixed = LLM(model, num_kv_blocks=64, dtype="bfloat16", deterministic=True).engine.runner
    assert fixed.dense_min_queries == 0


@pytest.fixture(scope="module")
def head_dim_32_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A tiny Llama whose heads the tile kernel takes (2 heads of 32, one kv head). Treat as read-only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import _common, build_tiny_tokenizer

    directory = tmp_path_factory.mktemp("tiny_llama_head_dim_32")
    torch.manual_seed(5)
    config = {**_common(tie_word_embeddings=False), "num_attention_heads": 2, "num_key_value_heads": 1,
              "max_position_embeddings": 512}
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(str(directory))
    build_tiny_tokenizer(directory, add_bos=True)
    return directory


def _prompt_logprobs(model_dir: pathlib.Path, tiles: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[list, int]:
    """Every prompt token's logprob from a bf16 engine (chunks of 48 tokens, the prefix cache on: the second
    round's prompts extend the first's), with the tile kernel or torch's flash / the paged kernel; and how
    many layer calls the tiles served."""
    from engine import LLM, SamplingParams

    calls = 0
    original = CpuAttention._dense_on_tiles

    def counted(self: CpuAttention, *args: object) -> None:
        nonlocal calls
        calls += 1
        original(self, *args)  # type: ignore[arg-type]

    with monkeypatch.context() as patch:
        patch.setattr(CpuAttention, "_dense_on_tiles", counted)
        if not tiles:
            patch.setattr("engine.model_runner.amx_prefill_supported", lambda pool, shape: False)
            patch.setattr("engine.attention.cpu_backend.amx_prefill_supported", lambda pool, shape: False)
        llm = LLM(str(model_dir), dtype="bfloat16", num_kv_blocks=128, max_num_batched_tokens=48)
        generator = torch.Generator().manual_seed(3)
        first = [torch.randint(4, 200, (n,), generator=generator).tolist() for n in (20, 70, 150, 300)]
        second = [p + torch.randint(4, 200, (n,), generator=generator).tolist()
                  for p, n in zip(first, (17, 64, 5, 90), strict=True)]
        params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=0, logprobs=0)
        outputs = llm.generate(first, params) + llm.generate(second, params)
    return [[lp.logprob for lp in out.prompt_logprobs[1:]] + [lp.logprob for lp in out.logprobs]
            for out in outputs], calls


def test_a_bf16_engine_on_the_tiles_scores_prompts_as_without_them(head_dim_32_llama_dir: pathlib.Path, tiles_on: bool,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the whole engine (chunked prefill, chunks after cached prefixes from the prefix cache), every
    prompt token's logprob with the tiles is within bf16 noise of the one without them, and the tiles served
    the prefill wherever the engine takes them (where the CPU grants AMX; everywhere with the portable build)."""
    with_tiles, calls = _prompt_logprobs(head_dim_32_llama_dir, True, monkeypatch)
    without, none = _prompt_logprobs(head_dim_32_llama_dir, False, monkeypatch)
    assert none == 0 and (calls > 0) == tiles_on
    worst = max(abs(a - b) for x, y in zip(with_tiles, without, strict=True) for a, b in zip(x, y, strict=True))
    assert worst < 0.01, worst
