"""KV between tensor-parallel groups of different degree (kv_transfer.kv_layout): which prefill rank sends which
KV heads to which decode rank, and the byte ranges that move them, checked by moving real bytes between pools."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import ModelConfig
from engine.parallel.shard import TPShard
from kv_transfer.errors import HandshakeError
from kv_transfer.kv_layout import KVLayout, Route, head_ranges, routes

LAYERS, BLOCK, KV_HEADS, HEAD_DIM = 3, 4, 4, 8


def group(size: int, kv_heads: int = KV_HEADS, num_blocks: int = 10) -> list[KVLayout]:
    """Each rank's layout of a group of `size` ranks, its heads as engine.parallel.shard splits them."""
    cfg = ModelConfig(architecture="llama", vocab_size=16, hidden_size=32, intermediate_size=32, num_layers=LAYERS,
                      num_heads=8, num_kv_heads=kv_heads, head_dim=HEAD_DIM, max_position_embeddings=64,
                      rms_norm_eps=1e-5, rope_theta=1e4)
    heads = tuple((TPShard(r, size).kv_heads(cfg).start, len(TPShard(r, size).kv_heads(cfg))) for r in range(size))
    whole = KVLayout(model="m", dtype="float32", block_size=BLOCK, num_layers=LAYERS, num_kv_heads=kv_heads,
                     head_dim=HEAD_DIM, num_blocks=num_blocks + 1, element_size=4, tp_size=size, group_heads=heads)
    return [whole.of_rank(r) for r in range(size)]


def pools(layouts: list[KVLayout], source: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Rank pools: slices of `source` (the whole model's pool) by each rank's heads, or zeros."""
    out = []
    for layout in layouts:
        shape = (LAYERS, layout.num_blocks, BLOCK, 2, layout.num_kv_heads, HEAD_DIM)
        out.append(torch.zeros(shape) if source is None else
                   source[..., layout.kv_head_start:layout.kv_head_start + layout.num_kv_heads, :].contiguous())
    return out


@pytest.mark.parametrize(("prefill_size", "decode_size", "kv_heads"),
                         [(1, 1, 4), (2, 2, 4), (2, 1, 4), (1, 2, 4), (4, 2, 4), (2, 4, 4), (4, 1, 2), (1, 4, 2),
                          (4, 8, 2), (8, 2, 2)])
def test_every_decode_head_lands_from_a_prefill_rank_holding_it(prefill_size, decode_size, kv_heads) -> None:
    prefill, decode = group(prefill_size, kv_heads), group(decode_size, kv_heads, num_blocks=13)
    whole = torch.randn(LAYERS, 11, BLOCK, 2, kv_heads, HEAD_DIM)
    sources, targets = pools(prefill, whole), pools(decode)
    local_blocks, remote_blocks = [1, 2, 3, 7, 0], [5, 6, 12, 2, 3]
    found = routes(prefill[0], decode[0])
    for route in found:  # every route moves heads its source holds
        p = prefill[route.source]
        assert p.kv_head_start <= route.first_head < route.first_head + route.num_heads <= \
            p.kv_head_start + p.num_kv_heads
        ranges = head_ranges(prefill[route.source], decode[route.dest], route.first_head, route.num_heads,
                             range(LAYERS), local_blocks, remote_blocks)
        src = sources[route.source].view(-1).view(torch.uint8).numpy()
        dst = targets[route.dest].view(-1).view(torch.uint8).numpy()
        for lo, ro, n in zip(ranges.local_offsets, ranges.remote_offsets, ranges.lengths, strict=True):
            dst[ro:ro + n] = src[lo:lo + n]
    # each decode head is sent once, and every decode pool's blocks now hold the whole pool's heads
    sent = sorted((r.dest, h) for r in found for h in range(r.first_head, r.first_head + r.num_heads))
    assert sent == sorted((d, h) for d, layout in enumerate(decode)
                          for h in range(layout.kv_head_start, layout.kv_head_start + layout.num_kv_heads))
    for layout, pool in zip(decode, targets, strict=True):
        heads = slice(layout.kv_head_start, layout.kv_head_start + layout.num_kv_heads)
        assert torch.equal(pool[:, remote_blocks], whole[:, local_blocks][..., heads, :])
        untouched = [b for b in range(13 + 1) if b not in remote_blocks]
        assert not pool[:, untouched].any()


def test_equal_groups_move_whole_blocks_and_no_rank_sends_another_ranks_heads() -> None:
    two = group(2)
    assert routes(two[0], two[0]) == (Route(0, 0, 0, 2), Route(1, 1, 2, 2))
    ranges = head_ranges(two[1], two[1], 2, 2, range(LAYERS), [1, 2], [3, 4])
    assert len(ranges) == LAYERS and ranges.total_bytes == LAYERS * 2 * two[1].block_bytes  # one run per layer
    # 2 prefill ranks into 1 decode rank: each sends its own two heads, half of every block
    one = group(1)
    assert routes(two[0], one[0]) == (Route(0, 0, 0, 2), Route(1, 0, 2, 2))
    assert head_ranges(two[1], one[0], 2, 2, range(LAYERS), [1], [1]).total_bytes == LAYERS * one[0].block_bytes // 2
    with pytest.raises(ValueError, match=r"holds KV heads 0\.\.1, not 2\.\.3"):
        head_ranges(two[0], one[0], 2, 2, range(LAYERS), [1], [1])


def test_decode_ranks_holding_a_replicated_head_take_it_from_different_prefill_ranks() -> None:
    four = group(4, kv_heads=2)  # ranks 0, 1 hold head 0; ranks 2, 3 head 1
    assert routes(four[0], four[0]) == (Route(0, 0, 0, 1), Route(1, 1, 0, 1), Route(2, 2, 1, 1), Route(3, 3, 1, 1))
    assert routes(four[0], group(2, kv_heads=2)[0]) == (Route(0, 0, 0, 1), Route(3, 1, 1, 1))


def test_the_handshake_accepts_other_degrees_and_refuses_what_it_cannot_map() -> None:
    two, four = group(2), group(4)
    two[1].check_compatible(four[3])  # any degrees of one model: every head is somewhere
    other_head_dim = KVLayout(**{**two[0].__dict__, "head_dim": 16})
    with pytest.raises(HandshakeError, match=r"head_dim: ours 8, peer's 16"):
        two[0].check_compatible(other_head_dim)
    missing = KVLayout(**{**two[0].__dict__, "group_heads": ((0, 2),), "tp_size": 1})
    with pytest.raises(HandshakeError, match=r"KV heads per rank: ours \[\(0, 2\), \(2, 2\)\] \(rank 0 of 2\), "
                                             r"peer's \[\(0, 2\)\] \(rank 0 of 1\)"):
        two[0].check_compatible(missing)
    assert KVLayout.from_json(two[1].to_json()) == two[1]
    # a single-rank layout's namespace (the KV store's) is what it was before groups existed
    assert group(1)[0].namespace() == KVLayout(**{**group(1)[0].__dict__, "group_heads": ()}).namespace()


def test_byte_ranges_stay_inside_both_pools() -> None:
    prefill, decode = group(4, 2), group(1, 2, num_blocks=3)
    for route in routes(prefill[0], decode[0]):
        r = head_ranges(prefill[route.source], decode[0], route.first_head, route.num_heads, range(LAYERS), [10], [3])
        assert np.all(r.local_offsets + r.lengths <= LAYERS * prefill[route.source].num_blocks
                      * prefill[route.source].block_bytes)
        assert np.all(r.remote_offsets + r.lengths <= LAYERS * decode[0].num_blocks * decode[0].block_bytes)


def test_notes_between_single_rank_peers_are_as_before_routes() -> None:
    """A single-rank push's notes carry no route (an older decode worker builds its note from every key), and a
    note with keys this build does not know is still read."""
    import json

    from kv_transfer.kv_connector import KVPushNote

    note = KVPushNote("r", (0, 1), 0, 2)
    assert "route" not in json.loads(note.encode())
    assert json.loads(KVPushNote("r", (0,), 0, 1, route=3).encode())["route"] == 3
    newer = json.dumps({**json.loads(note.encode()), "sender_epoch": 7}).encode()
    assert KVPushNote.decode(newer) == note
