"""The OpenAI (and vLLM) request fields that edit the logits before sampling, read into
`SamplingParameters`: `logit_bias`, `allowed_token_ids`, and structured output in all its
spellings (`response_format`; vLLM's `guided_json` / `guided_regex` / `guided_choice` /
`guided_grammar` and their newer `structured_outputs` object). At most one structured output per
request; each spelling's malformed value is a BadRequest naming the field."""

from __future__ import annotations

import json
from typing import Any

from cluster.openai_fields import BadRequest, refuse_unknown
from common.json_text import JsonTextError, load_json_object
from tandem.v1 import inference_pb2 as pb

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
_STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")
_RESPONSE_FORMAT_KEYS = ("type", "json_schema")
_JSON_SCHEMA_KEYS = ("name", "description", "schema", "strict")


def read_constraints(body: dict[str, Any], params: pb.SamplingParameters) -> None:
    """Sets params.logit_bias, allowed_token_ids and structured from the body."""
    _logit_bias(body.get("logit_bias"), params)
    allowed = body.get("allowed_token_ids")
    if allowed is not None:
        if (not isinstance(allowed, list) or not allowed
                or not all(type(t) is int and 0 <= t < 2**31 for t in allowed)):
            raise BadRequest("'allowed_token_ids' must be a non-empty array of token ids (integers >= 0)")
        params.allowed_token_ids.extend(allowed)
    found = [(name, spec) for name, spec in _spellings(body) if spec is not None]
    if len(found) > 1:
        raise BadRequest(f"structured output is asked for twice ({', '.join(n for n, _ in found)}): give one")
    if found:
        params.structured.CopyFrom(found[0][1])


def _logit_bias(bias: Any, params: pb.SamplingParameters) -> None:
    if bias is None:
        return
    if not isinstance(bias, dict):
        raise BadRequest("'logit_bias' must be an object mapping token ids (as strings) to numbers")
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and int(key) < 2**31):
            raise BadRequest(f"'logit_bias' keys must be token ids (decimal strings), got {key!r}")
        if type(value) not in (int, float) or not -100 <= value <= 100:
            raise BadRequest(f"'logit_bias' values must be numbers in [-100, 100], got {value!r} for token {key}")
        params.logit_bias[int(key)] = float(value)


def _spellings(body: dict[str, Any]) -> list[tuple[str, pb.StructuredOutput | None]]:
    found = [("response_format", _response_format(body.get("response_format")))]
    for name, kind in _GUIDED.items():
        found.append((name, _spec(kind, body.get(name), name)))
    outputs = body.get("structured_outputs")
    if outputs is not None:
        if not isinstance(outputs, dict):
            raise BadRequest("'structured_outputs' must be an object")
        refuse_unknown(outputs, _STRUCTURED_KEYS, "structured_outputs.")
        for kind in _STRUCTURED_KEYS:
            value = outputs.get(kind)
            if kind == "json_object":
                if value is not None and not isinstance(value, bool):
                    raise BadRequest("'structured_outputs.json_object' must be a boolean")
                spec = pb.StructuredOutput(json_object=True) if value else None
            else:
                spec = _spec(kind, value, f"structured_outputs.{kind}")
            found.append((f"structured_outputs.{kind}", spec))
    return found


def _response_format(value: Any) -> pb.StructuredOutput | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest("'response_format' must be an object with a 'type'")
    refuse_unknown(value, _RESPONSE_FORMAT_KEYS, "response_format.")
    kind = value.get("type")
    if kind == "text":
        if value.get("json_schema") is not None:
            raise BadRequest("'response_format.json_schema' goes with type 'json_schema'")
        return None
    if kind == "json_object":
        if value.get("json_schema") is not None:
            raise BadRequest("'response_format.json_schema' goes with type 'json_schema'")
        return pb.StructuredOutput(json_object=True)
    if kind != "json_schema":
        raise BadRequest("'response_format.type' must be 'text', 'json_object' or 'json_schema'")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise BadRequest("'response_format.json_schema' must be an object with a 'name' and a 'schema'")
    refuse_unknown(spec, _JSON_SCHEMA_KEYS, "response_format.json_schema.")
    name, description, strict = spec.get("name"), spec.get("description"), spec.get("strict")
    if not isinstance(name, str) or not name:
        raise BadRequest("'response_format.json_schema.name' must be a non-empty string")
    if description is not None and not isinstance(description, str):
        raise BadRequest("'response_format.json_schema.description' must be a string")
    if strict is not None and not isinstance(strict, bool):  # the schema is always enforced: strict or not
        raise BadRequest("'response_format.json_schema.strict' must be a boolean")
    schema = spec.get("schema")
    if schema is None:  # OpenAI: absent means any JSON object
        return pb.StructuredOutput(json_object=True)
    if not isinstance(schema, dict):
        raise BadRequest("'response_format.json_schema.schema' must be an object (a JSON Schema)")
    return pb.StructuredOutput(json_schema=json.dumps(schema))


def _spec(kind: str, value: Any, name: str) -> pb.StructuredOutput | None:
    if value is None:
        return None
    if kind == "json":
        if isinstance(value, str):
            try:
                value = load_json_object(value, name)
            except JsonTextError as e:
                raise BadRequest(str(e)) from e
        if not isinstance(value, dict):
            raise BadRequest(f"'{name}' must be a JSON Schema (an object, or its JSON text)")
        return pb.StructuredOutput(json_schema=json.dumps(value))
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise BadRequest(f"'{name}' must be a non-empty array of non-empty strings")
        return pb.StructuredOutput(choice=pb.ChoiceList(choices=value))
    if not isinstance(value, str) or not value:
        raise BadRequest(f"'{name}' must be a non-empty string")
    return pb.StructuredOutput(regex=value) if kind == "regex" else pb.StructuredOutput(grammar=value)
