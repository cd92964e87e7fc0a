"""Every frozen configuration of the engine: the model's architecture (`ModelConfig`), an engine
instance (`EngineConfig`) and the scheduler limits derived from it (`SchedulerConfig`). Values
measured at start-up live apart, in `engine.platform`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, get_args

RopeScalingType = Literal["llama3", "linear", "longrope"]
Architecture = Literal["llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen3_moe", "gemma2", "gemma3", "phi3"]
KVCacheDtype = Literal["auto", "bfloat16", "float16", "float32", "fp8_e4m3"]
# cpu: the C kernel (auto on CPU); triton: the Triton kernel (auto on CUDA); torch: plain torch, anywhere
AttentionBackend = Literal["auto", "torch", "triton", "cpu"]
SchedulingPolicy = Literal["fcfs", "priority"]
ComputeDtype = Literal["auto", "float32", "bfloat16", "float16"]
Quantization = Literal["int8", "int4"]


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (long wavelengths slowed by `factor`, a band blended), linear
    (every frequency divided by `factor`: Gemma 3's global layers; reads no other field), or LongRoPE
    (Phi-3: each frequency divided by its own factor from `short_factor` or `long_factor`, cos and sin
    multiplied by `attention_factor`).

    LongRoPE's set is chosen once per engine, not per sequence (as vLLM does): `use_long` when the
    engine's context (max_model_len) exceeds `original_max_position_embeddings` (`for_context`), so a
    token's KV never depends on how long its sequence grows. transformers instead picks per forward by
    the longest position in it, which rotates a prompt's KV with one set and its later tokens with the
    other once the sequence crosses the original length: the two agree for every sequence when the
    context stays within the original length, and for sequences whose prompt exceeds it."""

    factor: float
    low_freq_factor: float = 0.0
    high_freq_factor: float = 0.0
    original_max_position_embeddings: int = 0
    rope_type: RopeScalingType = "llama3"
    short_factor: tuple[float, ...] = ()  # longrope: one divisor per rotary frequency
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0  # longrope: cos and sin are multiplied by it
    use_long: bool = False  # longrope: the long set is in use (for_context)

    def __post_init__(self) -> None:
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be positive, got {self.factor}")
        if self.rope_type == "llama3" and not (0 < self.low_freq_factor < self.high_freq_factor
                                               and self.original_max_position_embeddings > 0):
            raise ValueError("llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor and "
                             "original_max_position_embeddings > 0")
        # JSON (the weight cache) gives lists: keep the config hashable and comparable
        object.__setattr__(self, "short_factor", tuple(float(f) for f in self.short_factor))
        object.__setattr__(self, "long_factor", tuple(float(f) for f in self.long_factor))
        if self.rope_type == "longrope" and not (
                self.short_factor and len(self.short_factor) == len(self.long_factor)
                and min(self.short_factor + self.long_factor) > 0 and self.original_max_position_embeddings > 0
                and self.attention_factor > 0):
            raise ValueError("longrope scaling needs positive short_factor and long_factor of one length, "
                             "original_max_position_embeddings > 0 and attention_factor > 0")

    def for_context(self, max_model_len: int) -> RopeScaling:
        """This scaling for an engine whose sequences reach `max_model_len` tokens (LongRoPE picks its set)."""
        if self.rope_type != "longrope":
            return self
        return replace(self, use_long=max_model_len > self.original_max_position_embeddings)

    @property
    def frequency_divisors(self) -> tuple[float, ...]:
        """longrope: the divisors in use."""
        return self.long_factor if self.use_long else self.short_factor


MOE_ARCHITECTURES = ("mixtral", "qwen3_moe")


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts MLPs (Mixtral, Qwen3-MoE): each token runs the `top_k` experts of highest
    router probability, weighted by those probabilities (renormalised to sum to 1 when
    `normalize_top_k`). Layers in `dense_layers` keep a dense MLP of the model's intermediate size."""

    num_experts: int
    top_k: int
    intermediate_size: int  # of one expert
    normalize_top_k: bool
    dense_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"need 1 <= top_k <= num_experts, got {self.top_k} of {self.num_experts}")
        if self.intermediate_size < 1:
            raise ValueError("an expert's intermediate_size must be >= 1")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family model, independent of where the weights came from."""

    architecture: Architecture
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None = None
    local_rope_theta: float | None = None  # Gemma 3: windowed layers' RoPE base (no scaling); None: rope_theta
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head's q and k, before RoPE
    moe: MoEConfig | None = None
    # per layer: a layer with w > 0 attends to the last w positions only (its own included); () or 0: all
    sliding_windows: tuple[int, ...] = ()
    attn_logit_softcap: float = 0.0  # > 0: attention scores become cap * tanh(score / cap) (Gemma 2)
    attention_scale: float | None = None  # None: head_dim ** -0.5
    final_logit_softcap: float = 0.0  # > 0: logits become cap * tanh(logit / cap) (Gemma 2)
    partial_rotary_factor: float = 1.0  # RoPE rotates the first rotary_dim of each head's dims (Phi-4-mini: 0.75)
    name: str = "model"
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for attr in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, attr) < 1:
                raise ValueError(f"ModelConfig.{attr} must be >= 1, got {getattr(self, attr)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.sliding_windows and (len(self.sliding_windows) != self.num_layers
                                     or min(self.sliding_windows) < 0):
            raise ValueError(f"sliding_windows needs one window >= 0 per layer ({self.num_layers}), "
                             f"got {self.sliding_windows}")
        if self.attn_logit_softcap < 0 or self.final_logit_softcap < 0:
            raise ValueError("soft-capping values must be >= 0")
        if not (0 < self.partial_rotary_factor <= 1) or self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(f"partial_rotary_factor {self.partial_rotary_factor} of head_dim {self.head_dim} must "
                             "give an even number of rotated dims >= 2")
        if (self.rope_scaling is not None and self.rope_scaling.rope_type == "longrope"
                and 2 * len(self.rope_scaling.short_factor) != self.rotary_dim):
            raise ValueError(f"longrope needs {self.rotary_dim // 2} factors (one per rotary frequency), got "
                             f"{len(self.rope_scaling.short_factor)}")
        if (self.moe is not None) != (self.architecture in MOE_ARCHITECTURES):
            raise ValueError(f"architecture {self.architecture!r} {'needs' if self.moe is None else 'takes no'} "
                             "MoE configuration")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def window_of_every_layer(self) -> int:
        """The widest window when every layer has one (then KV older than it is never read again), else 0."""
        return max(self.sliding_windows) if self.sliding_windows and min(self.sliding_windows) > 0 else 0

    @property
    def rotary_dim(self) -> int:
        """How many of a head's dims RoPE rotates (the first ones; the rest pass through)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def for_context(self, max_model_len: int) -> ModelConfig:
        """This config for an engine of context `max_model_len` (RopeScaling.for_context): what the model
        computes may depend on it, so the weights fingerprint is taken of the result."""
        if self.rope_scaling is None:
            return self
        return replace(self, rope_scaling=self.rope_scaling.for_context(max_model_len))


SpeculativeMethod = Literal["ngram", "draft"]
SELF_INT4_DRAFT = "self-int4"  # the draft is the target's own weights quantized to int4


@dataclass(frozen=True)
class SpeculativeConfig:
    """Drafts verified by the model in one step.

    ngram: prompt-lookup drafts, for plain greedy requests, off above `max_running_seqs` running sequences.
    draft: a smaller model sharing the tokenizer (`draft_model`: a path, or "self-int4") proposes up to
    `num_draft_tokens` per step for any sampling params (rejection sampling keeps the target's distribution;
    greedy stays token-exact); with `adaptive`, each step speculates only with the k (0: off) that the
    measured acceptance and step costs predict to give the most tokens/s (engine.spec_control).
    """

    num_draft_tokens: int = 4
    method: SpeculativeMethod = "ngram"
    ngram_max: int = 3
    ngram_min: int = 1
    # ngram: above this many running sequences the step is compute-bound and drafts cost throughput
    max_running_seqs: int = 4
    draft_model: str = SELF_INT4_DRAFT
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.num_draft_tokens < 1:
            raise ValueError("num_draft_tokens must be >= 1")
        if self.method not in ("ngram", "draft"):
            raise ValueError(f"speculative method must be ngram or draft, got {self.method!r}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")
        if not self.draft_model:
            raise ValueError(f"draft_model must be a path or {SELF_INT4_DRAFT!r}")


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # HF folder or .gguf file; None = the default SmolLM2-135M-Instruct
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: ComputeDtype = "auto"  # auto: bf16 where it is fast (CUDA, AVX512-BF16/AMX), else fp32
    kv_cache_dtype: KVCacheDtype = "auto"  # auto: the compute dtype
    block_size: int = 16
    kv_cache_memory_bytes: int = 1 << 30
    # overrides kv_cache_memory_bytes: as many bytes as this many blocks of every layer (engine.kv_groups)
    num_kv_blocks: int | None = None
    # a second KV tier of this many bytes (engine.kv_offload): cached blocks are copied there when the pool frees
    # them, so that once the pool evicts them they are loaded back on a prefix hit instead of recomputed; a
    # memory-mapped file in `kv_offload_dir` (default: the temp dir; its space is allocated at start) on a CPU,
    # pinned host memory on a GPU; 0: none
    kv_offload_bytes: int = 0
    kv_offload_dir: str | None = None
    max_model_len: int | None = None  # default: the model's context length, capped at 8192
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    scheduling_policy: SchedulingPolicy = "fcfs"
    quantization: Quantization | None = None
    speculative: SpeculativeConfig | None = None
    attention_backend: AttentionBackend = "auto"
    enforce_eager: bool = False  # no CUDA graphs
    seed: int = 0
    # torch intra-op threads on CPU, per rank; None = torch's default (a tensor-parallel rank: its share of the cores)
    num_threads: int | None = None
    record_kv_events: bool = False  # keep prefix-cache changes for drain_kv_events (KV-aware routing)
    # batch-invariant: a request's greedy tokens do not depend on what else is in its batch (any dtype);
    # needs the CPU kernels (checked at load), costs the single-row weight copy's speed-up
    deterministic: bool = False
    # schedule step N+1, build its inputs and detokenize step N while step N's forward runs (engine.step_pipeline).
    # Opt-in: on a CPU that work takes cores from the forward (2-4% slower on 2 cores, docs/BENCHMARKS.md); on a
    # GPU not measured yet (inputs are still built by blocking host-to-device copies). Not with n-gram
    # speculation (drafts need the last token to propose)
    async_scheduling: bool = False
    # a simulation profile (engine.simulated): the real scheduler and KV bookkeeping, a timing model for the forward
    simulate: str | None = None
    # a model with both windowed and global layers (Gemma 2/3, Qwen with max_window_layers) keeps its windowed
    # layers' KV in blocks of their own, given back behind the window (engine.kv_groups). Not yet with a second
    # tier (and so the cluster KV store): there every layer's KV is kept for every token, as models without this
    # layout do; KV peers (remote prefill) must agree on it
    hybrid_kv_cache: bool = True
    # ranks of a tensor-parallel group (engine.parallel): one process each, this engine's process rank 0; each
    # holds its share of the heads, MLP columns and vocabulary, and a KV pool of its KV heads of
    # kv_cache_memory_bytes (num_kv_blocks: blocks alike on every rank)
    tensor_parallel_size: int = 1
    # CPU ranks exchange their parts through shared memory (engine.parallel.shm_collectives); False: through Gloo
    # over 127.0.0.1 alone (a comparison: bench.tp_threads)
    tensor_parallel_shared_memory: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_bytes < 1:
            raise ValueError("kv_cache_memory_bytes must be positive")
        if self.kv_offload_bytes < 0:
            raise ValueError(f"kv_offload_bytes must be >= 0, got {self.kv_offload_bytes}")
        if self.kv_offload_bytes and not self.enable_prefix_caching:
            raise ValueError("a KV offload tier keeps prefix-cache blocks: it needs enable_prefix_caching")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.attention_backend not in get_args(AttentionBackend):
            removed = (" ('flash' needed vllm-flash-attn, which no release installs beside torch 2.13: 'triton' "
                       "replaces it)") if self.attention_backend == "flash" else ""
            raise ValueError(f"attention_backend must be auto, torch, triton or cpu, not "
                             f"{self.attention_backend!r}{removed}")
        if self.deterministic and self.attention_backend not in ("auto", "cpu"):
            raise ValueError("deterministic mode runs the CPU attention kernel: attention_backend must be auto or cpu")
        if self.deterministic and self.quantization is not None:
            raise ValueError("deterministic mode runs unquantized weights: drop quantization or deterministic")
        if self.async_scheduling and self.speculative is not None:
            raise ValueError("async scheduling runs without speculative decoding: drop one of them")
        if self.simulate is not None and (self.speculative is not None or self.async_scheduling or self.deterministic
                                          or self.quantization is not None or self.device == "cuda"
                                          or self.kv_offload_bytes):
            raise ValueError("a simulated engine runs no model: no speculative decoding, async scheduling, "
                             "deterministic mode, quantization, KV offload or CUDA device with simulate")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.tensor_parallel_size > 1 and self.simulate is not None:
            raise ValueError("tensor parallelism runs a real model: no simulate with tensor_parallel_size > 1")
        if self.deterministic and self.device == "cuda":
            raise ValueError("deterministic (batch-invariant) mode is implemented for CPUs only")

    def scheduler_config(self, max_model_len: int) -> SchedulerConfig:
        """The scheduler's limits once the context length is known (without chunked prefill a step
        must hold a whole prompt)."""
        whole_prompt = 0 if self.enable_chunked_prefill else max_model_len
        return SchedulerConfig(
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=max(self.max_num_batched_tokens, whole_prompt),
            max_model_len=max_model_len, enable_chunked_prefill=self.enable_chunked_prefill,
            policy=self.scheduling_policy)


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one scheduling step (see engine.scheduler)."""

    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192
    enable_chunked_prefill: bool = True
    policy: SchedulingPolicy = "fcfs"

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.max_model_len < 2:
            raise ValueError(f"invalid scheduler limits: {self}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError("without chunked prefill, max_num_batched_tokens must be >= max_model_len "
                             f"({self.max_num_batched_tokens} < {self.max_model_len})")
