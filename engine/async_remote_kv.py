"""The asyncio door to engine.remote_kv.RemoteKV: the same calls, each run on the engine thread
between two steps. A decode worker drives a remote prefill through it and nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

from engine.outputs import RequestOutput
from engine.remote_kv import RemotePrefillResult
from engine.request import EngineRequest

if TYPE_CHECKING:
    from engine.async_engine import AsyncEngine
    from engine.llm_engine import LLMEngine


class AsyncRemoteKV:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def cached_prefix_tokens(self, token_ids: Sequence[int], cache_salt: str = "") -> int:
        """Prompt tokens this engine's prefix cache already holds (no stats counted)."""
        prompt = list(token_ids)
        return await self._engine._call(lambda e: e.remote_kv.cached_prefix_tokens(prompt, cache_salt))

    async def reserve(self, request: EngineRequest) -> tuple[list[int], AsyncIterator[RequestOutput]]:
        """Reserve blocks for `request`'s prompt (OutOfKVBlocksError: none kept, no stream); returns
        their ids and the request's stream, which starts with `resume` or `prefill_locally`.
        Leaving the stream early aborts the request and frees the blocks it holds."""
        rid = request.request_id
        outputs = self._engine._open_stream(rid)
        try:
            blocks = await self._engine._call(lambda e: e.remote_kv.reserve(request))
        except BaseException:
            self._engine._close_stream(rid)
            raise
        return blocks, self._engine._stream(rid, outputs)

    async def resume(self, request_id: str, result: RemotePrefillResult) -> None:
        """The KV landed: the request joins the batch; its stream gets the first token now."""
        def resume(engine: LLMEngine) -> None:
            out = engine.remote_kv.resume(request_id, result)
            self._engine._deliver(request_id, out, last=out.finished)
        await self._engine._call(resume)

    async def detach(self, request_id: str, key: str, quarantine_s: float) -> None:
        await self._engine._call(lambda e: e.remote_kv.detach(request_id, key, quarantine_s))

    async def rereserve(self, request_id: str) -> list[int]:
        return await self._engine._call(lambda e: e.remote_kv.rereserve(request_id))

    async def prefill_locally(self, request_id: str) -> None:
        await self._engine._call(lambda e: e.remote_kv.prefill_locally(request_id))

    async def release(self, key: str) -> None:
        await self._engine._call(lambda e: e.remote_kv.release(key))


__all__ = ["AsyncRemoteKV", "RemotePrefillResult"]
