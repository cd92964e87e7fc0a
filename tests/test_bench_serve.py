"""bench.serve: its workloads and arrival processes, its summaries, and short runs of every
workload through both APIs against a real local cluster, whose results must be self-consistent."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest

from bench.serve.__main__ import _parser, main_async
from bench.serve.arrivals import arrival_offsets
from bench.serve.client import RequestResult, record_outcome
from bench.serve.metrics import SLO, summarize
from bench.serve.workloads import WORKLOADS, generate
from cluster.up_process import tandem_up


@pytest.mark.parametrize("name", WORKLOADS)
def test_workloads_are_seeded_and_bounded(name: str) -> None:
    a = generate(name, 20, seed=3, vocab=512, max_prompt=100, max_answer=20)
    assert a == generate(name, 20, seed=3, vocab=512, max_prompt=100, max_answer=20)
    assert a != generate(name, 20, seed=4, vocab=512, max_prompt=100, max_answer=20)
    for session in a:
        for turn in session.turns:
            assert 1 <= turn.max_tokens <= 20
            assert len(turn.prompt_ids) <= 100 and all(0 <= t < 512 for t in turn.prompt_ids)
            assert session.chat == bool(turn.user_message) == (not turn.prompt_ids)
    if name == "multiturn":
        assert len({s.system_prompt for s in a}) == 4 and all(len(s.turns) >= 2 for s in a)


def test_arrivals() -> None:
    poisson = arrival_offsets(4000, rate=20.0, seed=1)
    gaps = np.diff(poisson)
    assert poisson[0] == 0 and (gaps >= 0).all()
    assert abs(gaps.mean() - 1 / 20) < 0.005  # mean gap 1/rate
    assert abs(gaps.std() / gaps.mean() - 1) < 0.1  # exponential: coefficient of variation 1
    bursty = np.diff(arrival_offsets(4000, rate=20.0, burstiness=0.25, seed=1))
    assert bursty.std() / bursty.mean() > 1.7  # gamma shape k: CV 1/sqrt(k) = 2
    assert arrival_offsets(5, rate=math.inf) == [0.0] * 5
    with pytest.raises(ValueError):
        arrival_offsets(5, rate=0)


def _result(ttft: float, gaps: list[float], ok: bool = True) -> RequestResult:
    r = RequestResult(0, 0, 0.0, ok=ok, ttft=ttft, itl=gaps, prompt_tokens=10, output_tokens=len(gaps) + 1,
                      cached_tokens=5)
    r.e2e = ttft + sum(gaps)
    return r


@pytest.mark.parametrize(("finish_reason", "tokens", "ok"), [
    ("length", 5, True), ("stop", 1, True),
    ("", 5, False),  # truncated: the stream ended before its final chunk
    ("abort", 3, False), ("length", 0, False)])
def test_only_complete_streams_count_as_successes(finish_reason: str, tokens: int, ok: bool) -> None:
    result = RequestResult(0, 0, 0.0, output_tokens=tokens, finish_reason=finish_reason)
    record_outcome(result)
    assert result.ok is ok and bool(result.error) is not ok


def test_summary_counts_percentiles_and_goodput() -> None:
    results = [_result(0.1, [0.02] * 9), _result(0.5, [0.05] * 9), _result(3.0, [0.01] * 4),
               _result(0.2, [], ok=False)]
    s = summarize(results, duration_s=2.0, slo=SLO(ttft_ms=1000, tpot_ms=30))
    assert (s["requests"], s["completed"], s["failed"]) == (4, 3, 1)
    assert s["slo_met"] == 1  # the 2nd misses TPOT, the 3rd TTFT
    assert s["goodput_rps"] == 0.5 and s["requests_per_s"] == 1.5 and s["output_tokens_per_s"] == 25 / 2
    assert s["prefix_hit_rate"] == 0.5
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        assert s[key]["p50"] <= s[key]["p90"] <= s[key]["p99"]
    assert s["tpot_ms"]["p50"] == pytest.approx(20)


def _check_report(out: pathlib.Path, expected_runs: int) -> None:
    report = json.loads((out / "results.json").read_text())
    requests = json.loads((out / "requests.json").read_text())
    assert len(report["runs"]) == expected_runs == len(requests)
    for run, (label, rows) in zip(report["runs"], requests.items(), strict=True):
        s = run["summary"]
        assert label.startswith(run["config"])
        assert s["failed"] == 0, s["errors"]
        assert s["requests"] == s["completed"] == len(rows) > 0
        assert s["output_tokens"] == sum(r["output_tokens"] for r in rows)
        assert all(len(r["itl"]) + 1 <= r["output_tokens"] for r in rows)  # a chunk carries >= 1 token
        for key in ("ttft_ms", "itl_ms", "e2e_ms"):
            assert s[key]["p50"] <= s[key]["p90"] <= s[key]["p99"]
        assert s["ttft_ms"]["p99"] <= s["e2e_ms"]["p99"] + 1e-6
        assert 0 <= s["goodput_rps"] <= s["requests_per_s"] + 1e-9
        assert 0 <= s["prefix_hit_rate"] <= 1
    assert (out / "latency_cdf.png").stat().st_size > 0 and (out / "itl_over_time.png").stat().st_size > 0


@pytest.mark.slow
async def test_every_workload_through_both_apis(tiny_llama_dir, tmp_path: pathlib.Path) -> None:
    common = ["--num-sessions", "4", "--max-prompt", "48", "--max-answer", "8", "--vocab", "512", "--no-progress"]
    with tandem_up("--prefill", "1", "--decode", "1", "--model", str(tiny_llama_dir), "--dtype", "float32",
                   "--min-remote-prefill-tokens", "8") as cluster:
        for workload in WORKLOADS:
            for target in (["--url", cluster.http_url], ["--grpc", cluster.grpc_address]):
                out = tmp_path / f"{workload}-{target[0][2:]}"
                args = _parser().parse_args([*target, "--workload", workload, "--rate", "20", *common,
                                             "--out", str(out)])
                await main_async(args)
                _check_report(out, 1)
    sweep = tmp_path / "sweep"
    args = _parser().parse_args([
        "--config", f"agg=--prefill 0 --decode 0 --both 1 --model {tiny_llama_dir} --dtype float32",
        "--config", f"disagg=--prefill 1 --decode 1 --model {tiny_llama_dir} --dtype float32",
        "--workload", "sharegpt", "--rate", "10", "inf", *common, "--out", str(sweep)])
    report = await main_async(args)
    _check_report(sweep, 4)
    assert (sweep / "versus_rate.png").stat().st_size > 0
    disagg = [r for r in report["runs"] if r["config"] == "disagg"]
    assert all(r["summary"]["cluster"]["decode/decisions_remote"] > 0 for r in disagg)
