"""Every environment variable the engine reads, in one place (all prefixed `TANDEM_`)."""

from __future__ import annotations

import os
import pathlib


def tandem_cache_dir() -> pathlib.Path:
    """`TANDEM_CACHE_DIR`: converted weights, tokenizers and compiled kernels (default ~/.cache/tandem)."""
    configured = os.environ.get("TANDEM_CACHE_DIR")
    return pathlib.Path(configured) if configured else pathlib.Path.home() / ".cache" / "tandem"


def c_kernels_disabled() -> bool:
    """`TANDEM_DISABLE_C_KERNELS=1`: use the pure-torch paths only."""
    return os.environ.get("TANDEM_DISABLE_C_KERNELS", "") not in ("", "0")
