"""An HTTP request body as strict JSON (RFC 8259), for the OpenAI front: UTF-8, no NaN or Infinity,
every number one a double holds, nesting the parser can follow. Whatever the bytes, the outcome is
a value or BadRequest, never another error (which would be a 500)."""

from __future__ import annotations

import json
import math
from typing import Any

from cluster.openai_protocol import BadRequest


def decode_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"the request body is not valid JSON: it is not UTF-8 ({e})") from e
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise BadRequest("the request body is not valid JSON: it nests too deeply") from None
    except (json.JSONDecodeError, BadRequest) as e:
        raise BadRequest(f"the request body is not valid JSON: {e}") from e
    except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise BadRequest("the request body is not valid JSON: a number has too many digits") from None


def _no_constant(name: str) -> Any:
    raise BadRequest(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadRequest(f"the number {text[:40]} is out of range")
    return value
