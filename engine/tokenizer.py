"""Tokenizer: a thin wrapper of the model's `transformers` fast tokenizer, so ids match transformers."""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import time
import uuid
from collections.abc import Sequence
from typing import Any

import jinja2
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from engine.chat_tools import as_hermes_turns, uses_tools
from engine.disk_cache import entry_lock, publish_directory, tokenizer_cache_path
from engine.errors import InvalidRequestError, ModelLoadError
from engine.gguf_file import open_gguf

logger = logging.getLogger(__name__)

_GENERATION_CONFIG = "generation_config.json"


class Tokenizer:
    """Encode/decode and chat templating exactly as the model's own tokenizer does."""

    def __init__(self, hf_tokenizer: PreTrainedTokenizerBase, extra_eos_ids: Sequence[int] = ()) -> None:
        if not hf_tokenizer.is_fast:
            raise ModelLoadError("only fast (tokenizer.json) tokenizers are supported")
        self._tok = hf_tokenizer
        ids = [hf_tokenizer.eos_token_id] if hf_tokenizer.eos_token_id is not None else []
        self._eos_ids = tuple(dict.fromkeys([*ids, *extra_eos_ids]))

    @classmethod
    def from_source(cls, source: pathlib.Path) -> Tokenizer:
        """From a checkpoint directory, or from a GGUF file (built once, then read from the cache)."""
        if source.is_dir():
            return cls(_load_dir(source, source), _eos_ids_in(source))
        cached = tokenizer_cache_path(source)
        found = cls._from_cache(cached, source)
        if found is not None:
            return found
        with entry_lock(source, "tokenizer"):  # processes started together build it once
            found = cls._from_cache(cached, source)
            if found is not None:
                return found
            tok, eos = _build_from_gguf(source)
            if _save(tok, eos, cached):
                return cls(_load_dir(cached, source), _eos_ids_in(cached))
        return cls(tok, eos)

    @classmethod
    def _from_cache(cls, cached: pathlib.Path, source: pathlib.Path) -> Tokenizer | None:
        if not (cached / "tokenizer.json").is_file():
            return None
        try:
            return cls(_load_dir(cached, source), _eos_ids_in(cached))
        except ModelLoadError as exc:
            logger.warning("rebuilding the unreadable tokenizer cache %s: %s", cached, exc)
            shutil.rmtree(cached, ignore_errors=True)
            return None

    @property
    def hf_tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (base vocabulary plus added tokens)."""
        return len(self._tok)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    @property
    def all_special_ids(self) -> tuple[int, ...]:
        return tuple(self._tok.all_special_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens (e.g. BOS) are added only if the tokenizer adds them
        itself, and not at all with `add_special_tokens=False`."""
        if not isinstance(text, str):
            raise InvalidRequestError(f"prompt must be a string, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of the conversation rendered with the model's chat template. With tools (or
        tool calls and results in the messages): a template that knows tools renders them itself;
        for one that does not, engine.chat_tools rewrites them into Hermes-format turns first."""
        template = self._tok.chat_template
        if template is None:
            raise InvalidRequestError("this model has no chat template; send a plain prompt instead")
        _check_messages(messages)
        extra: dict[str, Any] = {}
        if uses_tools(messages, tools):
            if isinstance(template, str) and "tools" in template:
                extra["tools"] = tools or None
            else:
                messages = as_hermes_turns(messages, tools)
        try:
            ids: list[int] = self._tok.apply_chat_template(  # type: ignore[assignment]
                messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False, **extra)
        except (jinja2.TemplateError, TypeError) as exc:  # TypeError: e.g. it adds a str to a tool call's dict
            raise InvalidRequestError(f"the chat template rejected the messages: {exc}") from exc
        return [int(i) for i in ids]


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {'role': str, 'content': str}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise InvalidRequestError(f"messages[{i}] must be an object with 'role' and 'content'")
        for key, value in message.items():
            if key == "tool_calls":
                if not isinstance(value, list):
                    raise InvalidRequestError(f"messages[{i}].tool_calls must be a list")
            elif not isinstance(key, str) or not isinstance(value, str):
                raise InvalidRequestError(f"messages[{i}].{key} must be a string, got {type(value).__name__}")


def _eos_ids_in(directory: pathlib.Path) -> list[int]:
    """eos ids of config.json and generation_config.json (generation may stop on several)."""
    ids: list[int] = []
    for name in ("config.json", _GENERATION_CONFIG):
        try:
            value = json.loads((directory / name).read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, list):
            ids.extend(int(v) for v in value if isinstance(v, int))
    return ids


def _load_dir(directory: pathlib.Path, source: pathlib.Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ModelLoadError(f"{source}: no usable tokenizer: {exc}") from exc


def _build_from_gguf(source: pathlib.Path) -> tuple[PreTrainedTokenizerBase, list[int]]:
    """transformers' GGUF tokenizer conversion (seconds: callers cache it) and the GGUF's eos/eot ids."""
    started = time.perf_counter()
    fields = open_gguf(source).fields
    eos = [int(fields[k].contents()) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
           if k in fields]
    try:
        tok = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name, local_files_only=True)
    except Exception as exc:  # the GGUF conversion raises assorted errors for unusable files
        raise ModelLoadError(f"{source}: cannot build a tokenizer from this GGUF file: {exc}") from exc
    logger.info("built the tokenizer of %s in %.1f s", source, time.perf_counter() - started)
    return tok, eos


def _save(tok: PreTrainedTokenizerBase, eos: list[int], final: pathlib.Path) -> bool:
    """Save atomically to `final`; False (logged) when the cache directory is not writable."""
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex}.tmp"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(tmp))
        (tmp / _GENERATION_CONFIG).write_text(json.dumps({"eos_token_id": eos}))
        publish_directory(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        logger.warning("could not cache the tokenizer at %s: %s", final, exc)
        return False
    return True
