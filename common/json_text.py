"""JSON texts inside requests (a schema, a tool call's arguments): parsed into an object, or one
error that names the field. A nesting too deep for the parser is the client's error too."""

from __future__ import annotations

import json
from typing import Any


class JsonTextError(ValueError):
    """The named field's text is not a JSON object."""


def load_json_object(text: str, name: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise JsonTextError(f"'{name}' is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise JsonTextError(f"'{name}' must be a JSON object")
    return value
