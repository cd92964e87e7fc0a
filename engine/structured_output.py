"""What a request's output must match (structured output), as data: importable without torch or
the grammar engine. engine.grammar turns it into token masks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from engine.errors import InvalidRequestError

StructuredKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
_KINDS: tuple[StructuredKind, ...] = ("json_schema", "json_object", "regex", "choice", "grammar")
_MAX_SPEC_CHARS = 64 * 1024  # a schema, regex, grammar or list of choices longer than this is refused
# deeper JSON schemas are refused: xgrammar's conversion time grows about cubically with nesting
# (measured: 1 s at 200 levels, 9 s at 400), and it runs on the router's and workers' event loops
MAX_SCHEMA_DEPTH = 48


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
        if len(self.spec) + sum(len(c) for c in self.choices if isinstance(c, str)) > _MAX_SPEC_CHARS:
            raise InvalidRequestError(f"the {self.kind} specification is longer than {_MAX_SPEC_CHARS} characters")
        if (self.kind == "choice") != bool(self.choices):
            raise InvalidRequestError("a 'choice' structured output needs a non-empty list of choices"
                                      if self.kind == "choice" else f"{self.kind!r} takes no choices")
        if not all(isinstance(c, str) and c for c in self.choices):
            raise InvalidRequestError("every choice must be a non-empty string")
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.spec)
            except (ValueError, RecursionError) as e:
                raise InvalidRequestError(f"the JSON schema is not valid JSON: {e}") from e
            if not isinstance(schema, (dict, bool)):
                raise InvalidRequestError("a JSON schema must be an object (or a boolean)")
            if _depth(schema) > MAX_SCHEMA_DEPTH:
                raise InvalidRequestError(f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels")


def _depth(value: object) -> int:
    """Nesting depth of a parsed JSON value (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest
