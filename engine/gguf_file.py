"""Opening a GGUF file (the `gguf` package's reader; no torch): for the weight loader and the tokenizer."""

from __future__ import annotations

import pathlib

from gguf import GGUFReader

from engine.errors import ModelLoadError


def open_gguf(path: pathlib.Path) -> GGUFReader:
    try:
        return GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError, KeyError, IndexError, struct/numpy errors alike
        raise ModelLoadError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from exc
