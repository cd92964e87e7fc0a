"""What every OpenAI-compatible parser shares: the error for a body we refuse, and the rule that a
field we do not know is refused by name rather than silently dropped."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class BadRequest(ValueError):
    """The client's request is wrong; the message names the field and says what to change."""


def refuse_unknown(body: dict[str, Any], known: Iterable[str], where: str = "") -> None:
    """BadRequest naming every key of `body` outside `known` (prefixed with `where`, e.g.
    'response_format.'). A key set to null asks for nothing, so it passes (SDKs send them)."""
    allowed = set(known)
    unknown = sorted(str(key) for key, value in body.items() if key not in allowed and value is not None)
    if unknown:
        names = ", ".join(f"'{where}{key}'" for key in unknown)
        raise BadRequest(f"unsupported field{'s' if len(unknown) > 1 else ''} {names}: this server does not "
                         f"implement {'them' if len(unknown) > 1 else 'it'} (see /openapi.json for what it does)")
