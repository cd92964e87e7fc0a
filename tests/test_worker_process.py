"""A decode worker as its own OS process: it registers in etcd, answers health checks, gRPC and
/metrics, and on SIGTERM leaves routing at once, finishes in-flight streams, and exits cleanly."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.discovery import WorkerDirectory
from common.etcd.local import running_etcd
from common.processes import spawn
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import worker_pb2, worker_pb2_grpc

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def etcd() -> Iterator[str]:
    with running_etcd() as endpoint:
        yield endpoint


@pytest.mark.slow
async def test_worker_serves_registers_and_drains_on_sigterm(etcd: str, default_model_path) -> None:
    """The default model decodes 10-60 tokens/s on the CPUs measured, so the 120-token stream is still running
    when SIGTERM arrives (and ends well inside the 20 s grace)."""
    directory = WorkerDirectory(etcd, "wp")
    await directory.start()
    proc = spawn([sys.executable, "-m", "decode_worker", "--etcd", etcd, "--cluster", "wp", "--worker-id", "w1",
                  "--model", str(default_model_path), "--num-kv-blocks", "64", "--lease-ttl-s", "2", "--grace-s", "20"],
                 cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        ready = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 120)
        _, worker_id, address, metrics_port = ready.split()
        assert worker_id == "w1"
        await directory.wait_until(lambda d: [w.address for w in d.workers("both")] == [address], 5)
        async with grpc.aio.insecure_channel(address) as channel:
            status = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            stub = worker_pb2_grpc.WorkerStub(channel)
            request = worker_pb2.WorkerGenerateRequest(request_id="drain-me", prompt_token_ids=[5, 6, 7],
                                                       sampling=pb.SamplingParameters(temperature=0.0, max_tokens=120,
                                                                                      ignore_eos=True))
            call = stub.Generate(request)
            chunks = [await call.read()]
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            assert 'tandem_running_sequences{worker="w1"}' in metrics
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            await directory.wait_until(lambda d: d.workers() == [], 5)
            assert time.monotonic() - signalled < 2  # revoked at once, not after the lease TTL
            while (chunk := await call.read()) is not grpc.aio.EOF:  # the in-flight stream still finishes
                chunks.append(chunk)
            assert time.monotonic() - signalled > 0.3  # it was in flight, not already done
        assert sum(len(c.token_ids) for c in chunks) == 120 and chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        await directory.stop()
