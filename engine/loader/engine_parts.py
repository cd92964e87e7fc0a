"""Builds everything an engine needs from its config: weights, model, KV pool, sampler, runner."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch

from engine.config import EngineConfig, ModelConfig
from engine.errors import ModelLoadError
from engine.host_memory import keep_freed_buffers
from engine.kernels import fused_ops_kernel
from engine.kv_cache import KVCachePool, KVCacheSpec, resolve_kv_dtype, tensor_bytes
from engine.kv_groups import KVGroups
from engine.kv_hooks import KVStorageAllocator
from engine.loader.api import LoadedModel, load_model, load_tokenizer
from engine.loader.fingerprint import weights_fingerprint
from engine.loader.packing import make_batch_invariant, pack_linears
from engine.model_runner import ModelRunner, StepRunner
from engine.models.llama import LlamaForCausalLM
from engine.models.registry import model_class
from engine.models.rope import RotaryEmbedding
from engine.parallel.group import TPGroup, threads_per_rank
from engine.parallel.leader import TPLeader
from engine.parallel.protocol import RankPlugin
from engine.parallel.shard import TPShard
from engine.parallel.wiring import connect_shard
from engine.platform import Platform, detect_platform
from engine.sampler import Sampler
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

COMPUTE_DTYPES = {  # EngineConfig.dtype names (but auto)
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_MODEL_LEN = 8192


@dataclass(frozen=True)
class LoadedEngineParts:
    platform: Platform
    model: LlamaForCausalLM
    tokenizer: Tokenizer
    pool: KVCachePool
    runner: StepRunner
    max_model_len: int
    load_seconds: float
    quantized_layers: tuple[str, ...]
    weights_fingerprint: str  # engine.loader.fingerprint: what KV peers must share
    kv_groups: KVGroups  # how the model's layers share the pool's blocks (pool.spec.num_layers is its group_size)
    # tensor parallelism (engine.parallel): the other ranks, and the model's own config (`model.config` is this
    # rank's shard's: its heads, KV heads, intermediate and vocabulary rows); None with one rank
    tp_leader: TPLeader | None = None
    unsharded_config: ModelConfig | None = None

    @property
    def device(self) -> torch.device:
        return self.platform.device

    @property
    def model_config(self) -> ModelConfig:
        """The model's config (its vocabulary, heads, layers), whatever this rank's shard of it."""
        return self.unsharded_config or self.model.config


@dataclass(frozen=True)
class ShardRank:
    """The engine is one rank of a tensor-parallel group: its shard, its group, and on rank 0 the other ranks."""

    shard: TPShard
    group: TPGroup
    leader: TPLeader | None = None


def build_model(loaded: LoadedModel, platform: Platform, dtype: torch.dtype,
                shard: TPShard | None = None) -> LlamaForCausalLM:
    """The model in `dtype` on the platform's device; with `shard`, that rank's part of it (engine.parallel)."""
    config = loaded.config if shard is None else shard.local_config(loaded.config)
    with torch.device("meta"):
        model = model_class(config.architecture)(config)  # no init: the checkpoint has every weight
    model = model.to_empty(device=platform.device)
    model.load_hf_weights(loaded.weights if shard is None else shard.weights(loaded.weights, loaded.config))
    kept = model.fp32_parameters(dtype)
    model = model.to(dtype).eval().requires_grad_(False)
    for name, value in kept.items():
        model.get_parameter(name).data = value
    for module in model.modules():  # after the dtype cast: the rotary tables stay fp32
        if isinstance(module, RotaryEmbedding):
            module.build_tables(platform.device)
    return model


def tokens_held_per_sequence(config: EngineConfig, max_model_len: int, window: int) -> int:
    """The most KV slots one sequence holds at once: all of max_model_len, but for a model whose every layer has
    a window computed in chunks: its window, the chunks of two steps (the step in flight and the one scheduled
    beside it, async scheduling) and a block on each side (engine.scheduler gives the blocks behind back)."""
    if not window or not config.enable_chunked_prefill:
        return max_model_len
    return min(max_model_len, window + 2 * config.max_num_batched_tokens + 2 * config.block_size)


def blocks_held_per_sequence(config: EngineConfig, max_model_len: int, groups: KVGroups) -> int:
    """The most blocks one sequence holds at once, in every group's table."""
    return sum(-(-tokens_held_per_sequence(config, max_model_len, window) // config.block_size)
               for window in groups.windows)


def longest_context(config: EngineConfig, num_blocks: int, groups: KVGroups, max_model_len: int) -> int:
    """The longest context up to `max_model_len` whose sequence fits `num_blocks` blocks alone (0: none)."""
    low, high = 0, max_model_len  # blocks_held_per_sequence grows with the context
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if blocks_held_per_sequence(config, mid, groups) <= num_blocks else (low, mid - 1)
    return low


def kv_layout(config: EngineConfig, windows: tuple[int, ...], num_layers: int) -> KVGroups:
    """The pool's layer groups (engine.kv_groups): a hybrid layout where the model has windowed and global
    layers and nothing that keeps or mirrors blocks of every layer runs beside it (logged when refused)."""
    refusals = {"hybrid_kv_cache=False": not config.hybrid_kv_cache, "a KV offload tier": config.kv_offload_bytes > 0,
                "simulation": config.simulate is not None}
    refused = [name for name, applies in refusals.items() if applies]
    groups = KVGroups.of(num_layers, windows, hybrid=not refused)
    if not groups.is_hybrid and KVGroups.of(num_layers, windows, hybrid=True).is_hybrid:
        log.info("windowed layers keep every block (no hybrid KV layout with %s)", ", ".join(refused))
    return groups


def build_engine_parts(config: EngineConfig, kv_storage: KVStorageAllocator | None = None,
                       context_of: int | None = None, shard_rank: ShardRank | None = None,
                       rank_plugin: RankPlugin | None = None) -> LoadedEngineParts:
    """`kv_storage`, when given, allocates the memory the KV pool lives in (see KVCachePool); `context_of`: the
    context length whose model this is (a draft model's: its target's), by default its own max_model_len.
    With config.tensor_parallel_size > 1 this is rank 0, which starts the other ranks (engine.tp_follower
    passes `shard_rank` to build theirs), each running `rank_plugin` beside its shard."""
    if config.tensor_parallel_size == 1 or shard_rank is not None:
        return _build(config, kv_storage, context_of, shard_rank)
    leader = TPLeader(config, detect_platform(config.device).device, context_of, rank_plugin)
    try:
        parts = _build(config, kv_storage, context_of,
                       ShardRank(TPShard(0, config.tensor_parallel_size), leader.group, leader))
        leader.wait_ready()
    except BaseException:
        leader.close()
        raise
    return replace(parts, tp_leader=leader)


def _build(config: EngineConfig, kv_storage: KVStorageAllocator | None, context_of: int | None,
           shard_rank: ShardRank | None) -> LoadedEngineParts:
    started = time.perf_counter()
    platform = detect_platform(config.device)
    # a rank of a group on CPU takes its share of the cores unless told
    threads = config.num_threads or (threads_per_rank(shard_rank.shard.size)
                                     if shard_rank is not None and not platform.is_cuda else None)
    if threads is not None:
        torch.set_num_threads(threads)
    loaded = load_model(config.model)
    tokenizer = load_tokenizer(config.model)
    dtype = platform.default_dtype if config.dtype == "auto" else COMPUTE_DTYPES[config.dtype]
    family = model_class(loaded.config.architecture)
    if config.deterministic and family.not_batch_invariant is not None:
        raise ModelLoadError(f"deterministic mode does not cover {loaded.config.architecture} yet "
                             f"({family.not_batch_invariant}): run it without --deterministic")
    cfg = loaded.config
    shard = None if shard_rank is None else shard_rank.shard
    if shard is not None:
        shard.check(cfg)
    max_model_len = min(config.max_model_len or DEFAULT_MAX_MODEL_LEN, cfg.max_position_embeddings)
    kv_dtype = resolve_kv_dtype(config.kv_cache_dtype, dtype)
    groups = kv_layout(config, cfg.sliding_windows, cfg.num_layers)
    kv_heads = cfg.num_kv_heads if shard is None else len(shard.kv_heads(cfg))  # a rank's pool holds its KV heads
    probe = KVCacheSpec(groups.group_size, 1, config.block_size, kv_heads, cfg.head_dim, kv_dtype)
    # num_kv_blocks counts blocks of every layer: a hybrid layout gets as many bytes, in blocks of one group
    num_blocks = (config.num_kv_blocks * cfg.num_layers // groups.group_size if config.num_kv_blocks
                  else max(config.kv_cache_memory_bytes // probe.bytes_per_block, 1))
    held = blocks_held_per_sequence(config, max_model_len, groups)
    if num_blocks < held:
        if config.max_model_len is not None:
            raise ModelLoadError(
                f"the KV cache holds {num_blocks} blocks, less than the {held} one sequence of max_model_len "
                f"{max_model_len} holds at once: give more KV memory or a smaller max_model_len")
        max_model_len = max(longest_context(config, num_blocks, groups, max_model_len), 1)
    # what the model computes may depend on its context (LongRoPE's factor set): fixed before the fingerprint
    cfg = cfg.for_context(context_of or max_model_len)
    loaded = replace(loaded, config=cfg)
    numerics = [family.kv_numerics if dtype != torch.float32 else ""]
    if shard is not None and config.quantization == "int4" and loaded.source.suffix == ".gguf":
        numerics.append("int4-requantized")  # a shard quantizes its own rows, not the GGUF's prebuilt int4 blocks
    fingerprint = weights_fingerprint(loaded.weights, loaded.config, dtype, config.quantization,
                                      "|".join(n for n in numerics if n))
    model = build_model(loaded, platform, dtype, shard)
    quantized: list[str] = []
    if config.quantization is not None:  # (a shard quantizes its own rows: a GGUF's prebuilt blocks hold all rows)
        from engine.loader.quantized import quantize_loaded_model
        quantized = quantize_loaded_model(model, config.quantization, loaded.source, prebuilt=shard is None)
    if config.deterministic and (platform.is_cuda or fused_ops_kernel() is None):
        raise ModelLoadError("deterministic mode needs the CPU kernels (a CPU device and a C compiler, "
                             "TANDEM_DISABLE_C_KERNELS unset)")
    if not platform.is_cuda:
        pack_linears(model, config.deterministic)
        if config.deterministic:
            limits = config.scheduler_config(max_model_len)
            per_seq = 1 + (config.speculative.num_draft_tokens if config.speculative else 0)  # logits rows per sequence
            make_batch_invariant(model, limits.max_num_batched_tokens,
                                   min(limits.max_num_batched_tokens, limits.max_num_seqs * per_seq))
    if shard_rank is not None:  # after packing and quantization: the hooks sit on the final modules
        connect_shard(model, shard_rank.shard, shard_rank.group, cfg.vocab_size)
    spec = KVCacheSpec(groups.group_size, num_blocks, config.block_size, kv_heads, cfg.head_dim, kv_dtype)
    storage = None if kv_storage is None else kv_storage(tensor_bytes(spec))
    pool = KVCachePool(spec, platform.device, dtype, storage)
    sampler = Sampler(cfg.vocab_size, platform.device, seed=config.seed)
    # a rank's forward meets its peers' in collectives, which neither a CUDA graph nor the one-call C program holds
    fused = not config.enforce_eager and shard is None
    graphs = None if not fused or not platform.is_cuda or not model.supports_cuda_graphs \
        or groups.is_hybrid else config.max_num_seqs
    backend = "cpu" if config.deterministic else config.attention_backend  # the kernel computes rows alike
    runner = ModelRunner(model, pool, sampler, platform.device, backend, graphs, max_model_len,
                         batch_invariant=config.deterministic, step_program=fused and platform.device.type == "cpu",
                         kv_groups=groups,
                         followers=None if shard_rank is None else shard_rank.leader)
    if not platform.is_cuda:  # from now on a step's activations stay mapped (engine.host_memory); load's
        keep_freed_buffers()  # temporaries, freed above, went back to the system
    seconds = time.perf_counter() - started
    log.info("engine ready in %.1fs: %s on %s, %s, %d KV blocks x %d tokens (%s)%s", seconds, cfg.name,
             platform.device, dtype, num_blocks, config.block_size, kv_dtype,
             "" if shard is None else f", tensor-parallel rank {shard.rank} of {shard.size}")
    return LoadedEngineParts(platform, model, tokenizer, pool, runner, max_model_len, seconds, tuple(quantized),
                             fingerprint, groups, unsharded_config=None if shard is None else cfg)
