"""Tokenizer parity with transformers, chat templates, streaming detokenization and stop strings."""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Iterator, Sequence

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from engine.detokenizer import IncrementalDetokenizer, find_stop
from engine.errors import InvalidRequestError
from engine.loader.api import load_tokenizer
from engine.tokenizer import Tokenizer
from tests.conftest import build_tiny_tokenizer

TEXTS = [
    "Hello world",
    "  leading and trailing spaces  ",
    "What is the capital of France?\nAnswer: Paris.",
    "naïve café résumé — “curly quotes” and ‘single’",
    "日本語のテキストと中文，한국어",
    "emoji 🎉🚀👩‍👩‍👧 and flags 🇫🇷",
    "def f(x):\n\treturn {'a': [1, 2.5e-3]}  # comment\r\n",
    "<|im_start|>user\nspecial tokens inside text<|im_end|>",
    "",
    "a" * 300,
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "日本語で"}],
]


@pytest.fixture(scope="module")
def default_tokenizers(default_model_path: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
                       ) -> Iterator[tuple[Tokenizer, PreTrainedTokenizerBase]]:
    """(ours, built in an empty cache dir and then read back from it; transformers' own GGUF tokenizer)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TANDEM_CACHE_DIR", str(tmp_path_factory.mktemp("tok_cache")))
        started = time.perf_counter()
        load_tokenizer(None)
        first_s = time.perf_counter() - started
        started = time.perf_counter()
        ours = load_tokenizer(default_model_path)
        second_s = time.perf_counter() - started
        print(f"default tokenizer: first load {first_s:.2f} s, cached {second_s:.2f} s")
        assert second_s < first_s / 3
    reference = AutoTokenizer.from_pretrained(str(default_model_path.parent),
                                              gguf_file=default_model_path.name)
    yield ours, reference


def test_default_tokenizer_matches_transformers(
        default_tokenizers: tuple[Tokenizer, PreTrainedTokenizerBase]) -> None:
    ours, reference = default_tokenizers
    assert ours.vocab_size == 49152 and ours.eos_token_ids == (2,)
    assert {0, 1, 2} <= set(ours.all_special_ids)
    assert ours.encode("Hello world") == [19556, 905]  # SmolLM2 adds no BOS
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference.encode(text), text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids) == text
    for messages in CONVERSATIONS:
        for add in (True, False):
            want = reference.apply_chat_template(messages, add_generation_prompt=add, tokenize=True,
                                                 return_dict=False)
            assert ours.apply_chat_template(messages, add_generation_prompt=add) == want
    prompt = ours.decode(ours.apply_chat_template(CONVERSATIONS[0]), skip_special_tokens=False)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("fixture, bos", [("tiny_llama_dir", True), ("tiny_qwen2_dir", False)])
def test_tiny_tokenizers_follow_their_bos_setting(fixture: str, bos: bool,
                                                   request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    ours, reference = load_tokenizer(path), AutoTokenizer.from_pretrained(str(path))
    assert ours.vocab_size == 512 and ours.eos_token_ids == (2,)
    assert (ours.encode("Hello")[0] == 3) is bos
    for text in TEXTS:
        assert ours.encode(text) == reference.encode(text), text
    for messages in CONVERSATIONS:
        want = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=False)
        assert ours.apply_chat_template(messages) == want


def test_eos_ids_include_generation_config(tmp_path: pathlib.Path, tiny_llama_dir: pathlib.Path) -> None:
    for file in tiny_llama_dir.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert load_tokenizer(tmp_path).eos_token_ids == (2, 0)


def test_invalid_chat_requests(tmp_path: pathlib.Path, tiny_qwen2_dir: pathlib.Path) -> None:
    tok = load_tokenizer(tiny_qwen2_dir)
    bad: list[object] = [
        "just a string", [], [{"role": "user"}], [{"content": "hi"}], [{"role": "user", "content": 3}],
        [{"role": "user", "content": None}], ["hi"], [{"role": "user", "content": "hi", "name": 1}],
    ]
    for messages in bad:
        with pytest.raises(InvalidRequestError):
            tok.apply_chat_template(messages)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError):
        tok.encode(["not", "text"])  # type: ignore[arg-type]

    strict = build_tiny_tokenizer(tmp_path / "strict", add_bos=False)
    strict.chat_template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}x")
    strict.save_pretrained(str(tmp_path / "strict"))
    with pytest.raises(InvalidRequestError, match="user first"):
        load_tokenizer(tmp_path / "strict").apply_chat_template([{"role": "assistant", "content": "hi"}])

    plain = build_tiny_tokenizer(tmp_path / "plain", add_bos=False)
    plain.chat_template = None
    (tmp_path / "plain" / "chat_template.jinja").unlink()
    plain.save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(InvalidRequestError, match="no chat template"):
        load_tokenizer(tmp_path / "plain").apply_chat_template(CONVERSATIONS[0])


# --- streaming detokenization -----------------------------------------------------------------------------

def stream(tok: Tokenizer, ids: Sequence[int], skip_special_tokens: bool = True) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, prompt_ids=[5, 6, 7], skip_special_tokens=skip_special_tokens)
    deltas = [detok.append(i) for i in ids]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas, detok.text


@pytest.mark.parametrize("fixture", ["tiny_qwen2_dir", "tiny_llama_dir"])
def test_detokenizer_streams_multibyte_text(fixture: str, request: pytest.FixtureRequest) -> None:
    tok = load_tokenizer(request.getfixturevalue(fixture))
    text = "Emoji 🎉🚀 and 日本語, café — 👩‍👩‍👧!<|im_end|> end"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # the small vocabulary splits characters into byte tokens
    for skip in (True, False):
        deltas, streamed = stream(tok, ids, skip)
        assert streamed == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in d for d in deltas)
        assert "🎉" in deltas or any("🎉" in d for d in deltas)
    assert "<|im_end|>" in stream(tok, ids, skip_special_tokens=False)[1]
    assert "<|im_end|>" not in stream(tok, ids)[1]


def test_detokenizer_default_model(default_tokenizers: tuple[Tokenizer, PreTrainedTokenizerBase]) -> None:
    tok = default_tokenizers[0]
    for text in TEXTS:
        ids = tok.encode(text)
        assert stream(tok, ids)[1] == tok.decode(ids)


def test_detokenizer_holds_back_incomplete_characters(tiny_qwen2_dir: pathlib.Path) -> None:
    tok = load_tokenizer(tiny_qwen2_dir)
    ids = tok.encode("🎉")
    assert len(ids) > 1 and tok.decode(ids[:1]).endswith("\ufffd")
    detok = IncrementalDetokenizer(tok, [])
    assert [detok.append(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.append(ids[-1]) == "🎉"
    # A sequence that ends inside a character: flush() yields what decode() shows for it.
    detok = IncrementalDetokenizer(tok, [])
    cut = tok.encode("ok ") + ids[:1]
    held = "".join(detok.append(i) for i in cut)
    assert held == "ok " and detok.flush() == "\ufffd" and detok.text == tok.decode(cut)


def test_detokenizer_decodes_a_bounded_window(tiny_qwen2_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    tok = load_tokenizer(tiny_qwen2_dir)
    ids = tok.encode("Hello 🎉 world, 日本語! " * 40)
    lengths: list[int] = []
    original = Tokenizer.decode

    def counting(self: Tokenizer, window: Sequence[int], skip_special_tokens: bool = True) -> str:
        lengths.append(len(window))
        return original(self, window, skip_special_tokens)

    monkeypatch.setattr(Tokenizer, "decode", counting)
    streamed = stream(tok, ids)[1]
    monkeypatch.undo()
    assert streamed == tok.decode(ids) and len(ids) >= 400
    assert max(lengths) <= 8


def test_find_stop() -> None:
    assert find_stop("Hello world", ["world"], 0) == 6
    assert find_stop("Hello world", ["o", "world"], 0) == 4
    assert find_stop("Hello world", [], 0) is None and find_stop("Hello", [""], 0) is None
    assert find_stop("Hello world", ["xyz"], 0) is None
    # Only the tail that can hold a new match is searched: "lo w" spans the previous boundary (at 5).
    assert find_stop("Hello world", ["lo w"], 5) == 3
    assert find_stop("Hello world", ["lo w"], 11) is None  # ended before position 11 - 4 + 1: seen already
    assert find_stop("STOP here", ["STOP"], 2) == 0
    # Earliest start wins even when a longer stop string ends later.
    assert find_stop("abcdef", ["def", "bcdefg", "cd"], 4) == 2
