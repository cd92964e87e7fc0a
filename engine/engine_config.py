"""Configuration of an engine instance (frozen, validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine.kv_cache import KVCacheDtype
from engine.scheduler import SchedulingPolicy

ComputeDtype = Literal["auto", "float32", "bfloat16", "float16"]
Quantization = Literal["int8", "int4"]


@dataclass(frozen=True)
class SpeculativeConfig:
    """n-gram (prompt lookup) drafts, verified by the model in one step; greedy requests only."""

    num_draft_tokens: int = 4
    ngram_max: int = 3
    ngram_min: int = 1
    # Above this many running sequences the step is compute-bound and drafts cost throughput.
    max_running_seqs: int = 4

    def __post_init__(self) -> None:
        if self.num_draft_tokens < 1:
            raise ValueError("num_draft_tokens must be >= 1")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # HF folder or .gguf file; None = the default SmolLM2-135M-Instruct
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: ComputeDtype = "auto"  # auto: bf16 where it is fast (CUDA, AVX512-BF16/AMX), else fp32
    kv_cache_dtype: KVCacheDtype = "auto"  # auto: the compute dtype
    block_size: int = 16
    kv_cache_memory_bytes: int = 1 << 30
    num_kv_blocks: int | None = None  # overrides kv_cache_memory_bytes
    max_model_len: int | None = None  # default: the model's context length, capped at 8192
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    scheduling_policy: SchedulingPolicy = "fcfs"
    quantization: Quantization | None = None
    speculative: SpeculativeConfig | None = None
    attention_backend: Literal["auto", "torch", "flash"] = "auto"
    enforce_eager: bool = False  # no CUDA graphs
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads on CPU; None = torch's default

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_bytes < 1:
            raise ValueError("kv_cache_memory_bytes must be positive")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
