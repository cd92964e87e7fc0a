"""Fuzzing the router's gRPC tandem.v1.Inference/Generate with hypothesis, against a live 1P+1D
cluster of the tiny model (most prompts prefill remotely, so both workers see the odd values):
prompts of odd text, token ids negative / out of the vocabulary / at the int32 edges, chats with
odd roles, every SamplingParameters field at its extremes (NaN, ±inf, 0, the largest uint32 and
uint64), unknown models, negative or non-finite timeouts; then raw bytes as the request message.

Every call ends OK or with INVALID_ARGUMENT / NOT_FOUND / RESOURCE_EXHAUSTED and a message (or
DEADLINE_EXCEEDED when the request's own timeout was short) — never UNKNOWN, INTERNAL or
UNAVAILABLE — and the workers stay up with clean pools.

Raw bytes: left to itself, grpc-aio answers a request that does not deserialize with UNKNOWN
("Unexpected <class DecodeError>") and logs a traceback; the router installs
common.grpc_decoding.RejectUndecodable, so it is INVALID_ARGUMENT. A message over grpc's 4 MiB
receive limit is RESOURCE_EXHAUSTED, from grpc itself.

Reproducible: hypothesis is derandomized, with no example database."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tandem.v1 import inference_pb2 as pb
from tandem.v1 import inference_pb2_grpc
from tests.support.cluster import Cluster, assert_pools_clean, tandem_up, worker_status

pytestmark = pytest.mark.slow

OWN_DEADLINE_S = 5.0  # a request with a shorter timeout_seconds may rightly end in DEADLINE_EXCEEDED
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
SERVED = "\x00the served model"  # replaced by the cluster's model id before sending
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

INT32 = st.integers(-(2**31), 2**31 - 1)
FLOATS = st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-45, 3.4e38, -3.4e38, math.nan, math.inf, -math.inf]),
                   st.floats(width=32))
VOCAB_IDS = st.integers(0, 511)  # the tiny model's vocabulary
TOKEN_IDS = st.one_of(st.integers(0, 600), INT32, st.sampled_from([-1, 511, 512, 2**31 - 1, -(2**31)]))
# (plausible, extreme) values of each field; max_tokens stays small unless an extreme is drawn, so the
# tiny model never generates for long
SAMPLING_FIELDS = {
    "temperature": (st.floats(0, 2), FLOATS), "top_p": (st.floats(0.01, 1), FLOATS),
    "min_p": (st.floats(0, 0.5), FLOATS), "presence_penalty": (st.floats(-2, 2), FLOATS),
    "frequency_penalty": (st.floats(-2, 2), FLOATS), "repetition_penalty": (st.floats(0.5, 2), FLOATS),
    "top_k": (st.integers(-1, 600), INT32),
    "max_tokens": (st.integers(1, 6), st.sampled_from([0, 2**31, 2**32 - 1])),
    "min_tokens": (st.integers(0, 3), st.sampled_from([7, 2**32 - 1])),
    "seed": (st.integers(0, 1000), st.sampled_from([2**63, 2**64 - 1])),
    "logprobs": (st.integers(0, 20), st.sampled_from([21, 2**32 - 1])),
    "skip_special_tokens": (st.booleans(), st.booleans()),
}


def weighted(draw: st.DrawFn, *choices: tuple[int, st.SearchStrategy]) -> object:
    """A value from one of the strategies, picked with the given weights (the first one shrinks best)."""
    pick = draw(st.integers(0, sum(weight for weight, _ in choices) - 1))
    for weight, strategy in choices:
        if pick < weight:
            return draw(strategy)
        pick -= weight
    raise AssertionError("unreachable")


@st.composite
def sampling(draw: st.DrawFn) -> pb.SamplingParameters:
    params = pb.SamplingParameters(ignore_eos=draw(st.booleans()))
    for name, (plausible, extreme) in SAMPLING_FIELDS.items():
        value = weighted(draw, (7, st.none()), (2, plausible), (1, extreme))
        if value is not None:
            setattr(params, name, value)
    params.stop.extend(weighted(draw, (9, st.lists(st.text(min_size=1, max_size=6), max_size=2)),
                                (1, st.lists(st.text(max_size=6), max_size=3))))  # type: ignore[arg-type]
    params.stop_token_ids.extend(weighted(draw, (9, st.lists(VOCAB_IDS, max_size=2)),
                                          (1, st.lists(TOKEN_IDS, max_size=3))))  # type: ignore[arg-type]
    return params


ROLES = st.one_of(st.sampled_from(["user", "system", "assistant", "", "tool", "{{ role }}", "<|im_end|>"]),
                  st.text(max_size=12))
MESSAGES = st.builds(pb.ChatMessage, role=ROLES, content=st.text(max_size=40))
ODD_TEXT = st.sampled_from(["", " ", "\x00", "\U0010ffff" * 3, "<|im_end|><s>", "\u202e\ufeff\u200d", "🎉" * 50])


@st.composite
def requests(draw: st.DrawFn) -> pb.GenerateRequest:
    model = weighted(draw, (8, st.just("")), (1, st.just(SERVED)), (1, st.text(max_size=12)))
    request = pb.GenerateRequest(model=model, sampling=draw(sampling()),
                                 request_id=draw(st.text(max_size=12)),
                                 priority=weighted(draw, (4, st.just(0)), (1, INT32)))  # type: ignore[arg-type]
    kind = weighted(draw, (7, st.just("text")), (6, st.just("token_ids")), (6, st.just("chat")), (1, st.just("none")))
    if kind == "text":
        request.text = weighted(draw, (5, st.text(min_size=1, max_size=80)), (1, ODD_TEXT))  # type: ignore[assignment]
    elif kind == "token_ids":
        request.token_ids.ids.extend(weighted(  # type: ignore[arg-type]
            draw, (8, st.lists(VOCAB_IDS, min_size=1, max_size=40)), (1, st.lists(TOKEN_IDS, max_size=40)),
            (1, st.lists(VOCAB_IDS, min_size=250, max_size=300))))
    elif kind == "chat":
        request.chat.messages.extend(weighted(draw, (8, st.lists(MESSAGES, min_size=1, max_size=3)),
                                              (1, st.just([]))))  # type: ignore[arg-type]
    if draw(st.integers(0, 5)) == 0:
        request.timeout_seconds = draw(st.one_of(st.floats(), st.sampled_from([0.0, -1.0, 1e-300, 30.0])))
    return request


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir) -> Iterator[Cluster]:  # type: ignore[no-untyped-def]
    with tandem_up("--prefill", "1", "--decode", "1", "--model", str(tiny_llama_dir), "--dtype", "float32",
                   "--num-kv-blocks", "128", "--min-remote-prefill-tokens", "4") as running:
        yield running


@pytest.fixture(scope="module")
def channel(cluster: Cluster) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(cluster.grpc_address) as opened:
        yield opened


@pytest.fixture(scope="module")
def served(channel: grpc.Channel) -> str:
    return inference_pb2_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=10).models[0].id


def _outcome(call: Iterator[pb.GenerateResponse]) -> tuple[grpc.StatusCode, str, list[pb.GenerateResponse]]:
    chunks: list[pb.GenerateResponse] = []
    try:
        chunks.extend(call)
    except grpc.RpcError as e:
        return e.code(), e.details() or "", chunks  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, "", chunks


def assert_answered_properly(request: pb.GenerateRequest, code: grpc.StatusCode, details: str,
                             chunks: list[pb.GenerateResponse]) -> None:
    if code == grpc.StatusCode.OK:
        assert chunks and chunks[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED, chunks[-1:]
        return
    own_deadline = request.HasField("timeout_seconds") and request.timeout_seconds <= OWN_DEADLINE_S
    allowed = REFUSALS | ({grpc.StatusCode.DEADLINE_EXCEEDED} if own_deadline else set())
    assert code in allowed, f"{code.name}: {details!r} for {request}"
    assert details.strip(), f"{code.name} without a message for {request}"


@settings(FUZZ, max_examples=300)
@given(request=requests())
@example(request=pb.GenerateRequest(text="hi", timeout_seconds=math.nan))
@example(request=pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(temperature=1e-45, top_k=2**31 - 1,
                                                                                top_p=1e-45, max_tokens=2)))
@example(request=pb.GenerateRequest(token_ids=pb.TokenIds(ids=[2**31 - 1]), model=SERVED))
@example(request=pb.GenerateRequest(chat=pb.ChatInput(messages=[pb.ChatMessage(role="{{", content="{% x %}")]),
                                    sampling=pb.SamplingParameters(max_tokens=2, seed=2**64 - 1, temperature=1.0)))
def test_generate_answers_every_request_properly(channel: grpc.Channel, served: str,
                                                 request: pb.GenerateRequest) -> None:
    if request.model == SERVED:
        request.model = served
    stub = inference_pb2_grpc.InferenceStub(channel)
    code, details, chunks = _outcome(stub.Generate(request, timeout=120))
    assert_answered_properly(request, code, details, chunks)


@pytest.mark.parametrize("timeout", [math.nan, math.inf, -math.inf, 0.0, -1.0])
def test_timeouts_that_are_not_positive_and_finite_are_refused(channel: grpc.Channel, timeout: float) -> None:
    """Regression: NaN and infinite timeout_seconds were accepted (NaN <= 0 is false)."""
    request = pb.GenerateRequest(text="hi", timeout_seconds=timeout, sampling=pb.SamplingParameters(max_tokens=2))
    code, details, _ = _outcome(inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "timeout_seconds" in details


def _raw(channel: grpc.Channel, method: str) -> grpc.UnaryStreamMultiCallable:
    """A stub that sends bytes as they are: no serializer on the way out, none on the way back."""
    return channel.unary_stream(f"/tandem.v1.Inference/{method}", request_serializer=None,
                                response_deserializer=None)


@settings(FUZZ, max_examples=60)
@given(raw=st.one_of(st.binary(max_size=48), st.builds(bytes.__add__, st.just(b"\x12\x02"), st.binary(max_size=2))))
@example(raw=b"\x12\x02\xff\xfe")  # text (field 2) that is not UTF-8
@example(raw=b"\xff\xff\xff")  # no valid tag
@example(raw=b"\x0a\x80")  # a length that runs past the end
@example(raw=b"")  # a valid, empty GenerateRequest: refused for having no input
def test_raw_bytes_as_the_request(channel: grpc.Channel, raw: bytes) -> None:
    code, details, chunks = _outcome(_raw(channel, "Generate")(raw, timeout=120))
    try:
        request = pb.GenerateRequest.FromString(raw)
    except Exception:  # not a GenerateRequest: the router says so
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid message" in details, (code, details)
        return
    assert_answered_properly(request, code, details, [pb.GenerateResponse.FromString(c) for c in chunks])


def test_undecodable_list_models_request_is_invalid_argument(channel: grpc.Channel) -> None:
    call = channel.unary_unary("/tandem.v1.Inference/ListModels", request_serializer=None,
                               response_deserializer=None)
    with pytest.raises(grpc.RpcError) as failure:
        call(b"\xff\xff", timeout=10)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]


def test_a_message_over_the_receive_limit_is_resource_exhausted(channel: grpc.Channel) -> None:
    request = pb.GenerateRequest(text="a" * (5 << 20))
    code, details, _ = _outcome(inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=60))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details, (code, details)


def test_the_workers_still_serve_with_clean_pools(cluster: Cluster, channel: grpc.Channel) -> None:
    """After everything above (run last in this module): a normal request through P and D succeeds."""
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(5, 40))),
                                 sampling=pb.SamplingParameters(temperature=0.0, max_tokens=4))
    code, details, chunks = _outcome(inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=60))
    assert code == grpc.StatusCode.OK and sum(len(c.token_ids) for c in chunks) == 4, details

    async def check() -> None:
        for worker in cluster.workers:
            assert (await worker_status(worker)).pool_integrity_ok
        await assert_pools_clean(cluster)
    asyncio.run(check())
