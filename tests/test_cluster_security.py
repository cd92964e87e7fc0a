"""A 1P+1D cluster (`tandem up`) with TLS everywhere, mutual TLS to the workers, API keys on the
public APIs, and an etcd that takes only client certificates and a user with a password: requests
over TLS answer like the engine alone; plaintext clients, clients outside the cluster PKI and
clients without the right key are refused; no key and no prompt reach the cluster's output."""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.etcd.access import EtcdAccess
from common.pki import Pki, make_pki
from kv_transfer import EtcdStore, TransferEngine, TransferEngineConfig, TransferError, TransferOp, TransferRequest
from kv_transfer.link_tls import LinkTls
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.support.cluster import Cluster, assert_pools_clean, fetch, metric, metric_sum, tandem_up, worker_metrics
from tests.support.cluster_workload import Job, reference, run_openai
from tests.support.secure_etcd import etcdctl_binary, secure_etcd

pytestmark = pytest.mark.slow

FILE_KEY, ENV_KEY, ETCD_PASSWORD = "tk-file-4f1c9b7e", "tk-env-77d2a0c3", "etcd-pw-93be1f"
LIMITED_KEY = "tk-limited-0c5a61d2"  # named team-limited in the key file, with limits
LIMITS = {"team-limited": {"max_inflight": 1, "tokens_per_minute": 150}}
PROMPT = "Canary prompt: the violet heron counts quietly to eleven beside the river"


@dataclass(frozen=True)
class Secure:
    cluster: Cluster
    pki: Pki
    rogue: Pki
    etcd: str

    def credentials(self, pki: Pki | None = None, with_cert: bool = True) -> grpc.ChannelCredentials:
        """Trusts the cluster CA; presents `pki`'s certificate (the cluster's by default)."""
        ca = self.pki.ca.read_bytes()
        if not with_cert:
            return grpc.ssl_channel_credentials(root_certificates=ca)
        _, cert, key = (pki or self.pki).read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def https(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.pki.ca))


@pytest.fixture(scope="module")
def secure(tiny_llama_dir, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:  # type: ignore[no-untyped-def]
    if not etcdctl_binary().exists():
        pytest.skip(f"no etcdctl beside the etcd binary ({etcdctl_binary()})")
    folder = tmp_path_factory.mktemp("pki")
    pki, rogue = make_pki(folder, "cluster"), make_pki(folder, "rogue")
    keys_file = folder / "api-keys"
    keys_file.write_text(f"# keys of the test clients\n\n  {FILE_KEY}  \n# retired: tk-old\n"
                         f"team-limited {LIMITED_KEY}\n")
    limits_file = folder / "key-limits.json"
    limits_file.write_text(json.dumps(LIMITS))
    with secure_etcd(pki, "tandem", ETCD_PASSWORD) as etcd, tandem_up(
            "--prefill", "1", "--decode", "1", "--model", str(tiny_llama_dir), "--dtype", "float32",
            "--num-kv-blocks", "128", "--min-remote-prefill-tokens", "4", "--kv-backends", "tcp", *pki.flags(),
            "--api-keys-file",
            str(keys_file), "--api-key-limits", str(limits_file), "--etcd", etcd, "--etcd-ca", str(pki.ca),
            "--etcd-cert", str(pki.cert),
            "--etcd-key", str(pki.key), "--etcd-user", "tandem", stderr=subprocess.STDOUT,
            env={"TANDEM_API_KEYS": ENV_KEY, "TANDEM_ETCD_PASSWORD": ETCD_PASSWORD}) as cluster:
        yield Secure(cluster, pki, rogue, etcd)


def _bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def _generate_text(secure: Secure, job: Job, key: str) -> str:
    request = pb.GenerateRequest(text=job.text, sampling=pb.SamplingParameters(
        temperature=0.0, max_tokens=job.max_tokens, ignore_eos=job.ignore_eos))
    async with grpc.aio.secure_channel(secure.cluster.grpc_address, secure.credentials(with_cert=False)) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        return "".join([c.text async for c in stub.Generate(request, metadata=_bearer(key), timeout=60)])


def _get(url: str, context: ssl.SSLContext, headers: dict[str, str] | None = None) -> tuple[int, dict, str]:
    """(status, headers, body) of a GET, error statuses included."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30,
                                    context=context) as reply:
            return reply.status, dict(reply.headers), reply.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


async def test_tls_answers_like_the_engine_alone(secure: Secure, tiny_llama_dir: Path) -> None:
    """gRPC over TLS and the official OpenAI client over HTTPS (either key) give the engine's greedy
    text; the prompts were prefilled on the prefill worker (decode → prefill over mutual TLS, and
    the KV pages back over mutual-TLS peer links)."""
    jobs = [Job("text", text=PROMPT, max_tokens=8), Job("chat", text=PROMPT, max_tokens=6)]
    expected = reference(str(tiny_llama_dir), jobs)
    assert await _generate_text(secure, jobs[0], FILE_KEY) == expected[0].text
    client = openai.AsyncOpenAI(base_url=f"{secure.cluster.http_url}/v1", api_key=ENV_KEY, max_retries=0,
                                http_client=openai.DefaultAsyncHttpxClient(verify=secure.https()))
    assert secure.cluster.http_url.startswith("https://")
    model = (await client.models.list()).data[0].id
    for stream in (False, True):
        for job, want in zip(jobs, expected, strict=True):
            text, _, used = await run_openai(client, model, job, stream=stream)
            assert (text, used) == (want.text, len(want.token_ids)), (job.kind, stream)
    await client.close()
    decode = secure.cluster.role("decode")[0]
    assert metric(worker_metrics(decode), "tandem_disaggregation_decisions_total", decision="remote") > 0
    for worker in (decode, secure.cluster.role("prefill")[0]):  # the KV links are mutual TLS too
        text = worker_metrics(worker)
        assert metric(text, "tandem_kv_links_opened_total", protection="tls") > 0, worker.role
        assert metric_sum(text, "tandem_kv_links_opened_total") == metric(
            text, "tandem_kv_links_opened_total", protection="tls"), worker.role
    prefill = worker_metrics(secure.cluster.role("prefill")[0])  # and the pages crossed them (--kv-backends tcp)
    assert metric_sum(prefill, "tandem_kv_transfer_bytes_total", backend="tcp") > 0
    await assert_pools_clean(secure.cluster, credentials=secure.credentials())


async def test_plaintext_and_untrusting_clients_fail(secure: Secure) -> None:
    async with grpc.aio.insecure_channel(secure.cluster.grpc_address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await inference_pb2_grpc.InferenceStub(channel).ListModels(
                pb.ListModelsRequest(), metadata=_bearer(FILE_KEY), timeout=10)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    plain_url = secure.cluster.http_url.replace("https://", "http://")
    with pytest.raises((OSError, http.client.HTTPException)):
        urllib.request.urlopen(f"{plain_url}/health", timeout=10)
    with pytest.raises(urllib.error.URLError) as refused:  # the system's CAs did not sign the router's certificate
        urllib.request.urlopen(f"{secure.cluster.http_url}/health", timeout=10, context=ssl.create_default_context())
    assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)


async def test_a_foreign_certificate_cannot_write_into_a_decode_pool(secure: Secure, tiny_llama_dir: Path) -> None:
    """A process that read the decode pool's descriptor from etcd and trusts the cluster CA, but
    holds another CA's certificate (and no KV secret), cannot write into the pool over TCP: refused
    and counted by the decode worker, while a request through the cluster stays token-exact."""
    decode = secure.cluster.role("decode")[0]
    access = EtcdAccess(ca=str(secure.pki.ca), cert=str(secure.pki.cert), key=str(secure.pki.key), user="tandem",
                        password=ETCD_PASSWORD)
    store = EtcdStore(secure.etcd, access=access)
    rogue = TransferEngine(store, TransferEngineConfig(
        backends=("tcp",), metadata_prefix="/tandem/default/kv", default_timeout_s=10,
        link_tls=LinkTls(str(secure.pki.ca), str(secure.rogue.cert), str(secure.rogue.key))))
    junk = rogue.allocate_host_buffer(1 << 20, "junk")
    junk.fill_(0x5A)
    await rogue.register_segment("junk", junk)
    before = metric(worker_metrics(decode), "tandem_kv_link_refused_total", reason="tls")
    job = Job("text", text=PROMPT, max_tokens=8)
    expected = reference(str(tiny_llama_dir), [job])[0].text
    request = asyncio.create_task(_generate_text(secure, job, FILE_KEY))
    try:
        with pytest.raises(TransferError):  # refused at open, or at the write (TLS 1.3 tells the caller late)
            await rogue.open_segment(f"{decode.worker_id}.kv")
            write = [TransferRequest(TransferOp.WRITE, 0, f"{decode.worker_id}.kv", 0, 1 << 20)]
            await asyncio.to_thread(rogue.submit("junk", write).wait, 10)
        assert await request == expected
    finally:
        await rogue.close()
        await store.close()
    assert metric(worker_metrics(decode), "tandem_kv_link_refused_total", reason="tls") >= before + 1
    await assert_pools_clean(secure.cluster, credentials=secure.credentials())


async def test_workers_take_calls_only_from_cluster_members(secure: Secure) -> None:
    """A worker's Worker service answers a caller with a cluster certificate; without a client
    certificate, with one from another CA, or in plaintext, the handshake fails."""
    outsiders = {"no client cert": secure.credentials(with_cert=False),
                 "other CA's cert": secure.credentials(pki=secure.rogue)}
    for worker in secure.cluster.workers:
        async with grpc.aio.secure_channel(worker.address, secure.credentials()) as channel:
            status = await worker_pb2_grpc.WorkerStub(channel).Status(worker_pb2.StatusRequest(), timeout=10)
            assert status.worker_id == worker.worker_id and status.pool_integrity_ok
        for name, credentials in outsiders.items():
            async with grpc.aio.secure_channel(worker.address, credentials) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await worker_pb2_grpc.WorkerStub(channel).Abort(worker_pb2.AbortRequest(request_id="x"),
                                                                   timeout=10)
                assert failure.value.code() == grpc.StatusCode.UNAVAILABLE, name
        async with grpc.aio.insecure_channel(worker.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await worker_pb2_grpc.WorkerStub(channel).Status(worker_pb2.StatusRequest(), timeout=10)
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_grpc_api_keys(secure: Secure) -> None:
    """No key, a wrong key or another scheme: UNAUTHENTICATED for both Inference methods; either
    configured key works; health checking needs none."""
    async with grpc.aio.secure_channel(secure.cluster.grpc_address, secure.credentials(with_cert=False)) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        refused = {"missing": (), "wrong": _bearer("tk-guess"), "basic": (("authorization", f"Basic {FILE_KEY}"),)}
        for name, metadata in refused.items():
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=10)
            assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                async for _ in stub.Generate(pb.GenerateRequest(text=PROMPT), metadata=metadata, timeout=10):
                    pass
            assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
            assert "API key" in (failure.value.details() or "")
        for key in (FILE_KEY, ENV_KEY):
            models = await stub.ListModels(pb.ListModelsRequest(), metadata=_bearer(key), timeout=10)
            assert models.models
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_http_api_keys(secure: Secure) -> None:
    """401 with an OpenAI-style error and `WWW-Authenticate: Bearer` without the right key (the
    official client raises AuthenticationError); /health, /metrics and /openapi.json stay open."""
    url, context = secure.cluster.http_url, secure.https()
    for headers in ({}, {"Authorization": "Bearer tk-guess"}, {"Authorization": FILE_KEY}):
        status, reply_headers, body = _get(f"{url}/v1/models", context, headers)
        assert status == 401, headers
        assert reply_headers["WWW-Authenticate"].startswith("Bearer")
        error = json.loads(body)["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
    status, _, _ = _get(f"{url}/v1/models", context, {"Authorization": f"bearer {FILE_KEY}"})
    assert status == 200
    assert _get(f"{url}/health", context)[0] == _get(f"{url}/openapi.json", context)[0] == 200
    assert "tandem_" in fetch(f"{url}/metrics", context)
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="tk-guess", max_retries=0,
                                http_client=openai.DefaultAsyncHttpxClient(verify=context))
    with pytest.raises(openai.AuthenticationError):
        await client.completions.create(model="", prompt=PROMPT, max_tokens=2)
    await client.close()


async def test_each_key_has_its_own_prefix_cache(secure: Secure) -> None:
    """A prompt one key cached is a prefix-cache hit for that key only: another key computes it all
    (so it cannot time the first key's prompts), over HTTP and gRPC; a client's cache_salt splits a
    key's cache further."""
    prompt = "Isolation probe: " + " ".join(f"item{i}" for i in range(40))

    async def cached_http(key: str, **extra: str) -> int:
        async with openai.AsyncOpenAI(base_url=f"{secure.cluster.http_url}/v1", api_key=key, max_retries=0,
                                      http_client=openai.DefaultAsyncHttpxClient(verify=secure.https())) as client:
            done = await client.completions.create(model="", prompt=prompt, max_tokens=2, temperature=0,
                                                   extra_body=extra)
        assert done.usage is not None and done.usage.prompt_tokens_details is not None
        return done.usage.prompt_tokens_details.cached_tokens or 0

    async def cached_grpc(key: str, salt: str = "") -> int:
        request = pb.GenerateRequest(text=prompt, cache_salt=salt, sampling=pb.SamplingParameters(max_tokens=1))
        async with grpc.aio.secure_channel(secure.cluster.grpc_address, secure.credentials(with_cert=False)) as channel:
            chunks = [c async for c in inference_pb2_grpc.InferenceStub(channel).Generate(
                request, metadata=_bearer(key), timeout=60)]
        return chunks[-1].usage.cached_prompt_tokens

    assert await cached_http(FILE_KEY) == 0
    assert await cached_http(FILE_KEY) > 0  # its own blocks
    assert await cached_http(ENV_KEY) == 0  # not another key's
    assert await cached_grpc(ENV_KEY) > 0 and await cached_grpc(FILE_KEY) > 0
    assert await cached_http(FILE_KEY, cache_salt="s1") == 0
    assert await cached_grpc(FILE_KEY, "s1") > 0 and await cached_grpc(ENV_KEY, "s1") == 0
    await assert_pools_clean(secure.cluster, credentials=secure.credentials())


async def test_per_key_limits(secure: Secure) -> None:
    """team-limited may have one request in flight and 150 tokens a minute: a second concurrent
    request, and one after the minute's tokens are used, get 429 with Retry-After, counted under the
    key's name (never the key); other keys are unaffected."""
    url = secure.cluster.http_url

    def client(key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0,
                                  http_client=openai.DefaultAsyncHttpxClient(verify=secure.https()))

    async with client(LIMITED_KEY) as limited, client(FILE_KEY) as other:
        # long enough (120 steps) to be still in flight when the next request arrives on a fast CPU with a
        # busy router, short enough to leave the minute's budget unspent
        stream = await limited.completions.create(model="", prompt="Count: one two", max_tokens=120, temperature=0,
                                                  stream=True, stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True})
        await anext(aiter(stream))  # in flight
        with pytest.raises(openai.RateLimitError) as busy:
            await limited.completions.create(model="", prompt="hi", max_tokens=2)
        assert "in flight" in str(busy.value) and busy.value.response.headers["Retry-After"] == "1"
        assert (await other.completions.create(model="", prompt="hi", max_tokens=2)).choices
        used = [chunk.usage.total_tokens async for chunk in stream if chunk.usage is not None]
        assert len(used) == 1 and used[0] < 150
        with pytest.raises(openai.RateLimitError) as spent:
            for _ in range(20):  # small requests, until the minute's 150 are used
                done = await limited.completions.create(model="", prompt="Count: one", max_tokens=3, temperature=0,
                                                        extra_body={"ignore_eos": True})
                assert done.usage is not None
                used.append(done.usage.total_tokens)
        # refused at the first request after the budget was spent, not before, not later
        assert sum(used) >= 150 > sum(used[:-1]) and "tokens in the last minute" in str(spent.value)
        assert 1 <= int(spent.value.response.headers["Retry-After"]) <= 60
        assert (await other.completions.create(model="", prompt="hi", max_tokens=2)).choices
    text = fetch(f"{url}/metrics", secure.https())
    assert metric(text, "tandem_router_key_requests_total", key="team-limited", outcome="key_limit") >= 2
    assert metric(text, "tandem_router_key_tokens_total", key="team-limited", kind="generated") >= 40
    assert LIMITED_KEY not in text and FILE_KEY not in text
    await assert_pools_clean(secure.cluster, credentials=secure.credentials())


def test_no_key_password_or_prompt_in_the_output(secure: Secure) -> None:
    """Everything the cluster printed (the launcher, and its children's logs at the default level)
    names neither a key, nor the etcd password, nor the prompt text. Runs last."""
    output = "".join(secure.cluster.output)
    assert "router: gRPC on" in output  # the children's logs are in it
    assert "links are not authenticated" not in output  # tandem up gave the workers the cluster's KV secret
    for secret in (FILE_KEY, ENV_KEY, LIMITED_KEY, ETCD_PASSWORD, PROMPT, PROMPT[:20]):
        assert secret not in output, secret
