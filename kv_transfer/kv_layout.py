"""The KV pool layout as the wire sees it: byte ranges of blocks, coalesced, and the handshake.

Pool tensor (engine.kv_cache): `[num_layers, num_blocks + 1, block_size, 2, kv_heads, head_dim]`,
so block b of layer l is the byte range `[(l * rows + b) * B, +B)` with `rows = num_blocks + 1`
and `B` the bytes of one block of one layer. A run of consecutive block ids is one range.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np

from engine.config import ModelConfig
from engine.kv_cache import KVCachePool
from engine.kv_groups import KVGroups
from kv_transfer.datatypes import Ranges
from kv_transfer.errors import HandshakeError

POOL_LAYOUT = "layer,block,token,kv,head,dim/v1"
# Fields two engines must agree on before any byte moves (num_blocks may differ: each side has its own).
_MUST_MATCH = ("model", "weights", "dtype", "block_size", "num_layers", "num_kv_heads", "head_dim", "layout",
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

    @classmethod
    def of_pool(cls, pool: KVCachePool, model: ModelConfig, tp_size: int = 1, tp_rank: int = 0,
                weights: str = "", groups: KVGroups | None = None) -> KVLayout:
        spec = pool.spec
        return cls(model=model_identity(model), weights=weights, dtype=str(spec.dtype).removeprefix("torch."),
                   block_size=spec.block_size, num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads,
                   head_dim=spec.head_dim, num_blocks=spec.num_blocks + 1,
                   element_size=pool.tensor.element_size(), tp_size=tp_size, tp_rank=tp_rank,
                   kv_groups="" if groups is None else groups.describe())

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer."""
        return self.block_size * 2 * self.num_kv_heads * self.head_dim * self.element_size

    def namespace(self) -> str:
        """What KV blocks of this layout are filed under outside a pool (the cluster KV store): the fields two
        engines must agree on, hashed; equal for every worker whose blocks are interchangeable."""
        # (a single-group layout's as before kv_groups existed: blocks filed by older workers stay found)
        agreed = json.dumps({name: getattr(self, name) for name in _MUST_MATCH
                             if name != "kv_groups" or self.kv_groups}, sort_keys=True)
        return hashlib.sha256(agreed.encode()).hexdigest()[:32]

    def check_compatible(self, peer: KVLayout) -> None:
        """Raise HandshakeError naming every field on which `peer` differs from us."""
        diffs = [f"{name}: ours {getattr(self, name)!r}, peer's {getattr(peer, name)!r}"
                 for name in _MUST_MATCH if getattr(self, name) != getattr(peer, name)]
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
