"""Rotary position embedding (half-split / NeoX order, as in HF Llama), with llama3 scaling."""

from __future__ import annotations

import math

import torch

from engine.config import RopeScaling
from engine.kernels import ops


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
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
    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: RopeScaling | None) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.theta, self.scaling = head_dim, max_positions, theta, scaling
        self.register_buffer("cos", torch.empty(0), persistent=False)  # [max_positions, head_dim / 2], fp32
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.build_tables(torch.empty(0).device)  # a no-op under `with torch.device("meta")`

    def build_tables(self, device: torch.device) -> None:
        """(Re)compute the cos/sin tables in fp32 on `device` (they are not part of any checkpoint)."""
        if device.type == "meta":
            return
        inv_freq = inverse_frequencies(self.head_dim, self.theta, self.scaling)
        angles = torch.outer(torch.arange(self.max_positions, dtype=torch.float32), inv_freq).to(device)
        self.cos, self.sin = angles.cos(), angles.sin()

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q `[T, Hq*d]`, k `[T, Hk*d]` → rotated copies of the same shapes."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return (ops.rotate_reference(q, cos, sin, self.head_dim), ops.rotate_reference(k, cos, sin, self.head_dim))

    def rotate_in_place(self, positions: torch.Tensor, qkv: torch.Tensor, num_heads: int, num_kv_heads: int) -> bool:
        """Rotate the q and k heads at the front of each row of `qkv` in place, where a fused kernel
        applies (then True); the same values as `forward`."""
        return ops.rope_in_place(qkv, num_heads, num_kv_heads, self.head_dim, positions, self.cos, self.sin)
