"""Builds a simulated engine's parts (engine.loader.engine_parts for a real one): the tokenizer of the
checkpoint the profile names, the model's structure on the meta device (no weights), a KV pool whose
capacity in blocks is what the simulated model's real KV would get from the same memory, and the runner.

The pool's pages are token-sized placeholders (one fp32 value per token per layer, K and V): block
tables, prefix hashes, KV events and the transfer path's control messages are real; the bytes a real
push would move are not. Their time is modelled: the runner holds a pushing step until the real KV's
bytes would have crossed the profile's link (engine.simulated.runner; 0 s if the profile has no
kv_s_per_byte, as before)."""

from __future__ import annotations

import functools
import hashlib
import logging
import time

import torch

from engine.config import EngineConfig, ModelConfig
from engine.errors import ModelLoadError
from engine.kv_cache import KVCachePool, KVCacheSpec, resolve_kv_dtype, tensor_bytes
from engine.kv_groups import KVGroups
from engine.kv_hooks import KVStorageAllocator
from engine.loader.api import load_tokenizer, resolve_model_path
from engine.loader.engine_parts import COMPUTE_DTYPES, DEFAULT_MAX_MODEL_LEN, LoadedEngineParts
from engine.models.registry import model_class
from engine.platform import detect_platform
from engine.sampler import Sampler
from engine.simulated.profile import SimulationProfile
from engine.simulated.runner import SimulatedRunner
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SIMULATED_KV_DTYPE = torch.float32  # of the placeholder pages


@functools.cache
def _shared_tokenizer(path: str | None) -> Tokenizer:
    """One per checkpoint in a process (a process may host many simulated workers): read-only once loaded."""
    return load_tokenizer(path)


def simulated_avoids(tokenizer: Tokenizer, model: ModelConfig) -> tuple[int, ...]:
    """The ids the simulated model never picks: end-of-sequence and every special token."""
    return tuple(sorted({*tokenizer.eos_token_ids, *model.eos_token_ids, *tokenizer.all_special_ids}))


def build_simulated_parts(config: EngineConfig, kv_storage: KVStorageAllocator | None = None) -> LoadedEngineParts:
    assert config.simulate is not None
    started = time.perf_counter()
    profile = SimulationProfile.load(config.simulate)
    cfg = profile.model
    platform = detect_platform("cpu")
    if resolve_model_path(config.model) != resolve_model_path(profile.tokenizer):  # the name the worker serves
        raise ModelLoadError(f"simulation profile {profile.name} is of {profile.tokenizer or 'the default model'}, "
                             f"not {config.model or 'the default model'}: pass its checkpoint as --model")
    tokenizer = _shared_tokenizer(profile.tokenizer)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ModelLoadError(f"simulation profile {profile.name}: its tokenizer has {tokenizer.vocab_size} "
                             f"tokens, more than the model's vocabulary of {cfg.vocab_size}")
    with torch.device("meta"):  # the structure only: nothing runs it
        model = model_class(cfg.architecture)(cfg)
    # the simulated model's real KV, in bf16 unless told (as on the hardware a profile stands for)
    compute = torch.bfloat16 if config.dtype == "auto" else COMPUTE_DTYPES[config.dtype]
    real = KVCacheSpec(cfg.num_layers, 1, config.block_size, cfg.num_kv_heads, cfg.head_dim,
                       resolve_kv_dtype(config.kv_cache_dtype, compute))
    num_blocks = config.num_kv_blocks or max(config.kv_cache_memory_bytes // real.bytes_per_block, 1)
    max_model_len = min(config.max_model_len or DEFAULT_MAX_MODEL_LEN, cfg.max_position_embeddings,
                        num_blocks * config.block_size)
    spec = KVCacheSpec(cfg.num_layers, num_blocks, config.block_size, 1, 1, SIMULATED_KV_DTYPE)
    storage = None if kv_storage is None else kv_storage(tensor_bytes(spec))
    pool = KVCachePool(spec, platform.device, SIMULATED_KV_DTYPE, storage)
    sampler = Sampler(cfg.vocab_size, platform.device, seed=config.seed)
    runner = SimulatedRunner(profile, sampler, cfg.num_layers, tokenizer.vocab_size, simulated_avoids(tokenizer, cfg),
                             real_kv=real)
    fingerprint = "simulated:" + hashlib.sha256(profile.to_json().encode()).hexdigest()[:16]
    seconds = time.perf_counter() - started
    log.info("simulated engine ready in %.1fs: %s (%s), %d KV blocks x %d tokens", seconds, profile.name,
             profile.source, num_blocks, config.block_size)
    return LoadedEngineParts(platform, model, tokenizer, pool, runner, max_model_len, seconds, (), fingerprint,
                             KVGroups.single(cfg.num_layers, cfg.window_of_every_layer))
