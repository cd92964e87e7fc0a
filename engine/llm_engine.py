"""The synchronous engine: requests in, one batched model step at a time, outputs out."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace

import torch

from engine.block_manager import BlockManager, KVCacheEvents, salted_root
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.draft_model import DraftModel
from engine.errors import InvalidRequestError, PoolIntegrityError
from engine.kv_cache import KVCachePool
from engine.kv_hooks import KVStepHook, KVStorageAllocator
from engine.kv_offload import KVOffloadTier, offload_capacity
from engine.loader.engine_parts import LoadedEngineParts, build_engine_parts
from engine.model_runner import ModelRunner, SequenceResult
from engine.ngram import propose_ngram_drafts
from engine.outputs import SPEC_DECISIONS, EngineStats, RequestOutput, SpecStats
from engine.parallel.protocol import RankPlugin
from engine.prefill_cost import PrefillCost
from engine.remote_kv import RemoteKV
from engine.request import EngineRequest, RequestValidator
from engine.request_state import RequestState
from engine.sampler import SequenceSamplingState
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledSequence, Scheduler, SchedulerOutput
from engine.sequence import Sequence as EngineSequence
from engine.sequence import SequenceStatus
from engine.spec_control import SpeculationControl
from engine.step_pipeline import StepPipeline

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, parts: LoadedEngineParts | None = None,
                 kv_storage: KVStorageAllocator | None = None, rank_plugin: RankPlugin | None = None) -> None:
        """`rank_plugin`: with tensor_parallel_size > 1, what the ranks past 0 run beside their shards
        (engine.parallel.protocol.RankPlugin)."""
        self.config = config or EngineConfig()
        if parts is None and self.config.simulate is not None:
            from engine.simulated.parts import build_simulated_parts
            parts = build_simulated_parts(self.config, kv_storage)
        self.parts = parts or build_engine_parts(self.config, kv_storage, rank_plugin=rank_plugin)
        try:
            self._set_up()
        except BaseException:
            if self.parts.tp_leader is not None:  # the other ranks end with the engine that failed to start
                self.parts.tp_leader.close()
            raise

    def _set_up(self) -> None:
        self.tokenizer = self.parts.tokenizer
        self.model_config = self.parts.model_config
        self.max_model_len = self.parts.max_model_len
        self.block_manager = BlockManager(self.parts.pool.spec.num_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching)
        self.block_manager.record_events = self.config.record_kv_events
        self.block_manager.null_block_id = self.parts.pool.scratch_block
        self.offload: KVOffloadTier | None = None
        if self.config.kv_offload_bytes:
            self.offload = KVOffloadTier(self.parts.pool, offload_capacity(self.config, self.parts.pool),
                                         self.config.kv_offload_dir)
            self.offload.record_events = self.config.record_kv_events
            self.block_manager.offload = self.offload
            if self.parts.tp_leader is not None:  # the other ranks make its copies in their own tiers
                self.offload.copies = []
                self.parts.tp_leader.tier_copies = self.offload.take_copies
        self.scheduler = Scheduler(self.config.scheduler_config(self.max_model_len), self.block_manager,
                                   groups=self.parts.kv_groups)
        self.runner = self.parts.runner
        self.validator = RequestValidator(self.tokenizer, self.model_config.vocab_size, self.max_model_len)
        self.requests: dict[str, RequestState] = {}
        self.remote_kv = RemoteKV(self)
        self.num_steps = 0
        self.num_computed_tokens_total = 0
        self.num_draft_tokens_proposed = 0
        self.num_draft_tokens_accepted = 0
        self.kv_hook: KVStepHook | None = None
        self.prefill_cost = PrefillCost()
        self.pipeline = StepPipeline(self) if self.config.async_scheduling else None
        self.draft: DraftModel | None = None
        self.spec_control: SpeculationControl | None = None
        self.spec_steps = dict.fromkeys(SPEC_DECISIONS, 0)
        self.last_forward_seconds = 0.0
        # (decoding, drafting, k) of this step's drafts, when they cost what one more such step would
        self.spec_step: tuple[int, int, int] | None = None
        spec = self.config.speculative
        if spec is not None and spec.method == "draft":
            self.draft = DraftModel.load(self.config, self.parts, self.block_manager)
            self.scheduler.on_release = self.draft.release
            self.spec_control = SpeculationControl(spec.num_draft_tokens, spec.adaptive)

    @property
    def kv_pool(self) -> KVCachePool:
        return self.parts.pool

    # -- requests -----------------------------------------------------------------------------------
    def make_request(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams | None = None,
                     priority: int = 0, resume_token_ids: Sequence[int] | None = None,
                     cache_salt: str = "") -> EngineRequest:
        """Validate a request once (InvalidRequestError says what to change); see engine.request."""
        return self.validator.validate(request_id, prompt, params, priority, resume_token_ids, cache_salt)

    def add_request(self, request: EngineRequest) -> None:
        """Queue a validated request (`make_request`). A resumed one continues after its
        `resume_token_ids` without emitting them again."""
        self.scheduler.add(self.start_request(request))

    def start_request(self, request: EngineRequest) -> EngineSequence:
        """The request's state, registered but not queued (the scheduler or RemoteKV takes it)."""
        if request.request_id in self.requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        prompt, params = list(request.prompt_token_ids), request.params
        state = SequenceSamplingState(params, prompt, self.model_config.vocab_size, self.parts.device,
                                      self.tokenizer.eos_token_ids, request.grammar)
        seq = EngineSequence(request.request_id, prompt, params, state, priority=request.priority,
                             root_hash=salted_root(request.cache_salt))
        req = RequestState(seq, IncrementalDetokenizer(self.tokenizer, prompt, params.skip_special_tokens),
                           tuple(self.tokenizer.eos_token_ids), self.max_model_len)
        if request.resume_token_ids:
            req.replay_streamed(request.resume_token_ids, self.parts.device)
        self.requests[request.request_id] = req
        return seq

    def forget_request(self, request_id: str) -> None:
        """Drop a started request that never got blocks or a queue place."""
        del self.requests[request_id]

    def skip_remote_draw(self, seq: EngineSequence) -> None:
        """Another engine sampled this request's first token with its seeded generator: stay in step."""
        self.requests[seq.request_id].skip_draw(self.parts.device)

    def set_kv_hook(self, hook: KVStepHook | None) -> None:
        """Plug a KV connector into the step loop (see engine.kv_hooks)."""
        self._quiet()
        self.kv_hook = hook

    def close(self) -> None:
        """Stop the async-scheduling forward thread and the KV offload writer, if any (the engine steps no more)."""
        if self.pipeline is not None:
            self.pipeline.close()
        if self.offload is not None:
            self.offload.close()
        if self.parts.tp_leader is not None:
            self.parts.tp_leader.close()

    def quiesce(self) -> list[RequestOutput]:
        """With async scheduling: finish the step in flight and return the outputs not returned yet, so the
        engine's state may be touched; call before anything but `add_request` between two steps."""
        return self.pipeline.quiesce() if self.pipeline is not None else []

    def _quiet(self) -> None:
        """`quiesce`, keeping its outputs for the next step."""
        if self.pipeline is not None:
            self.pipeline.keep_ready(self.pipeline.quiesce())

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks; returns its final output (None if unknown or finished; with async
        scheduling, a request that ends in the step in flight returns that ending, not an abort)."""
        self._quiet()
        earlier = self.pipeline.take_ready_of(request_id) if self.pipeline is not None else []
        req = self.requests.pop(request_id, None)
        if req is None:  # it ended meanwhile: its last outputs are the answer
            return earlier[-1].after(earlier[:-1]) if earlier else None
        if req.seq.status is SequenceStatus.WAITING_FOR_REMOTE_KV:
            self.remote_kv.drop(req.seq)
        self.scheduler.finish(req.seq, "abort")
        req.release_held_text()
        return req.output().after(earlier)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0 or (self.pipeline is not None and self.pipeline.busy)

    # -- the step -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        self.remote_kv.release_expired()
        if self.pipeline is not None:
            if self.kv_hook is None:
                return self.pipeline.step()
            return self.pipeline.quiesce() + self._step()  # a KV hook wants each step whole (set after a quiesce)
        return self._step()

    def _step(self) -> list[RequestOutput]:
        proposing = time.perf_counter()
        self._propose_drafts()
        propose_seconds = time.perf_counter() - proposing
        plan = self.scheduler.schedule()
        self.run_staged_loads()
        if plan.is_empty:
            return []
        hook = self.kv_hook
        if hook is None:
            results = self._execute(plan)
        else:
            self.runner.layer_observer = hook.layer_written if hook.begin_step(plan) else None
            try:
                results = self._execute(plan)
            finally:
                self.runner.layer_observer = None
                hook.wait_for_save(plan)
        self.num_steps += 1
        self.num_computed_tokens_total += plan.num_tokens
        if self.spec_control is not None and all(item.samples and item.num_tokens == 1 + len(item.draft_token_ids)
                                                 for item in plan.scheduled):  # decoding only: no prompt chunk
            self.spec_control.observe_target(plan.num_tokens, self.last_forward_seconds)
            drafted = [len(item.draft_token_ids) for item in plan.scheduled if item.draft_token_ids]
            if self.spec_step is not None and drafted == [self.spec_step[2]] * self.spec_step[1]:  # as planned
                self.spec_control.observe_step(*self.spec_step, propose_seconds + self.last_forward_seconds)
        outputs = self._commit(plan.scheduled, results)
        if hook is not None:
            hook.step_committed(outputs)
        return outputs

    def run_staged_loads(self) -> None:
        """Copy the second-tier blocks the last schedule admitted into the pool; only while no forward runs."""
        if self.offload is not None:
            self.offload.run_staged()

    def commit(self, items: Iterable[ScheduledSequence], results: dict[str, SequenceResult]) -> list[RequestOutput]:
        """Apply a step's results (this engine's, or a remote prefill's first token) to its requests."""
        self._quiet()
        return self._commit(items, results)

    def _execute(self, plan: SchedulerOutput) -> dict[str, SequenceResult]:
        started = time.perf_counter()
        if self.pipeline is not None:  # the model runs on the pipeline's forward thread only
            results = self.pipeline.run_whole(lambda: self.runner.execute(plan))
        else:
            results = self.runner.execute(plan)
        self.forward_ended()
        self.last_forward_seconds = time.perf_counter() - started
        self.prefill_cost.observe(plan, self.last_forward_seconds)
        return results

    def forward_ended(self) -> None:
        """After a forward, on the thread that ran it. With a second tier on a GPU, wait until the device has
        run it: a step that samples nothing returns while its kernels still write KV, and the blocks it fills
        may be copied into the tier (on its own stream) as soon as the step is committed."""
        if self.offload is not None and self.parts.device.type == "cuda":
            torch.cuda.current_stream(self.parts.device).synchronize()

    def _commit(self, items: Iterable[ScheduledSequence], results: dict[str, SequenceResult]) -> list[RequestOutput]:
        outputs = []
        tested = accepted_drafts = 0  # draft positions verified this step, and of those kept
        for item in items:
            req = self.requests[item.seq.request_id]
            result = results.get(item.seq.request_id)
            accepted: list[int] = []
            if result is not None:
                if result.prompt_logprobs:
                    req.add_prompt_logprobs(result.prompt_logprobs_start, result.prompt_logprobs)
                accepted, _ = req.take_tokens(result.token_ids, result.logprobs, texted=True)
            if item.draft_token_ids:
                kept = max(len(accepted) - 1, 0)
                self.num_draft_tokens_proposed += len(item.draft_token_ids)
                self.num_draft_tokens_accepted += kept
                # a rejection tested one more position; a sequence that ended on a kept token tested no more
                tested += kept + (kept < len(item.draft_token_ids) and req.seq.finish_reason is None)
                accepted_drafts += kept
            self.scheduler.commit(item, accepted)
            if req.seq.finish_reason is not None and not req.seq.is_finished:
                req.release_held_text()
                self.scheduler.finish(req.seq, req.seq.finish_reason)
            if accepted or req.seq.is_finished:
                outputs.append(req.output())
            if req.seq.is_finished:
                del self.requests[item.seq.request_id]
        if self.spec_control is not None:
            self.spec_control.observe_acceptance(tested, accepted_drafts)
        return outputs

    # -- speculative decoding --------------------------------------------------------------------------
    def _propose_drafts(self) -> None:
        spec = self.config.speculative
        if self.draft is not None:
            self._propose_model_drafts()
            return
        if spec is None or len(self.scheduler.running) > spec.max_running_seqs:
            return
        for seq in self.scheduler.running:
            p = seq.params
            # drafts are verified against the argmax of the raw logits, or of the grammar-masked ones:
            # no request whose logits are edited otherwise
            if (seq.in_prefill or not p.is_greedy or p.needs_penalties or p.logprobs is not None or p.logit_bias
                    or p.allowed_token_ids is not None):
                continue
            if seq.num_output_tokens < p.min_tokens:
                continue
            room = min(spec.num_draft_tokens, p.max_tokens - seq.num_output_tokens - 1,
                       self.max_model_len - len(seq.token_ids) - 1)
            if room > 0:
                drafts = propose_ngram_drafts(seq.token_ids, room, spec.ngram_max, spec.ngram_min)
                if seq.sampling_state.matcher is not None:
                    # a draft the grammar forbids cannot be the masked argmax, and nothing follows an
                    # ending token: cut at either (the verifying row after the drafts may still end it)
                    ending = set(self.tokenizer.eos_token_ids) | set(p.stop_token_ids)
                    drafts = drafts[:next((i for i, t in enumerate(drafts) if t in ending), len(drafts))]
                    drafts = drafts[:seq.sampling_state.grammar_prefix(drafts)]
                seq.spec_token_ids = drafts

    def _propose_model_drafts(self) -> None:
        """Drafts from the draft model for the decoding sequences, as many as the controller predicts pay."""
        spec, draft, control = self.config.speculative, self.draft, self.spec_control
        assert spec is not None and draft is not None and control is not None
        self.spec_step = None
        decoding = [seq for seq in self.scheduler.running if not seq.in_prefill]
        eligible: list[tuple[EngineSequence, int]] = []
        for seq in decoding:
            p = seq.params
            # structured output decodes plainly; so do seeded sampled requests: their generator gives one draw per
            # token, which keeps their tokens independent of the batch and lets a migrated stream resume exactly
            if seq.sampling_state.matcher is not None or seq.sampling_state.generator is not None:
                continue
            room = min(spec.num_draft_tokens, p.max_tokens - seq.num_output_tokens - 1,
                       self.max_model_len - len(seq.token_ids) - 1, draft.max_model_len - len(seq.token_ids))
            if room > 0:
                eligible.append((seq, room))
        decision = control.decide(len(decoding), len(eligible), self.config.max_num_batched_tokens)
        if eligible:
            self.spec_steps["off" if decision.k == 0 else "probe" if decision.exploring else "on"] += 1
        if decision.k == 0:
            return
        if decision.max_sequences is not None:  # a probe: the sequences whose draft KV lags least
            eligible.sort(key=lambda e: len(e[0].token_ids) - draft.computed_tokens(e[0]))
            eligible = eligible[:decision.max_sequences]
        eligible = eligible[:control.drafting(len(decoding), len(eligible), decision.k)]
        assert isinstance(self.runner, ModelRunner)  # a simulated engine takes no draft model (EngineConfig)
        proposals = draft.propose([(seq, min(room, decision.k)) for seq, room in eligible], self.runner.sampler,
                                  self.config.max_num_batched_tokens)
        for rows, seconds in draft.last_step_seconds:
            control.observe_draft(rows, seconds)
        for seq, _ in eligible:
            proposal = proposals.get(seq.request_id)
            if proposal is not None:
                seq.spec_token_ids, seq.spec_draft_probs = proposal.token_ids, proposal.probs
        # a step whose draft caught up with more than the tokens of the last verify (a prompt the draft had not
        # seen, or a sequence back after steps off) is not what a speculative step costs from one to the next
        steady = bool(draft.last_step_seconds) and draft.last_step_seconds[0][0] <= 2 * len(proposals)
        if proposals and steady:
            self.spec_step = (len(decoding), len(proposals), decision.k)  # checked against the plan that runs

    # -- health and observation -------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise PoolIntegrityError unless block bookkeeping matches the live sequences exactly
        (running, waiting, parked for remote KV, and detached blocks), and the second tier's is consistent."""
        refs = self.scheduler.held_block_refs()
        for block_id, count in self.remote_kv.held_block_refs().items():
            refs[block_id] = refs.get(block_id, 0) + count
        self.block_manager.check_integrity(refs)
        if self.offload is not None:
            self.offload.check_integrity()
        if self.draft is not None:
            self.draft.check_integrity(self.scheduler.running)

    def integrity_error(self) -> str | None:
        """`check_integrity`'s complaint, or None when the pool is consistent."""
        try:
            self.check_integrity()
        except PoolIntegrityError as e:
            return str(e)
        return None

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                           waiting_for_remote_kv=self.remote_kv.num_parked, free_blocks=bm.num_free_blocks,
                           total_blocks=bm.num_blocks, kv_usage=bm.usage(),
                           preemptions_total=self.scheduler.num_preemptions_total,
                           computed_tokens_total=self.num_computed_tokens_total,
                           prefix_queried_blocks=bm.stats_queried_blocks, prefix_hit_blocks=bm.stats_hit_blocks,
                           offload=None if self.offload is None else self.offload.stats(),
                           spec=self._spec_stats())

    def _spec_stats(self) -> SpecStats | None:
        control = self.spec_control
        if control is None:
            return None
        return SpecStats(dict(self.spec_steps), self.num_draft_tokens_proposed, self.num_draft_tokens_accepted,
                         control.acceptance or 0.0, control.last.k, control.last.predicted_gain)

    def drain_kv_events(self, with_snapshot: bool = False) -> KVCacheEvents:
        """Prefix-cache changes since the last drain (config.record_kv_events), in the pool and in the second tier,
        and with `with_snapshot` every cached hash now, read together (exact as of this call)."""
        events = self.block_manager.drain_events(with_snapshot)
        if self.offload is None:
            return events
        stored, removed, snapshot = self.offload.drain_events(with_snapshot)
        return replace(events, offloaded=stored, unoffloaded=removed, offload_snapshot=snapshot,
                       offload_block_cost=self.offload_block_cost())

    def offload_block_cost(self) -> float:
        """Loading a block from the second tier in blocks of prefill work, both measured here (0: not yet known)."""
        per_token = self.prefill_cost.seconds_per_token
        if self.offload is None or per_token == 0.0:
            return 0.0
        return self.offload.load_seconds_per_block() / (per_token * self.config.block_size)

    @property
    def has_kv_events(self) -> bool:
        """Whether `drain_kv_events` would return changes (safe from any thread; see BlockManager.has_events)."""
        return self.block_manager.has_events or (self.offload is not None and self.offload.has_events)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block, in the pool and in the second tier."""
        self._quiet()
        self.run_staged_loads()
        if self.offload is not None:
            self.offload.clear()
        self.block_manager.reset_prefix_cache()
