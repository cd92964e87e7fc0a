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
other rows are; torch's own linear does once the rows are padded to a multiple of ROW_PAD (MKL picks
its kernels by that); `check_batch_invariance` verifies it at load for every shape. The single-row
copy is not used then, since it rounds differently from the packed path.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from engine.kernels import gemv_kernel

log = logging.getLogger(__name__)

BATCH_HINT = 64  # the batch oneDNN lays the weight out for
ROW_PAD = 16  # deterministic mode: torch's own linears see row counts that are multiples of this
SINGLE_ROW_COPY_BYTES = 2 << 30  # keep the one-row copy only while all linear weights stay below this


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """y = x W^T + b for 2-D x, from oneDNN's packed weight, or for one row (`single_row`) from
    `one_row`: W itself for Tandem's C matrix-vector kernel (engine/kernels/gemv.c, fp32), else
    W^T for MKL's `mm`."""

    def __init__(self, linear: nn.Linear, single_row: bool) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed: torch.Tensor
        self.bias: torch.Tensor | None
        self.one_row: torch.Tensor | None
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT), persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone(), persistent=False)
        self.gemv = gemv_kernel() if single_row and weight.dtype == torch.float32 else None
        one_row = None
        if single_row:  # W as it is (a tied lm_head shares the embedding's) for the C kernel, else a W^T copy
            one_row = weight.contiguous() if self.gemv is not None else weight.t().contiguous()
        self.register_buffer("one_row", one_row, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.one_row is not None and x.shape[0] == 1:
            if self.gemv is not None and x.dtype == torch.float32 and x.shape[1] == self.in_features:
                x = x.contiguous()
                y = x.new_empty((1, self.out_features))
                self.gemv.f32_gemv(x.data_ptr(), self.one_row.data_ptr(),
                                   None if self.bias is None else self.bias.data_ptr(), y.data_ptr(),
                                   self.out_features, self.in_features, torch.get_num_threads())
                return y
            if self.gemv is None:
                return torch.mm(x, self.one_row) if self.bias is None else torch.addmm(self.bias, x, self.one_row)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")


class RowPaddedLinear(nn.Module):
    """torch's own linear on rows padded with zeros to a multiple of ROW_PAD (deterministic mode)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        padded = -(-rows // ROW_PAD) * ROW_PAD
        if padded != rows:
            x = torch.cat((x, x.new_zeros(padded - rows, x.shape[1])))
        return torch.nn.functional.linear(x, self.weight, self.bias)[:rows]


def _pack(linear: nn.Linear, single_row: bool, deterministic: bool) -> nn.Module | None:
    """The linear's replacement, or None to keep it (oneDNN cannot pack its dtype here)."""
    if onednn_available():
        try:
            return PackedLinear(linear, single_row)
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
        module = _pack(linear, single_row, deterministic)
        if module is not None:
            setattr(parent, name, module)
            replaced += 1
    copies = sum(m.one_row.numel() * m.one_row.element_size() for m in model.modules()
                 if isinstance(m, PackedLinear) and m.one_row is not None)
    log.info("packed %d of %d linears (%.0f MB of weights); one-row weights: %.0f MB (W itself or a W^T copy)",
             replaced, len(found),
             total / 1e6, copies / 1e6)
    return replaced


INVARIANCE_BATCHES = (1, 3, 16, 17, 64, 65, 200, 257)


def check_batch_invariance(model: nn.Module, max_rows: int, max_logit_rows: int) -> None:
    """Raise RuntimeError unless every linear computes a row bit-identically whatever batch it is in
    (the premise of deterministic mode on this CPU and torch build): batches of INVARIANCE_BATCHES
    rows up to the most a step feeds the linear (`max_rows`; the lm_head only sees a step's last
    tokens, at most `max_logit_rows`) and that most itself, with the row first, in the middle and
    last (oneDNN and MKL choose kernels and tails by the row count)."""
    seen: set[tuple[int, int, torch.dtype, int]] = set()
    generator = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            raise RuntimeError("deterministic mode leaves no plain nn.Linear (pack_linears first)")
        if not isinstance(module, (PackedLinear, RowPaddedLinear)):
            continue
        dtype = module.packed.dtype if isinstance(module, PackedLinear) else module.weight.dtype
        most = max_logit_rows if name.rsplit(".", 1)[-1] == "lm_head" else max_rows
        key = (module.in_features, module.out_features, dtype, most)
        if key in seen:
            continue
        seen.add(key)
        sizes = sorted({s for s in INVARIANCE_BATCHES if s < most} | {most})
        row = torch.randn(1, module.in_features, generator=generator).to(dtype)
        reference = module(row)
        for size in sizes:
            batch = torch.randn(size, module.in_features, generator=generator).to(dtype)
            places = sorted({0, size // 2, size - 1})
            batch[places] = row[0]
            if not all(torch.equal(module(batch)[i], reference[0]) for i in places):
                raise RuntimeError(f"a {module.in_features}x{module.out_features} {dtype} linear is not batch-"
                                   f"invariant on this CPU (a row alone and in a batch of {size} differ): "
                                   "deterministic mode cannot be exact here")
