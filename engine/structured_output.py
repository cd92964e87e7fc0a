"""What a request's output must match (structured output), as data: importable without torch or
the grammar engine. engine.grammar turns it into token masks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from engine.errors import InvalidRequestError

StructuredKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
_KINDS: tuple[StructuredKind, ...] = ("json_schema", "json_object", "regex", "choice", "grammar")
_MAX_SPEC_CHARS = 64 * 1024  # a schema, regex or grammar longer than this is refused


@dataclass(frozen=True)
class StructuredOutput:
    """The output must be: `json_schema` an instance of the JSON Schema `spec` (JSON text);
    `json_object` any JSON object; `regex` a full match of `spec`; `choice` exactly one of
    `choices`; `grammar` a sentence of the EBNF grammar `spec` (xgrammar's dialect, GBNF-like,
    start rule `root`).

    Invariant: `spec` is non-empty exactly for json_schema, regex and grammar; `choices` is
    non-empty exactly for choice."""

    kind: StructuredKind
    spec: str = ""
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise InvalidRequestError(f"structured output kind must be one of {', '.join(_KINDS)}, got {self.kind!r}")
        object.__setattr__(self, "choices", tuple(self.choices))
        wants_spec = self.kind in ("json_schema", "regex", "grammar")
        if wants_spec != bool(self.spec):
            raise InvalidRequestError(f"structured output {self.kind!r} " + (
                "needs a non-empty specification" if wants_spec else "takes no specification"))
        if len(self.spec) > _MAX_SPEC_CHARS:
            raise InvalidRequestError(f"the {self.kind} specification is longer than {_MAX_SPEC_CHARS} characters")
        if (self.kind == "choice") != bool(self.choices):
            raise InvalidRequestError("a 'choice' structured output needs a non-empty list of choices"
                                      if self.kind == "choice" else f"{self.kind!r} takes no choices")
        if not all(isinstance(c, str) and c for c in self.choices):
            raise InvalidRequestError("every choice must be a non-empty string")
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.spec)
            except ValueError as e:
                raise InvalidRequestError(f"the JSON schema is not valid JSON: {e}") from e
            if not isinstance(schema, (dict, bool)):
                raise InvalidRequestError("a JSON schema must be an object (or a boolean)")
