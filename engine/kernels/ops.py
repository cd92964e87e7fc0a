"""The decoder layers' element-wise ops, fused into one C pass each on CPU (fused_ops.c) and in
plain torch everywhere else (CUDA, fp16, TANDEM_DISABLE_C_KERNELS=1, no compiler). The torch
versions are the reference the C ones are tested against (tests/test_fused_ops.py).

Each op follows torch's eager order and roundings, so the torch versions below are exactly what the
model computed before these ops existed.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from engine.kernels import DTYPE_CODES, fused_ops_kernel


def _c_kernel(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The fused-ops library when every tensor is a contiguous CPU fp32/bf16 tensor of one dtype."""
    first = tensors[0]
    if first.device.type != "cpu" or first.dtype not in DTYPE_CODES:
        return None
    if any(t.dtype != first.dtype or t.device != first.device or not t.is_contiguous() for t in tensors):
        return None
    return fused_ops_kernel()


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if weight.dtype == torch.float32:  # (Gemma's order: the product in fp32, one cast; the same in fp32)
        return (weight * x32).to(x.dtype)
    return weight * x32.to(x.dtype)


def _norm_kernel(x: torch.Tensor, weight: torch.Tensor, *others: torch.Tensor) -> ctypes.CDLL | None:
    """The fused-ops library for a norm of `x` by `weight`: of one dtype, or a fp32 weight (Gemma's order)."""
    if weight.dtype == torch.float32 and x.dtype != torch.float32:
        return _c_kernel(x, *others) if weight.device == x.device and weight.is_contiguous() else None
    return _c_kernel(x, *others, weight)


def _run_norm(lib: ctypes.CDLL, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
              eps: float) -> torch.Tensor:
    out = torch.empty_like(x)
    rows, n = x.numel() // x.shape[-1], x.shape[-1]
    fn = lib.rms_norm_fp32_weight if weight.dtype != x.dtype else lib.rms_norm
    fn(x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, n,
       eps, DTYPE_CODES[x.dtype], torch.get_num_threads())
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * x / rms(x)` over the last dimension (the statistics in fp32). A weight in the activations'
    dtype multiplies the normed row cast to it (Llama's order); a fp32 weight multiplies it in fp32, and the
    product is cast once (Gemma's)."""
    lib = _norm_kernel(x, weight)
    if lib is None:
        return rms_norm_reference(x, weight, eps)
    return _run_norm(lib, x, None, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`residual + x` and its RMSNorm (as `rms_norm`): (normed, the new residual). The C path updates `residual`
    in place; callers must not keep other references to it."""
    lib = _norm_kernel(x, weight, residual)
    if lib is None:
        summed = residual + x
        return rms_norm_reference(summed, weight, eps), summed
    return _run_norm(lib, x, residual, weight, eps), residual


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` of `x = [gate | up]` split in halves along the last dimension."""
    lib = _c_kernel(x)
    if lib is None:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
    n = x.shape[-1] // 2
    out = x.new_empty((*x.shape[:-1], n))
    lib.silu_mul(x.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], n, DTYPE_CODES[x.dtype],
                 torch.get_num_threads())
    return out


def rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Half-split (NeoX) rotation of `x [T, heads * head_dim]` in fp32; cos/sin `[T, 1, head_dim / 2]`."""
    shape = x.shape
    x = x.view(shape[0], -1, head_dim)
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.to(x.dtype).view(shape)


def rope_in_place(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, positions: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Rotate the q and k heads at the front of each row of `qkv` in place (cos/sin: fp32
    `[max_positions, head_dim / 2]` tables). False (nothing done) where the C kernel does not apply."""
    lib = _c_kernel(qkv)
    if (lib is None or positions.dtype != torch.int64 or not positions.is_contiguous() or cos.dtype != torch.float32
            or not cos.is_contiguous() or not sin.is_contiguous()):
        return False
    lib.rope(qkv.data_ptr(), qkv.shape[0], qkv.stride(0), num_heads, num_kv_heads, head_dim, positions.data_ptr(),
             cos.data_ptr(), sin.data_ptr(), DTYPE_CODES[qkv.dtype], torch.get_num_threads())
    return True


def argmax_rows(logits: torch.Tensor) -> list[int]:
    """The first index of each row's largest value of `logits [R, V]` (torch.argmax's, for rows without
    NaN), as Python ints: in C for fp32 and bf16 on CPU (bf16 read as is, half the bytes of its fp32
    copy), torch elsewhere."""
    lib = _c_kernel(logits)
    if lib is None or logits.dim() != 2:
        return logits.max(dim=-1).indices.tolist()  # max's indices are argmax's, in half the time on CPU
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    lib.argmax_rows(logits.data_ptr(), out.data_ptr(), logits.shape[0], logits.shape[1], DTYPE_CODES[logits.dtype],
                    torch.get_num_threads())
    return out.tolist()
