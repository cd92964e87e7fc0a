"""Structured output, logit_bias and allowed_token_ids in the engine alone, on the default model:
every constrained output matches its schema / regex / choice / grammar; the sampler's unpacked
bitmask equals xgrammar's own masking; a resumed request's matcher continues exactly where the
tokens it replays leave it; what the grammar cannot honour is refused."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import jsonschema
import pytest
import torch
import xgrammar

from engine import SamplingParams, SpeculativeConfig
from engine import grammar as grammar_module
from engine.errors import InvalidRequestError
from engine.grammar import GrammarMasker
from engine.llm import LLM
from engine.remote_kv import RemotePrefillResult
from engine.structured_output import StructuredOutput

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
          "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"},
                         "city": {"enum": ["Paris", "Tokyo", "Lima"]},
                         "pets": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}}}
TOPICS = ["a chef", "a pilot", "a child", "a painter", "an astronaut", "a farmer", "a student", "a doctor"]


@pytest.fixture(scope="module")
def llm(default_model_path) -> Iterator[LLM]:  # type: ignore[no-untyped-def]
    yield LLM(str(default_model_path), dtype="float32")


def chat(llm: LLM, text: str) -> list[int]:
    return llm.engine.tokenizer.apply_chat_template([{"role": "user", "content": text}])


def test_json_schema_outputs_parse_and_validate(llm: LLM) -> None:
    prompts = [chat(llm, f"Describe {t} as JSON: name, age, city and pets.") for t in TOPICS]
    params = SamplingParams.greedy(max_tokens=120, structured=StructuredOutput("json_schema", json.dumps(PERSON)))
    for out in llm.generate(prompts, params):
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), PERSON)


def test_sampled_json_object_outputs_parse(llm: LLM) -> None:
    prompts = [chat(llm, f"Give {t}'s profile as a JSON object.") for t in TOPICS[:4]]
    params = [SamplingParams(temperature=0.7, seed=s, max_tokens=150, structured=StructuredOutput("json_object"))
              for s in range(4)]
    outs = llm.generate(prompts, params)
    finished = [o for o in outs if o.finish_reason == "stop"]
    assert finished, [o.text for o in outs]  # a sampled object may run to max_tokens; a finished one parses
    for out in finished:
        assert isinstance(json.loads(out.text), dict), out.text


@pytest.mark.parametrize(("structured", "check"), [
    (StructuredOutput("regex", r"[0-9]{3}-[a-z]{2,5}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", t)),
    (StructuredOutput("choice", choices=("yes", "no", "maybe so")), lambda t: t in ("yes", "no", "maybe so")),
    (StructuredOutput("grammar", 'root ::= "(" [a-c]+ ")" | "none"'),
     lambda t: re.fullmatch(r"\([a-c]+\)|none", t)),
])
def test_regex_choice_and_grammar(llm: LLM, structured: StructuredOutput, check) -> None:  # type: ignore[no-untyped-def]
    prompts = [chat(llm, q) for q in ("Is the sky blue?", "Pick a code.", "What now?")]
    for out in llm.generate(prompts, SamplingParams.greedy(max_tokens=12, structured=structured)):
        assert check(out.text), out.text
        assert out.finish_reason == "stop"


def test_logit_bias_forces_and_forbids(llm: LLM) -> None:
    prompt = chat(llm, "Name a colour.")
    free = llm.generate([prompt], SamplingParams.greedy(max_tokens=1, logprobs=2))[0]
    first, runner_up = free.token_ids[0], free.logprobs[0].top[1][0]  # type: ignore[index]
    forbidden = llm.generate([prompt], SamplingParams.greedy(max_tokens=1, logit_bias={first: -100}))[0]
    assert forbidden.token_ids == [runner_up]
    forced = llm.generate([prompt], SamplingParams.greedy(max_tokens=4, logit_bias={1234: 100}))[0]
    assert forced.token_ids == [1234] * 4
    sampled = llm.generate([prompt], SamplingParams(temperature=1.0, seed=0, max_tokens=8, logit_bias={77: 100}))[0]
    assert sampled.token_ids == [77] * 8


def test_allowed_token_ids(llm: LLM) -> None:
    allowed = (300, 301, 302, 5000)
    params = [SamplingParams.greedy(max_tokens=6, allowed_token_ids=allowed),
              SamplingParams(temperature=1.0, seed=1, max_tokens=6, allowed_token_ids=allowed)]
    for out in llm.generate([chat(llm, "Count."), chat(llm, "Count.")], params):
        assert set(out.token_ids) <= set(allowed), out.token_ids


def test_constrained_and_free_rows_share_a_batch(llm: LLM) -> None:
    """Free rows in the same batch keep their unconstrained greedy output (row-local masks)."""
    prompts = [chat(llm, f"Tell me about {t}.") for t in TOPICS[:3]]
    alone = llm.generate(prompts, SamplingParams.greedy(max_tokens=10))
    mixed = llm.generate(prompts, [SamplingParams.greedy(max_tokens=10),
                                   SamplingParams.greedy(max_tokens=10, structured=StructuredOutput("json_object")),
                                   SamplingParams.greedy(max_tokens=10, logit_bias={5: 100})])
    assert mixed[0].token_ids == alone[0].token_ids
    assert mixed[1].text.startswith("{")
    assert mixed[2].token_ids == [5] * 10


@pytest.mark.parametrize("path", ["c_kernel", "torch"])
def test_the_applied_bitmask_equals_xgrammars_masking(llm: LLM, path: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    grammars = [engine.validator.grammars.compile(StructuredOutput("json_schema", json.dumps(PERSON))),
                engine.validator.grammars.compile(StructuredOutput("regex", r"[a-z]+!"))]
    if path == "torch":
        monkeypatch.setattr(grammar_module, "token_mask_kernel", lambda: None)
    else:
        assert grammar_module.token_mask_kernel() is not None, "the C kernel did not build"
    matchers = [xgrammar.GrammarMatcher(g) for g in grammars]
    for token in engine.tokenizer.encode('{"name'):  # one matcher mid-object, the other at its start
        assert matchers[0].accept_token(token)
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    ours = logits.clone()
    GrammarMasker().apply(ours, [0, 2], matchers)
    theirs = logits.clone()
    bitmask = xgrammar.allocate_token_bitmask(2, vocab)
    for i, m in enumerate(matchers):
        m.fill_next_token_bitmask(bitmask, i)
    reference = theirs[[0, 2]]
    xgrammar.apply_token_bitmask_inplace(reference, bitmask)
    theirs[[0, 2]] = reference
    assert torch.equal(ours, theirs)
    assert torch.equal(ours[1], logits[1])
    assert 0 < int(torch.isfinite(ours[0]).sum()) < vocab


def test_a_resumed_request_continues_its_grammar(llm: LLM) -> None:
    """What a migrated request does: the new engine replays the streamed tokens through the matcher,
    then continues exactly as the undisturbed run."""
    prompt = chat(llm, "Describe a pilot as JSON: name, age, city and pets.")
    params = SamplingParams.greedy(max_tokens=120, structured=StructuredOutput("json_schema", json.dumps(PERSON)))
    whole = llm.generate([prompt], params)[0]
    engine = llm.engine
    for cut in (1, 7):
        engine.add_request(engine.make_request(f"resume-{cut}", prompt, params, resume_token_ids=whole.token_ids[:cut]))
        outs = []
        while engine.has_unfinished_requests():
            outs += engine.step()
        assert [t for o in outs for t in o.new_token_ids] == whole.token_ids[cut:]
    bad = engine.tokenizer.encode("hello")  # not how a JSON object starts
    with pytest.raises(InvalidRequestError, match="violates"):
        engine.start_request(engine.make_request("resume-bad", prompt, params, resume_token_ids=bad))
    assert "resume-bad" not in engine.requests


def test_a_dead_end_grammar_ends_its_sequence_and_the_engine_goes_on(llm: LLM) -> None:
    """The regex allows no token after 'a' (an empty class): the sequence ends with eos instead of
    sampling a token the grammar rejects; its batch neighbour is undisturbed."""
    prompt = chat(llm, "Say something.")
    free = SamplingParams.greedy(max_tokens=6)
    alone = llm.generate([prompt], free)[0]
    dead, neighbour = llm.generate([prompt, prompt], [
        SamplingParams.greedy(max_tokens=6, structured=StructuredOutput("regex", r"a[^\s\S]")), free])
    assert dead.text == "a" and dead.finish_reason == "stop"
    assert dead.token_ids[-1] in llm.engine.tokenizer.eos_token_ids
    assert neighbour.token_ids == alone.token_ids
    assert llm.generate([prompt], free)[0].token_ids == alone.token_ids


def test_a_remote_first_token_outside_the_grammar_is_refused_before_anything_changes(llm: LLM) -> None:
    """A prefill worker that sampled without the grammar: the parked request stays parked (the
    decode worker then retries elsewhere), and a token the grammar allows resumes it."""
    engine = llm.engine
    params = SamplingParams.greedy(max_tokens=8, structured=StructuredOutput("choice", choices=("yes", "no")))
    engine.remote_kv.reserve(engine.make_request("remote", chat(llm, "Yes or no?"), params))
    with pytest.raises(InvalidRequestError, match="violates"):
        engine.remote_kv.resume("remote", RemotePrefillResult(engine.tokenizer.encode("maybe")[0]))
    assert "remote" in engine.remote_kv.parked
    engine.remote_kv.detach("remote", "attempt-1", quarantine_s=60)  # what the decode worker does next
    engine.remote_kv.release("attempt-1")
    engine.remote_kv.prefill_locally("remote")
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert "".join(o.new_text for o in outs) in ("yes", "no")


def test_choices_beyond_the_basic_plane(llm: LLM) -> None:
    params = SamplingParams.greedy(max_tokens=8, structured=StructuredOutput("choice", choices=("😀 yes", "🙁 no")))
    assert llm.generate([chat(llm, "Happy?")], params)[0].text in ("😀 yes", "🙁 no")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"structured": StructuredOutput("json_schema", '{"type": 5}')}, "cannot be used"),
    ({"structured": StructuredOutput("regex", "a(b")}, "cannot be used"),
    ({"structured": StructuredOutput("grammar", "root ::= nothing")}, "cannot be used"),
    ({"logit_bias": {10**7: 1.0}}, "outside the vocabulary"),
    ({"allowed_token_ids": (1, 10**7)}, "outside the vocabulary"),
    ({"allowed_token_ids": (2,), "min_tokens": 1}, "no token could be generated"),  # 2: the default model's eos
])
def test_unusable_requests_are_refused(llm: LLM, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        llm.engine.make_request("bad", [1, 2, 3], SamplingParams.greedy(**kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"structured": StructuredOutput("json_object"), "min_tokens": 2}, "min_tokens"),
    ({"structured": StructuredOutput("json_object"), "ignore_eos": True}, "ignore_eos"),
    ({"structured": StructuredOutput("json_object"), "allowed_token_ids": (1,)}, "allowed_token_ids"),
    ({"logit_bias": {1: 100.5}}, r"\[-100, 100\]"),
    ({"logit_bias": {-1: 1}}, "non-negative"),
    ({"allowed_token_ids": ()}, "non-empty"),
])
def test_params_that_cannot_be_honoured_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams.greedy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("spec", "message"), [
    ('{"a": ' * 5000 + "1" + "}" * 5000, "not valid JSON"),  # too deep for the parser
    (json.dumps(json.loads('{"type": "array", "items": ' * 60 + '{"type": "integer"}' + "}" * 60)), "deeper than 48"),
])
def test_schemas_too_deep_are_refused(spec: str, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        StructuredOutput("json_schema", spec)


@pytest.mark.parametrize("structured", [
    StructuredOutput("json_schema", "{}"), StructuredOutput("choice", choices=('a "quoted" \\ one', "b"))])
def test_specifications_compile(llm: LLM, structured: StructuredOutput) -> None:
    assert llm.engine.validator.grammars.compile(structured) is not None


def test_speculative_drafts_follow_the_grammar(tiny_llama_dir) -> None:  # type: ignore[no-untyped-def]
    """n-gram drafts of a constrained request are cut where the grammar forbids them and verified
    against the grammar-masked argmax: the output is exactly plain greedy decoding under the grammar,
    with drafts accepted along the way."""
    schema = {"type": "object", "required": ["items"], "additionalProperties": False, "properties": {"items": {
        "type": "array", "minItems": 12, "maxItems": 30, "items": {"enum": ["ab", "cd", "ef"]}}}}
    params = SamplingParams.greedy(max_tokens=150, structured=StructuredOutput("json_schema", json.dumps(schema)))
    prompts = [[(7 * i + j % (3 + i)) % 300 + 5 for j in range(10 + i)] for i in range(4)]
    plain = LLM(str(tiny_llama_dir), num_kv_blocks=128, dtype="float32").generate(prompts, params)
    drafting = LLM(str(tiny_llama_dir), num_kv_blocks=128, dtype="float32",
                   speculative=SpeculativeConfig(num_draft_tokens=4, max_running_seqs=8))
    outputs = drafting.generate(prompts, params)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in plain]
    assert drafting.engine.num_draft_tokens_accepted > 0
    for out in outputs:
        if out.finish_reason == "stop":
            jsonschema.validate(json.loads(out.text), schema)


def test_drafts_stop_at_an_ending_token(tiny_llama_dir) -> None:  # type: ignore[no-untyped-def]
    """The prompt repeats `<answer><eos>`, so the n-gram drafter proposes eos and what followed it
    once the answer is written: drafts are cut before eos (the grammar accepts nothing after it),
    and the output is plain greedy decoding under the grammar."""
    plain = LLM(str(tiny_llama_dir), num_kv_blocks=64, dtype="float32")
    tokenizer = plain.engine.tokenizer
    answer = tokenizer.encode("abc abc")
    eos = tokenizer.eos_token_ids[0]
    prompt = [*answer, eos] * 3 + answer[:2]
    params = SamplingParams.greedy(max_tokens=20, structured=StructuredOutput("choice", choices=(
        tokenizer.decode(answer),)))
    drafting = LLM(str(tiny_llama_dir), num_kv_blocks=64, dtype="float32",
                   speculative=SpeculativeConfig(num_draft_tokens=4, max_running_seqs=8))
    want = plain.generate([prompt], params)[0]
    got = drafting.generate([prompt], params)[0]
    assert got.token_ids == want.token_ids and got.text == tokenizer.decode(answer)
    assert drafting.engine.num_draft_tokens_proposed > 0
