"""The engine's side of disaggregation, in one process: KV step hooks see every layer as it is
written, and a request whose prompt KV another engine computed decodes exactly like one this
engine prefilled itself. (Across processes, through kv_transfer: tests/test_kv_connector.py.)"""

from __future__ import annotations

import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.errors import InvalidRequestError, OutOfKVBlocksError
from engine.kv_hooks import LayerReady
from engine.outputs import RequestOutput
from engine.remote_kv import RemotePrefillResult
from engine.scheduler import SchedulerOutput


class CopyPagesHook:
    """Copies request `rid`'s pages, layer by layer as they are written, into `dst`'s `dst_blocks`."""

    def __init__(self, src: LLMEngine, dst: LLMEngine, rid: str, dst_blocks: list[int]) -> None:
        self.src, self.dst, self.rid, self.dst_blocks = src, dst, rid, dst_blocks
        self.block_table: list[int] = []
        self.layers_seen: list[int] = []
        self.first_token: int | None = None

    def begin_step(self, plan: SchedulerOutput) -> bool:
        self.block_table = next((list(i.seq.block_table) for i in plan.scheduled if i.seq.request_id == self.rid), [])
        return bool(self.block_table)

    def layer_written(self, layer: int, ready: LayerReady | None = None) -> None:
        assert ready is None  # (a CPU pool: the layer's KV is in it already)
        self.layers_seen.append(layer)
        src, dst = self.src.parts.pool.tensor, self.dst.parts.pool.tensor
        for src_block, dst_block in zip(self.block_table, self.dst_blocks, strict=False):
            dst[layer, dst_block].copy_(src[layer, src_block])

    def wait_for_save(self, plan: SchedulerOutput) -> None:
        pass

    def step_committed(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.request_id == self.rid and out.token_ids and self.first_token is None:
                self.first_token = out.token_ids[0]


def _engine(model_dir, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=kw.pop("num_kv_blocks", 64), block_size=4,
                                  max_num_batched_tokens=kw.pop("max_num_batched_tokens", 256), dtype="float32", **kw))


def _run(engine: LLMEngine, rid: str) -> list[int]:
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid:
                tokens = out.token_ids
    return tokens


@pytest.mark.parametrize("chunk", [256, 5])
def test_remote_prefill_decodes_like_a_local_one(tiny_llama_dir, chunk: int) -> None:
    prompt = [(7 * i) % 90 + 5 for i in range(23)]
    params = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    alone = _engine(tiny_llama_dir)
    alone.add_request(alone.make_request("r", prompt, params))
    expected = _run(alone, "r")

    prefill = _engine(tiny_llama_dir, max_num_batched_tokens=chunk)
    decode = _engine(tiny_llama_dir, num_kv_blocks=40)
    busy = SamplingParams(max_tokens=2, temperature=0.0)
    decode.add_request(decode.make_request("busy", prompt[:6], busy))  # other block ids in use
    _run(decode, "busy")
    blocks = decode.remote_kv.reserve(decode.make_request("r", prompt, params))
    assert len(blocks) == 6  # 23 tokens in blocks of 4
    hook = CopyPagesHook(prefill, decode, "r", blocks)
    prefill.set_kv_hook(hook)
    prefill.add_request(prefill.make_request("r", prompt, SamplingParams(max_tokens=1, temperature=0.0)))
    _run(prefill, "r")
    num_layers = prefill.model_config.num_layers
    steps = -(-len(prompt) // chunk)
    assert hook.layers_seen == list(range(num_layers)) * steps
    assert not decode.has_unfinished_requests()  # parked: outside the batch until its KV is in
    assert hook.first_token is not None
    first = decode.remote_kv.resume("r", RemotePrefillResult(hook.first_token))
    assert first.token_ids == [hook.first_token]
    assert _run(decode, "r") == expected
    prefill.check_integrity()
    decode.check_integrity()


def test_parked_requests_abort_cleanly_and_reservations_are_bounded(tiny_llama_dir) -> None:
    engine = _engine(tiny_llama_dir, num_kv_blocks=10)
    engine.remote_kv.reserve(engine.make_request("a", list(range(5, 30)), SamplingParams(max_tokens=2)))  # 7 blocks
    with pytest.raises(OutOfKVBlocksError, match="needs 4 KV blocks, 3 are free"):
        engine.remote_kv.reserve(engine.make_request("b", list(range(5, 20)), SamplingParams(max_tokens=2)))
    assert "b" not in engine.requests
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        engine.remote_kv.resume("a", RemotePrefillResult(10**9))
    with pytest.raises(InvalidRequestError, match="no request"):
        engine.remote_kv.resume("zzz", RemotePrefillResult(1))
    engine.check_integrity()
    engine.abort_request("a")
    engine.check_integrity()
    assert engine.block_manager.num_free_blocks == 10
