"""Per-step attention metadata: the contract between the model runner and attention backends.

Token order of a step: first every single-token sequence (the decode batch), then each
multi-token segment (prefill chunks and speculative verifications) in turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from engine.config import ModelConfig

if TYPE_CHECKING:
    from engine.attention.cpu_backend import CpuAttentionPlan


@dataclass(frozen=True)
class AttentionShape:
    """A model's attention, layer by layer: what every backend computes, whatever the step."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    # per layer: w > 0 attends to the last w positions only (its own included); () or 0: every position
    windows: tuple[int, ...] = ()
    softcap: float = 0.0  # > 0: scores (scaled) become softcap * tanh(score / softcap) before the softmax

    @staticmethod
    def of(config: ModelConfig) -> AttentionShape:
        scale = config.attention_scale if config.attention_scale is not None else config.head_dim ** -0.5
        return AttentionShape(config.num_heads, config.num_kv_heads, config.head_dim, scale,
                              config.sliding_windows, config.attn_logit_softcap)

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def window(self, layer: int) -> int:
        """Layer `layer`'s window (0: none)."""
        return self.windows[layer] if self.windows else 0


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
class PagedMetadata:
    """The step's sequences as the Triton kernel reads them (int32, on the pool's device): sequence s has queries
    q_starts[s] .. + q_lens[s] and a context of kv_lens[s] tokens (its queries last) in pages block_table[s]."""

    q_starts: torch.Tensor  # [S]
    q_lens: torch.Tensor  # [S]
    kv_lens: torch.Tensor  # [S]
    block_table: torch.Tensor  # [S, max_blocks], padded with pages never read
    max_q_len: int


@dataclass(frozen=True)
class AttentionMetadata:
    """What the step's backend needs: the torch backend reads `decode` and `segments`, the Triton backend
    `paged`, the C backend `cpu` (and the runner builds only what its backend reads)."""

    slot_mapping: torch.Tensor  # [T] int64: the cache slot each new token's K/V goes to
    decode: DecodeBatch | None
    segments: tuple[Segment, ...]
    num_tokens: int
    cpu: CpuAttentionPlan | None = None
    paged: PagedMetadata | None = None
    # a hybrid KV layout's (engine.kv_groups) groups 1, 2, ...: the same tokens through their own block tables
    groups: tuple[AttentionMetadata, ...] = ()


class AttentionFn(Protocol):
    """What the model sees: attention for one layer over the step's tokens.

    q is `[T, num_heads * head_dim]`, k and v `[T, num_kv_heads * head_dim]` (RoPE applied);
    returns `[T, num_heads * head_dim]`. The backend stores k/v in the paged cache itself.
    """

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...
