"""The KV connector between two engines in two OS processes: a real prefill's KV pages pushed
layer by layer into the decode engine's reserved blocks, whose greedy continuation must equal
transformers' (and so the single engine's)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import torch

from common.etcd.local import running_etcd
from engine.kv_cache import KVCachePool, KVCacheSpec
from engine.loader.api import load_tokenizer
from kv_transfer.errors import HandshakeError
from kv_transfer.kv_layout import KVLayout, block_ranges
from tests.support.hf_reference import hf_greedy
from tests.support.kv_peers import KVPeer, PeerProcess
from tests.support.prompts import text_of_about

BACKENDS = ["shm", "tcp", "nixl"]
MAX_TOKENS = 12


def _engine_peer(etcd: str, name: str, backend: str, model: str, prefix: str, secret: str | None = None,
                 **extra: int | str) -> PeerProcess:
    args = ["--etcd", etcd, "--name", name, "--backend", backend, "--model", model, "--prefix", prefix]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return PeerProcess("tests.support.kv_engine_peer", args, name,
                       env_extra={"TANDEM_KV_SECRET": secret} if secret else None)


@pytest.fixture(scope="module")
def etcd() -> Iterator[str]:
    with running_etcd() as endpoint:
        yield endpoint


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_pushed_prefill_decodes_like_transformers(backend: str, etcd: str, default_model_path) -> None:
    _push_and_decode(backend, etcd, str(default_model_path))


@pytest.mark.slow
def test_a_push_waiting_on_device_events_decodes_like_transformers(etcd: str, default_model_path) -> None:
    """As on a GPU, each layer's KV writes are marked by an event (here a CPU stand-in that lands 2 ms later) which
    the push waits on off the engine's thread (engine.kv_hooks.ObservedAttention, KVPusher.layer_written): every
    layer is still pushed whole, and the decode side's output equals transformers'."""
    _push_and_decode("shm", etcd, str(default_model_path), layer_events=1)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_two_engines_on_one_gpu_push_and_decode_like_transformers(etcd: str, default_model_path) -> None:
    """Both pools in one GPU's memory (CUDA segments) through NIXL (UCX's CUDA transports; tcp and shm move host
    memory only, NCCL refuses two segments of one GPU), the Triton backend and real per-layer CUDA events."""
    _push_and_decode("nixl", etcd, str(default_model_path), device="cuda")


def _push_and_decode(backend: str, etcd: str, model: str, layer_events: int = 0, device: str = "cpu") -> None:
    if backend == "nixl":
        from tests.test_kv_transfer_processes import _nixl_available

        if not _nixl_available():
            pytest.skip("NIXL is not available here")
    prefix = f"/tandem/test-{uuid.uuid4().hex[:8]}"
    # The prefill engine runs 40-token chunks, so a long prompt is pushed over several steps (each
    # step re-pushes the block its previous chunk left partly filled); the decode pool is sized
    # differently, so block ids and layer strides differ on the two sides.
    prefill = _engine_peer(etcd, f"p-{backend}", backend, model, prefix, num_blocks=96, max_batched_tokens=40,
                           layer_events=layer_events, device=device)
    decode = _engine_peer(etcd, f"d-{backend}", backend, model, prefix, num_blocks=160, device=device)
    try:
        tokenizer = load_tokenizer(model)
        prompts = [text_of_about(tokenizer, n, seed) for n, seed in ((5, 1), (16, 2), (83, 3), (200, 4))]
        for i, prompt in enumerate(prompts):
            rid = f"r{i}"
            reserved = decode.call(cmd="reserve", request_id=rid, prompt=prompt, max_tokens=MAX_TOKENS)
            assert reserved["ok"], reserved
            decode.send(cmd="decode", request_id=rid, peer=prefill.engine_id, timeout=60)
            assert decode.read(timeout=30)["expecting"] == rid
            pushed = prefill.call(cmd="prefill", request_id=rid, prompt=prompt, peer_segment=decode.name,
                                  blocks=reserved["blocks"], reply_within=180)
            assert pushed["ok"], pushed
            result = decode.read(timeout=120)
            assert result["ok"], result
            expected = hf_greedy(model, prompt, MAX_TOKENS, tokenizer.eos_token_ids)
            assert result["tokens"] == expected, f"prompt {i} ({len(prompt)} tokens)"
            assert result["tokens"][0] == pushed["first_token"]
            assert result["layers"] == list(range(30))
            if layer_events:  # every push waited on its layers' events, on the pusher's own thread
                assert pushed["event_waits"] > 0 and pushed["event_threads"] == ["tandem-kv-push_0"], pushed
            else:
                assert pushed["event_waits"] == 0
    finally:
        prefill.close()
        decode.close()


# per windowed checkpoint: its window, and the (layers, windowed) of each group of its KV layout (engine.kv_groups)
WINDOWED = {"tiny_mistral_window_dir": (8, ((2, True),)),
            "tiny_gemma3_dir": (6, ((1, False), (1, True), (1, True))),
            "tiny_gemma3_padded_dir": (6, ((1, False), (2, True), (2, True), (2, True), (2, True)))}


@pytest.mark.slow
@pytest.mark.parametrize("fixture", list(WINDOWED))
def test_a_windowed_models_push_moves_only_the_blocks_the_decode_side_needs(etcd: str, fixture: str,
                                                                            request: pytest.FixtureRequest) -> None:
    """The tiny Mistral (every layer windowed: one group) and two tiny Gemma 3 (windowed and global layers: a
    hybrid layout of three groups of one layer, or of five of two with a slot unfilled) on both sides: the decode
    side reserves every block of a global group and, of a windowed group, those the window of the prompt's next
    position reaches (-1 for the others), every group's in turn; the prefill pushes only those, each group's
    into the same group's, no page of an unfilled slot, in 16-token chunks that leave the prefill's own windowed
    blocks behind as it goes; the continuation equals transformers'."""
    model = str(request.getfixturevalue(fixture))
    window, groups = WINDOWED[fixture]
    prefix = f"/tandem/test-{uuid.uuid4().hex[:8]}"
    prefill = _engine_peer(etcd, "p-window", "tcp", model, prefix, num_blocks=24, max_batched_tokens=16)
    decode = _engine_peer(etcd, "d-window", "tcp", model, prefix, num_blocks=32)
    try:
        for i, length in enumerate((5, 40, 200)):
            prompt = [(11 * j + i) % 500 + 3 for j in range(length)]
            rid = f"w{i}"
            reserved = decode.call(cmd="reserve", request_id=rid, prompt=prompt, max_tokens=MAX_TOKENS)
            blocks, n = reserved["blocks"], -(-length // 16)
            behind = max(length - window + 1, 0) // 16
            assert len(blocks) == len(groups) * n
            for group, (_, windowed) in enumerate(groups):
                held = blocks[group * n:(group + 1) * n]
                skipped = behind if windowed else 0
                assert held[:skipped] == [-1] * skipped and min(held[skipped:]) >= 0
            decode.send(cmd="decode", request_id=rid, peer=prefill.engine_id, timeout=60)
            assert decode.read(timeout=30)["expecting"] == rid
            pushed = prefill.call(cmd="prefill", request_id=rid, prompt=prompt, peer_segment=decode.name,
                                  blocks=blocks, reply_within=120)
            assert pushed["ok"], pushed
            page = 16 * 2 * 2 * 16 * 4  # a block of one layer: tokens x (k, v) x kv heads x head_dim x fp32
            assert pushed["bytes"] == sum(layers * (n - (behind if windowed else 0)) for layers, windowed in groups) \
                * page
            result = decode.read(timeout=60)
            assert result["ok"], result
            assert result["tokens"] == hf_greedy(model, prompt, MAX_TOKENS, eos_ids=(2,))
    finally:
        prefill.close()
        decode.close()


def test_handshake_refuses_a_different_block_size_before_moving_bytes(etcd: str, default_model_path) -> None:
    prefix = f"/tandem/test-{uuid.uuid4().hex[:8]}"
    a = _engine_peer(etcd, "hs-a", "tcp", str(default_model_path), prefix, num_blocks=64)
    b = _engine_peer(etcd, "hs-b", "tcp", str(default_model_path), prefix, num_blocks=64, block_size=32)
    try:
        result = a.call(cmd="connect", segment=b.name)
        assert not result["ok"] and result["error"] == "HandshakeError"
        assert "block_size: ours 16, peer's 32" in result["message"]
    finally:
        a.close()
        b.close()


def test_handshake_refuses_other_weights_of_the_same_architecture(etcd: str, default_model_path) -> None:
    """Same model, same pool layout, but int4 weights on one side: its KV is not the other's."""
    prefix = f"/tandem/test-{uuid.uuid4().hex[:8]}"
    a = _engine_peer(etcd, "w-a", "tcp", str(default_model_path), prefix, num_blocks=64)
    b = _engine_peer(etcd, "w-b", "tcp", str(default_model_path), prefix, num_blocks=64, quantization="int4")
    c = _engine_peer(etcd, "w-c", "tcp", str(default_model_path), prefix, num_blocks=80)
    try:
        result = a.call(cmd="connect", segment=b.name)
        assert not result["ok"] and result["error"] == "HandshakeError", result
        assert "weights: ours" in result["message"] and "|float32|none', peer's" in result["message"]
        assert "|float32|int4'" in result["message"]
        checked = b.call(cmd="check_peer", segment=a.name)  # the int4 side, asked to take the fp32 one's push
        assert not checked["ok"] and checked["error"] == "HandshakeError" and "weights: ours" in checked["message"]
        assert a.call(cmd="connect", segment=c.name)["ok"]  # the same weights in a pool of another size
        assert c.call(cmd="check_peer", segment=a.name)["ok"]
    finally:
        for peer in (a, b, c):
            peer.close()


def _layout(num_blocks: int, **changes: object) -> KVLayout:
    import torch

    from engine.config import ModelConfig

    spec = KVCacheSpec(num_layers=3, num_blocks=num_blocks, block_size=4, num_kv_heads=2, head_dim=8,
                       dtype=torch.float32)
    model = ModelConfig(architecture="llama", vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=3,
                        num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5,
                        rope_theta=10000.0)
    layout = KVLayout.of_pool(KVCachePool(spec, torch.device("cpu"), torch.float32), model)
    return KVLayout(**{**layout.__dict__, **changes})


def test_block_ranges_coalesce_runs_and_match_the_pool_bytes() -> None:
    import torch

    local, remote = _layout(10), _layout(20)
    ranges = block_ranges(local, remote, [0, 2], [3, 4, 5, 9, 1], [7, 8, 9, 10, 2])
    # runs: (3,4,5)->(7,8,9); (9)->(10); (1)->(2): three ranges per layer
    assert len(ranges) == 6
    b = local.block_bytes
    assert ranges.lengths.tolist() == [3 * b, b, b] * 2
    assert ranges.local_offsets[:3].tolist() == [3 * b, 9 * b, 1 * b]
    assert ranges.remote_offsets[3:].tolist() == [(2 * 21 + 7) * b, (2 * 21 + 10) * b, (2 * 21 + 2) * b]
    # the offsets address exactly KVCachePool.block_bytes(layer, block) in a real pool
    spec = KVCacheSpec(3, 10, 4, 2, 8, torch.float32)
    pool = KVCachePool(spec, torch.device("cpu"), torch.float32)
    pool.tensor.copy_(torch.randn_like(pool.tensor))
    flat = pool.tensor.view(-1).view(torch.uint8)
    off = int(ranges.local_offsets[4])  # layer 2, block 9
    assert torch.equal(flat[off:off + b], pool.block_bytes(2, 9))


def test_a_single_group_layout_files_its_blocks_where_it_did_before_layer_groups() -> None:
    """The cluster KV store files blocks under the layout's namespace: a single-group layout's is the hash of the
    fields agreed before `kv_groups` existed, so blocks filed by older workers stay found."""
    import hashlib
    import json

    layout = _layout(10)
    before = ("model", "weights", "dtype", "block_size", "num_layers", "num_kv_heads", "head_dim", "layout",
              "tp_size", "tp_rank")
    agreed = json.dumps({name: getattr(layout, name) for name in before}, sort_keys=True)
    assert layout.namespace() == hashlib.sha256(agreed.encode()).hexdigest()[:32]
    assert _layout(10, kv_groups="size 2, windows [0, 8]").namespace() != layout.namespace()


def test_layout_mismatch_names_every_difference() -> None:
    ours = _layout(10)
    with pytest.raises(HandshakeError, match=r"dtype: ours 'float32', peer's 'bfloat16'.*KV heads per rank: ours "
                                             r"\[\(0, 2\)\] \(rank 0 of 1\), peer's \[\(0, 1\)\] \(rank 0 of 2\)"):
        ours.check_compatible(_layout(12, dtype="bfloat16", tp_size=2, group_heads=((0, 1),)))
    ours.check_compatible(_layout(12, tp_size=2, group_heads=((0, 1), (1, 1)), num_kv_heads=1))  # another degree
    with pytest.raises(HandshakeError, match=r"weights: ours '', peer's 'abc\|float32\|none'"):
        ours.check_compatible(_layout(12, weights="abc|float32|none"))
    ours.check_compatible(_layout(12))  # pool sizes may differ
    from engine.kv_groups import KVGroups
    hybrid = KVGroups.of(4, (8, 0, 8, 0), hybrid=True).describe()  # a peer whose windowed layers have their blocks
    with pytest.raises(HandshakeError, match=r"kv_groups: ours '', peer's 'size 2, windows \[0, 8\], placement"):
        ours.check_compatible(_layout(12, kv_groups=hybrid))



@pytest.mark.slow
def test_prefill_killed_mid_push_fails_the_decode_request_and_frees_its_blocks(etcd: str, default_model_path) -> None:
    """The decode engine waits for a long chunked push; the prefill process dies part way. The
    receipt must fail (never complete with partial pages) and the reserved blocks must be freed."""
    model = str(default_model_path)
    prefix = f"/tandem/test-{uuid.uuid4().hex[:8]}"
    # 1000 tokens in 16-token chunks: ~60 steps, several seconds on a 2-core CPU; killed after 1 s
    prefill = _engine_peer(etcd, "p-kill", "tcp", model, prefix, num_blocks=96, max_batched_tokens=16)
    decode = _engine_peer(etcd, "d-kill", "tcp", model, prefix, num_blocks=96)
    try:
        prompt = text_of_about(load_tokenizer(model), 1000, seed=5)
        reserved = decode.call(cmd="reserve", request_id="long", prompt=prompt, max_tokens=4)
        assert reserved["ok"], reserved
        decode.send(cmd="decode", request_id="long", peer=prefill.engine_id, timeout=60)
        assert decode.read(timeout=30)["expecting"] == "long"
        prefill.send(cmd="prefill", request_id="long", prompt=prompt, peer_segment=decode.name,
                     blocks=reserved["blocks"])
        time.sleep(1.0)
        prefill.kill()
        result = decode.read(timeout=30)
        assert not result["ok"] and result["error"] == "PeerLostError", result
        assert result["layers"] != list(range(30))  # the push was partial, and it was not taken as complete
        # the decode engine freed the reserved blocks (check_integrity ran in the peer) and still serves
        again = decode.call(cmd="reserve", request_id="next", prompt=prompt[:20], max_tokens=2)
        assert again["ok"], again
    finally:
        prefill.close()
        decode.close()


@pytest.mark.slow
def test_a_member_without_a_grant_cannot_write_into_a_decode_pool(etcd: str, default_model_path) -> None:
    """Authenticated links (one cluster secret): a process that holds the secret and read the decode
    pool's descriptor from etcd writes junk into the very blocks the decode engine reserved, under
    the request's own tag, while it waits for their KV. The pool is guarded: only the prefill engine
    the blocks were granted to may write them, so the junk is refused (counted), and the decode
    continues token for token as transformers does; once the decode has its KV, the grant is gone
    (a granted peer's late write refused: tests/test_kv_link_auth.py)."""
    model = str(default_model_path)
    prefix = f"/tandem/test-{uuid.uuid4().hex[:8]}"
    secret = "cluster-secret-3f9a61c2e0"
    prefill = _engine_peer(etcd, "p-auth", "tcp", model, prefix, secret=secret, num_blocks=64)
    decode = _engine_peer(etcd, "d-auth", "tcp", model, prefix, secret=secret, num_blocks=64)
    intruder = KVPeer(etcd, "intruder", 1 << 20, seed=7, backends=["tcp"], prefix=prefix, secret=secret)
    try:
        tokenizer = load_tokenizer(model)
        prompt = text_of_about(tokenizer, 83, 3)
        reserved = decode.call(cmd="reserve", request_id="r0", prompt=prompt, max_tokens=MAX_TOKENS)
        assert reserved["ok"], reserved
        # SmolLM2-135M in fp32: 30 layers, 3 KV heads of 64, 16-token blocks
        layout = KVLayout(model="", dtype="float32", block_size=16, num_layers=30, num_kv_heads=3, head_dim=64,
                          num_blocks=65, element_size=4)
        pages = block_ranges(layout, layout, range(30), reserved["blocks"], reserved["blocks"])
        junk = [[0, int(o), min(int(n), 1 << 20)] for o, n in zip(pages.remote_offsets, pages.lengths, strict=True)]
        assert intruder.call(cmd="open", segment=decode.name)["ok"]
        decode.send(cmd="decode", request_id="r0", peer=prefill.engine_id, timeout=60)
        assert decode.read(timeout=30)["expecting"] == "r0"  # the blocks are granted to the prefill engine
        forged = intruder.call(cmd="submit", op="write", remote=decode.name, ranges=junk, tag="kv/r0")
        assert not forged["ok"] and forged["error"] == "GrantRefusedError", forged
        pushed = prefill.call(cmd="prefill", request_id="r0", prompt=prompt, peer_segment=decode.name,
                              blocks=reserved["blocks"], reply_within=180)
        assert pushed["ok"], pushed
        result = decode.read(timeout=120)
        assert result["ok"], result
        assert result["tokens"] == hf_greedy(model, prompt, MAX_TOKENS, tokenizer.eos_token_ids)
        refused = decode.call(cmd="refused")
        assert refused["grants_refused"]["no_grant"] == 1 and refused["grants"] == 0, refused  # revoked
    finally:
        for peer in (prefill, decode, intruder):
            peer.close()
