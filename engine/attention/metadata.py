"""Per-step attention metadata: the contract between the model runner and attention backends.

Token order of a step: first every single-token sequence (the decode batch), then each
multi-token segment (prefill chunks and speculative verifications) in turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from engine.attention.cpu_backend import CpuAttentionPlan


@dataclass(frozen=True)
class DecodeBatch:
    """Sequences that feed exactly one token this step (tokens 0..num_seqs-1 of the step)."""

    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with block 0 (masked out)
    context_lens: torch.Tensor  # [B] int64, tokens in context including the new one
    bias: torch.Tensor  # [B, 1, max_blocks * block_size] additive mask: 0 inside context, -inf past it

    @property
    def num_seqs(self) -> int:
        return self.block_tables.shape[0]


@dataclass(frozen=True)
class Segment:
    """A sequence feeding `num_tokens` > 1 tokens (or one token when decode batching is off)."""

    token_start: int  # index of its first token in the step's flat token order
    num_tokens: int
    context_len: int  # tokens in context after this step (cached + new)
    block_ids: torch.Tensor  # [ceil(context_len / block_size)] int64
    causal_mask: torch.Tensor | None  # [num_tokens, context_len] bool; None when context_len == num_tokens


@dataclass(frozen=True)
class AttentionMetadata:
    """What the step's backend needs: the torch and flash backends read `decode` and `segments`;
    the C backend reads `cpu` (and the runner builds only what its backend reads)."""

    slot_mapping: torch.Tensor  # [T] int64: the cache slot each new token's K/V goes to
    decode: DecodeBatch | None
    segments: tuple[Segment, ...]
    num_tokens: int
    cpu: CpuAttentionPlan | None = None


class AttentionFn(Protocol):
    """What the model sees: attention for one layer over the step's tokens.

    q is `[T, num_heads * head_dim]`, k and v `[T, num_kv_heads * head_dim]` (RoPE applied);
    returns `[T, num_heads * head_dim]`. The backend stores k/v in the paged cache itself.
    """

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...
