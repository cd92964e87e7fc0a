"""Worker discovery against a real etcd: registration, clean and unclean exits, lease loss."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from cluster.discovery import WorkerDirectory
from common.etcd.local import EtcdServer, running_etcd
from common.processes import spawn
from common.worker_record import WorkerRecord, WorkerRegistration, worker_key

REPO = Path(__file__).resolve().parents[1]
TTL_S = 2


def _record(worker_id: str, role: str = "decode") -> WorkerRecord:
    return WorkerRecord(worker_id=worker_id, role=role, address=f"127.0.0.1:{5000 + len(worker_id)}",  # type: ignore[arg-type]
                        model="smollm2", max_num_seqs=8, num_kv_blocks=64, block_size=16,
                        transfer={"engine_id": f"xfer-{worker_id}", "segment": f"kv-{worker_id}"})


@pytest.fixture(scope="module")
def etcd() -> Iterator[str]:
    with running_etcd() as endpoint:
        yield endpoint


def _ids(directory: WorkerDirectory, role: str | None = None) -> list[str]:
    return [w.worker_id for w in directory.workers(role)]  # type: ignore[arg-type]


async def test_workers_appear_and_a_clean_stop_removes_them_at_once(etcd: str) -> None:
    directory = WorkerDirectory(etcd, "c1")
    await directory.start()
    p = WorkerRegistration(etcd, "c1", _record("p1", "prefill"), ttl_s=TTL_S)
    d = WorkerRegistration(etcd, "c1", _record("d1", "decode"), ttl_s=TTL_S)
    await p.start()
    await d.start()
    await directory.wait_until(lambda x: _ids(x) == ["d1", "p1"], 5)
    assert _ids(directory, "prefill") == ["p1"] and directory.workers("decode")[0] == _record("d1")
    started = time.monotonic()
    await p.stop()
    await directory.wait_until(lambda x: _ids(x) == ["d1"], 5)
    assert time.monotonic() - started < 1.0  # revoked, not expired
    await asyncio.sleep(TTL_S + 0.5)  # the survivor's keep-alive holds it past its TTL
    assert _ids(directory) == ["d1"]
    await d.stop()
    await directory.stop()


async def test_killed_worker_leaves_within_ttl_plus_two_seconds(etcd: str) -> None:
    directory = WorkerDirectory(etcd, "c2")
    await directory.start()
    script = ("import asyncio, json, sys\n"
              "from common.worker_record import WorkerRecord, WorkerRegistration\n"
              "async def main():\n"
              f"    r = WorkerRegistration({etcd!r}, 'c2', WorkerRecord(**json.loads(sys.argv[1])), ttl_s={TTL_S})\n"
              "    await r.start(); print('up', flush=True); await asyncio.sleep(60)\n"
              "asyncio.run(main())\n")
    from dataclasses import asdict
    proc = spawn([sys.executable, "-c", script, json.dumps(asdict(_record("doomed")))], cwd=REPO,
                 stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        await directory.wait_until(lambda x: _ids(x) == ["doomed"], 5)
        proc.kill()
        killed = time.monotonic()
        await directory.wait_until(lambda x: _ids(x) == [], TTL_S + 2)
        assert time.monotonic() - killed <= TTL_S + 2
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        await directory.stop()


async def test_a_lost_lease_is_noticed_and_the_worker_registers_again(etcd: str) -> None:
    import aetcd

    directory = WorkerDirectory(etcd, "c3")
    await directory.start()
    reg = WorkerRegistration(etcd, "c3", _record("w1"), ttl_s=TTL_S)
    await reg.start()
    await directory.wait_until(lambda x: _ids(x) == ["w1"], 5)
    host, _, port = etcd.rpartition(":")
    async with aetcd.Client(host, int(port)) as admin:  # as if the lease had expired (a long pause)
        await admin.revoke_lease(reg.lease_id)
    await directory.wait_until(lambda x: _ids(x) == [], 5)
    await directory.wait_until(lambda x: _ids(x) == ["w1"], TTL_S + 3)
    assert reg.registrations == 2
    await reg.stop()
    await directory.wait_until(lambda x: _ids(x) == [], 5)
    await directory.stop()


async def test_an_etcd_restart_keeps_the_view_and_every_worker_registered(tmp_path: Path) -> None:
    """etcd crashes, stays away longer than the lease TTL, and comes back on the same port and data:
    meanwhile the directory keeps its last view; after it, the registration is written again (new
    lease) without ever leaving the view, and a worker registering right after the restart connects
    at once (no reconnect backoff left over from the outage)."""
    server = EtcdServer(str(tmp_path))
    server.start()
    views: list[list[str]] = []
    directory = WorkerDirectory(server.endpoint, "c4", on_change=lambda: views.append(_ids(directory)))
    reg = WorkerRegistration(server.endpoint, "c4", _record("w1"), ttl_s=TTL_S)
    late = WorkerRegistration(server.endpoint, "c4", _record("w2"), ttl_s=TTL_S)
    try:
        await directory.start()
        await reg.start()
        await directory.wait_until(lambda x: _ids(x) == ["w1"], 5)
        server.stop(signal.SIGKILL)
        await asyncio.sleep(TTL_S + 1)
        assert _ids(directory) == ["w1"]
        server.start()
        started = time.monotonic()
        await late.start()
        assert time.monotonic() - started < 1.0
        await directory.wait_until(lambda x: _ids(x) == ["w1", "w2"], 5)
        await asyncio.sleep(TTL_S + 1)  # both leases are kept alive
        assert _ids(directory) == ["w1", "w2"] and reg.registrations == 2
        assert all("w1" in view for view in views[1:]), views
    finally:
        await late.stop()
        await reg.stop()
        await directory.stop()
        server.stop()


def test_records_validate_and_round_trip() -> None:
    record = _record("x")
    assert WorkerRecord.from_json(record.to_json()) == record
    assert worker_key("prod", record) == "/tandem/prod/workers/decode/x"
    with pytest.raises(ValueError, match="role"):
        WorkerRecord("x", "router", "a:1", "m", 1, 1, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'/'"):
        _record("a/b")


async def test_the_routers_pool_follows_each_event_and_keeps_its_views_until_a_change(etcd: str) -> None:
    """The router's WorkerPool (cluster.worker_pool) built from a listing, then kept by single etcd events
    (each applied alone, not by re-reading the directory): ordered views, limits and the per-pool gauge
    follow every put and delete; a changed record gets a new handle, the others keep theirs."""
    import aetcd
    from prometheus_client import REGISTRY

    from cluster.worker_pool import WorkerPool

    def record(worker_id: str, role: str, max_model_len: int = 0, port: int = 1) -> WorkerRecord:
        return replace(_record(worker_id, role), address=f"127.0.0.1:{port}", max_model_len=max_model_len)

    def gauge(pool_name: str) -> float | None:
        return REGISTRY.get_sample_value("tandem_router_workers", {"pool": pool_name})

    host, _, port = etcd.rpartition(":")
    async with aetcd.Client(host, int(port)) as admin:
        async def put(r: WorkerRecord) -> None:
            await admin.put(worker_key("c5", r).encode(), r.to_json())

        await put(record("d2", "decode", 512))
        await put(record("p1", "prefill"))
        pool = WorkerPool(etcd, "c5")
        await pool.start()  # the listing
        assert [h.worker_id for h in pool.workers()] == ["d2", "p1"] and pool.limits() == (512, 16)
        await put(record("d1", "decode", 1024))
        await put(record("b1", "both"))
        await pool.directory.wait_until(lambda d: len(d.records()) == 4, 5)
        assert [h.worker_id for h in pool.workers("decode", "both")] == ["b1", "d1", "d2"]
        assert pool.workers("decode") is pool.workers("decode")  # cached until a change
        assert (gauge("decode"), gauge("prefill"), gauge("both")) == (2, 1, 1)
        d1, d2 = pool.handle("d1"), pool.handle("d2")
        await put(record("d1", "decode", 1024, port=2))  # the same worker at another address
        await pool.directory.wait_until(lambda d: d.record_at(worker_key("c5", record("d1", "decode"))).address
                                        == "127.0.0.1:2", 5)
        new_d1 = pool.handle("d1")
        assert new_d1 is not None and new_d1 is not d1 and new_d1.record.address == "127.0.0.1:2"
        assert pool.handle("d2") is d2
        await admin.delete(worker_key("c5", record("d2", "decode")).encode())
        await pool.directory.wait_until(lambda d: len(d.records()) == 3, 5)
        assert [h.worker_id for h in pool.workers("decode")] == ["d1"] and pool.limits() == (1024, 16)
        assert gauge("decode") == 1
        await put(record("b1", "prefill"))  # the same id under a second key (role): the newest record serves
        await pool.directory.wait_until(lambda d: len(d.records()) == 4, 5)
        handle = pool.handle("b1")
        assert handle is not None and handle.record.role == "prefill"
        await admin.delete(worker_key("c5", record("b1", "prefill")).encode())  # the first key's record again
        await pool.directory.wait_until(lambda d: len(d.records()) == 3, 5)
        handle = pool.handle("b1")
        assert handle is not None and handle.record.role == "both"
        assert [h.worker_id for h in pool.workers()] == ["b1", "d1", "p1"]
        await pool.stop()
        # one id under two keys at the listing: whichever serves, deleting the other keeps the handle, and
        # deleting the serving one hands over to the other
        await put(record("x1", "prefill", port=3))
        await put(record("x1", "both", port=4))
        pool = WorkerPool(etcd, "c5")
        await pool.start()
        first = pool.handle("x1")
        assert first is not None
        other = "prefill" if first.record.role == "both" else "both"
        await admin.delete(worker_key("c5", record("x1", other)).encode())
        await pool.directory.wait_until(lambda d: len(d.records()) == 4, 5)
        assert pool.handle("x1") is first
        await put(record("x1", other, port=5))  # the newest record serves
        await pool.directory.wait_until(lambda d: len(d.records()) == 5, 5)
        newest = pool.handle("x1")
        assert newest is not None and newest.record.role == other
        pool.directory._changed_keys = None  # as after a watch failure: the next sync reads the whole listing
        pool._sync()
        assert pool.handle("x1") is newest  # a listing keeps the record that serves
        await admin.delete(worker_key("c5", record("x1", other)).encode())
        await pool.directory.wait_until(lambda d: len(d.records()) == 4, 5)
        back = pool.handle("x1")
        assert back is not None and back.record == first.record
        await pool.stop()


def test_a_local_etcd_whose_port_was_taken_starts_on_other_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    """A port free when picked may be taken before etcd binds it: running_etcd starts again on fresh ports."""
    import socket
    import urllib.request

    from common.etcd import local

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    real, picks = local.free_port, []

    def first_taken(host: str = "127.0.0.1") -> int:
        picks.append(host)
        return taken.getsockname()[1] if len(picks) == 1 else real(host)

    monkeypatch.setattr(local, "free_port", first_taken)
    try:
        with running_etcd() as endpoint:
            assert endpoint != f"127.0.0.1:{taken.getsockname()[1]}" and len(picks) == 4
            with urllib.request.urlopen(f"http://{endpoint}/health", timeout=5) as reply:
                assert b"true" in reply.read()
    finally:
        taken.close()
