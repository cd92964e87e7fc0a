"""A draft model for speculative decoding, proposing k tokens per sequence per step: a smaller model sharing
the target's tokenizer, with its own paged KV pool and prefix cache, or the target's own weights in int4
(`self-int4`), which drafts inside the target's pool.

Self-int4 shares the target's geometry, so it attends to the target's KV of the tokens computed so far and
writes its tentative KV into the sequence's own blocks, at the positions the verify step then overwrites
(the newest token's and the drafts'): it never catches up on a prompt (a decode worker drafts at once for
a prompt prefilled elsewhere) and needs no pool of its own. Its KV differs from what it would compute
alone: that changes which drafts it proposes, never what is emitted (rejection sampling gives the target's
distribution for any draft distribution). Those positions lie past every block the prefix cache holds.

Invariants of a draft with its own pool, per sequence it has seen (`DraftState`):
- its draft KV holds `seq.token_ids[:num_computed]` exactly; writes only go to positions >= num_computed,
  and only blocks wholly below num_computed are registered in its prefix cache;
- after a proposal it also holds the drafts fed (`fed`, after `base` tokens), which count once the target
  has accepted them (`settle`); the rest is overwritten by later steps;
- its blocks are given back when the target releases the sequence (finished, aborted, preempted), and, for a
  draft whose every layer has a window, as that window leaves them (`num_behind` leading entries of its table
  are then the pool's null block, as in engine.scheduler).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from engine.attention.planning import SeqSpan
from engine.block_manager import BlockManager, blocks_behind, hash_block, hash_blocks
from engine.config import SELF_INT4_DRAFT, EngineConfig
from engine.errors import ModelLoadError, PoolIntegrityError
from engine.loader.engine_parts import LoadedEngineParts, ShardRank, build_engine_parts
from engine.model_runner import ModelRunner
from engine.parallel.protocol import DraftFollowers, StepFollowers
from engine.parallel.shard import TPShard
from engine.sampler import Sampler, SequenceSamplingState
from engine.sequence import Sequence as EngineSequence
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)
# texts whose token ids a draft's tokenizer must give exactly as the target's does
TOKENIZER_PROBES = ("Hello, world! 1234 ünïcödé\n\tcode: def f(x): return x**2",
                    "The quick brown fox jumps over the lazy dog.")


@dataclass
class DraftState:
    block_table: list[int]
    block_hashes: list[int] = field(default_factory=list)
    num_computed: int = 0
    base: int = 0  # len(token_ids) when the last proposal was made
    fed: tuple[int, ...] = ()  # drafts whose KV that proposal wrote after `base` tokens
    num_behind: int = 0  # block_table[:num_behind] were given back: the draft's window has left them


@dataclass(frozen=True)
class Proposal:
    token_ids: list[int]
    probs: torch.Tensor | None  # [k, V] distributions drawn from; None for plain greedy (argmax drafts)


def draft_engine_config(config: EngineConfig, num_blocks: int) -> EngineConfig:
    """The draft's own engine config: its model (or the target's in int4), a pool of `num_blocks` blocks."""
    spec = config.speculative
    assert spec is not None and spec.method == "draft"
    own = spec.draft_model == SELF_INT4_DRAFT
    # (one layer group: a self-int4 draft runs over its target's pool, in its target's layout, and leaves its own
    # unused; a draft model of its own holds one block table per sequence). A tensor-parallel target's self-int4
    # draft is split as the target is, each rank's shard over that rank's pool; a draft model of its own runs whole
    # on rank 0
    return replace(config, model=config.model if own else spec.draft_model, quantization="int4" if own else None,
                   speculative=None, num_kv_blocks=num_blocks, kv_offload_bytes=0, record_kv_events=False,
                   deterministic=False, async_scheduling=False, max_model_len=None, hybrid_kv_cache=False,
                   tensor_parallel_size=config.tensor_parallel_size if own else 1)


def load_self_int4(config: EngineConfig, target: LoadedEngineParts, shard_rank: ShardRank | None = None,
                   followers: StepFollowers | None = None) -> tuple[LoadedEngineParts, ModelRunner]:
    """The target's weights in int4 (with `shard_rank`: that rank's shard of them, as the target's) and the runner
    that drafts with them inside the target's pool; `followers`: on rank 0, the ranks that follow its forwards."""
    # its own one-block pool gets no CUDA graphs or step program; its context is the target's (LongRoPE's factor
    # set: the draft rotates as the target does)
    draft_config = replace(draft_engine_config(config, 1), enforce_eager=True)
    parts = build_engine_parts(draft_config, context_of=target.max_model_len, shard_rank=shard_rank)
    return parts, self_int4_runner(config, parts, target, followers)


def self_int4_runner(config: EngineConfig, parts: LoadedEngineParts, target: LoadedEngineParts,
                     followers: StepFollowers | None = None) -> ModelRunner:
    """The int4 model of `parts` over the target's pool (it drafts inside the target's blocks)."""
    # a tensor-parallel rank's forward meets its peers' in collectives: no CUDA graph or one-call C program
    eager, cuda = config.enforce_eager or config.tensor_parallel_size > 1, target.device.type == "cuda"
    graphs = config.max_num_seqs if cuda and not eager and parts.model.supports_cuda_graphs else None
    sampler = Sampler(parts.model.config.vocab_size, target.device)  # unused: the engine's samples the drafts
    return ModelRunner(parts.model, target.pool, sampler, target.device, config.attention_backend, graphs,
                       target.max_model_len, step_program=not cuda and not eager, kv_groups=target.kv_groups,
                       followers=followers)


def check_same_tokenizer(target: Tokenizer, draft: Tokenizer, target_vocab: int, draft_vocab: int) -> None:
    """Refuse a draft whose tokens would not mean the target's (ModelLoadError says what differs)."""
    if draft_vocab != target_vocab:
        raise ModelLoadError(f"the draft model's vocabulary has {draft_vocab} rows, the target's {target_vocab}: "
                             "a draft must share the target's tokenizer")
    if set(draft.eos_token_ids) != set(target.eos_token_ids):
        raise ModelLoadError(f"the draft model ends on {draft.eos_token_ids}, the target on {target.eos_token_ids}")
    for text in TOKENIZER_PROBES:
        if draft.encode(text) != target.encode(text):
            raise ModelLoadError(f"the draft model's tokenizer splits {text!r} differently from the target's")


class DraftModel:
    def __init__(self, parts: LoadedEngineParts, runner: ModelRunner, enable_prefix_caching: bool,
                 target_blocks: BlockManager | None = None, max_model_len: int | None = None) -> None:
        self.parts = parts
        self.runner = runner
        # self-int4: the target's block manager, whose sequences' blocks hold the draft's KV; else None
        self.target_blocks = target_blocks
        self.blocks: BlockManager | None = None if target_blocks is not None else BlockManager(
            parts.pool.spec.num_blocks, parts.pool.spec.block_size, enable_prefix_caching)
        self.states: dict[str, DraftState] = {}  # a draft with its own pool: its KV of each sequence
        # a draft with its own pool whose every layer has a window: the blocks behind it are given back
        self.window = parts.kv_groups.window if target_blocks is None else 0
        self.num_blocks_behind_window_total = 0
        # positions the draft holds (a draft may know fewer than the target)
        self.max_model_len = max_model_len or parts.max_model_len
        self.last_step_seconds: list[tuple[int, float]] = []  # (rows, seconds) of each forward of the last proposal

    @classmethod
    def load(cls, config: EngineConfig, target: LoadedEngineParts, target_blocks: BlockManager) -> DraftModel:
        spec = config.speculative
        assert spec is not None
        if spec.draft_model == SELF_INT4_DRAFT:
            leader = target.tp_leader  # (the other ranks build their shards of it as they start: engine.tp_follower)
            rank0 = None if leader is None else ShardRank(TPShard(0, config.tensor_parallel_size), leader.group)
            parts, runner = load_self_int4(config, target, rank0, None if leader is None else DraftFollowers(leader))
            log.info("draft model ready: %s in int4, drafting in the target's KV pool", parts.model.config.name)
            return cls(parts, runner, config.enable_prefix_caching, target_blocks, target.max_model_len)
        # a draft of its own gets as many blocks as the target's pool holds blocks of every layer (engine.kv_groups)
        groups = target.kv_groups
        own_blocks = -(-target.pool.spec.num_blocks * groups.group_size // len(groups.placement))
        parts = build_engine_parts(draft_engine_config(config, own_blocks), context_of=target.max_model_len)
        check_same_tokenizer(target.tokenizer, parts.tokenizer, target.model_config.vocab_size,
                             parts.model_config.vocab_size)
        if parts.pool.spec.block_size != target.pool.spec.block_size:
            raise ModelLoadError("the draft's KV blocks must be the target's size")
        if not isinstance(parts.runner, ModelRunner):
            raise ModelLoadError("a draft model needs a real model runner")
        log.info("draft model ready: %s (%s), %d KV blocks", parts.model.config.name,
                 ", ".join(parts.quantized_layers[:1]) or "unquantized", parts.pool.spec.num_blocks)
        return cls(parts, parts.runner, config.enable_prefix_caching)

    # -- bookkeeping ------------------------------------------------------------------------------------
    def release(self, seq: EngineSequence) -> None:
        """Give back the blocks of `seq` (finished, aborted or preempted by the target)."""
        state = self.states.pop(seq.request_id, None)
        if state is not None and self.blocks is not None:
            self.blocks.release(state.block_table)

    def computed_tokens(self, seq: EngineSequence) -> int:
        """Tokens of `seq` its draft KV holds (0 for a sequence not seen)."""
        if self.target_blocks is not None:
            return seq.num_computed_tokens
        state = self.states.get(seq.request_id)
        return 0 if state is None else state.num_computed

    def check_integrity(self, running: Sequence[EngineSequence]) -> None:
        """Raise PoolIntegrityError unless the draft pool's references are exactly those of the states kept,
        and every state belongs to a running sequence."""
        live = {seq.request_id for seq in running}
        stale = set(self.states) - live
        if stale:
            raise PoolIntegrityError(f"the draft model holds blocks for sequences not running: {sorted(stale)}")
        refs: dict[int, int] = {}
        for state in self.states.values():
            for block_id in state.block_table[state.num_behind:]:
                refs[block_id] = refs.get(block_id, 0) + 1
        if self.blocks is not None:
            self.blocks.check_integrity(refs)

    def _own_blocks(self) -> BlockManager:
        assert self.blocks is not None, "a draft sharing the target's pool keeps no blocks of its own"
        return self.blocks

    def _settle(self, seq: EngineSequence, state: DraftState) -> None:
        """Count the drafts the target kept, and register the full blocks the draft KV now holds."""
        blocks = self._own_blocks()
        kept, tokens = 0, seq.token_ids
        after = tokens[state.base:state.base + len(state.fed)]
        while kept < len(after) and after[kept] == state.fed[kept]:
            kept += 1
        if state.fed:
            state.num_computed = state.base + kept
        state.fed = ()
        # the newest token's position is fed again when nothing after it is computed (its logits start the
        # drafts): it is never in a registered block
        state.num_computed = min(state.num_computed, len(tokens) - 1)
        size = blocks.block_size
        for i in range(len(state.block_hashes), state.num_computed // size):
            parent = state.block_hashes[-1] if state.block_hashes else seq.root_hash
            block_hash = hash_block(parent, tokens[i * size:(i + 1) * size])
            state.block_hashes.append(block_hash)
            if state.block_table[i] != blocks.null_block_id:  # (the chain goes on past a block given back)
                blocks.register_full_block(state.block_table[i], block_hash, tokens[i * size:(i + 1) * size])
        self._give_back_behind_window(state)

    def _behind(self, next_position: int) -> int:
        return blocks_behind(next_position, self.window, self._own_blocks().block_size)

    def _give_back_behind_window(self, state: DraftState) -> None:
        """Give back the blocks wholly before the window of the next position the draft computes: no later query
        (at positions >= num_computed) reads them. Registered ones stay in its prefix cache until evicted."""
        blocks = self._own_blocks()
        end = min(self._behind(state.num_computed), len(state.block_table))
        if end <= state.num_behind:
            return
        blocks.give_back(state.block_table, state.num_behind, end)
        self.num_blocks_behind_window_total += end - state.num_behind
        state.num_behind = end

    def _state_for(self, seq: EngineSequence, num_tokens: int) -> DraftState | None:
        """`seq`'s state with blocks for `num_tokens` positions (a new one starts from the prefix cache);
        None when the pool cannot hold them."""
        blocks = self._own_blocks()
        state = self.states.get(seq.request_id)
        if state is None:
            hashes = hash_blocks(seq.token_ids[:len(seq.token_ids) - 1], blocks.block_size, seq.root_hash)
            # with a window in every layer, the cached blocks within the window of the prefix's end suffice
            hits = (blocks.peek_cached_window(hashes, seq.token_ids, self._behind) if self.window
                    else list[int | None](blocks.peek_cached_prefix(hashes, seq.token_ids)))
            behind = self._behind(len(hits) * blocks.block_size)
            taken = [block_id for block_id in hits[behind:] if block_id is not None]
            assert len(taken) == len(hits) - behind, "every block within the window of the prefix's end is cached"
            if blocks.blocks_needed(num_tokens) - len(hits) + blocks.num_evictable_among(taken) \
                    > blocks.num_free_blocks:
                return None
            blocks.count_lookup(len(hashes), len(hits))  # (blocks not computed: cached, or behind the window)
            blocks.take_cached(taken)
            state = DraftState([blocks.null_block_id] * behind + taken, hashes[:len(hits)],
                               len(hits) * blocks.block_size, num_behind=behind)
            self.states[seq.request_id] = state
        else:
            self._settle(seq, state)
        need = blocks.blocks_needed(num_tokens) - len(state.block_table)
        if need > blocks.num_free_blocks:  # the draft pool is full: this sequence's draft KV goes
            self.release(seq)
            return None
        if need > 0:
            state.block_table.extend(blocks.allocate(need))
        return state

    # -- proposing --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, seqs: Sequence[tuple[EngineSequence, int]], sampler: Sampler,
                max_catch_up_tokens: int) -> dict[str, Proposal]:
        """Drafts for each (sequence, k) in `seqs` (sequences not in prefill, k >= 1). With a pool of its own, a
        sequence whose draft KV lags by more than `max_catch_up_tokens` (summed over the batch) or that finds no
        draft blocks only catches up this step. Draws use each request's own generator when seeded; the
        sequences' sampling states are as they were on return."""
        self.last_step_seconds = []
        if self.target_blocks is not None:
            return self._propose_in_target_pool(seqs, sampler, self.target_blocks)
        work: list[tuple[EngineSequence, int, list[list[int]]]] = []
        spans: list[tuple[EngineSequence, DraftState, int]] = []  # catch-up: (seq, state, tokens fed)
        budget = max_catch_up_tokens
        for seq, k in seqs:
            state = self._state_for(seq, len(seq.token_ids) + k - 1)
            if state is None:
                continue
            lag = len(seq.token_ids) - state.num_computed
            feed = min(lag, max(budget, 1))
            budget -= feed
            spans.append((seq, state, feed))
            if feed == lag:
                work.append((seq, k, [state.block_table]))
        if not spans:
            return {}
        spans.sort(key=lambda s: s[2] != 1)  # single-token spans first (the attention planner's decode batch)
        token_ids: list[int] = []
        seq_spans: list[SeqSpan] = []
        for seq, state, feed in spans:
            token_ids.extend(seq.token_ids[state.num_computed:state.num_computed + feed])
            seq_spans.append(SeqSpan(state.block_table, state.num_computed, feed))
        logits = self._timed_span_logits(token_ids, seq_spans)
        for _, state, feed in spans:
            state.num_computed += feed
        drafting = {seq.request_id for seq, _, _ in work}
        first = {seq.request_id: logits[i] for i, (seq, _, _) in enumerate(spans) if seq.request_id in drafting}
        proposals = self._draft(work, first, sampler)
        for seq, _, _ in work:  # the draft KV now also holds every draft but the last (`_settle` counts the kept)
            state = self.states[seq.request_id]
            state.base, state.fed = len(seq.token_ids), tuple(proposals[seq.request_id].token_ids[:-1])
        return proposals

    def _propose_in_target_pool(self, seqs: Sequence[tuple[EngineSequence, int]], sampler: Sampler,
                                blocks: BlockManager) -> dict[str, Proposal]:
        """Self-int4: each sequence's blocks (every layer group's), extended to the verify step's last position where
        blocks are free (the scheduler then allocates none), take the draft's KV from the newest token's position
        on."""
        work: list[tuple[EngineSequence, int, list[list[int]]]] = []
        for seq, k in seqs:
            n = len(seq.token_ids)
            wanted = blocks.blocks_needed(n + k)
            if seq.num_computed_tokens != n - 1 or blocks.shortfall(seq.tables, wanted) > blocks.num_free_blocks:
                continue
            blocks.extend(seq.tables, wanted)
            work.append((seq, k, seq.tables))
        if not work:
            return {}
        logits = self._timed_logits([seq.token_ids[-1] for seq, _, _ in work],
                                    [(tables, len(seq.token_ids) - 1) for seq, _, tables in work])
        return self._draft(work, {seq.request_id: logits[i] for i, (seq, _, _) in enumerate(work)}, sampler)

    def _draft(self, work: list[tuple[EngineSequence, int, list[list[int]]]], first: dict[str, torch.Tensor],
               sampler: Sampler) -> dict[str, Proposal]:
        """Draw each (sequence, k, block tables)'s drafts, from `first` (the logits after its newest token) on."""
        drafts: dict[str, list[int]] = {seq.request_id: [] for seq, _, _ in work}
        probs: dict[str, list[torch.Tensor]] = {seq.request_id: [] for seq, _, _ in work}
        try:
            live = work
            rows = torch.stack([first[seq.request_id] for seq, _, _ in live]) if live else None
            while live and rows is not None:
                q = sampler.distributions(rows, [seq.sampling_state for seq, _, _ in live])
                for i, (seq, _, _) in enumerate(live):
                    token = _pick(q[i], seq.sampling_state, sampler)
                    seq.sampling_state.append(token)  # the next draft is scored as if this one were generated
                    drafts[seq.request_id].append(token)  # (after the append: `finally` retracts exactly these)
                    probs[seq.request_id].append(q[i])
                live = [w for w in live if len(drafts[w[0].request_id]) < w[1]]
                if not live:
                    break
                rows = self._timed_logits([drafts[seq.request_id][-1] for seq, _, _ in live],
                                          [(tables, len(seq.token_ids) + len(drafts[seq.request_id]) - 1)
                                           for seq, _, tables in live])
        finally:
            for seq, _, _ in work:
                seq.sampling_state.retract(drafts[seq.request_id])
        out: dict[str, Proposal] = {}
        for seq, _, _ in work:
            plain = seq.sampling_state.is_plain_greedy
            out[seq.request_id] = Proposal(drafts[seq.request_id],
                                           None if plain else torch.stack(probs[seq.request_id]))
        return out

    def _timed_logits(self, token_ids: list[int], feeds: list[tuple[list[list[int]], int]]) -> torch.Tensor:
        """The logits after each single token fed: (its sequence's block tables, one per layer group; position)."""
        return self._timed_span_logits(token_ids, [SeqSpan(tables[0], start, 1) for tables, start in feeds],
                                       [tables[1:] for tables, _ in feeds])

    def _timed_span_logits(self, token_ids: list[int], spans: list[SeqSpan],
                           group_tables: list[list[list[int]]] | None = None) -> torch.Tensor:
        started = time.perf_counter()
        logits = self.runner.logits_at_ends(token_ids, spans, group_tables or ())
        if self.parts.device.type == "cuda":
            torch.cuda.current_stream(self.parts.device).synchronize()
        self.last_step_seconds.append((len(token_ids), time.perf_counter() - started))
        return logits


def _pick(q: torch.Tensor, state: SequenceSamplingState, sampler: Sampler) -> int:
    if state.params.is_greedy:
        return int(q.argmax())
    return sampler.draw(q, state)
