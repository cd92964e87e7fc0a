"""A mixed workload for cluster equality tests and its reference outputs from the engine alone.

Prompts of 3 to ~200 tokens (some sharing a prefix, so prefix caches are exercised), as token
ids, text or chat messages; 1 to 24 greedy tokens; eos honoured in half of them."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import grpc
import numpy as np
import openai

from engine import SamplingParams
from engine.llm import LLM
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import inference_pb2_grpc
from tests.support.prompts import SENTENCES


@dataclass(frozen=True)
class Job:
    kind: str  # "ids", "text" or "chat"
    ids: tuple[int, ...] = ()
    text: str = ""
    max_tokens: int = 16
    ignore_eos: bool = True

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": self.text}]


@dataclass(frozen=True)
class Expected:
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str
    logprobs: tuple[float, ...] = ()  # the chosen tokens' logprobs as float32 (the wire's width), when asked for


def workload(count: int = 32, vocab: int = 512, seed: int = 0) -> list[Job]:
    rng = random.Random(seed)
    shared = [rng.randrange(4, vocab) for _ in range(64)]
    jobs = []
    for i in range(count):
        max_tokens, ignore_eos = rng.randint(1, 24), i % 2 == 0
        if i % 8 == 5:
            text = " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(1, 4)))
            jobs.append(Job("text", text=text, max_tokens=max_tokens, ignore_eos=ignore_eos))
        elif i % 8 == 7:
            jobs.append(Job("chat", text=rng.choice(SENTENCES), max_tokens=max_tokens, ignore_eos=ignore_eos))
        else:
            length = rng.choice([3, 9, 17, 40, 75, 120, 160, 200])
            head = shared if i < 8 and length > 64 else []
            ids = head + [rng.randrange(4, vocab) for _ in range(length - len(head))]
            jobs.append(Job("ids", ids=tuple(ids), max_tokens=max_tokens, ignore_eos=ignore_eos))
    return jobs


def reference(model: str, jobs: list[Job], dtype: str = "float32", deterministic: bool = False,
              logprobs: bool = False, simulate: str | None = None) -> list[Expected]:
    """The engine alone, in-process (fp32 unless told), all jobs in one continuous batch; with `simulate`
    (a profile), the simulated engine's (engine.simulated)."""
    llm = LLM(model=model, dtype=dtype, deterministic=deterministic, simulate=simulate)
    tok = llm.engine.tokenizer
    prompts = [list(j.ids) if j.kind == "ids" else tok.encode(j.text) if j.kind == "text"
               else tok.apply_chat_template(j.messages()) for j in jobs]
    params = [SamplingParams(temperature=0.0, max_tokens=j.max_tokens, ignore_eos=j.ignore_eos,
                             logprobs=0 if logprobs else None) for j in jobs]
    outs = llm.generate(prompts, params)
    return [Expected(tuple(o.token_ids), o.text, o.finish_reason or "",
                     tuple(float(np.float32(lp.logprob)) for lp in o.logprobs or () if lp is not None)) for o in outs]


_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort"}


async def run_grpc(address: str, job: Job, logprobs: bool = False) -> Expected:
    sampling = pb.SamplingParameters(temperature=0.0, max_tokens=job.max_tokens, ignore_eos=job.ignore_eos)
    if logprobs:
        sampling.logprobs = 0
    request = pb.GenerateRequest(sampling=sampling, timeout_seconds=120)
    if job.kind == "ids":
        request.token_ids.ids.extend(job.ids)
    elif job.kind == "text":
        request.text = job.text
    else:
        request.chat.messages.extend(pb.ChatMessage(**m) for m in job.messages())
    ids: list[int] = []
    chosen: list[float] = []
    text, reason = "", ""
    async with grpc.aio.insecure_channel(address) as channel:
        async for chunk in inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=120):
            ids += chunk.token_ids
            chosen += [lp.logprob for lp in chunk.logprobs]
            text += chunk.text
            reason = _REASONS.get(chunk.finish_reason, reason)
    return Expected(tuple(ids), text, reason, tuple(chosen))


async def run_openai(client: openai.AsyncOpenAI, model: str, job: Job, stream: bool) -> tuple[str, str, int]:
    """(text, finish reason, completion tokens) through the official client."""
    extra = {"ignore_eos": job.ignore_eos}
    common = dict(model=model, max_tokens=job.max_tokens, temperature=0.0, extra_body=extra)
    if job.kind == "chat":
        if not stream:
            r = await client.chat.completions.create(messages=job.messages(), **common)  # type: ignore[arg-type]
            return r.choices[0].message.content or "", r.choices[0].finish_reason, r.usage.completion_tokens
        parts, reason, used = [], "", 0
        events = await client.chat.completions.create(messages=job.messages(), stream=True,  # type: ignore[arg-type]
                                                      stream_options={"include_usage": True}, **common)
        async for event in events:
            if event.choices:
                parts.append(event.choices[0].delta.content or "")
                reason = event.choices[0].finish_reason or reason
            if event.usage:
                used = event.usage.completion_tokens
        return "".join(parts), reason, used
    prompt = list(job.ids) if job.kind == "ids" else job.text
    if not stream:
        r = await client.completions.create(prompt=prompt, **common)  # type: ignore[arg-type]
        return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens
    parts, reason, used = [], "", 0
    events = await client.completions.create(prompt=prompt, stream=True, stream_options={"include_usage": True},
                                             **common)  # type: ignore[arg-type]
    async for event in events:
        if event.choices:
            parts.append(event.choices[0].text)
            reason = event.choices[0].finish_reason or reason
        if event.usage:
            used = event.usage.completion_tokens
    return "".join(parts), reason, used


async def gather_limited(coros: list, limit: int = 32) -> list:  # type: ignore[type-arg]
    gate = asyncio.Semaphore(limit)

    async def one(c):  # type: ignore[no-untyped-def]
        async with gate:
            return await c
    return await asyncio.gather(*(one(c) for c in coros))
