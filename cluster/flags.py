"""Command-line flags from a frozen settings dataclass: one `--flag-name` per field, each also
settable as the environment variable TANDEM_<FIELD_NAME> (a flag given wins over the variable).
This is the one module that reads TANDEM_* settings from the environment."""

from __future__ import annotations

import argparse
import os
import types
import typing
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
