"""Weight-only int8 / int4 linear layers (kernel conventions: engine/quant.py) and the model pass
that puts them in place of plain linears."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import DTYPE_CODES, quant_matmul_kernel
from engine.quant import (
    INT4_GROUP_SIZES,
    KERNEL_DTYPE,
    Int4Weights,
    Int8Weights,
    QuantizedWeights,
    QuantMethod,
    UnsupportedShapeError,
    check_int4_shape,
    quantize_int4,
    quantize_int8,
)

logger = logging.getLogger(__name__)
# From this many rows a quantized linear dequantizes W for a float matmul instead of its integer kernel.
# Measured on an AMX Xeon over the default model's 120 body linears (ms per step, kernel / dequantized):
# int4 bf16 16 rows 37/54, 24: 54/52, 32: 64/53, 512: 1092/153; int4 fp32 64: 128/156, 512: 1112/457;
# int8 (dequantized by torch ops) bf16 64: 117/194, 512: 804/179.
INT4_DEQUANTIZE_MIN_ROWS = {torch.bfloat16: 24, torch.float32: 96}
INT8_DEQUANTIZE_MIN_ROWS = {torch.bfloat16: 128, torch.float32: 128}
DEQUANTIZE_CHUNK_ELEMENTS = 1 << 22  # W is dequantized this many elements (output rows x K) at a time
C_KERNEL_GROUP = 32  # quant_matmul.c rounds activations per 32 and takes int4 groups of 32 only (GGUF's block)


def _c_kernel_takes(out_features: int, in_features: int) -> bool:
    return in_features % C_KERNEL_GROUP == 0 and out_features % 4 == 0


class _CQuantKernel:
    """y = x @ W^T through quant_matmul.c's `fn` (int4_linear or int8_linear), W given by a layer's buffers.

    A decode calls this ~120 times per token for one row each, so a call costs one allocation and one
    C call: fp32 and bf16 x go in as they are and y comes back in x's dtype (rounded once in C), and the
    buffers' pointers are checked and recorded by `bind`, which the layer calls when it is built and
    after every move or cast (`nn.Module._apply`): buffers that no longer fit the kernel are refused.
    """

    def __init__(self, fn: Callable[..., int], in_features: int, out_features: int,
                 weights: tuple[torch.Tensor, ...]) -> None:
        self._fn, self._in, self._out = fn, in_features, out_features
        self._ptrs: tuple[int, ...] | None = None
        self._bound: tuple[torch.Tensor, ...] = ()
        self.bind(weights)

    def bind(self, weights: tuple[torch.Tensor, ...]) -> None:
        fits = all(w.device.type == "cpu" and w.is_contiguous() and
                   (not w.is_floating_point() or w.dtype == torch.float32) for w in weights)
        self._ptrs = tuple(w.data_ptr() for w in weights) if fits else None
        # held, so the pointers never outlive their storage (a buffer swapped without _apply, e.g. by
        # load_state_dict(assign=True), leaves stale weights, never freed memory)
        self._bound = weights

    @property
    def bound(self) -> bool:
        """The buffers fit the kernel (and the layer's dequantizing path): CPU, contiguous, fp32 scales."""
        return self._ptrs is not None

    def check_fits(self, x: torch.Tensor) -> tuple[int, ...]:
        """The bound buffers' pointers; raises unless x and they fit the C code (this kernel or the
        layer's C dequantizer)."""
        if self._ptrs is None or x.device.type != "cpu":
            # e.g. the module was moved or cast after it was built: its buffers no longer fit the kernel
            raise RuntimeError("the C quantized kernel needs CPU input and its contiguous fp32 / integer buffers "
                               "as built; quantize the model where and in the dtype it will run")
        return self._ptrs

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self._in:
            raise ValueError(f"expected input with last dimension {self._in}, got {tuple(x.shape)}")
        ptrs = self.check_fits(x)
        io = x.dtype if x.dtype in DTYPE_CODES else torch.float32
        x2 = x if x.dtype == io and x.is_contiguous() else x.to(io).contiguous()
        y = torch.empty(*x.shape[:-1], self._out, dtype=io)
        if self._fn(x2.data_ptr(), *ptrs, y.data_ptr(), x2.numel() // self._in, self._out, self._in,
                    DTYPE_CODES[io], torch.get_num_threads()) != 0:
            raise MemoryError("quantized matmul kernel: no memory for the rounded activations")
        return y if io == x.dtype else y.to(x.dtype)


def _many_rows(x: torch.Tensor, min_rows: dict[torch.dtype, int]) -> bool:
    """Enough rows (CPU, fp32/bf16) that dequantizing W once for the call and running torch's float matmul
    (oneDNN; AMX for bf16) beats the integer kernel, which is made for the few rows of a decode."""
    return x.dtype in min_rows and x.numel() >= min_rows[x.dtype] * x.shape[-1]


def _dequantized_matmul(x: torch.Tensor, out_features: int, in_features: int,
                        dequantize: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """x @ W^T with W dequantized a block of output rows at a time (`dequantize(n0, n1)`: W[n0:n1] in
    x's dtype), so the float copy of a vocabulary-wide head never exists whole."""
    step = max(1, DEQUANTIZE_CHUNK_ELEMENTS // in_features)
    parts = [F.linear(x, dequantize(n0, min(n0 + step, out_features))) for n0 in range(0, out_features, step)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _flatten(x: torch.Tensor, in_features: int) -> torch.Tensor:
    if x.shape[-1] != in_features:
        raise ValueError(f"expected input with last dimension {in_features}, got {tuple(x.shape)}")
    return x.reshape(-1, in_features).to(KERNEL_DTYPE).contiguous()


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + bias. On CPU through Tandem's C kernel (engine/kernels/quant_matmul.c:
    activations rounded to int8 per group of 32, integer dot products) where the shape allows, else
    through torch's `_weight_int8pack_mm`; on CUDA the weight is widened to x's dtype per call (saves
    memory, not time).
    """

    q: torch.Tensor
    scale: torch.Tensor

    def __init__(self, weights: Int8Weights, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weights.shape
        if self.in_features % 8:  # the CPU kernel reads K in steps of 8 and segfaults otherwise
            raise UnsupportedShapeError(f"int8 needs in_features divisible by 8, got {self.in_features}")
        self.register_buffer("q", weights.q.contiguous())
        self.c_kernel = None
        if weights.q.device.type == "cpu" and _c_kernel_takes(self.out_features, self.in_features):
            self.c_kernel = quant_matmul_kernel()
        # the C kernel takes the fp32 scale as given; torch's kernel wants it in bf16
        self.register_buffer("scale", weights.scale.to(torch.float32 if self.c_kernel else KERNEL_DTYPE).contiguous())
        self._c_linear = None if self.c_kernel is None else _CQuantKernel(
            self.c_kernel.int8_linear, self.in_features, self.out_features, (self.q, self.scale))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Int8Linear:
        try:
            super()._apply(fn, *args, **kwargs)
        finally:  # moved or cast (even part way): the kernel's buffers are new tensors
            if self._c_linear is not None:
                self._c_linear.bind((self.q, self.scale))
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls(quantize_int8(linear.weight), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda":
            y = F.linear(x, self.q.to(x.dtype)) * self.scale.to(x.dtype)
        elif self.c_kernel is not None and _many_rows(x, INT8_DEQUANTIZE_MIN_ROWS):
            y = _dequantized_matmul(x, self.out_features, self.in_features, lambda n0, n1: (
                self.q[n0:n1].to(torch.float32) * self.scale[n0:n1, None]).to(x.dtype))
        elif self.c_kernel is not None:
            assert self._c_linear is not None
            y = self._c_linear(x)
        else:
            y = torch._weight_int8pack_mm(_flatten(x, self.in_features), self.q, self.scale)
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Int4Linear(nn.Module):
    """y = x @ w.T + bias with grouped int4 w (see Int4Weights), packed for the weights' device.

    On CPU, groups of 32 (GGUF's Q4_1) run through Tandem's C kernel (engine/kernels/quant_matmul.c:
    activations rounded to int8 per group, integer dot products); other group sizes, and CPUs
    without a C compiler, through torch's int4 kernel. The packed layout is specific to the device
    (and CPU ISA) it was packed on: build the layer where it will run; moving it afterwards is
    refused at forward time.
    """

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    q: torch.Tensor  # only when the kernel is unavailable (CUDA fallback)
    nibbles: torch.Tensor  # C kernel: [N, K / 2], see quant_matmul.c
    scale: torch.Tensor  # C kernel: fp32 [N, K / 32]
    offset: torch.Tensor  # C kernel: fp32 [N, K / 32], zero - 8 * scale

    def __init__(self, weights: Int4Weights, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weights.shape
        self.group_size = weights.group_size
        check_int4_shape(self.out_features, self.in_features, self.group_size)
        self.packed_on = weights.q.device
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.use_kernel = True
        self.c_kernel = None
        self._c_linear: _CQuantKernel | None = None
        if self.packed_on.type == "cpu" and self.group_size == C_KERNEL_GROUP:
            self.c_kernel = quant_matmul_kernel()
        if self.c_kernel is not None:
            self._pack_c(weights)
            self._c_linear = _CQuantKernel(self.c_kernel.int4_linear, self.in_features, self.out_features,
                                           (self.nibbles, self.scale, self.offset))
            return
        # [K / G, N, 2]: torch's kernels' scales_and_zeros, bf16.
        sz = torch.stack([weights.scale, weights.zero], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scales_and_zeros", sz.to(KERNEL_DTYPE), persistent=False)
        if self.packed_on.type == "cuda":
            self.use_kernel = self._pack_cuda(weights)
        else:
            packed = torch._convert_weight_to_int4pack_for_cpu(weights.q.to(torch.int32).contiguous(), 1)
            self.register_buffer("packed", packed, persistent=False)

    def _pack_c(self, weights: Int4Weights) -> None:
        groups = weights.q.view(self.out_features, -1, C_KERNEL_GROUP)
        nibbles = groups[..., : C_KERNEL_GROUP // 2] | (groups[..., C_KERNEL_GROUP // 2:] << 4)
        self.register_buffer("nibbles", nibbles.reshape(self.out_features, -1).contiguous(), persistent=False)
        self.register_buffer("scale", weights.scale.contiguous(), persistent=False)
        self.register_buffer("offset", (weights.zero - 8 * weights.scale).contiguous(), persistent=False)

    def _pack_cuda(self, weights: Int4Weights) -> bool:
        q = weights.q.contiguous()
        inner_k_tiles = next(t for t in (8, 4, 2) if self.in_features % (t * 16) == 0)
        try:
            pairs = (q[:, ::2] << 4 | q[:, 1::2]).contiguous()
            packed = torch._convert_weight_to_int4pack(pairs, inner_k_tiles)
            probe = torch.zeros(1, self.in_features, dtype=KERNEL_DTYPE, device=q.device)
            torch._weight_int4pack_mm(probe, packed, self.group_size, self.scales_and_zeros)
        except RuntimeError as err:  # no tinygemm for this build or GPU: dequantize per call
            logger.debug("int4 CUDA kernel unavailable (%s); dequantizing on the fly", err)
            self.register_buffer("q", q, persistent=False)
            return False
        self.register_buffer("packed", packed, persistent=False)
        return True

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Int4Linear:
        try:
            super()._apply(fn, *args, **kwargs)
        finally:  # moved or cast (even part way): the kernel's buffers are new tensors
            if self._c_linear is not None:
                self._c_linear.bind((self.nibbles, self.scale, self.offset))
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> Int4Linear:
        check_int4_shape(linear.out_features, linear.in_features, group_size)
        return cls(quantize_int4(linear.weight, group_size), linear.bias)

    def _c_dequantized(self, n0: int, n1: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows n0 .. n1 - 1 of W in `dtype` (fp32 or bf16), from the C kernel's format."""
        assert self.c_kernel is not None
        w = torch.empty(n1 - n0, self.in_features, dtype=dtype)
        self.c_kernel.int4_dequantize(self.nibbles[n0].data_ptr(), self.scale[n0].data_ptr(),
                                      self.offset[n0].data_ptr(), w.data_ptr(), n1 - n0, self.in_features,
                                      int(dtype == torch.bfloat16), torch.get_num_threads())
        return w

    def _dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        scale, zero = (t.transpose(0, 1).to(dtype) for t in self.scales_and_zeros.unbind(-1))
        q = self.q.to(dtype).view(self.out_features, -1, self.group_size) - 8
        return (q * scale[..., None] + zero[..., None]).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._c_linear is not None:  # CPU only: _c_linear refuses input or buffers elsewhere
            if _many_rows(x, INT4_DEQUANTIZE_MIN_ROWS):
                self._c_linear.check_fits(x)
                y = _dequantized_matmul(x, self.out_features, self.in_features,
                                        lambda n0, n1: self._c_dequantized(n0, n1, x.dtype))
            else:
                y = self._c_linear(x)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        if x.device != self.scales_and_zeros.device or self.scales_and_zeros.device != self.packed_on:
            raise RuntimeError(f"Int4Linear was packed on {self.packed_on}; got input on {x.device}")
        if not self.use_kernel:
            y = F.linear(x, self._dequantized(x.dtype))
        else:
            x2 = _flatten(x, self.in_features)
            if x.device.type == "cuda":
                y = torch._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_and_zeros)
            else:
                y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def _quantized_layer(linear: nn.Linear, method: QuantMethod, group_size: int,
                     weights: QuantizedWeights | None) -> nn.Module:
    if weights is None and method == "int8":
        return Int8Linear.from_linear(linear)
    if weights is None:
        return Int4Linear.from_linear(linear, group_size)
    if weights.shape != (linear.out_features, linear.in_features):
        raise ValueError(f"prebuilt weights {weights.shape} do not match the layer "
                         f"({linear.out_features}, {linear.in_features})")
    device = linear.weight.device
    if isinstance(weights, Int8Weights):
        return Int8Linear(Int8Weights(weights.q.to(device), weights.scale.to(device)), linear.bias)
    moved = Int4Weights(weights.q.to(device), weights.scale.to(device), weights.zero.to(device),
                        weights.group_size)
    return Int4Linear(moved, linear.bias)


def quantize_model(model: nn.Module, method: QuantMethod, *, group_size: int = 32,
                   skip: Callable[[str], bool] | None = None,
                   prebuilt: Mapping[str, QuantizedWeights] | None = None) -> list[str]:
    """Replace every nn.Linear of `model` (not skipped by name) by a quantized layer, in place.

    A layer takes `prebuilt[name]` when present (its type, Int4 or Int8, decides the layer, so
    Q8_0 and Q4_1 tensors can be mixed), else it is quantized from its float weight with `method`.
    Layers the kernel cannot take stay float. Quantized layers own fresh tensors, so a weight
    shared with an embedding (tied lm_head) is left untouched. Returns the replaced names.
    Run it after the model is on its final device.
    """
    if method not in ("int8", "int4"):
        raise ValueError(f"quantization method must be 'int8' or 'int4', got {method!r}")
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    prebuilt = prebuilt or {}
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(set(prebuilt) - set(linears))
    if unknown:
        raise ValueError(f"prebuilt weights name no nn.Linear of the model: {unknown}")
    if "" in linears:
        raise ValueError("the model itself is an nn.Linear: wrap it in a module to quantize it")
    replaced: list[str] = []
    kept: list[str] = []
    for name, linear in linears.items():
        if skip is not None and skip(name):
            continue
        try:
            layer = _quantized_layer(linear, method, group_size, prebuilt.get(name))
        except UnsupportedShapeError as err:
            logger.debug("keeping %s in float: %s", name, err)
            kept.append(name)
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
        replaced.append(name)
    if kept:
        logger.info("%s: %d linears stay float, their shapes unsupported (e.g. %s)", method, len(kept), kept[0])
    return replaced
