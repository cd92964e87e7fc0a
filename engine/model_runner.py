"""Turns a `SchedulerOutput` into tensors, runs the model and samples.

The runner owns the model, the KV pool and the sampler; it never decides what runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, TypeVar

import torch

from common.settings import triton_interpreted
from engine.attention.cpu_backend import (
    AMX_PREFILL_MIN_QUERIES,
    DENSE_MAX_CONTEXT_PER_QUERY,
    DENSE_PREFILL_MIN_QUERIES,
    CpuAttention,
    amx_prefill_supported,
    cpu_attention_supported,
)
from engine.attention.metadata import AttentionFn, AttentionMetadata, AttentionShape
from engine.attention.planning import SeqSpan, attention_metadata
from engine.attention.torch_backend import TorchAttention
from engine.attention.triton_backend import TritonAttention, triton_attention_problem
from engine.config import AttentionBackend
from engine.cuda_graphs import CudaGraphDecoder
from engine.kv_cache import KVCachePool
from engine.kv_groups import KVGroups
from engine.kv_hooks import LayerObserver, LayerReady, ObservedAttention, cuda_layer_event
from engine.logprobs import prompt_row_chunks, prompt_token_logprobs, token_logprobs
from engine.models.llama import LlamaForCausalLM
from engine.outputs import TokenLogprobs
from engine.parallel.protocol import FollowerStep, StepFollowers
from engine.sampler import Sampler
from engine.scheduler import ScheduledSequence, SchedulerOutput
from engine.spec_sampling import verify_by_rejection
from engine.step_program import StepProgram

T = TypeVar("T")


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attention: AttentionMetadata
    sample_rows: tuple[tuple[ScheduledSequence, int, int], ...]  # (item, first logits row, row count)
    logits_indices: torch.Tensor
    # prefill chunks of requests that want prompt logprobs: (item, first row in prompt_indices, count);
    # row j of an item is its position item.start + j, whose logits score prompt token start + j + 1
    prompt_rows: tuple[tuple[ScheduledSequence, int, int], ...] = ()
    prompt_indices: torch.Tensor | None = None
    # async scheduling: rows of input_ids whose token the step in flight samples, as (row, item); the token
    # is item.seq.token_ids[item.start + known - 1] once committed (`fill_awaited` puts it in)
    awaited: tuple[tuple[int, ScheduledSequence], ...] = ()
    # a speculative verify step: every item feeds its newest token and its drafts only (no prompt chunk), and some
    # have drafts; the step program may take its rows at once. Other steps of several rows stay eager, whose
    # oneDNN product computes a row alike whatever the row count (async scheduling's exactness rests on it)
    verifying: bool = False
    # tensor parallelism: the spans as built (block tables copied: the scheduler may change them before the step
    # runs) and their further groups' tables, for the other ranks (engine.parallel); empty with one rank
    spans: tuple[tuple[tuple[int, ...], int, int], ...] = ()
    group_tables: tuple[tuple[tuple[int, ...], ...], ...] = ()
    request_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class SequenceResult:
    token_ids: list[int]  # accepted drafts followed by the newly sampled token (none mid-prefill)
    logprobs: list[TokenLogprobs | None]
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()  # of prompt tokens prompt_logprobs_start, ...
    prompt_logprobs_start: int = 0


class StepRunner(Protocol):
    """What the engine asks of a runner: this module's ModelRunner, or engine.simulated's."""

    layer_observer: LayerObserver | None  # set for one step by a KV push hook

    def execute(self, out: SchedulerOutput) -> dict[str, SequenceResult]: ...


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, pool: KVCachePool, sampler: Sampler, device: torch.device,
                 backend: AttentionBackend = "auto", cuda_graph_max_batch: int | None = None,
                 max_model_len: int = 8192, batch_invariant: bool = False, step_program: bool = False,
                 kv_groups: KVGroups | None = None, followers: StepFollowers | None = None) -> None:
        """`kv_groups`: how the model's layers share `pool` (by default one group: a pool layer per model layer);
        `followers`: rank 0 of a tensor-parallel group hands them each step before running it (engine.parallel)."""
        self.model = model
        self.followers = followers
        self.pool = pool
        self.sampler = sampler
        self.device = device
        self.block_size = pool.spec.block_size
        cfg = model.config
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.shape = AttentionShape.of(cfg)
        self.kv_groups = kv_groups or KVGroups.single(cfg.num_layers, cfg.window_of_every_layer)
        if self.kv_groups.group_size != pool.spec.num_layers:
            raise ValueError(f"a pool of {pool.spec.num_layers} layers does not hold groups of "
                             f"{self.kv_groups.group_size} (engine.kv_groups)")
        # each group's attention, by pool layer (its slots): the windows of the model layers placed there
        self.group_shapes = (tuple(replace(self.shape, windows=self.kv_groups.slot_windows(g, cfg.sliding_windows))
                                   for g in range(self.kv_groups.num_groups))
                             if self.kv_groups.is_hybrid else (self.shape,))
        self.use_triton = self._pick_triton(backend)
        self.use_cpu_kernel = self._pick_cpu(backend)
        # long prompts through the AMX tiles or torch's flash kernel, except where a row must not depend on how
        # its prompt was chunked (batch-invariant mode) or the model caps scores (which neither can)
        dense = self.use_cpu_kernel and not batch_invariant and not self.shape.softcap
        amx = dense and amx_prefill_supported(pool, self.shape)
        self.dense_min_queries = 0 if not dense else AMX_PREFILL_MIN_QUERIES if amx else DENSE_PREFILL_MIN_QUERIES
        self.dense_max_context_per_query = 0 if amx else DENSE_MAX_CONTEXT_PER_QUERY
        self.graphs: CudaGraphDecoder | None = None
        self.layer_observer: LayerObserver | None = None  # set for one step by a KV push hook
        # what marks a layer's KV writes on the device for the observer to wait on (None: a CPU's writes are done)
        self.layer_events: Callable[[], LayerReady] | None = cuda_layer_event if device.type == "cuda" else None
        if self.use_triton and cuda_graph_max_batch and not self.kv_groups.is_hybrid:  # (one block table per step)
            self.graphs = CudaGraphDecoder(model, pool, cuda_graph_max_batch, max_model_len)
        # decode steps of a few tokens as one C call where every kernel of the model has one (engine/step_program.py)
        self.program = (StepProgram.build(model, pool, self.shape, pool.compute_dtype)  # (one block table per step)
                        if step_program and self.use_cpu_kernel and not self.kv_groups.is_hybrid else None)

    def _pick_triton(self, backend: AttentionBackend) -> bool:
        """The Triton kernel: on CUDA by default where it can serve; asked for, it must (on CPU it runs only in
        Triton's interpreter, for tests)."""
        if backend in ("torch", "cpu"):
            return False
        problem = triton_attention_problem(self.pool, self.shape)
        if problem is None and not self.pool.tensor.is_cuda and not triton_interpreted():
            problem = "it runs on CUDA (on CPU only in Triton's interpreter, for tests: TRITON_INTERPRET=1)"
        if backend == "triton" and problem is not None:
            raise ValueError(f"attention_backend='triton' cannot serve here: {problem}")
        return backend == "triton" or (problem is None and self.pool.tensor.is_cuda)

    def _pick_cpu(self, backend: AttentionBackend) -> bool:
        if backend in ("torch", "triton"):
            return False
        supported = cpu_attention_supported(self.pool, self.head_dim, self.num_heads)
        if backend == "cpu" and not supported:
            raise ValueError("attention_backend='cpu' needs a CPU pool in fp32 or bf16 (compute and cache), "
                             "head_dim a multiple of 8 up to 256, at most 128 heads, blocks of at most 64 tokens, "
                             "and a C compiler (not TANDEM_DISABLE_C_KERNELS)")
        return supported

    def _attention(self, meta: AttentionMetadata) -> AttentionFn:
        if not meta.groups:
            return self._group_attention(self.shape, meta)
        return _GroupedAttention([self._group_attention(shape, group_meta) for shape, group_meta
                                  in zip(self.group_shapes, (meta, *meta.groups), strict=True)],
                                 self.kv_groups.placement)

    def _group_attention(self, shape: AttentionShape, meta: AttentionMetadata) -> AttentionFn:
        if self.use_cpu_kernel:
            return CpuAttention(self.pool, shape, meta)
        if self.use_triton:
            return TritonAttention(self.pool, shape, meta)
        return TorchAttention(self.pool, shape, meta)

    def _metadata(self, spans: list[SeqSpan], group_tables: Sequence[Sequence[list[int]]] = ()) -> AttentionMetadata:
        """The step's metadata for `spans`; in a hybrid layout with each further group's, from `group_tables`
        (per span, its tables of groups 1, 2, ...)."""
        def build(group_spans: list[SeqSpan]) -> AttentionMetadata:
            return attention_metadata(group_spans, self.block_size, self.device, self.pool.compute_dtype,
                                      self.use_cpu_kernel, self.dense_min_queries, self.dense_max_context_per_query,
                                      paged=self.use_triton)

        others = tuple(build([replace(span, block_table=tables[g]) for span, tables in zip(spans, group_tables,
                                                                                          strict=True)])
                       for g in range(self.kv_groups.num_groups - 1))
        return replace(build(spans), groups=others) if others else build(spans)

    def prepare(self, out: SchedulerOutput) -> StepInputs:
        ids: list[int] = []
        sample_rows: list[tuple[ScheduledSequence, int, int]] = []
        logits_rows: list[int] = []
        prompt_rows: list[tuple[ScheduledSequence, int, int]] = []
        prompt_indices: list[int] = []
        awaited: list[tuple[int, ScheduledSequence]] = []
        for item in out.scheduled:
            start_token = len(ids)
            ids.extend(item.input_token_ids())
            if len(ids) - start_token < item.num_tokens:  # only the newest token can be awaited
                awaited.append((len(ids), item))
                ids.append(0)
            if item.samples:
                rows = len(item.draft_token_ids) + 1
                sample_rows.append((item, len(logits_rows), rows))
                logits_rows.extend(range(start_token + item.num_tokens - rows, start_token + item.num_tokens))
            if item.seq.needs_prompt_logits:  # positions before the prompt's last score a prompt token
                count = min(item.start + item.num_tokens, item.seq.num_prompt_tokens - 1) - item.start
                if count > 0:
                    prompt_rows.append((item, len(prompt_indices), count))
                    prompt_indices.extend(range(start_token, start_token + count))
        spans = [SeqSpan(item.seq.block_table, item.start, item.num_tokens) for item in out.scheduled]
        positions = [p for s in spans for p in range(s.start, s.context_len)]
        meta = self._metadata(spans, [item.seq.group_tables for item in out.scheduled])
        items = out.scheduled
        verifying = (any(item.draft_token_ids for item in items)
                     and all(item.samples and item.num_tokens == 1 + len(item.draft_token_ids) for item in items))
        shared: tuple[tuple[tuple[int, ...], int, int], ...] = ()
        shared_groups: tuple[tuple[tuple[int, ...], ...], ...] = ()
        if self.followers is not None:
            shared = tuple((tuple(s.block_table), s.start, s.num_tokens) for s in spans)
            shared_groups = tuple(tuple(tuple(t) for t in item.seq.group_tables) for item in items)
        return StepInputs(self._tensor(ids), self._tensor(positions), meta, tuple(sample_rows),
                          self._tensor(logits_rows), tuple(prompt_rows),
                          self._tensor(prompt_indices) if prompt_indices else None, tuple(awaited), verifying,
                          shared, shared_groups,
                          tuple(item.seq.request_id for item in items) if self.followers is not None else ())

    def fill_awaited(self, inputs: StepInputs) -> StepInputs:
        """`inputs` prepared while the step before ran (async scheduling), completed once that step is committed:
        the awaited tokens put in, and no sampling for sequences known to have ended (their rows are computed in
        vain; one ended by a stop string found later is still sampled, and its token dropped)."""
        if inputs.awaited:
            rows = self._tensor([row for row, _ in inputs.awaited])
            tokens = [item.seq.token_ids[item.start + item.num_tokens - 1] for _, item in inputs.awaited]
            inputs.input_ids.index_copy_(0, rows, self._tensor(tokens))
        live = tuple(row for row in inputs.sample_rows if not row[0].seq.is_finished)
        return replace(inputs, sample_rows=live, awaited=())

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def execute(self, out: SchedulerOutput) -> dict[str, SequenceResult]:
        return self.execute_prepared(self.prepare(out))

    @torch.inference_mode()
    def execute_prepared(self, inputs: StepInputs) -> dict[str, SequenceResult]:
        """Run the model on `inputs` and sample (any one thread at a time: the sampler reads the sampled sequences'
        states and moves their seeded generators and grammar matchers, which nothing else touches meanwhile)."""
        if inputs.awaited:
            raise ValueError("the step's inputs still await tokens: fill_awaited first")
        if self.followers is None:
            return self._run_prepared(inputs)
        return self._led(FollowerStep(
            tuple(inputs.input_ids.tolist()), inputs.request_ids, inputs.spans, inputs.group_tables,
            tuple(inputs.logits_indices.tolist()) if inputs.sample_rows else None,
            () if inputs.prompt_indices is None else tuple(inputs.prompt_indices.tolist()),
            tuple(count for _, _, count in inputs.prompt_rows)), lambda: self._run_prepared(inputs))

    def _led(self, step: FollowerStep, run: Callable[[], T]) -> T:
        """Rank 0 of a tensor-parallel group: hand the other ranks `step`, then run it here."""
        assert self.followers is not None
        self.followers.send(step)
        try:
            return run()
        except BaseException as exc:  # the other ranks are inside this step's collectives: no later step meets them
            self.followers.abandon(repr(exc))
            raise

    def _run_prepared(self, inputs: StepInputs) -> dict[str, SequenceResult]:
        hidden = self._forward(inputs.input_ids, inputs.positions, inputs.attention, self.layer_observer,
                               inputs.verifying)
        results: dict[str, SequenceResult] = {}
        if inputs.sample_rows:
            logits = self.model.sampling_logits(hidden.index_select(0, inputs.logits_indices))
            results = self._sample(logits, inputs.sample_rows)
        if inputs.prompt_indices is not None:
            self._add_prompt_logprobs(results, hidden.index_select(0, inputs.prompt_indices), inputs.prompt_rows)
        return results

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 observer: LayerObserver | None, several_rows: bool) -> torch.Tensor:
        """The model's hidden states; `several_rows`: the step program may run a step of more than one token."""
        if observer is None and self.graphs is not None and self.graphs.can_run(meta):
            return self.graphs.run(input_ids, positions, meta)
        if (observer is None and self.program is not None and self.program.can_run(meta)
                and (several_rows or input_ids.shape[0] == 1)):
            return self.program.run(input_ids, positions, meta)
        attn = self._attention(meta)
        if observer is not None:
            attn = ObservedAttention(attn, observer, self.layer_events)
        return self.model(input_ids, positions, attn)

    @torch.inference_mode()
    def follow(self, step: FollowerStep, observer: LayerObserver | None = None) -> None:
        """Run on a tensor-parallel rank other than 0 the step rank 0 runs (`execute_prepared`, or a self-int4 draft's
        `logits_at_ends`): the same forward and
        the same lm_head calls on the same rows, whose collectives meet rank 0's; rank 0 samples from their logits.
        `observer`: called as each layer's KV is written (a KV push, as `layer_observer` on rank 0)."""
        spans = [SeqSpan(list(table), start, count) for table, start, count in step.spans]
        positions = [p for s in spans for p in range(s.start, s.context_len)]
        meta = self._metadata(spans, [[list(t) for t in tables] for tables in step.group_tables])
        attn = self._attention(meta)
        if observer is not None:
            attn = ObservedAttention(attn, observer, self.layer_events)
        hidden = self.model(self._tensor(list(step.input_ids)), self._tensor(positions), attn)
        if step.logits_indices is not None:
            self.model.sampling_logits(hidden.index_select(0, self._tensor(list(step.logits_indices))))
        if step.prompt_indices:
            rows, first = hidden.index_select(0, self._tensor(list(step.prompt_indices))), 0
            for count in step.prompt_counts:
                for start, stop in prompt_row_chunks(count):
                    self.model.compute_logits(rows[first + start:first + stop])
                first += count

    @torch.inference_mode()
    def logits_at_ends(self, token_ids: list[int], spans: list[SeqSpan],
                       group_tables: Sequence[Sequence[list[int]]] = ()) -> torch.Tensor:
        """Feed `token_ids` (each span's tokens in turn; single-token spans first) and return the logits
        [len(spans), V] at each span's last position: a forward with no sampling (a draft model's). In a hybrid
        layout `group_tables` holds each span's tables of groups 1, 2, ... (engine.kv_groups)."""
        ends, end = [], -1
        for span in spans:
            end += span.num_tokens
            ends.append(end)

        def run() -> torch.Tensor:
            positions = [p for s in spans for p in range(s.start, s.context_len)]
            meta = self._metadata(spans, group_tables)
            hidden = self._forward(self._tensor(token_ids), self._tensor(positions), meta, None, True)
            return self.model.sampling_logits(hidden.index_select(0, self._tensor(ends)))

        if self.followers is None:
            return run()
        return self._led(FollowerStep(tuple(token_ids), (), tuple((tuple(s.block_table), s.start, s.num_tokens)
                                                                  for s in spans),
                                      tuple(tuple(tuple(t) for t in tables) for tables in group_tables),
                                      tuple(ends), (), ()), run)

    def _add_prompt_logprobs(self, results: dict[str, SequenceResult], hidden: torch.Tensor,
                             rows: tuple[tuple[ScheduledSequence, int, int], ...]) -> None:
        for item, first, count in rows:
            seq = item.seq
            found = prompt_token_logprobs(hidden[first:first + count],
                                          seq.prompt_token_ids[item.start + 1:item.start + 1 + count],
                                          seq.params.prompt_logprobs or 0, self.model.compute_logits)
            sampled = results.get(seq.request_id, SequenceResult([], []))
            results[seq.request_id] = replace(sampled, prompt_logprobs=tuple(found),
                                              prompt_logprobs_start=item.start + 1)

    def _sample(self, logits: torch.Tensor, rows: tuple[tuple[ScheduledSequence, int, int], ...]
                ) -> dict[str, SequenceResult]:
        results: dict[str, SequenceResult] = {}
        plain = [(item, first) for item, first, count in rows if count == 1]
        if plain:
            firsts = [first for _, first in plain]
            in_order = firsts == list(range(logits.shape[0]))
            rows_logits = logits if in_order else logits.index_select(0, self._tensor(firsts))
            sampled = self.sampler(rows_logits, [item.seq.sampling_state for item, _ in plain])
            for (item, _), token, lp in zip(plain, sampled.token_ids, sampled.logprobs, strict=True):
                results[item.seq.request_id] = SequenceResult([token], [lp])
        for item, first, count in rows:
            if count == 1:
                continue
            seq, rows_logits = item.seq, logits[first:first + count]
            if seq.spec_draft_probs is None:  # greedy verification: keep the agreeing prefix + 1 token
                tokens = self.sampler.verify_greedy_drafts(rows_logits, seq.sampling_state, item.draft_token_ids)
            else:  # a draft model's drafts: rejection sampling (engine.spec_sampling)
                tokens = verify_by_rejection(self.sampler, rows_logits, seq.sampling_state, item.draft_token_ids,
                                             seq.spec_draft_probs)
            wanted = seq.params.logprobs
            found: list[TokenLogprobs | None] = (
                list(token_logprobs(rows_logits[:len(tokens)], tokens, [wanted] * len(tokens)))
                if wanted is not None else [None] * len(tokens))
            results[seq.request_id] = SequenceResult(tokens, found)
        return results


class _GroupedAttention:
    """A hybrid layout's attention (engine.kv_groups): each model layer through its group's backend, at its slot."""

    def __init__(self, backends: list[AttentionFn], placement: tuple[tuple[int, int], ...]) -> None:
        self._backends, self._placement = backends, placement

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        group, slot = self._placement[layer]
        return self._backends[group](slot, q, k, v)
