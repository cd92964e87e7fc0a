"""Linear weights in the layouts this CPU's matmul runs fastest, packed once at load.

Measured on an AVX2 EPYC (fp32, 2 threads, weights cold in cache as in a decode step; see
docs/BENCHMARKS.md): oneDNN's prepacked weights (`_reorder_linear_weight`, batch hint 64) beat
torch's default `linear` by 20-80% for every layer shape from 2 rows up (the vocabulary-wide
lm_head by 3-4x), while for a single row a plain matrix-vector product over the transposed weight
(`mm(x, W^T)`, MKL) beat it, and Tandem's own C matrix-vector kernel over W as stored beats both
(see docs/BENCHMARKS.md). So a `PackedLinear` keeps the oneDNN weight, and for models whose weights
fit `SINGLE_ROW_COPY_BYTES` also W for one-row inputs (batch-1 decode; W^T where the C kernel is
unavailable).
oneDNN is also the path to AVX512-BF16 / AMX for bf16 weights.

Where oneDNN cannot pack a dtype on this CPU (bf16 needs AVX512-BW or AVX-NE-CONVERT), linears stay
torch's own.

Batch invariance (`--deterministic`): oneDNN's packed linear computes a row the same whatever the
other rows are on the AVX2 CPUs measured, while on an AMX Xeon it switches kernels (and summation
order) for one row (fp32) or past 32 rows (bf16), so those shapes run in calls of 2 to ROW_TILE rows;
torch's own linear does once the rows are padded to a multiple of ROW_PAD (MKL picks its kernels by that).
`make_batch_invariant` checks every shape at load and tiles where needed. The single-row copy is not
used then, since it rounds differently from the packed path.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from torch import nn

from engine.kernels import gemv_kernel, ops
from engine.models.llama import MLP

log = logging.getLogger(__name__)

_GEMV = {torch.float32: "f32_gemv", torch.bfloat16: "bf16_gemv"}  # gemv.c's function per weight dtype
BATCH_HINT = 64  # the batch oneDNN lays the weight out for
ROW_PAD = 16  # deterministic mode: torch's own linears see row counts that are multiples of this
ROW_TILE = 32  # deterministic mode, where oneDNN's result for a row depends on the batch: most rows per call
SINGLE_ROW_COPY_BYTES = 2 << 30  # keep the one-row copy only while all linear weights stay below this


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def onednn_packs(dtype: torch.dtype) -> bool:
    """oneDNN can pack a weight of `dtype` on this CPU (bf16 needs AVX512-BW or AVX-NE-CONVERT)."""
    if not onednn_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), BATCH_HINT)
    except RuntimeError:
        return False
    return True


class PackedLinear(nn.Module):
    """y = x W^T + b for 2-D x, from oneDNN's packed weight, or for one row (`single_row`) from
    `one_row`: W itself for Tandem's C matrix-vector kernel (engine/kernels/gemv.c, fp32 and bf16),
    else (fp32 without the kernel) W^T for MKL's `mm`."""

    def __init__(self, linear: nn.Linear, single_row: bool, bias_apart: bool = False) -> None:
        super().__init__()
        # the bias added after oneDNN's product (not fused into it, where a one-row call adds it in another
        # order than a batch's: measured on an AMX Xeon in fp32), for deterministic mode
        self.bias_apart = bias_apart
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed: torch.Tensor
        self.bias: torch.Tensor | None
        self.one_row: torch.Tensor | None
        self._register_packed(weight)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone(), persistent=False)
        kernel = gemv_kernel() if single_row and weight.dtype in _GEMV else None
        self.gemv: Callable[..., None] | None = None if kernel is None else getattr(kernel, _GEMV[weight.dtype])
        one_row = None
        if self.gemv is not None:  # W as it is (a tied lm_head shares the embedding's)
            one_row = weight.contiguous()
        elif single_row and weight.dtype == torch.float32:  # MKL's mm over a W^T copy beats oneDNN for one fp32 row
            one_row = weight.t().contiguous()
        self.register_buffer("one_row", one_row, persistent=False)
        self.row_tile = 0  # > 0: 2 to this many rows per oneDNN call (make_batch_invariant)

    def _register_packed(self, weight: torch.Tensor) -> None:
        """oneDNN's copy of W (a subclass may keep it otherwise)."""
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_tile:
            parts = [self._packed(part) if part.shape[0] > 1
                     else self._packed(torch.cat((part, torch.zeros_like(part))))[:1]
                     for part in x.split(self.row_tile)]
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        if self.one_row is not None and x.shape[0] == 1:
            if self.gemv is not None and x.dtype == self.one_row.dtype and x.shape[1] == self.in_features:
                x = x.contiguous()
                y = x.new_empty((1, self.out_features))
                self.gemv(x.data_ptr(), self.one_row.data_ptr(), None if self.bias is None else self.bias.data_ptr(),
                          y.data_ptr(), self.out_features, self.in_features, torch.get_num_threads())
                return y
            if self.gemv is None:
                return torch.mm(x, self.one_row) if self.bias is None else torch.addmm(self.bias, x, self.one_row)
        return self._packed(x)

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias_apart and self.bias is not None:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, None, "none", [], "").add_(self.bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")


class FusedGateUp(PackedLinear):
    """The [gate | up] projection of a SiLU MLP whose SiLU(gate) * up runs inside oneDNN's matmuls: gate's
    applies SiLU to its accumulator (the swish post-op), up's multiplies its accumulator by that, so neither
    the [T, 2I] product nor a separate element-wise pass goes through memory (measured on an AMX Xeon, bf16:
    the same or faster from 8 rows, 30% at 2048). SiLU is taken before rounding to the weight dtype (torch's
    order rounds gate first), so it serves bf16/fp16 weights only, never fp32, whose outputs the exactness
    tests pin to transformers', nor deterministic mode. One row still goes through W and the C gemv, then
    ops.silu_mul."""

    def __init__(self, linear: nn.Linear, single_row: bool) -> None:
        self.packed_gate: torch.Tensor
        self.packed_up: torch.Tensor
        super().__init__(linear, single_row)

    def _register_packed(self, weight: torch.Tensor) -> None:  # the halves, each packed; no whole copy
        half = weight.shape[0] // 2
        self.register_buffer("packed", torch.empty(0, dtype=weight.dtype), persistent=False)
        for name, rows in (("packed_gate", weight[:half]), ("packed_up", weight[half:])):
            self.register_buffer(name, torch.ops.mkldnn._reorder_linear_weight(rows.contiguous(), BATCH_HINT),
                                 persistent=False)

    def _packed(self, x: torch.Tensor) -> torch.Tensor:  # the plain [gate | up] product (not the hot path)
        x = x.contiguous()
        return torch.cat([torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
                          for w in (self.packed_gate, self.packed_up)], dim=-1)

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU(x W_gate^T) * (x W_up^T)."""
        if x.shape[0] == 1 and self.one_row is not None:
            return ops.silu_mul(self.forward(x))
        x = x.contiguous()
        gate = torch.ops.mkldnn._linear_pointwise(x, self.packed_gate, None, "swish", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, gate, self.packed_up, None, "mul")


@functools.cache
def onednn_fuses_silu_mul(dtype: torch.dtype) -> bool:
    """oneDNN here takes the swish and binary-mul post-ops on a packed `dtype` linear."""
    if dtype == torch.float32 or not onednn_packs(dtype):
        return False
    try:
        linear = nn.Linear(8, 16, bias=False).to(dtype)
        FusedGateUp(linear, single_row=False).silu_mul(torch.zeros(2, 8, dtype=dtype))
    except RuntimeError:
        return False
    return True


class RowPaddedLinear(nn.Module):
    """torch's own linear on rows padded with zeros to a multiple of ROW_PAD (deterministic mode)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.row_tile = 0  # never tiled (make_batch_invariant tiles packed linears only)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        padded = -(-rows // ROW_PAD) * ROW_PAD
        if padded != rows:
            x = torch.cat((x, x.new_zeros(padded - rows, x.shape[1])))
        return torch.nn.functional.linear(x, self.weight, self.bias)[:rows]


def _pack(linear: nn.Linear, single_row: bool, deterministic: bool, silu_gate_up: bool = False) -> nn.Module | None:
    """The linear's replacement, or None to keep it (oneDNN cannot pack its dtype here). `silu_gate_up`: the
    linear is a SiLU MLP's [gate | up] (fused with its SiLU * up where FusedGateUp serves)."""
    if silu_gate_up and linear.bias is None and not deterministic and onednn_fuses_silu_mul(linear.weight.dtype):
        return FusedGateUp(linear, single_row)
    if onednn_available():
        try:
            return PackedLinear(linear, single_row, bias_apart=deterministic)
        except RuntimeError as e:  # e.g. bf16 on a CPU without AVX512-BW
            log.info("oneDNN cannot pack a %s linear here (%s): torch's own linear runs it", linear.weight.dtype, e)
    return RowPaddedLinear(linear) if deterministic else None


def _linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if type(child) is nn.Linear]


def pack_linears(model: nn.Module, deterministic: bool) -> int:
    """Replace every plain `nn.Linear` of a CPU model by its packed form; returns how many were
    replaced. (Quantized linears keep their own kernels.) A tied lm_head gets its own packed copy;
    the embedding keeps the original."""
    found = _linears(model)
    total = sum(lin.weight.numel() * lin.weight.element_size() for _, _, lin in found)
    single_row = not deterministic and total <= SINGLE_ROW_COPY_BYTES
    replaced = 0
    for parent, name, linear in found:
        module = _pack(linear, single_row, deterministic, silu_gate_up=type(parent) is MLP and name == "gate_up_proj")
        if module is not None:
            setattr(parent, name, module)
            replaced += 1
    copies = sum(m.one_row.numel() * m.one_row.element_size() for m in model.modules()
                 if isinstance(m, PackedLinear) and m.one_row is not None)
    log.info("packed %d of %d linears (%.0f MB of weights); one-row weights: %.0f MB (W itself or a W^T copy)",
             replaced, len(found),
             total / 1e6, copies / 1e6)
    return replaced


# every size up to one past a tile (oneDNN's blocks and tails live there), then a spread of larger ones
INVARIANCE_BATCHES = (*range(1, ROW_TILE + 2), 48, 64, 65, 100, 200, 257, 512)
REFERENCE_ROWS = 48


def _variant_batch(module: PackedLinear | RowPaddedLinear, dtype: torch.dtype, most: int,
                   generator: torch.Generator) -> int | None:
    """The first batch size (of INVARIANCE_BATCHES below `most`, and `most`) in which some row comes out
    of `module` other than alone; None if there is none. Batches are drawn from REFERENCE_ROWS rows,
    each computed alone once, so every place in a batch is checked (oneDNN on AMX computes the rows
    past the 32nd of a batch differently, not the first ones)."""
    sizes = sorted({s for s in INVARIANCE_BATCHES if s < most} | {most})
    rows = torch.randn(REFERENCE_ROWS, module.in_features, generator=generator).to(dtype)
    alone = torch.cat([module(rows[i:i + 1]) for i in range(REFERENCE_ROWS)])
    for size in sizes:
        picks = torch.randint(0, REFERENCE_ROWS, (size,), generator=generator)
        if not torch.equal(module(rows[picks]), alone[picks]):
            return size
    return None


def make_batch_invariant(model: nn.Module, max_rows: int, max_logit_rows: int) -> int:
    """Make every linear compute a row bit-identically whatever batch it is in (the premise of
    deterministic mode), or raise RuntimeError: each shape is checked in batches of INVARIANCE_BATCHES
    rows up to the most a step feeds it (`max_rows`; the lm_head only sees a step's last tokens, at
    most `max_logit_rows`) and that most itself. Where a packed shape fails, every packed linear of its
    dtype runs in calls of 2 to ROW_TILE rows from then on (a lone row padded with a zero row), and all
    are checked again (a later pass may catch what an earlier one missed: bf16 outputs hide most
    changes of summation order): measured on an AMX Xeon, oneDNN sums a row in another order when it
    is alone (fp32, K = 1536) or past the 32nd of a call (bf16, every shape of the default model).
    Returns how many linears were tiled."""
    groups: dict[tuple[int, int, torch.dtype, int], list[PackedLinear | RowPaddedLinear]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            raise RuntimeError("deterministic mode leaves no plain nn.Linear (pack_linears first)")
        if isinstance(module, (PackedLinear, RowPaddedLinear)):
            dtype = module.packed.dtype if isinstance(module, PackedLinear) else module.weight.dtype
            most = max_logit_rows if name.rsplit(".", 1)[-1] == "lm_head" else max_rows
            groups.setdefault((module.in_features, module.out_features, dtype, most), []).append(module)
    generator = torch.Generator().manual_seed(0)
    tiled_dtypes: set[torch.dtype] = set()
    while True:
        caught = None
        for (k, n, dtype, most), modules in groups.items():
            size = _variant_batch(modules[0], dtype, most, generator)
            if size is not None:
                caught = (k, n, dtype, size, modules[0])
                break
        if caught is None:
            break
        k, n, dtype, size, module = caught
        if dtype in tiled_dtypes or not isinstance(module, PackedLinear):
            raise RuntimeError(f"a {k}x{n} {dtype} linear is not batch-invariant on this CPU (a row alone and in "
                               f"a batch of {size} differ): deterministic mode cannot be exact here")
        tiled_dtypes.add(dtype)  # one shape caught switching: every packed linear of its dtype runs in tiles
        for other in model.modules():
            if isinstance(other, PackedLinear) and other.packed.dtype == dtype:
                other.row_tile = ROW_TILE
    tiled = sum(1 for m in model.modules() if isinstance(m, PackedLinear) and m.row_tile)
    if tiled:
        log.info("deterministic mode: %d linears run in calls of at most %d rows (batch-invariant only so here)",
                 tiled, ROW_TILE)
    return tiled
