"""Continuous batching under a per-step token budget, with chunked prefill and preemption.

Each step the scheduler first serves running sequences (a decode token each, or the next chunk
of a prefill, plus speculative draft tokens), preempting the lowest-priority running sequence
(by recompute: its blocks are released, it waits again) when blocks run out; then it admits
waiting sequences, reusing cached prefix blocks. Its only product is a `SchedulerOutput`.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from engine.block_manager import BlockManager, blocks_behind, group_key, group_keys, hash_block, hash_blocks
from engine.config import SchedulerConfig
from engine.errors import OutOfKVBlocksError
from engine.kv_groups import KVGroups
from engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledSequence:
    seq: Sequence
    start: int  # position of the first token fed (== seq.num_computed_tokens when scheduled)
    num_tokens: int  # tokens fed this step, drafts included
    draft_token_ids: tuple[int, ...]

    # whether this step reaches the end of the known tokens (a token still awaited from the step in flight
    # counts), so the model's output is sampled; fixed when scheduled, as the sequence grows after
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        known = len(self.seq.token_ids) + self.seq.awaiting_token
        object.__setattr__(self, "samples", self.start + self.num_tokens - len(self.draft_token_ids) == known)

    def input_token_ids(self) -> list[int]:
        """The tokens fed, as far as they are known now: a token awaited from the step in flight (async
        scheduling) is missing at the end until that step is committed."""
        known = self.num_tokens - len(self.draft_token_ids)
        return self.seq.token_ids[self.start:self.start + known] + list(self.draft_token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    """The one scheduler → runner contract. Decodes (one token each) come first in token order."""

    decodes: tuple[ScheduledSequence, ...]
    segments: tuple[ScheduledSequence, ...]
    preempted: tuple[Sequence, ...]

    @property
    def scheduled(self) -> tuple[ScheduledSequence, ...]:
        return self.decodes + self.segments

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.segments


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, window: int = 0,
                 groups: KVGroups | None = None) -> None:
        """`groups`: the pool's layer groups (engine.kv_groups), a table each per sequence; by default one, with
        `window` > 0 when every layer of the model attends to the last `window` positions only. A windowed group's
        blocks that lie wholly before the window of a running sequence's next position are given back as it goes
        (its table keeps the block manager's null block in their place)."""
        self.config = config
        self.blocks = block_manager
        if groups is not None and window:
            raise ValueError("give the scheduler a window or layer groups, not both")
        self.groups = groups or KVGroups.single(1, window)
        self.window = self.groups.window  # 0 turns giving back off (bench.window_kv compares both ways)
        self.num_blocks_behind_window_total = 0  # blocks given back behind a window, summed over the groups
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions_total = 0
        # called with each sequence that gives back its blocks (finished or preempted): a draft model drops its own
        self.on_release: Callable[[Sequence], None] | None = None

    # -- queue ------------------------------------------------------------------------------------------
    def _rank(self, seq: Sequence) -> tuple[float, ...]:
        if self.config.policy == "priority":
            return (seq.priority, seq.arrival_time)
        return (seq.arrival_time,)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.waiting.sort(key=self._rank)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence wherever it is and give back its blocks (a parked one's are engine.remote_kv's)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.release_tables(seq)
        seq.status = SequenceStatus.FINISHED
        if self.on_release is not None:
            self.on_release(seq)
        seq.finish_reason = reason

    def _windowed(self, group: int) -> bool:
        """Whether `group` gives back its blocks behind the window."""
        return self.window > 0 and self.groups.windows[group] > 0

    def held_blocks(self, seq: Sequence) -> list[int]:
        """Every block `seq` holds, in every group's table."""
        behind = seq.num_blocks_behind_window
        return [b for g, table in enumerate(seq.tables) for b in (table[behind:] if self._windowed(g) else table)]

    def release_tables(self, seq: Sequence) -> None:
        """Give back every block `seq` holds and empty its tables."""
        for table in seq.tables:
            self.blocks.release(table)
        seq.drop_tables()

    def _skips(self, behind: int) -> list[int]:
        """Per group, the leading blocks its table leaves to the null block when `behind` are behind the window."""
        return [behind if self._windowed(g) else 0 for g in range(self.groups.num_groups)]

    def _set_tables(self, seq: Sequence, tables: list[list[int]], behind: int) -> None:
        seq.block_table, seq.group_tables, seq.num_blocks_behind_window = tables[0], tables[1:], behind

    # -- sequences that do not come through the waiting queue (engine.remote_kv) -------------------------
    def allocate_fresh(self, seq: Sequence) -> None:
        """Give `seq` fresh blocks (no prefix-cache hits) for its tokens, or raise OutOfKVBlocksError and leave
        it unchanged; in a windowed group, only for those the window of its next position reaches (the null
        block stands for the others: `seq.num_blocks_behind_window` of them)."""
        total = self.blocks.blocks_needed(len(seq.token_ids))
        behind = min(self.blocks_behind_window(len(seq.token_ids)), total)
        skips = self._skips(behind)
        need = sum(total - skip for skip in skips)
        if need > self.blocks.num_free_blocks:
            raise OutOfKVBlocksError(f"request {seq.request_id!r} needs {need} KV blocks, "
                                     f"{self.blocks.num_free_blocks} are free")
        self._set_tables(seq, [[self.blocks.null_block_id] * skip + self.blocks.allocate(total - skip)
                               for skip in skips], behind)

    def blocks_behind_window(self, next_position: int) -> int:
        """How many leading blocks of a windowed group no query at `next_position` or later reads (its window
        has left them); 0 without windowed groups."""
        return blocks_behind(next_position, self.window, self.blocks.block_size)

    def join_running(self, seq: Sequence) -> ScheduledSequence:
        """`seq`'s prompt KV was computed elsewhere into its blocks: it joins the running batch (even
        past max_num_seqs: its blocks are already held). Returns the step that computed it, for `commit`."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return ScheduledSequence(seq, 0, len(seq.token_ids), ())

    def add_first(self, seq: Sequence) -> None:
        """Queue `seq` ahead of every waiting sequence (it already waited elsewhere)."""
        seq.status = SequenceStatus.WAITING
        self.waiting.insert(0, seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.release_tables(seq)
        seq.block_hashes, seq.spec_token_ids, seq.spec_draft_probs = [], [], None
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions_total += 1
        if self.on_release is not None:
            self.on_release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.insert(0, seq)
        self.waiting.sort(key=self._rank)

    # -- scheduling -------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted: list[Sequence] = []
        for seq in sorted(self.running, key=self._rank):
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue
            item = self._plan_running(seq, budget)
            if item is None:
                continue
            if not self._reserve(seq, item.start + item.num_tokens, preempted):
                continue
            scheduled.append(item)
            budget -= item.num_tokens
        if not preempted:
            budget = self._admit_waiting(budget, scheduled)
        decodes = tuple(s for s in scheduled if s.num_tokens == 1)
        segments = tuple(s for s in scheduled if s.num_tokens > 1)
        return SchedulerOutput(decodes, segments, tuple(preempted))

    def _plan_running(self, seq: Sequence, budget: int) -> ScheduledSequence | None:
        remaining = len(seq.token_ids) + seq.awaiting_token - seq.num_computed_tokens
        if remaining <= 0:  # async scheduling: its step in flight gives its last token
            return None
        drafts = tuple(seq.spec_token_ids)
        if remaining + len(drafts) <= budget:
            return ScheduledSequence(seq, seq.num_computed_tokens, remaining + len(drafts), drafts)
        if not self.config.enable_chunked_prefill and remaining > budget:
            return None
        return ScheduledSequence(seq, seq.num_computed_tokens, min(remaining, budget), ())

    def _reserve(self, seq: Sequence, num_tokens: int, preempted: list[Sequence]) -> bool:
        """Give `seq` blocks for `num_tokens` tokens, preempting lower-ranked sequences if needed.
        Returns False if `seq` itself had to be preempted."""
        wanted = self.blocks.blocks_needed(num_tokens)
        while self.blocks.shortfall(seq.tables, wanted) > self.blocks.num_free_blocks:
            victim = max(self.running, key=self._rank)
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        self.blocks.extend(seq.tables, wanted)
        return True

    def cached_prefix_blocks(self, hashes: Seq[int], token_ids: Seq[int]) -> list[list[int | None]]:
        """Per group, its blocks of the longest run of leading blocks whose KV need not be computed (every
        group's lists are as long): a global group's are all cached, a windowed group's are cached from the
        window of the run's end on, None before it (engine.block_manager.peek_cached_window). A look: no stats."""
        def hits(group: int, count: int) -> list[int | None]:
            keys = group_keys(hashes[:count], group)
            if self._windowed(group):
                return self.blocks.peek_cached_window(keys, token_ids, self.blocks_behind_window)
            return list(self.blocks.peek_cached_prefix(keys, token_ids))

        count = len(hashes)
        while True:  # each group's run within the shortest: a run for every group shortens only
            found = [hits(g, count) for g in range(self.groups.num_groups)]
            shortest = min(len(f) for f in found)
            if shortest == count or self.groups.num_groups == 1:
                return found
            count = shortest

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledSequence]) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            # Keep at least the last token to compute: its logits produce the next token.
            hashes = hash_blocks(seq.token_ids[:len(seq.token_ids) - 1], self.blocks.block_size, seq.root_hash)
            reads_cache = not seq.needs_prompt_logits
            # a windowed group's blocks behind the window of the first position to compute may be missing
            group_hits = (self.cached_prefix_blocks(hashes, seq.token_ids) if reads_cache
                          else [[] for _ in range(self.groups.num_groups)])
            hits = group_hits[0]
            offload = self.blocks.offload
            assert offload is None or self.groups.num_groups == 1, "a second tier holds one group's blocks"

            # blocks the pool lacks that the second tier holds: loaded into fresh blocks, not computed
            tier_lookup = reads_cache and len(hits) < len(hashes)
            offloaded = (offload.match(hashes[len(hits):], seq.token_ids, len(hits))
                         if offload is not None and tier_lookup else [])
            computed = (len(hits) + len(offloaded)) * self.blocks.block_size
            remaining = len(seq.token_ids) - computed
            if remaining > budget and not self.config.enable_chunked_prefill:
                break
            num_tokens = min(remaining, budget)
            # cached blocks behind the window of the first position to compute are neither taken nor loaded: a
            # prefix longer than the pool is served from its last window
            behind = self.blocks_behind_window(computed)
            skips = self._skips(behind)
            taken = [[block_id for block_id in group[skip:] if block_id is not None]
                     for group, skip in zip(group_hits, skips, strict=True)]
            assert all(len(t) == len(h[s:]) for t, h, s in zip(taken, group_hits, skips, strict=True)), \
                "every block within the window of `computed` is cached"
            skipped_loads = max(behind - len(hits), 0)
            loads = offloaded[skipped_loads:]
            total = self.blocks.blocks_needed(computed + num_tokens)
            needs = [total - skip - len(t) for t, skip in zip(taken, skips, strict=True)]
            held = [block_id for t in taken for block_id in t]
            if sum(needs) + self.blocks.num_evictable_among(held) > self.blocks.num_free_blocks:
                break
            self.waiting.pop(0)
            if reads_cache:
                self.blocks.count_lookup(len(hashes), len(hits))  # blocks not computed: cached, or behind the window
            self.blocks.take_cached(held)
            fresh = [self.blocks.allocate(need) for need in needs]
            if offload is not None and tier_lookup and loads:
                loaded = fresh[0][:len(loads)]
                # copied by the engine before the next forward (one may be running now, async scheduling); the
                # blocks are registered now: whoever finds them reads them in a later forward too
                offload.stage(loads, loaded, len(hashes) - len(hits))
                size = self.blocks.block_size
                first = len(hits) + skipped_loads
                for i, (block_id, block_hash) in enumerate(zip(loaded, loads, strict=True), start=first):
                    self.blocks.register_full_block(block_id, block_hash, seq.token_ids[i * size:(i + 1) * size])
            self._set_tables(seq, [[self.blocks.null_block_id] * skip + t + f
                                   for skip, t, f in zip(skips, taken, fresh, strict=True)], behind)
            seq.block_hashes = hashes[:len(hits) + len(offloaded)]
            seq.num_computed_tokens = computed
            if seq.num_preemptions == 0:
                # a resumed request (migration) may find its generated tokens cached too: count the prompt's only
                seq.num_cached_tokens = min(computed, seq.num_prompt_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSequence(seq, computed, num_tokens, ()))
            budget -= num_tokens
        return budget

    # -- async scheduling: the next step is scheduled while this one runs ---------------------------------
    def mark_in_flight(self, plan: SchedulerOutput) -> None:
        """`plan` runs now and the next schedule is made before it ends, as if it had: each item's tokens count
        as computed, and a sampling item's sequence awaits one more token, unless its length limit ends it
        with that token (it is then not scheduled again). Sequences that end on a sampled token (an end or
        stop token, a stop string) show only when the step is committed: the next step computes one row
        for them in vain. Plans with drafts are never run this way."""
        for item in plan.scheduled:
            if item.draft_token_ids:
                raise ValueError("a step with draft tokens cannot run ahead of its commit")
            seq = item.seq
            if seq.is_finished:  # ended by the step before, after this one was scheduled: a row in vain
                continue
            seq.num_computed_tokens = item.start + item.num_tokens
            last = seq.ends_by_length(seq.num_output_tokens + 1, self.config.max_model_len)
            seq.awaiting_token = item.samples and not last

    # -- after the step ---------------------------------------------------------------------------------
    def commit(self, item: ScheduledSequence, accepted_token_ids: list[int],
               on_token: Callable[[Sequence, int], None] | None = None) -> None:
        """Record a step's result for one sequence: `accepted_token_ids` are the new tokens (accepted
        drafts then the sampled one; empty for a prefill chunk that does not reach the end). A sequence
        preempted while its step ran (async scheduling) keeps the token, to compute again with the rest."""
        seq = item.seq
        seq.awaiting_token = False
        if seq.status is SequenceStatus.WAITING:
            seq.token_ids.extend(accepted_token_ids)
            return
        known = item.num_tokens - len(item.draft_token_ids)
        num_drafts_accepted = max(len(accepted_token_ids) - 1, 0)
        seq.num_computed_tokens = item.start + known + num_drafts_accepted
        seq.spec_token_ids, seq.spec_draft_probs = [], None
        for token_id in accepted_token_ids:
            seq.token_ids.append(token_id)
            if on_token is not None:
                on_token(seq, token_id)
        self._register_full_blocks(seq)
        if self.window:
            self._release_behind_window(seq)

    def _release_behind_window(self, seq: Sequence) -> None:
        """Give back the windowed groups' blocks wholly before the window of `seq`'s next position: every later
        query (at positions >= num_computed_tokens: drafts, verification and chunks included) attends to positions
        > its own - window only. Registered blocks stay in the prefix cache until evicted. Runs after the step's
        KV push has finished (the engine waits for it before committing), so nothing still reads them."""
        start, end = seq.num_blocks_behind_window, min(self.blocks_behind_window(seq.num_computed_tokens),
                                                       len(seq.block_table))
        if end <= start:
            return
        for group, table in enumerate(seq.tables):
            if self._windowed(group):
                self.blocks.give_back(table, start, end)
                self.num_blocks_behind_window_total += end - start  # (entries past num_blocks_behind_window are held)
        seq.num_blocks_behind_window = end

    def _register_full_blocks(self, seq: Sequence) -> None:
        size = self.blocks.block_size
        if not self.blocks.enable_prefix_caching:
            return
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // size):
            tokens = seq.token_ids[i * size:(i + 1) * size]
            parent = seq.block_hashes[-1] if seq.block_hashes else seq.root_hash
            block_hash = hash_block(parent, tokens)
            seq.block_hashes.append(block_hash)
            for group, table in enumerate(seq.tables):
                if table[i] != self.blocks.null_block_id:  # (the chain goes on past a block not held)
                    self.blocks.register_full_block(table[i], group_key(block_hash, group), tokens,
                                                     publish=group == 0)

    def held_block_refs(self) -> dict[int, int]:
        """Block id → number of running or waiting sequences holding it (for integrity checks)."""
        refs: dict[int, int] = {}
        for seq in self.running + self.waiting:
            for block_id in self.held_blocks(seq):
                refs[block_id] = refs.get(block_id, 0) + 1
        return refs
