"""The planner's inputs and outputs apart from the policy: quantiles from histogram buckets, the
router-scrape source (diff over a window), the Prometheus source (its exact queries, against a stub
HTTP API), the loop (decisions logged, counted under the alert rules' metric names, applied), and
the local-process actuator (real child processes: start, announce, drain the newest with SIGTERM)."""

from __future__ import annotations

import json
import logging
import math
import pathlib
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import generate_latest

from bench.scrape import metric
from cluster.planner.capacity import CapacityProfile, DecodePoint
from cluster.planner.local_actuator import LocalProcessActuator
from cluster.planner.loop import PlannerLoop
from cluster.planner.observation import Observation, quantile_from_buckets
from cluster.planner.settings import PlannerSettings, Pool
from cluster.planner.sources import PrometheusSource, RouterScrapeSource, Scrape
from tests.support.planner import router_metrics_text

INF = math.inf


def test_quantile_from_buckets_interpolates_like_histogram_quantile() -> None:
    buckets = [(0.01, 10.0), (0.02, 30.0), (0.04, 90.0), (0.1, 100.0), (INF, 100.0)]
    assert quantile_from_buckets(0.5, buckets) == pytest.approx(0.02 + 0.02 * (50 - 30) / 60)
    assert quantile_from_buckets(0.9, buckets) == pytest.approx(0.04)  # on a bucket's upper edge
    assert quantile_from_buckets(0.05, buckets) == pytest.approx(0.005)  # the first bucket starts at 0
    assert quantile_from_buckets(0.99, buckets) == pytest.approx(0.04 + 0.06 * 9 / 10)
    assert quantile_from_buckets(0.9, [(0.01, 0.0), (0.1, 1.0), (INF, 10.0)]) == 0.1  # in +Inf: the top bound
    assert quantile_from_buckets(0.9, [(0.01, 0.0), (INF, 0.0)]) is None  # no sample
    assert quantile_from_buckets(0.5, [(0.01, 0.0), (0.02, 0.0), (0.04, 4.0), (INF, 4.0)]) == pytest.approx(0.03)
    with pytest.raises(ValueError, match="Inf"):
        quantile_from_buckets(0.5, [(0.01, 1.0)])


def test_router_scrape_source_diffs_the_histograms_over_the_window() -> None:
    source = RouterScrapeSource("unused", quantile=0.9, window_s=10)
    early = [0.03] * 100  # slow tokens, before the window
    source.add(Scrape.parse(router_metrics_text(early, [0.2], 100, 4), at=0))
    assert source.observation() is None  # one scrape is no window
    source.add(Scrape.parse(router_metrics_text(early + [0.003] * 50, [0.2] * 3, 400, 2), at=5))
    o = source.observation()
    assert o is not None and o.window_s == 5
    assert o.itl_s == pytest.approx(0.0045)  # only the 50 new samples: p90 in (0, 0.005]
    assert o.ttft_s == pytest.approx(0.1 + 0.4 * 0.9)  # 2 new TTFTs of 0.2 s, both in (0.1, 0.5]
    assert (o.prompt_tokens_per_s, o.streams) == (60.0, 2.0)
    source.add(Scrape.parse(router_metrics_text(early + [0.003] * 50, [0.2] * 3, 400, 6), at=11))
    source.add(Scrape.parse(router_metrics_text(early + [0.003] * 50 + [0.015] * 10, [0.2] * 3, 500, 6), at=16))
    o = source.observation()  # base: the scrape at 5 s (the newest one at least 10 s old)
    assert o is not None and o.window_s == 11 and o.itl_s == pytest.approx(0.019)
    assert (o.prompt_tokens_per_s, o.streams) == (pytest.approx(100 / 11), 6.0)
    source.add(Scrape.parse(router_metrics_text([], [], 0, 0), at=20))  # the router restarted
    assert source.observation() is None
    with pytest.raises(ValueError, match="router"):
        Scrape.parse("# nothing\n", at=0)


@pytest.fixture()
def stub_http() -> Iterator[tuple[str, list[str], dict[str, str]]]:
    """An HTTP server on 127.0.0.1 answering GETs from `replies` (by path prefix), recording paths."""
    seen: list[str] = []
    replies: dict[str, str] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            body = next((v for k, v in replies.items() if self.path.startswith(k)), None)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write((body or "").encode())

        def log_message(self, *args: object) -> None:
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen, replies
    server.shutdown()
    server.server_close()


def _vector(value: str | None) -> str:
    result = [] if value is None else [{"metric": {}, "value": [1700000000.0, value]}]
    return json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}})


def test_prometheus_source_sends_these_queries(stub_http: tuple[str, list[str], dict[str, str]]) -> None:
    url, seen, replies = stub_http
    source = PrometheusSource(url, quantile=0.95, window_s=60, selector='namespace="tandem"')
    values = {"histogram_quantile(0.95, sum by (le) (rate(tandem_time_to_first_token_seconds": "0.25",
              "histogram_quantile(0.95, sum by (le) (rate(tandem_inter_token_latency_seconds": "NaN",
              "sum(rate(tandem_prompt_tokens_total": "1234.5", "sum(avg_over_time(": None}
    for prefix, value in values.items():
        replies["/api/v1/query?" + urllib.parse.urlencode({"query": prefix})] = _vector(value)
    assert source.observe() == Observation(window_s=60, ttft_s=0.25, itl_s=None, prompt_tokens_per_s=1234.5,
                                           streams=0.0)
    queries = [urllib.parse.parse_qs(urllib.parse.urlparse(p).query)["query"][0] for p in seen]
    assert queries == [
        'histogram_quantile(0.95, sum by (le) (rate(tandem_time_to_first_token_seconds_bucket{namespace="tandem"}'
        '[60s])))',
        'histogram_quantile(0.95, sum by (le) (rate(tandem_inter_token_latency_seconds_bucket{namespace="tandem"}'
        '[60s])))',
        'sum(rate(tandem_prompt_tokens_total{namespace="tandem"}[60s]))',
        'sum(avg_over_time(tandem_router_decoding_streams{namespace="tandem"}[60s]))']


class FakeSource:
    def __init__(self) -> None:
        self.next: Observation | None = None

    def observe(self) -> Observation | None:
        if isinstance(self.next, Exception):
            raise self.next
        return self.next


class FakeActuator:
    def __init__(self, fail: bool = False, failing: tuple[Pool, ...] = ()) -> None:
        self.size: dict[Pool, int] = {"prefill": 1, "decode": 1}
        self.calls: list[tuple[Pool, int]] = []
        self.failing = ("prefill", "decode") if fail else failing

    def current_replicas(self, pool: Pool) -> int:
        return self.size[pool]

    def scale(self, pool: Pool, replicas: int) -> None:
        self.calls.append((pool, replicas))
        if pool in self.failing:
            raise RuntimeError("the scaler is down")
        self.size[pool] = replicas


def test_the_loop_logs_counts_and_applies_every_decision(caplog: pytest.LogCaptureFixture) -> None:
    settings = PlannerSettings(itl_target_s=0.05, planner_interval_s=1, planner_window_s=5, cooldown_s=0,
                               min_prefill_workers=1, max_decode_workers=3)
    source, actuator, now = FakeSource(), FakeActuator(), [0.0]
    loop = PlannerLoop(settings, source, actuator, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="cluster.planner")
    assert loop.tick() is not None  # no observation yet
    source.next = Observation(window_s=5, ttft_s=0.1, itl_s=0.08, prompt_tokens_per_s=10, streams=3)
    assert loop.tick() is None  # within the interval
    now[0] = 1.0
    assert loop.tick() is not None and actuator.calls == [("decode", 2)]
    now[0] = 2.5
    loop.step()
    assert actuator.calls == [("decode", 2), ("decode", 3)]
    lines = [r.getMessage() for r in caplog.records if "decode 1->2" in r.getMessage()]
    assert lines == ["planner: decode 1->2 scale_up reason=itl_over_target (target=0.0500s q0.9=0.0800s load=3.00 "
                     "capacity/worker=unknown) ttft=0.1000s itl=0.0800s prompt_tokens/s=10.0 streams=3.00 window=5s"]
    text = generate_latest(loop.metrics.registry).decode()
    assert metric(text, "tandem_planner_decisions_total", pool="decode", action="scale_up",
                  reason="itl_over_target") == 2
    assert metric(text, "tandem_planner_decisions_total", pool="decode", action="hold", reason="no_data") == 1
    assert metric(text, "tandem_planner_decisions_total", pool="prefill", action="hold", reason="at_min") == 2
    for name, value in (("desired", 3), ("current", 2), ("min", 1), ("max", 3)):
        assert metric(text, f"tandem_planner_{name}_replicas", pool="decode") == value
    assert metric(text, "tandem_planner_max_replicas", pool="prefill") == 4
    port = loop.metrics.serve(0)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert "tandem_planner_desired_replicas{pool=\"decode\"} 3.0" in reply.read().decode()


def test_a_failing_scaler_or_source_does_not_stop_the_loop(caplog: pytest.LogCaptureFixture) -> None:
    settings = PlannerSettings(itl_target_s=0.05, planner_interval_s=1, planner_window_s=5, cooldown_s=0)
    source, actuator = FakeSource(), FakeActuator(fail=True)
    loop = PlannerLoop(settings, source, actuator)
    source.next = Observation(window_s=5, ttft_s=None, itl_s=0.08, prompt_tokens_per_s=0, streams=1)
    loop.step()
    source.next = OSError("connection refused")  # type: ignore[assignment]
    decisions = loop.step()
    assert actuator.calls == [("decode", 2)] and {d.reason for d in decisions} == {"no_data"}
    assert "scaling decode to 2 failed" in caplog.text and "no observation (connection refused)" in caplog.text


def test_a_move_between_pools_shrinks_first_and_grows_only_if_the_shrink_happened(
        tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    profile = tmp_path / "capacity.json"
    CapacityProfile(prefill_tokens_per_s=1000.0, decode=(DecodePoint(1, {"0.9": 0.01}, 100.0),
                                                         DecodePoint(8, {"0.9": 0.05}, 160.0))).save(profile)
    settings = PlannerSettings(ttft_target_s=0.5, itl_target_s=0.05, planner_interval_s=1, planner_window_s=5,
                               max_prefill_workers=7, max_decode_workers=7, max_total_workers=8,
                               capacity_profile=str(profile))
    starved = Observation(window_s=5, ttft_s=5.0, itl_s=0.2, prompt_tokens_per_s=4400, streams=2)
    for failing, calls, size in (((), [("decode", 3), ("prefill", 5)], {"prefill": 5, "decode": 3}),
                                 (("decode",), [("decode", 3)], {"prefill": 1, "decode": 7})):
        source, actuator = FakeSource(), FakeActuator(failing=failing)  # type: ignore[arg-type]
        actuator.size = {"prefill": 1, "decode": 7}
        source.next = starved
        loop = PlannerLoop(settings, source, actuator)
        assert loop.step()[0].reason == "budget" and not actuator.calls  # the first decision calls for the move
        decisions = loop.step()
        assert [d.pool for d in decisions] == ["prefill", "decode"]  # recorded in pool order
        assert actuator.calls == calls and actuator.size == size
    assert "not growing prefill: the pool that was to give its workers did not shrink" in caplog.text


_FAKE_WORKER = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("READY w-" + sys.argv[1] + " 127.0.0.1:1 2", flush=True)
time.sleep(60)
"""


def test_the_local_actuator_starts_announces_and_drains_the_newest() -> None:
    announced: list[tuple[Pool, int, list[str]]] = []
    started: list[subprocess.Popen] = []

    def start(pool: Pool) -> subprocess.Popen:
        started.append(subprocess.Popen([sys.executable, "-c", _FAKE_WORKER, f"{pool}{len(started)}"],
                                        stdout=subprocess.PIPE, text=True))
        return started[-1]
    actuator = LocalProcessActuator(start, lambda pool, proc, ready: announced.append((pool, proc.pid, ready)))
    first = start("decode")
    actuator.adopt("decode", first)
    assert actuator.current_replicas("decode") == 1 and actuator.current_replicas("prefill") == 0
    actuator.scale("decode", 3)
    actuator.scale("prefill", 1)
    assert [actuator.current_replicas(p) for p in ("prefill", "decode")] == [1, 3]
    deadline = time.monotonic() + 20
    while len(announced) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted((pool, ready) for pool, _, ready in announced) == [
        ("decode", ["w-decode1", "127.0.0.1:1", "2"]), ("decode", ["w-decode2", "127.0.0.1:1", "2"]),
        ("prefill", ["w-prefill3", "127.0.0.1:1", "2"])]
    actuator.scale("decode", 1)  # the two newest get SIGTERM and leave the count at once
    assert actuator.current_replicas("decode") == 1
    assert [p.wait(10) for p in started[1:3]] == [0, 0] and first.poll() is None
    assert set(actuator.processes()) == {started[0], started[3]}  # the drained ones were reaped
    first.kill()
    first.wait()
    assert actuator.current_replicas("decode") == 0  # one that died is no longer counted
    for proc in started:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    with pytest.raises(ValueError):
        actuator.scale("decode", -1)
