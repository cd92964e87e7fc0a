"""The planner's Kubernetes actuator, through the real `kubernetes` client, against a stub HTTP
server on 127.0.0.1 standing in for the API server: the exact requests it sends (method, path,
query, content type, body) to read and set each pool's Deployment scale, a planner step that
scales the decode Deployment through it, and `tandem planner` doing so as its own process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from cluster.planner.actuator import KubernetesActuator
from cluster.planner.loop import PlannerLoop
from cluster.planner.observation import Observation
from cluster.planner.settings import PlannerServiceSettings
from tests.support.cluster import REPO
from tests.support.planner import router_metrics_text

SCALE = "/apis/apps/v1/namespaces/tandem/deployments/{}/scale"


@dataclass
class Request:
    method: str
    path: str
    content_type: str | None
    body: object


@dataclass
class StubApiServer:
    url: str
    replicas: dict[str, int]
    requests: list[Request] = field(default_factory=list)
    refuse_patch: bool = False
    scrapes: int = 0  # of its /metrics: a router whose every token is slow (40 ms) and whose load grows


def _scale(name: str, replicas: int) -> dict[str, object]:
    """A Scale object as the API server returns it (built and serialized by the client's models)."""
    scale = client.V1Scale(api_version="autoscaling/v1", kind="Scale",
                           metadata=client.V1ObjectMeta(name=name, namespace="tandem", resource_version="7"),
                           spec=client.V1ScaleSpec(replicas=replicas),
                           status=client.V1ScaleStatus(replicas=replicas, selector="app.kubernetes.io/component=x"))
    return client.ApiClient().sanitize_for_serialization(scale)


@pytest.fixture()
def api_server() -> Iterator[StubApiServer]:
    stub = StubApiServer("", {"prefill": 1, "decode": 1})

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: object) -> None:
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def _deployment(self) -> str | None:
            path = self.path.split("?")[0]
            return next((name for name in stub.replicas if path == SCALE.format(name)), None)

        def do_GET(self) -> None:
            if self.path == "/metrics":
                stub.scrapes += 1
                text = router_metrics_text([0.04] * 100 * stub.scrapes, [0.2] * stub.scrapes, 50 * stub.scrapes, 3)
                raw = text.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)
                return
            stub.requests.append(Request("GET", self.path, self.headers.get("Content-Type"), None))
            name = self._deployment()
            if name is None:
                self._answer(404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404})
            else:
                self._answer(200, _scale(name, stub.replicas[name]))

        def do_PATCH(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            stub.requests.append(Request("PATCH", self.path, self.headers.get("Content-Type"), body))
            name = self._deployment()
            if stub.refuse_patch or name is None:
                self._answer(403, {"kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403})
                return
            stub.replicas[name] = body["spec"]["replicas"]
            self._answer(200, _scale(name, stub.replicas[name]))

        def log_message(self, *args: object) -> None:
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stub.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield stub
    server.shutdown()
    server.server_close()


def _settings(api: StubApiServer, **overrides: object) -> PlannerServiceSettings:
    return PlannerServiceSettings(kube_api_server=api.url, kube_namespace="tandem",
                                  router_metrics_url="http://127.0.0.1:1/metrics", **overrides)  # type: ignore[arg-type]


def test_reads_and_sets_the_scale_subresource(api_server: StubApiServer) -> None:
    actuator = KubernetesActuator.from_settings(_settings(api_server))
    assert actuator.current_replicas("decode") == 1
    actuator.scale("decode", 3)
    api_server.replicas["prefill"] = 2
    assert actuator.current_replicas("prefill") == 2
    actuator.scale("prefill", 0)
    assert api_server.requests == [
        Request("GET", SCALE.format("decode"), None, None),
        Request("PATCH", SCALE.format("decode") + "?fieldManager=tandem-planner", "application/merge-patch+json",
                {"spec": {"replicas": 3}}),
        Request("GET", SCALE.format("prefill"), None, None),
        Request("PATCH", SCALE.format("prefill") + "?fieldManager=tandem-planner", "application/merge-patch+json",
                {"spec": {"replicas": 0}})]
    assert api_server.replicas == {"prefill": 0, "decode": 3}


def test_deployment_names_are_settings(api_server: StubApiServer) -> None:
    api_server.replicas = {"tandem-decode": 4}
    actuator = KubernetesActuator.from_settings(_settings(api_server, decode_deployment="tandem-decode"))
    assert actuator.current_replicas("decode") == 4
    with pytest.raises(ApiException) as error:
        actuator.current_replicas("prefill")  # no Deployment "prefill" here
    assert error.value.status == 404


class OverTarget:
    def observe(self) -> Observation:
        return Observation(window_s=60, ttft_s=0.2, itl_s=0.3, prompt_tokens_per_s=50, streams=12)


def test_a_planner_step_patches_the_decode_deployment(api_server: StubApiServer,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    settings = _settings(api_server, itl_target_s=0.1, cooldown_s=0)
    loop = PlannerLoop(settings, OverTarget(), KubernetesActuator.from_settings(settings))
    decisions = loop.step()
    assert [(d.pool, d.action, d.desired, d.reason) for d in decisions] == [
        ("prefill", "hold", 1, "at_min"), ("decode", "scale_up", 2, "itl_over_target")]
    assert [(r.method, r.path.split("?")[0], r.body) for r in api_server.requests] == [
        ("GET", SCALE.format("prefill"), None), ("GET", SCALE.format("decode"), None),
        ("PATCH", SCALE.format("decode"), {"spec": {"replicas": 2}})]
    api_server.refuse_patch = True  # RBAC says no: logged, and the planner goes on
    loop.step()
    assert api_server.requests[-1].method == "PATCH" and api_server.replicas["decode"] == 2
    assert "scaling decode to 3 failed" in caplog.text and "403" in caplog.text


def test_tandem_planner_scales_the_deployment_from_the_routers_metrics(api_server: StubApiServer) -> None:
    """`tandem planner` as a process: it scrapes the router's /metrics, sees the ITL p90 over its
    target and patches the decode Deployment; SIGTERM stops it cleanly."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "planner", "--kube-api-server", api_server.url, "--kube-namespace",
         "tandem", "--router-metrics-url", f"{api_server.url}/metrics", "--itl-target-s", "0.02",
         "--planner-interval-s", "0.2", "--planner-window-s", "1", "--cooldown-s", "60"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("READY planner metrics=")
        deadline = time.monotonic() + 30
        while api_server.replicas["decode"] == 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert api_server.replicas == {"prefill": 1, "decode": 2}
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "decode 1->2 scale_up reason=itl_over_target" in err
    patches = [r for r in api_server.requests if r.method == "PATCH"]
    assert [(r.path.split("?")[0], r.body) for r in patches] == [(SCALE.format("decode"), {"spec": {"replicas": 2}})]
