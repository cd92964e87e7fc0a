"""The synchronous engine: requests in, one batched model step at a time, outputs out."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from engine.block_manager import BlockManager
from engine.detokenizer import IncrementalDetokenizer, find_stop
from engine.engine_config import EngineConfig
from engine.errors import InvalidRequestError, OutOfKVBlocksError
from engine.kv_hooks import KVStepHook, KVStorageAllocator
from engine.model_loading import LoadedEngineParts, build_engine_parts
from engine.model_runner import SequenceResult
from engine.ngram import propose_ngram_drafts
from engine.outputs import RequestOutput
from engine.sampler import SequenceSamplingState, TokenLogprobs
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.sequence import Sequence

log = logging.getLogger(__name__)


@dataclass
class _Request:
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    stop_holdback: int  # chars withheld from streaming while a stop string could still be forming
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    text: str = ""
    emitted_tokens: int = 0
    emitted_chars: int = 0
    first_token_time: float | None = None


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, parts: LoadedEngineParts | None = None,
                 kv_storage: KVStorageAllocator | None = None) -> None:
        self.config = config or EngineConfig()
        self.parts = parts or build_engine_parts(self.config, kv_storage)
        self.tokenizer = self.parts.tokenizer
        self.model_config = self.parts.model.config
        self.max_model_len = self.parts.max_model_len
        self.block_manager = BlockManager(self.parts.pool.spec.num_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=max(self.config.max_num_batched_tokens,
                                       0 if self.config.enable_chunked_prefill else self.max_model_len),
            max_model_len=self.max_model_len,
            enable_chunked_prefill=self.config.enable_chunked_prefill,
            policy=self.config.scheduling_policy,
        ), self.block_manager)
        self.runner = self.parts.runner
        self.requests: dict[str, _Request] = {}
        self.num_steps = 0
        self.num_computed_tokens_total = 0
        self.num_draft_tokens_proposed = 0
        self.num_draft_tokens_accepted = 0
        self.kv_hook: KVStepHook | None = None

    # -- requests -----------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise InvalidRequestError("prompt must be a string or a list of token ids (ints)")
        return list(prompt)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    priority: int = 0, resume_token_ids: list[int] | None = None) -> None:
        """Queue a request. `resume_token_ids`: tokens another engine already generated (and streamed)
        for it before it was lost — this engine continues after them without emitting them again."""
        seq = self._new_request(request_id, prompt, params, priority)
        if resume_token_ids:
            try:
                self._replay_streamed(self.requests[request_id], resume_token_ids)
            except InvalidRequestError:
                del self.requests[request_id]
                raise
        self.scheduler.add(seq)

    def _new_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None,
                     priority: int) -> Sequence:
        params = params or SamplingParams()
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        token_ids = self.encode_prompt(prompt)
        self._validate_prompt(token_ids)
        state = SequenceSamplingState(params, token_ids, self.model_config.vocab_size, self.parts.device,
                                      self.tokenizer.eos_token_ids)
        seq = Sequence(request_id, token_ids, params, state, priority=priority)
        detok = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
        holdback = max((len(s) for s in params.stop), default=1) - 1
        self.requests[request_id] = _Request(seq, detok, holdback)
        return seq

    def validate_resume(self, prompt_token_ids: list[int], params: SamplingParams,
                        resume_token_ids: list[int]) -> None:
        """Raise InvalidRequestError unless a request could continue after `resume_token_ids`."""
        bad = next((t for t in resume_token_ids if not 0 <= t < self.model_config.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"resumed token id {bad} is outside the vocabulary")
        if len(resume_token_ids) >= params.max_tokens:
            raise InvalidRequestError(f"{len(resume_token_ids)} tokens were already generated: max_tokens "
                                      f"({params.max_tokens}) leaves nothing to resume")
        if len(prompt_token_ids) + len(resume_token_ids) >= self.max_model_len:
            raise InvalidRequestError(f"prompt and resumed tokens ({len(prompt_token_ids)} + "
                                      f"{len(resume_token_ids)}) fill the context ({self.max_model_len})")

    def _replay_streamed(self, req: _Request, token_ids: list[int]) -> None:
        """Account for tokens another engine generated as if this one had: sampling state (penalties,
        min/max tokens), the seeded generator's position, detokenizer and stop-string state. The
        text they produced counts as already emitted, exactly as far as `_output` would have streamed
        it after their last token, so the next chunk starts where the client's text ends."""
        seq = req.seq
        self.validate_resume(seq.prompt_token_ids, seq.params, token_ids)
        state = seq.sampling_state
        for token_id in token_ids:
            if self._on_token(req, token_id, None):
                raise InvalidRequestError(f"the resumed tokens already end the request "
                                          f"({seq.finish_reason}): there is nothing to resume")
            seq.token_ids.append(token_id)
            if state.generator is not None and not seq.params.is_greedy:
                torch.rand((), generator=state.generator, device=self.parts.device)  # the draw it cost
        req.emitted_tokens = len(token_ids)
        req.emitted_chars = max(len(req.text) - req.stop_holdback, 0)

    # -- remote prefill (decode role) -----------------------------------------------------------------
    def add_remote_prefill_request(self, request_id: str, prompt: str | list[int],
                                   params: SamplingParams | None = None, priority: int = 0) -> list[int]:
        """Reserve KV blocks for a prompt another engine will prefill; returns their ids in token
        order (block i holds tokens [i*block_size, (i+1)*block_size)). Raises OutOfKVBlocksError
        when the blocks are not free now. The request then waits for `finish_remote_prefill`
        (or `abort_request`)."""
        seq = self._new_request(request_id, prompt, params, priority)
        try:
            self.scheduler.park_for_remote_kv(seq)
        except OutOfKVBlocksError:
            del self.requests[request_id]
            raise
        return list(seq.block_table)

    def finish_remote_prefill(self, request_id: str, first_token_id: int, logprobs: TokenLogprobs | None = None,
                              num_cached_tokens: int = 0) -> RequestOutput:
        """The prompt's KV is in the reserved blocks and `first_token_id` was sampled remotely: the
        request joins the batch as if this engine had run its prefill. `num_cached_tokens`: prompt
        tokens the remote engine's prefix cache served (reported in the request's usage)."""
        req = self.requests.get(request_id)
        if req is None:
            raise InvalidRequestError(f"no request {request_id!r} is waiting for remote KV")
        if not 0 <= first_token_id < self.model_config.vocab_size:
            raise InvalidRequestError(f"first token id {first_token_id} is outside the vocabulary")
        item = self.scheduler.resume_remote_kv(req.seq)
        req.seq.num_cached_tokens = num_cached_tokens
        state = req.seq.sampling_state
        if state.generator is not None and not req.seq.params.is_greedy:
            # the remote engine drew one uniform for the first token: keep this request's stream in step
            torch.rand((), generator=state.generator, device=self.parts.device)
        plan = SchedulerOutput(decodes=(), segments=(item,), preempted=())
        outputs = self._commit(plan, {request_id: SequenceResult([first_token_id], [logprobs])})
        return outputs[0]

    def detach_remote_blocks(self, request_id: str, key: str) -> None:
        """Hold a parked request's reserved blocks apart from it under `key`, because a remote
        engine may still write into them (its prefill failed or was given up). The request then
        gets fresh blocks (`rereserve_remote_blocks`), is prefilled here (`prefill_locally`) or
        aborted; `release_detached_blocks(key)` frees the old ones once no write can come."""
        self.scheduler.detach_remote_blocks(self._parked(request_id), key)

    def rereserve_remote_blocks(self, request_id: str) -> list[int]:
        """Fresh blocks for the next remote prefill attempt (OutOfKVBlocksError if none free)."""
        seq = self._parked(request_id)
        self.scheduler.rereserve_remote_kv(seq)
        return list(seq.block_table)

    def prefill_locally(self, request_id: str) -> None:
        """Give up on the remote prefill of a parked request (blocks detached): prefill it here."""
        self.scheduler.unpark_for_local_prefill(self._parked(request_id))

    def release_detached_blocks(self, key: str) -> None:
        self.scheduler.release_detached(key)

    def _parked(self, request_id: str) -> Sequence:
        req = self.requests.get(request_id)
        if req is None:
            raise InvalidRequestError(f"no request {request_id!r} is waiting for remote KV")
        return req.seq

    def set_kv_hook(self, hook: KVStepHook | None) -> None:
        """Plug a KV connector into the step loop (see engine.kv_hooks)."""
        self.kv_hook = hook

    def _validate_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise InvalidRequestError("prompt is empty: give at least one token")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(token_ids)} tokens but the context holds {self.max_model_len} "
                f"(prompt + at least one generated token): shorten the prompt")
        bad = next((t for t in token_ids if not 0 <= t < self.model_config.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} is outside the vocabulary [0, {self.model_config.vocab_size})")

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks; returns its final output (None if unknown/finished)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.finish(req.seq, "abort")
        self._release_held_text(req)
        return self._output(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # -- the step -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        self._propose_drafts()
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        hook = self.kv_hook
        if hook is None:
            results = self.runner.execute(plan)
        else:
            self.runner.layer_observer = hook.layer_written if hook.begin_step(plan) else None
            try:
                results = self.runner.execute(plan)
            finally:
                self.runner.layer_observer = None
                hook.wait_for_save(plan)
        self.num_steps += 1
        self.num_computed_tokens_total += plan.num_tokens
        outputs = self._commit(plan, results)
        if hook is not None:
            hook.step_committed(outputs)
        return outputs

    def _commit(self, plan: SchedulerOutput, results: dict) -> list[RequestOutput]:
        outputs = []
        for item in plan.scheduled:
            req = self.requests[item.seq.request_id]
            result = results.get(item.seq.request_id)
            accepted: list[int] = []
            if result is not None:
                for token_id, lp in zip(result.token_ids, result.logprobs, strict=True):
                    accepted.append(token_id)
                    if self._on_token(req, token_id, lp):
                        break
            if item.draft_token_ids:
                self.num_draft_tokens_proposed += len(item.draft_token_ids)
                self.num_draft_tokens_accepted += max(len(accepted) - 1, 0)
            self.scheduler.commit(item, accepted)
            if req.seq.finish_reason is not None and not req.seq.is_finished:
                self._release_held_text(req)
                self.scheduler.finish(req.seq, req.seq.finish_reason)
            if accepted or req.seq.is_finished:
                outputs.append(self._output(req))
            if req.seq.is_finished:
                del self.requests[item.seq.request_id]
        return outputs

    def _on_token(self, req: _Request, token_id: int, logprob: TokenLogprobs | None) -> bool:
        """Account for one new token; returns True when it ends the request."""
        seq, params = req.seq, req.seq.params
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        seq.sampling_state.append(token_id)
        if params.logprobs is not None:
            req.logprobs.append(logprob)
        checked_from = len(req.text)
        req.text += req.detokenizer.append(token_id)
        num_out = seq.sampling_state.num_generated
        if num_out >= params.min_tokens:
            is_eos = not params.ignore_eos and token_id in self.tokenizer.eos_token_ids
            if is_eos or token_id in params.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token_id
                return True
            stop_at = find_stop(req.text, params.stop, checked_from) if params.stop else None
            if stop_at is not None:
                seq.finish_reason = "stop"
                seq.stop_reason = next(s for s in params.stop if req.text.startswith(s, stop_at))
                req.text = req.text[:stop_at]
                return True
        if num_out >= params.max_tokens or seq.num_prompt_tokens + num_out >= self.max_model_len:
            seq.finish_reason = "length"
            return True
        return False

    @staticmethod
    def _release_held_text(req: _Request) -> None:
        """At the end, text held back for an incomplete UTF-8 character is final (unless a stop
        string already cut the text)."""
        if not isinstance(req.seq.stop_reason, str):
            req.text += req.detokenizer.flush()

    def _output(self, req: _Request) -> RequestOutput:
        seq = req.seq
        finished = seq.is_finished
        visible = len(req.text) if finished else max(len(req.text) - req.stop_holdback, req.emitted_chars)
        out_ids = seq.output_token_ids if seq.output_token_ids or not finished else []
        out = RequestOutput(
            request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids, token_ids=list(out_ids),
            text=req.text[:visible], new_token_ids=out_ids[req.emitted_tokens:],
            new_text=req.text[req.emitted_chars:visible], finished=finished, finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason, logprobs=list(req.logprobs) if seq.params.logprobs is not None else None,
            num_cached_tokens=seq.num_cached_tokens, arrival_time=seq.arrival_time,
            first_token_time=req.first_token_time)
        req.emitted_tokens, req.emitted_chars = len(out_ids), visible
        return out

    # -- speculative decoding --------------------------------------------------------------------------
    def _propose_drafts(self) -> None:
        spec = self.config.speculative
        if spec is None or len(self.scheduler.running) > spec.max_running_seqs:
            return
        for seq in self.scheduler.running:
            p = seq.params
            if seq.in_prefill or not p.is_greedy or p.needs_penalties or p.logprobs is not None:
                continue
            if seq.num_output_tokens < p.min_tokens:
                continue
            room = min(spec.num_draft_tokens, p.max_tokens - seq.num_output_tokens - 1,
                       self.max_model_len - len(seq.token_ids) - 1)
            if room > 0:
                seq.spec_token_ids = propose_ngram_drafts(seq.token_ids, room, spec.ngram_max, spec.ngram_min)

    # -- health -----------------------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Assert that block bookkeeping matches the live sequences exactly."""
        self.block_manager.check_integrity(self.scheduler.held_block_refs())

    def reset_prefix_cache(self) -> None:
        self.block_manager.reset_prefix_cache()
