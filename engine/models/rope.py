"""Rotary position embedding (half-split / NeoX order, as in HF Llama) over a head's first `rotary_dim`
dims (all of them but for partial rotary), with llama3, linear or LongRoPE scaling."""

from __future__ import annotations

import math

import torch

from engine.config import RopeScaling
from engine.kernels import ops


def inverse_frequencies(rotary_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """fp32, computed as transformers does (the same operations in the same order: equal bits)."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    if scaling is not None and scaling.rope_type == "longrope":
        return 1.0 / (torch.tensor(scaling.frequency_divisors, dtype=torch.float32) * theta ** exponents)
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    in_band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(in_band, blended, scaled)


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: RopeScaling | None,
                 rotary_dim: int | None = None) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.theta, self.scaling = head_dim, max_positions, theta, scaling
        self.rotary_dim = head_dim if rotary_dim is None else rotary_dim  # the first dims of a head; the rest pass
        self.register_buffer("cos", torch.empty(0), persistent=False)  # [max_positions, rotary_dim / 2], fp32
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.build_tables(torch.empty(0).device)  # a no-op under `with torch.device("meta")`

    def build_tables(self, device: torch.device) -> None:
        """(Re)compute the cos/sin tables in fp32 on `device` (they are not part of any checkpoint)."""
        if device.type == "meta":
            return
        inv_freq = inverse_frequencies(self.rotary_dim, self.theta, self.scaling)
        angles = torch.outer(torch.arange(self.max_positions, dtype=torch.float32), inv_freq).to(device)
        self.cos, self.sin = angles.cos(), angles.sin()
        if self.scaling is not None and self.scaling.rope_type == "longrope":  # in fp32, as transformers does
            self.cos, self.sin = self.cos * self.scaling.attention_factor, self.sin * self.scaling.attention_factor

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q `[T, Hq*d]`, k `[T, Hk*d]` → rotated copies of the same shapes."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        if self.rotary_dim != self.head_dim:
            return self._rotate_part(q, cos, sin), self._rotate_part(k, cos, sin)
        return (ops.rotate_reference(q, cos, sin, self.head_dim), ops.rotate_reference(k, cos, sin, self.head_dim))

    def _rotate_part(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Partial rotary: each head's first rotary_dim dims rotated, the rest as they are."""
        heads = x.view(x.shape[0], -1, self.head_dim)
        rotated = ops.rotate_reference(heads[..., :self.rotary_dim].reshape(x.shape[0], -1), cos, sin, self.rotary_dim)
        return torch.cat((rotated.view(x.shape[0], -1, self.rotary_dim), heads[..., self.rotary_dim:]),
                         dim=-1).view(x.shape)

    def rotate_in_place(self, positions: torch.Tensor, qkv: torch.Tensor, num_heads: int, num_kv_heads: int) -> bool:
        """Rotate the q and k heads at the front of each row of `qkv` in place, where a fused kernel
        applies (then True); the same values as `forward`."""
        if self.rotary_dim != self.head_dim:  # the kernel rotates whole heads
            return False
        return ops.rope_in_place(qkv, num_heads, num_kv_heads, self.head_dim, positions, self.cos, self.sin)
