"""On-disk cache of converted GGUF weights (fp32 safetensors) and of the tokenizer built from a GGUF.

A cache entry is keyed by the source file's absolute path, size, mtime and `CACHE_VERSION`; any change
to the file gives a new key, and storing an entry removes older entries of the same path. Entries are
written to a temporary file and moved into place with `os.replace`, so a reader sees a whole file or
none. An entry that cannot be read or does not match its key is treated as absent (and rebuilt).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
import uuid
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from engine.config import ModelConfig, RopeScaling
from engine.env import tandem_cache_dir

logger = logging.getLogger(__name__)

# Bump whenever the GGUF conversion (names, un-permutation, dequantization) or this layout changes.
CACHE_VERSION = 1
_KEY_META = "tandem.key"
_CONFIG_META = "tandem.config"
_QUANT_META = "tandem.quant_types"


def cache_dir() -> pathlib.Path:
    """`$TANDEM_CACHE_DIR`, default `~/.cache/tandem` (see engine.env)."""
    return tandem_cache_dir()


@dataclass(frozen=True)
class CachedWeights:
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    gguf_quant_types: dict[str, int]


def _key(source: pathlib.Path) -> tuple[str, str]:
    """(stem shared by every entry of this path, full key string). Raises OSError if the file is gone."""
    source = source.resolve()
    stat = source.stat()
    path_hash = hashlib.sha256(str(source).encode()).hexdigest()[:16]
    full = f"{source}|{stat.st_size}|{stat.st_mtime_ns}|v{CACHE_VERSION}"
    return path_hash, full


def _entry_name(source: pathlib.Path, kind: str) -> tuple[str, str]:
    path_hash, full = _key(source)
    return f"{kind}-{path_hash}-{hashlib.sha256(full.encode()).hexdigest()[:16]}", full


def config_to_json(config: ModelConfig) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def config_from_json(text: str) -> ModelConfig:
    fields: dict[str, Any] = json.loads(text)
    scaling = fields.get("rope_scaling")
    fields["rope_scaling"] = RopeScaling(**scaling) if scaling is not None else None
    fields["eos_token_ids"] = tuple(fields.get("eos_token_ids", ()))
    return ModelConfig(**fields)


def load_cached_weights(source: pathlib.Path) -> CachedWeights | None:
    """The cached conversion of `source`, or None when absent, stale or unreadable."""
    try:
        name, full = _entry_name(source, "weights")
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
        name, full = _entry_name(source, "weights")
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
    _remove_older_entries(directory, name, suffix=".safetensors")
    return final


def tokenizer_cache_path(source: pathlib.Path) -> pathlib.Path:
    """Directory the tokenizer built from `source` is saved to (it may not exist yet)."""
    name, _ = _entry_name(source, "tokenizer")
    return cache_dir() / name


def publish_directory(tmp: pathlib.Path, final: pathlib.Path) -> None:
    """Move a fully written directory into place; a concurrent writer that won first is kept."""
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise
        return
    _remove_older_entries(final.parent, final.name, suffix="")


def _remove_older_entries(directory: pathlib.Path, current: str, suffix: str) -> None:
    kind, path_hash, _ = current.split("-", 2)
    for old in directory.glob(f"{kind}-{path_hash}-*{suffix}"):
        if old.name == f"{current}{suffix}":
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
