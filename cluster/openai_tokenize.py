"""vLLM's /tokenize and /detokenize, answered by the router's own tokenizer (no worker involved).

/tokenize takes a prompt (`add_special_tokens` defaults to true) or chat messages (rendered with
the chat template; `add_generation_prompt` defaults to true) and answers
{count, max_model_len, tokens, token_strs}; /detokenize takes {tokens} and answers {prompt}.
The chat form renders exactly as /v1/chat/completions does, so its count is what that request's
prompt will cost."""

from __future__ import annotations

from typing import Any

from cluster.openai_fields import BadRequest, refuse_unknown
from cluster.openai_protocol import read_messages
from cluster.openai_tools import read_tools
from engine.tokenizer import Tokenizer
from tandem.v1 import inference_pb2 as pb
from worker_runtime.convert import chat_from_proto

_PROMPT_FIELDS = ("model", "prompt", "add_special_tokens", "return_token_strs")
_CHAT_FIELDS = ("model", "messages", "add_generation_prompt", "return_token_strs", "tools")
_DETOKENIZE_FIELDS = ("model", "tokens")


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"'{name}' must be a boolean")
    return value


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("'model' must be a string")
    return model or ""


def tokenize(body: Any, tokenizer: Tokenizer, max_model_len: int) -> tuple[str, dict[str, Any]]:
    """(the model the body names, the response body)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    chat = body.get("messages") is not None  # a key set to null asks for nothing (openai_fields)
    refuse_unknown(body, _CHAT_FIELDS if chat else _PROMPT_FIELDS)
    model = _model(body)
    try:
        if chat:
            request = pb.GenerateRequest(chat=pb.ChatInput(messages=read_messages(body["messages"])))
            read_tools(body, request)
            messages, tools = chat_from_proto(request.chat)
            tokens = tokenizer.apply_chat_template(
                messages, add_generation_prompt=_flag(body, "add_generation_prompt", True), tools=tools)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise BadRequest("'prompt' must be a string (or send 'messages')")
            tokens = tokenizer.encode(prompt, add_special_tokens=_flag(body, "add_special_tokens", True))
    except (ValueError, TypeError) as e:  # InvalidRequestError; protobuf refusing a lone surrogate
        raise BadRequest(str(e)) from e
    strs = ([tokenizer.hf_tokenizer.convert_ids_to_tokens(t) for t in tokens]
            if _flag(body, "return_token_strs", False) else None)
    return model, {"count": len(tokens), "max_model_len": max_model_len, "tokens": tokens, "token_strs": strs}


def detokenize(body: Any, tokenizer: Tokenizer) -> tuple[str, dict[str, Any]]:
    """(the model the body names, the response body); ids outside the tokenizer's vocabulary are refused."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    refuse_unknown(body, _DETOKENIZE_FIELDS)
    model = _model(body)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
        raise BadRequest("'tokens' must be an array of token ids (integers)")
    bad = next((t for t in tokens if not 0 <= t < tokenizer.vocab_size), None)
    if bad is not None:
        raise BadRequest(f"token id {bad} is outside the vocabulary [0, {tokenizer.vocab_size})")
    return model, {"prompt": tokenizer.decode(tokens, skip_special_tokens=False)}
