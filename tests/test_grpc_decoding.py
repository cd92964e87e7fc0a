"""common/grpc_decoding.py, in process: bytes that are not the method's message get INVALID_ARGUMENT
(grpc-aio alone says UNKNOWN), for streaming and unary methods, async-generator and coroutine
servicers alike; messages that decode reach the servicer unchanged."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.grpc_decoding import RejectUndecodable
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import inference_pb2_grpc

NOT_UTF8_TEXT = b"\x12\x02\xff\xfe"  # GenerateRequest.text (field 2) holding bytes that are not UTF-8


class _Echo(inference_pb2_grpc.InferenceServicer):
    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        yield pb.GenerateResponse(text=request.text)

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[pb.ModelInfo(id="m")])


@pytest.fixture
async def address() -> AsyncIterator[str]:
    server = grpc.aio.server(interceptors=[RejectUndecodable()])
    inference_pb2_grpc.add_InferenceServicer_to_server(_Echo(), server)
    health_servicer = health.aio.HealthServicer()  # Check and Watch are coroutines that write
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    yield f"127.0.0.1:{port}"
    await server.stop(None)


@pytest.fixture
async def channel(address: str) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(address) as opened:
        yield opened


@pytest.mark.parametrize(("method", "raw"), [
    ("/tandem.v1.Inference/Generate", NOT_UTF8_TEXT), ("/tandem.v1.Inference/Generate", b"\xff\xff\xff"),
    ("/tandem.v1.Inference/Generate", b"\x0a\x80"),  # a length that runs past the end
    ("/grpc.health.v1.Health/Watch", b"\x0a\x02\xff\xfe"),  # HealthCheckRequest.service, not UTF-8
    ("/grpc.health.v1.Health/Watch", b"\xff\xff\xff")])
async def test_undecodable_stream_requests_are_invalid_argument(channel: grpc.aio.Channel, method: str,
                                                                raw: bytes) -> None:
    call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)(raw, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call.read()
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid message" in (failure.value.details() or "")


@pytest.mark.parametrize("method", ["/tandem.v1.Inference/ListModels", "/grpc.health.v1.Health/Check"])
async def test_undecodable_unary_requests_are_invalid_argument(channel: grpc.aio.Channel, method: str) -> None:
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call(b"\xff\xff", timeout=10)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_messages_that_decode_reach_the_servicer(channel: grpc.aio.Channel) -> None:
    stub = inference_pb2_grpc.InferenceStub(channel)
    assert [r.text async for r in stub.Generate(pb.GenerateRequest(text="héllo"), timeout=10)] == ["héllo"]
    assert (await stub.ListModels(pb.ListModelsRequest(), timeout=10)).models[0].id == "m"
    checked = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert checked.status == health_pb2.HealthCheckResponse.SERVING
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
