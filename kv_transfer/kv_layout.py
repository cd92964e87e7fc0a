"""The KV pool layout as the wire sees it: byte ranges of blocks, coalesced, and the handshake.

Pool tensor (engine.kv_cache): `[num_layers, num_blocks + 1, block_size, 2, kv_heads, head_dim]`,
so block b of layer l is the byte range `[(l * rows + b) * B, +B)` with `rows = num_blocks + 1`
and `B` the bytes of one block of one layer. A run of consecutive block ids is one range.

A tensor-parallel worker (engine.parallel) has a pool per rank, each of its own KV heads (`kv_head_start`,
`num_kv_heads`; `group_heads` lists every rank's). Between groups of different degree each decode rank's heads
come from the prefill ranks that hold them (`routes`), as strided pieces of the blocks (`head_ranges`): a head
subset of a block is `block_size * 2` runs of `heads * head_dim` elements.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from engine.config import ModelConfig
from engine.kv_cache import KVCachePool
from engine.kv_groups import KVGroups
from kv_transfer.datatypes import Ranges
from kv_transfer.errors import HandshakeError

POOL_LAYOUT = "layer,block,token,kv,head,dim/v1"
# Fields two engines must agree on before any byte moves (num_blocks may differ: each side has its own; so may the
# tensor-parallel degrees: every KV head of the model is held by some rank of either group, `routes`).
_MUST_MATCH = ("model", "weights", "dtype", "block_size", "num_layers", "head_dim", "layout", "kv_groups")
# what a pool's blocks are filed under outside it (`namespace`): as before tensor-parallel groups could differ
_NAMESPACE_FIELDS = ("model", "weights", "dtype", "block_size", "num_layers", "num_kv_heads", "head_dim", "layout",
                     "tp_size", "tp_rank", "kv_groups")


def model_identity(config: ModelConfig) -> str:
    return (f"{config.name}|{config.architecture}|L{config.num_layers}|H{config.hidden_size}|q{config.num_heads}"
            f"|kv{config.num_kv_heads}|d{config.head_dim}|V{config.vocab_size}")


@dataclass(frozen=True)
class KVLayout:
    model: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_blocks: int  # rows per layer in the pool tensor, the scratch block included
    element_size: int
    layout: str = POOL_LAYOUT
    tp_size: int = 1
    tp_rank: int = 0
    weights: str = ""  # engine.loader.fingerprint: the weights, compute dtype and quantization behind the KV
    # engine.kv_groups.KVGroups.describe: a hybrid layout's groups ("" for one; num_layers is then its group_size)
    kv_groups: str = ""
    kv_head_start: int = 0  # the first of the model's KV heads this pool holds (num_kv_heads of them)
    # every rank's (first KV head, count), rank by rank; () for one rank holding them all
    group_heads: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:  # (JSON gives lists: keep the layout hashable and comparable)
        object.__setattr__(self, "group_heads", tuple((int(s), int(c)) for s, c in self.group_heads))

    @classmethod
    def of_pool(cls, pool: KVCachePool, model: ModelConfig, tp_size: int = 1, tp_rank: int = 0,
                weights: str = "", groups: KVGroups | None = None,
                group_heads: tuple[tuple[int, int], ...] = ()) -> KVLayout:
        """`model`: the whole model's config (not a rank's shard's); `group_heads` as the field says."""
        spec = pool.spec
        start = group_heads[tp_rank][0] if group_heads else 0
        return cls(model=model_identity(model), weights=weights, dtype=str(spec.dtype).removeprefix("torch."),
                   block_size=spec.block_size, num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads,
                   head_dim=spec.head_dim, num_blocks=spec.num_blocks + 1,
                   element_size=pool.tensor.element_size(), tp_size=tp_size, tp_rank=tp_rank,
                   kv_groups="" if groups is None else groups.describe(), kv_head_start=start,
                   group_heads=tuple(group_heads))

    @property
    def ranks_heads(self) -> tuple[tuple[int, int], ...]:
        """Every rank's (first KV head, count) of this layout's group."""
        return self.group_heads or ((0, self.num_kv_heads),)

    def of_rank(self, rank: int) -> KVLayout:
        """Rank `rank`'s layout in this layout's group (its pool as big as ours)."""
        start, count = self.ranks_heads[rank]
        return replace(self, tp_rank=rank, kv_head_start=start, num_kv_heads=count)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer."""
        return self.block_size * 2 * self.num_kv_heads * self.head_dim * self.element_size

    def namespace(self) -> str:
        """What KV blocks of this layout are filed under outside a pool (the cluster KV store): the fields two
        engines must agree on, hashed; equal for every worker whose blocks are interchangeable."""
        # (a single-group layout's as before kv_groups existed: blocks filed by older workers stay found)
        agreed = json.dumps({name: getattr(self, name) for name in _NAMESPACE_FIELDS
                             if name != "kv_groups" or self.kv_groups}, sort_keys=True)
        return hashlib.sha256(agreed.encode()).hexdigest()[:32]

    def check_compatible(self, peer: KVLayout) -> None:
        """Raise HandshakeError naming every field on which `peer` differs from us."""
        diffs = [f"{name}: ours {getattr(self, name)!r}, peer's {getattr(peer, name)!r}"
                 for name in _MUST_MATCH if getattr(self, name) != getattr(peer, name)]
        if _heads_held(self.ranks_heads) != _heads_held(peer.ranks_heads):
            diffs.append(f"KV heads per rank: ours {list(self.ranks_heads)!r} (rank {self.tp_rank} of {self.tp_size}), "
                         f"peer's {list(peer.ranks_heads)!r} (rank {peer.tp_rank} of {peer.tp_size})")
        if diffs:
            raise HandshakeError("KV layouts differ, refusing to transfer: " + "; ".join(diffs))

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> KVLayout:
        body = json.loads(raw)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in body.items() if k in known})


def block_ranges(local: KVLayout, remote: KVLayout, layers: Sequence[int], local_blocks: Sequence[int],
                 remote_blocks: Sequence[int]) -> Ranges:
    """Byte ranges moving `local_blocks[i]` ↔ `remote_blocks[i]` for every layer in `layers`, one
    range per run of blocks that are consecutive on both sides."""
    if len(local_blocks) != len(remote_blocks):
        raise ValueError("local and remote block lists differ in length")
    if not len(local_blocks) or not len(layers):
        return Ranges(np.empty(0), np.empty(0), np.empty(0))
    lb = np.asarray(local_blocks, dtype=np.int64)
    rb = np.asarray(remote_blocks, dtype=np.int64)
    breaks = np.flatnonzero((np.diff(lb) != 1) | (np.diff(rb) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    run_len = np.diff(np.concatenate((starts, [len(lb)])))
    size = local.block_bytes
    layer_arr = np.asarray(layers, dtype=np.int64)[:, None]
    local_off = (layer_arr * local.num_blocks + lb[starts][None, :]) * size
    remote_off = (layer_arr * remote.num_blocks + rb[starts][None, :]) * size
    lengths = np.broadcast_to(run_len[None, :] * size, local_off.shape)
    return Ranges(local_off.reshape(-1), remote_off.reshape(-1), lengths.reshape(-1))


def _heads_held(ranks_heads: tuple[tuple[int, int], ...]) -> set[int]:
    return {h for start, count in ranks_heads for h in range(start, start + count)}


@dataclass(frozen=True)
class Route:
    """Model KV heads [first_head, first_head + num_heads) go from prefill rank `source` to decode rank `dest`."""

    source: int
    dest: int
    first_head: int
    num_heads: int


def routes(prefill: KVLayout, decode: KVLayout) -> tuple[Route, ...]:
    """Where every decode rank's KV heads come from, in runs of consecutive heads, decode rank by rank: one prefill
    rank per head and decode rank (a head replicated over prefill ranks is sent by one of them, the decode ranks
    that hold it spread over its holders: decode rank d takes holder d mod their number). Both sides compute it."""
    found: list[Route] = []
    for dest, (start, count) in enumerate(decode.ranks_heads):
        for head in range(start, start + count):
            holders = [r for r, (s, c) in enumerate(prefill.ranks_heads) if s <= head < s + c]
            source = holders[dest % len(holders)]
            last = found[-1] if found else None
            if last is not None and (last.source, last.dest) == (source, dest) \
                    and last.first_head + last.num_heads == head:
                found[-1] = replace(last, num_heads=last.num_heads + 1)
            else:
                found.append(Route(source, dest, head, 1))
    return tuple(found)


def head_ranges(local: KVLayout, remote: KVLayout, first_head: int, num_heads: int, layers: Sequence[int],
                local_blocks: Sequence[int], remote_blocks: Sequence[int]) -> Ranges:
    """Byte ranges moving KV heads [first_head, first_head + num_heads) of the model between `local_blocks[i]` and
    `remote_blocks[i]` for every layer in `layers`: whole blocks (`block_ranges`) where both pools hold just those
    heads, else a range per (block, token, k/v) of the heads' elements."""
    if local.num_kv_heads == remote.num_kv_heads == num_heads:
        return block_ranges(local, remote, layers, local_blocks, remote_blocks)
    if len(local_blocks) != len(remote_blocks):
        raise ValueError("local and remote block lists differ in length")
    for side in (local, remote):
        if not side.kv_head_start <= first_head <= first_head + num_heads <= side.kv_head_start + side.num_kv_heads:
            raise ValueError(f"rank {side.tp_rank} holds KV heads {side.kv_head_start}.."
                             f"{side.kv_head_start + side.num_kv_heads - 1}, not {first_head}.."
                             f"{first_head + num_heads - 1}")
    if not len(local_blocks) or not len(layers):
        return Ranges(np.empty(0), np.empty(0), np.empty(0))
    head_bytes = local.head_dim * local.element_size
    pieces = np.arange(local.block_size * 2, dtype=np.int64)  # (token, k/v) runs of a block, in memory order

    def offsets(side: KVLayout, blocks: Sequence[int]) -> np.ndarray:
        rows = np.asarray(layers, dtype=np.int64)[:, None] * side.num_blocks + np.asarray(blocks, dtype=np.int64)
        within = (pieces * side.num_kv_heads + first_head - side.kv_head_start) * head_bytes
        return (rows[:, :, None] * side.block_bytes + within[None, None, :]).reshape(-1)

    local_off, remote_off = offsets(local, local_blocks), offsets(remote, remote_blocks)
    return Ranges(local_off, remote_off, np.full(len(local_off), num_heads * head_bytes, dtype=np.int64))
