"""On-disk cache of converted GGUF weights (fp32 safetensors) and of the tokenizer built from a GGUF.

A cache entry is keyed by the source file's absolute path, size, mtime and `CACHE_VERSION`; any change
to the file gives a new key, and storing an entry removes older entries of the same path. Entries are
written to a temporary file and moved into place with `os.replace`, so a reader sees a whole file or
none. An entry that cannot be read or does not match its key is treated as absent (and rebuilt).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import uuid
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from engine.config import ModelConfig, MoEConfig, RopeScaling
from engine.disk_cache import cache_dir, entry_name, remove_older_entries

logger = logging.getLogger(__name__)

_KEY_META = "tandem.key"
_CONFIG_META = "tandem.config"
_QUANT_META = "tandem.quant_types"


@dataclass(frozen=True)
class CachedWeights:
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    gguf_quant_types: dict[str, int]


def config_to_json(config: ModelConfig) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def config_from_json(text: str) -> ModelConfig:
    fields: dict[str, Any] = json.loads(text)
    scaling = fields.get("rope_scaling")
    fields["rope_scaling"] = RopeScaling(**scaling) if scaling is not None else None
    fields["eos_token_ids"] = tuple(fields.get("eos_token_ids", ()))
    fields["sliding_windows"] = tuple(fields.get("sliding_windows", ()))
    moe = fields.get("moe")
    fields["moe"] = MoEConfig(**{**moe, "dense_layers": tuple(moe["dense_layers"])}) if moe is not None else None
    return ModelConfig(**fields)


def load_cached_weights(source: pathlib.Path) -> CachedWeights | None:
    """The cached conversion of `source`, or None when absent, stale or unreadable."""
    try:
        name, full = entry_name(source, "weights")
    except OSError:
        return None
    path = cache_dir() / f"{name}.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get(_KEY_META) != full:
            return None
        config = config_from_json(metadata[_CONFIG_META])
        quant_types = {str(k): int(v) for k, v in json.loads(metadata[_QUANT_META]).items()}
        weights = load_file(str(path))  # memory-mapped by safetensors
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as exc:
        logger.warning("ignoring unreadable weight cache %s: %s", path, exc)
        return None
    return CachedWeights(config, weights, quant_types)


def store_cached_weights(source: pathlib.Path, cached: CachedWeights) -> pathlib.Path | None:
    """Write the entry for `source`; returns its path, or None when it could not be written (logged)."""
    try:
        name, full = entry_name(source, "weights")
        directory = cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / f"{name}.safetensors"
        tmp = directory / f".{name}.{uuid.uuid4().hex}.tmp"
        metadata = {
            _KEY_META: full,
            _CONFIG_META: config_to_json(cached.config),
            _QUANT_META: json.dumps(cached.gguf_quant_types, sort_keys=True),
        }
        tensors = {k: v.contiguous() for k, v in cached.weights.items()}
        try:
            save_file(tensors, str(tmp), metadata=metadata)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        logger.warning("could not write weight cache for %s: %s", source, exc)
        return None
    remove_older_entries(directory, name, suffix=".safetensors")
    return final
