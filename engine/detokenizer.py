"""Streaming detokenization and stop-string search.

`IncrementalDetokenizer` decodes only a short window of recent tokens per step (vLLM's
prefix_offset/read_offset scheme), so a step costs the same at token 10 and at token 10,000.
Invariant: `prefix_offset <= read_offset <= len(ids)`; text of `ids[:read_offset]` has been emitted, and
`decode(ids[prefix_offset:read_offset])` is the context whose text is subtracted from each new decode.
Text ending in U+FFFD (an incomplete UTF-8 sequence, e.g. the first byte tokens of an emoji) is held back
until a later token completes it, or until `flush()`.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Text deltas of generated tokens; `text` always equals the concatenation of returned deltas.

    Only generated tokens are decoded (`prompt_ids` are not text of the output), so after `flush()` the
    text equals `tokenizer.decode(generated_ids, skip_special_tokens)` exactly.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int],
                 skip_special_tokens: bool = True) -> None:
        del prompt_ids  # accepted for the engine's call signature; output text never depends on it
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._text_parts: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._text_parts) > 1:
            self._text_parts = ["".join(self._text_parts)]
        return self._text_parts[0] if self._text_parts else ""

    @property
    def token_ids(self) -> list[int]:
        """Generated token ids appended so far."""
        return list(self._ids)

    def append(self, token_id: int) -> str:
        """Add one generated token; returns the newly completed text (possibly empty)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""  # nothing new, or an incomplete character: wait for the next token
        return self._emit(new_text[len(prefix_text):])

    def flush(self) -> str:
        """Text still held back (an incomplete character at the end); call once the sequence ends."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        return self._emit(new_text[len(prefix_text):])

    def _emit(self, delta: str) -> str:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if delta:
            self._text_parts.append(delta)
        return delta

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special) if ids else ""


def find_stop(text: str, stops: Sequence[str], search_from: int) -> int | None:
    """Start index of the earliest stop string in `text`, or None.

    Only matches that end at or after `search_from` (the length of the text already searched) are new, so
    the search starts at `search_from - max(len(stop)) + 1`. Empty stop strings never match.
    """
    longest = max((len(s) for s in stops), default=0)
    if longest == 0:
        return None
    start = max(0, search_from - longest + 1)
    found = [i for i in (text.find(stop, start) for stop in stops if stop) if i >= 0]
    return min(found) if found else None
