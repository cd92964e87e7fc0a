"""Entries of Tandem's on-disk cache (`TANDEM_CACHE_DIR`): converted weights and tokenizers built
from a checkpoint file. An entry's name hashes the source's path, size, mtime and CACHE_VERSION, so
a changed source never reads a stale entry; entries are published atomically and older entries of
the same source are removed."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pathlib
import shutil
from collections.abc import Iterator

from common.settings import cache_dir

# Bump whenever the GGUF conversion (names, un-permutation, dequantization) or the entries' layout changes.
CACHE_VERSION = 1


def entry_key(source: pathlib.Path) -> tuple[str, str]:
    """(stem shared by every entry of this path, full key string). Raises OSError if the file is gone."""
    source = source.resolve()
    stat = source.stat()
    path_hash = hashlib.sha256(str(source).encode()).hexdigest()[:16]
    full = f"{source}|{stat.st_size}|{stat.st_mtime_ns}|v{CACHE_VERSION}"
    return path_hash, full


def entry_name(source: pathlib.Path, kind: str) -> tuple[str, str]:
    path_hash, full = entry_key(source)
    return f"{kind}-{path_hash}-{hashlib.sha256(full.encode()).hexdigest()[:16]}", full


def tokenizer_cache_path(source: pathlib.Path) -> pathlib.Path:
    """Directory the tokenizer built from `source` is saved to (it may not exist yet)."""
    name, _ = entry_name(source, "tokenizer")
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
    remove_older_entries(final.parent, final.name, suffix="")


def remove_older_entries(directory: pathlib.Path, current: str, suffix: str) -> None:
    kind, path_hash, _ = current.split("-", 2)
    for old in directory.glob(f"{kind}-{path_hash}-*{suffix}"):
        if old.name == f"{current}{suffix}":
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(old) if old.is_dir() else old.unlink()


@contextlib.contextmanager
def entry_lock(source: pathlib.Path, kind: str) -> Iterator[None]:
    """Held while one process builds an entry, so that processes started together (a launcher's
    workers and router) build it once and the others read it. Without a writable cache: no lock."""
    try:
        path_hash, _ = entry_key(source)
        locks = cache_dir() / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        handle = open(locks / f"{kind}-{path_hash}.lock", "a+")  # noqa: SIM115 (held across the yield)
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
