"""A step of a few tokens of a Llama-family decoder as one C call (engine/kernels/step_program.c): the
CPU's counterpart of the CUDA graphs in engine/cuda_graphs.py. One token in any dtype; in fp32 up to
`MAX_ROWS` where the runner allows it (a speculative verify, a draft model's steps), each row through
gemv.c's few-row kernel, which computes every row exactly as the one-row kernel does (the eager path's
oneDNN product for several rows rounds otherwise: a multi-row program step is not bit-equal to an eager
one, but to one-row steps). bf16 keeps one row (its few-row kernel is unmeasured against oneDNN on the
AMX machines that run bf16).

At batch 1 the eager forward makes ~10 calls per layer (norms, linears, RoPE, attention, SiLU·mul)
through nn.Module, torch and ctypes; with the weights streaming through the caches each call
costs 10-30 us of Python, a fifth of the step. The program is the same calls on the same kernels,
listed once at start-up over fixed activation buffers, so a step is: the embedding row, one C
call, and the logits. It applies where every call has a C kernel: the plain Llama layer (no
q/k norm, no sandwich norms), the CPU attention kernel, linears through the one-row C
matrix-vector kernel (fp32/bf16, `PackedLinear.gemv`) or the int4 / int8 C kernels without bias.
Anything else (other families, deterministic mode's row tiles, a layer observer) runs eagerly.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from engine.attention.metadata import AttentionMetadata, AttentionShape
from engine.kernels import (
    DTYPE_CODES,
    attention_kernel,
    fused_ops_kernel,
    gemv_kernel,
    quant_matmul_kernel,
    step_program_kernel,
)
from engine.kv_cache import KVCachePool
from engine.models.llama import MLP, Attention, DecoderLayer, LlamaForCausalLM
from engine.quant_layers import Int4Linear, Int8Linear

logger = logging.getLogger(__name__)
MAX_ROWS = {torch.float32: 8, torch.bfloat16: 1}  # rows a program step takes, by activation dtype

OP_RMS_NORM, OP_ROPE, OP_ATTENTION, OP_SILU_MUL, OP_GEMV, OP_INT4, OP_INT8 = range(7)
_P = ctypes.c_void_p


class _Model(ctypes.Structure):
    _fields_ = [("rms_norm", _P), ("silu_mul", _P), ("rope", _P), ("attention", _P), ("int4_linear", _P),
                ("int8_linear", _P), ("gemv", _P), ("gemm_few", _P), ("dt", ctypes.c_int32), ("kv_dt", ctypes.c_int32),
                ("heads", ctypes.c_int32), ("kv_heads", ctypes.c_int32), ("head_dim", ctypes.c_int32),
                ("block_size", ctypes.c_int32), ("qkv_stride", ctypes.c_int64), ("scale", ctypes.c_float),
                ("softcap", ctypes.c_float), ("cos", _P), ("sin", _P)]


class _StepContext(ctypes.Structure):
    _fields_ = [("positions", _P), ("slots", _P), ("tables", _P), ("item_pos0", _P), ("item_seq", _P),
                ("item_token", _P), ("item_count", _P), ("table_width", ctypes.c_int32),
                ("num_items", ctypes.c_int32), ("num_threads", ctypes.c_int32), ("rows", ctypes.c_int32)]


class _Op(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("unused", ctypes.c_int32), ("input", _P), ("out", _P), ("w", _P * 3),
                ("aux", _P), ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("window", ctypes.c_int64),
                ("eps", ctypes.c_float), ("unused2", ctypes.c_float)]


@runtime_checkable
class OneRowLinear(Protocol):
    """A linear whose one-row forward is Tandem's C matrix-vector kernel `gemv` over `one_row` (W),
    unless `row_tile` sends rows to oneDNN: engine.loader.packing.PackedLinear (named by its attributes:
    the loader imports the runner, not the other way)."""

    gemv: Callable[..., None] | None
    one_row: torch.Tensor | None
    bias: torch.Tensor | None
    row_tile: int
    in_features: int
    out_features: int


class Unsupported(Exception):
    """The model (or its set-up) has a part the program cannot run: it decodes eagerly."""


def _address(lib: ctypes.CDLL | None, name: str) -> int:
    if lib is None:
        raise Unsupported(f"no C kernel library for {name}")
    address = ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
    assert address is not None
    return address


@dataclass
class _Buffers:
    """The activations of up to max_rows tokens, reused every step (the program holds their addresses)."""

    residual: torch.Tensor
    x: torch.Tensor  # a layer's output (o_proj, then down_proj)
    normed: torch.Tensor
    qkv: torch.Tensor
    attended: torch.Tensor
    gate_up: torch.Tensor
    act: torch.Tensor


class StepProgram:
    """Built by `build` (None where it does not apply); `can_run` / `run` as CudaGraphDecoder's."""

    def __init__(self, model: LlamaForCausalLM, pool: KVCachePool, shape: AttentionShape, dtype: torch.dtype) -> None:
        self.model, self.dtype = model, dtype
        lib = step_program_kernel()
        if lib is None:
            raise Unsupported("no C compiler")
        self._run = lib.run_step
        layers = list(model.layers)
        first = layers[0]
        assert isinstance(first, DecoderLayer)
        hidden = first.input_layernorm.weight.shape[0]
        attn0, mlp0 = first.self_attn, first.mlp
        assert isinstance(attn0, Attention) and isinstance(mlp0, MLP)
        q_size, kv_size = attn0.q_size, attn0.kv_size

        self.max_rows = MAX_ROWS.get(dtype, 1)

        def buffer(width: int) -> torch.Tensor:
            return torch.zeros(self.max_rows, width, dtype=dtype)

        self.buffers = _Buffers(buffer(hidden), buffer(hidden), buffer(hidden), buffer(q_size + 2 * kv_size),
                                buffer(q_size), buffer(2 * mlp0.intermediate), buffer(mlp0.intermediate))
        rope = attn0.rope
        cos, sin = rope.cos, rope.sin
        if rope.rotary_dim != rope.head_dim:
            raise Unsupported("partial rotary (the RoPE kernel rotates whole heads)")
        if cos.dtype != torch.float32 or not cos.is_contiguous() or not sin.is_contiguous():
            raise Unsupported("RoPE tables are not contiguous fp32")
        self._keep: list[object] = [cos, sin]  # whatever the program points into must outlive it
        gemv = gemv_kernel()
        self._model = _Model(
            _address(fused_ops_kernel(), "rms_norm"), _address(fused_ops_kernel(), "silu_mul"),
            _address(fused_ops_kernel(), "rope"), _address(attention_kernel(), "paged_attention"),
            _address(quant_matmul_kernel(), "int4_linear"), _address(quant_matmul_kernel(), "int8_linear"),
            _address(gemv, "f32_gemv" if dtype == torch.float32 else "bf16_gemv"),
            _address(gemv, "f32_gemm_few" if dtype == torch.float32 else "bf16_gemm_few"), DTYPE_CODES[dtype],
            DTYPE_CODES[pool.tensor.dtype],
            shape.num_heads, shape.num_kv_heads, shape.head_dim, pool.spec.block_size, q_size + 2 * kv_size,
            shape.scale, shape.softcap, cos.data_ptr(), sin.data_ptr())
        ops = [op for i, layer in enumerate(layers) for op in self._layer_ops(i, layer, pool, shape)]
        final = model.norm
        ops.append(self._norm(self.buffers.x, final.weight, final.eps, residual=True))
        self._ops = (_Op * len(ops))(*ops)
        self._context = _StepContext()

    @staticmethod
    def build(model: nn.Module, pool: KVCachePool, shape: AttentionShape, dtype: torch.dtype) -> StepProgram | None:
        """The program for `model`, or None (logged) where some part has no C kernel."""
        try:
            if type(model) is not LlamaForCausalLM or dtype not in DTYPE_CODES or pool.tensor.dtype not in DTYPE_CODES:
                raise Unsupported(f"{type(model).__name__} in {dtype} with a {pool.tensor.dtype} cache")
            return StepProgram(model, pool, shape, dtype)
        except Unsupported as why:
            logger.info("one-token steps run eagerly: %s", why)
            return None

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: bool) -> _Op:
        """normed = RMSNorm(residual + x) with the residual updated in place, or of the residual itself."""
        if weight.dtype != self.dtype or not weight.is_contiguous():
            raise Unsupported("a norm weight in another dtype")
        self._keep.append(weight)
        op = _Op(kind=OP_RMS_NORM, input=x.data_ptr() if residual else self.buffers.residual.data_ptr(),
                 out=self.buffers.normed.data_ptr(), n=weight.shape[0], eps=eps)
        op.w[0] = weight.data_ptr()
        op.aux = self.buffers.residual.data_ptr() if residual else None
        return op

    def _linear(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> _Op:
        """y = module(x) for one row, through the kernel the module's own forward calls for one row."""
        if isinstance(module, OneRowLinear):
            w = module.one_row
            if module.gemv is None or module.row_tile or w is None or w.dtype != self.dtype:
                raise Unsupported("a linear without the one-row C kernel (or tiled for batch invariance)")
            op = _Op(kind=OP_GEMV, n=module.out_features, k=module.in_features)
            weights = [w] if module.bias is None else [w, module.bias]
        elif (isinstance(module, (Int4Linear, Int8Linear)) and module._c_linear is not None and module._c_linear.bound
              and module.bias is None):
            op = _Op(kind=OP_INT4 if isinstance(module, Int4Linear) else OP_INT8, n=module.out_features,
                     k=module.in_features)
            weights = ([module.nibbles, module.scale, module.offset] if isinstance(module, Int4Linear)
                       else [module.q, module.scale])
        else:
            raise Unsupported(f"a {type(module).__name__} linear")
        if (module.in_features, module.out_features) != (x.shape[1], y.shape[1]):
            raise Unsupported(f"a {module.in_features} -> {module.out_features} linear where the buffers are "
                              f"{x.shape[1]} -> {y.shape[1]} (layers of other widths)")
        for i, w in enumerate(weights):
            op.w[i] = w.data_ptr()
        self._keep.extend(weights)
        op.input, op.out = x.data_ptr(), y.data_ptr()
        return op

    def _layer_ops(self, index: int, layer: nn.Module, pool: KVCachePool, shape: AttentionShape) -> list[_Op]:
        if type(layer) is not DecoderLayer or type(layer.self_attn) is not Attention or type(layer.mlp) is not MLP:
            raise Unsupported(f"layer {index} is a {type(layer).__name__}")
        b = self.buffers
        attn, mlp = layer.self_attn, layer.mlp
        cache = pool.tensor[index]
        self._keep.append(cache)
        return [
            self._norm(b.x, layer.input_layernorm.weight, layer.input_layernorm.eps, residual=index > 0),
            self._linear(attn.qkv_proj, b.normed, b.qkv),
            _Op(kind=OP_ROPE, out=b.qkv.data_ptr()),
            _Op(kind=OP_ATTENTION, input=b.qkv.data_ptr(), out=b.attended.data_ptr(), aux=cache.data_ptr(),
                window=shape.window(index)),
            self._linear(attn.o_proj, b.attended, b.x),
            self._norm(b.x, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.eps, residual=True),
            self._linear(mlp.gate_up_proj, b.normed, b.gate_up),
            _Op(kind=OP_SILU_MUL, input=b.gate_up.data_ptr(), out=b.act.data_ptr(), n=mlp.intermediate),
            self._linear(mlp.down_proj, b.act, b.x),
        ]

    def can_run(self, meta: AttentionMetadata) -> bool:
        """Up to max_rows tokens, planned for the CPU attention kernel, with nothing for torch's flash path."""
        plan = meta.cpu
        return plan is not None and 1 <= meta.slot_mapping.shape[0] <= self.max_rows and not plan.dense

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The final norm's output `[rows, hidden]` (a fresh tensor), as `model(...)` returns it."""
        plan = meta.cpu
        assert plan is not None and positions.dtype == torch.int64 and meta.slot_mapping.dtype == torch.int64
        rows = input_ids.shape[0]
        self.buffers.residual[:rows].copy_(self.model.embed(input_ids))
        c = self._context
        c.positions, c.slots, c.tables = positions.data_ptr(), meta.slot_mapping.data_ptr(), plan.tables.data_ptr()
        c.item_pos0, c.item_seq = plan.item_pos0.data_ptr(), plan.item_seq.data_ptr()
        c.item_token, c.item_count = plan.item_token.data_ptr(), plan.item_count.data_ptr()
        c.table_width, c.num_items, c.num_threads = plan.tables.shape[1], plan.item_seq.numel(), torch.get_num_threads()
        c.rows = rows
        failed = self._run(ctypes.byref(self._model), ctypes.byref(c), self._ops, len(self._ops))
        if failed:
            raise RuntimeError(f"step program: kernel call {failed - 1} of {len(self._ops)} refused its input "
                               "or found no memory")
        return self.buffers.normed[:rows].clone()
