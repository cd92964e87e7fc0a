"""Settings of the SLO planner. Flags and TANDEM_* variables map onto these fields (common/settings.py):
`tandem up --planner true` takes PlannerSettings, `tandem planner` (Kubernetes) PlannerServiceSettings,
`tandem profile` ProfileSettings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from common.settings import described

Pool = Literal["prefill", "decode"]
POOLS: tuple[Pool, ...] = ("prefill", "decode")


@dataclass(frozen=True)
class PoolBounds:
    min: int
    max: int


@dataclass(frozen=True)
class PlannerSettings:
    ttft_target_s: float = field(default=1.0, metadata=described("prefill pool's target: TTFT at the quantile"))
    itl_target_s: float = field(default=0.1, metadata=described("decode pool's target: ITL at the quantile"))
    latency_quantile: float = field(default=0.9, metadata=described("quantile the targets apply to"))
    capacity_profile: str | None = field(default=None, metadata=described(
        "JSON capacity profile from `tandem profile`; without one the planner follows latency alone"))
    prometheus_url: str = field(default="", metadata=described(
        "Prometheus to query (/api/v1/query); empty: scrape the router's /metrics and diff it"))
    prometheus_selector: str = field(default="", metadata=described(
        "label matchers added to every Prometheus query, e.g. namespace=\"tandem\""))
    planner_interval_s: float = field(default=10.0, metadata=described("seconds between two decisions"))
    planner_window_s: float = field(default=60.0, metadata=described("rate window of the observations"))
    cooldown_s: float = field(default=60.0, metadata=described("after scaling a pool, seconds it is left alone"))
    scale_down_delay_s: float = field(default=120.0, metadata=described(
        "a pool shrinks only after being comfortably under its target for this long"))
    scale_up_utilization: float = field(default=0.9, metadata=described(
        "grow a pool when its load passes this share of its profiled capacity"))
    scale_down_utilization: float = field(default=0.6, metadata=described(
        "shrink only if the remaining workers would run under this share of their capacity"))
    scale_down_latency_ratio: float = field(default=0.7, metadata=described(
        "shrink only if the latency quantile, now and as projected with one worker less, is under "
        "this share of the target"))
    min_prefill_workers: int = field(default=1, metadata=described(
        "prefill pool's lower bound; 0 lets it empty when idle (decode workers then prefill themselves)"))
    max_prefill_workers: int = field(default=4, metadata=described("prefill pool's upper bound"))
    min_decode_workers: int = field(default=1, metadata=described("decode pool's lower bound"))
    max_decode_workers: int = field(default=4, metadata=described("decode pool's upper bound"))
    max_total_workers: int = field(default=8, metadata=described("budget: prefill + decode workers at most"))
    prefill_worker_devices: int = field(default=1, metadata=described(
        "devices one prefill worker holds: its tensor-parallel degree (a group of N ranks is one replica of N)"))
    decode_worker_devices: int = field(default=1, metadata=described("devices one decode worker holds (see above)"))
    max_total_devices: int = field(default=0, metadata=described(
        "budget: devices the prefill and decode workers hold at most, each worker its pool's devices; 0: none"))
    planner_metrics_port: int = field(default=0, metadata=described("planner's Prometheus /metrics port; 0: any"))

    def __post_init__(self) -> None:
        if min(self.ttft_target_s, self.itl_target_s) <= 0 or not 0 < self.latency_quantile < 1:
            raise ValueError("latency targets must be > 0 and latency_quantile in (0, 1)")
        if self.planner_interval_s <= 0 or self.planner_window_s < self.planner_interval_s:
            raise ValueError("planner_interval_s must be > 0 and planner_window_s >= planner_interval_s")
        if min(self.cooldown_s, self.scale_down_delay_s) < 0:
            raise ValueError("cooldown_s and scale_down_delay_s must be >= 0")
        # the gap between the two utilizations is the hysteresis band: steady load sits in it
        if not 0 < self.scale_down_utilization < self.scale_up_utilization <= 1:
            raise ValueError("need 0 < scale_down_utilization < scale_up_utilization <= 1")
        if not 0 < self.scale_down_latency_ratio < 1:
            raise ValueError("scale_down_latency_ratio must be in (0, 1)")
        if self.min_prefill_workers < 0 or self.min_decode_workers < 1:
            raise ValueError("min_prefill_workers must be >= 0 and min_decode_workers >= 1")
        if self.max_prefill_workers < self.min_prefill_workers or self.max_decode_workers < self.min_decode_workers:
            raise ValueError("a pool's max workers must be >= its min")
        if self.max_total_workers < self.min_prefill_workers + self.min_decode_workers:
            raise ValueError("max_total_workers must hold both pools' minimums")
        if min(self.prefill_worker_devices, self.decode_worker_devices) < 1 or self.max_total_devices < 0:
            raise ValueError("a worker holds >= 1 device, and max_total_devices must be >= 0 (0: no device budget)")
        if self.max_total_devices and self.max_total_devices < self.devices(
                {"prefill": self.min_prefill_workers, "decode": self.min_decode_workers}):
            raise ValueError("max_total_devices must hold both pools' minimums, each worker its pool's devices")

    def worker_devices(self, pool: Pool) -> int:
        return self.prefill_worker_devices if pool == "prefill" else self.decode_worker_devices

    def devices(self, workers: Mapping[Pool, int]) -> int:
        """Devices `workers` (per pool) hold."""
        return sum(n * self.worker_devices(pool) for pool, n in workers.items())

    def over_budget(self, workers: Mapping[Pool, int]) -> bool:
        """`workers` (per pool) exceed the worker budget or the device budget."""
        return sum(workers.values()) > self.max_total_workers or bool(
            self.max_total_devices and self.devices(workers) > self.max_total_devices)

    def bounds(self, pool: Pool) -> PoolBounds:
        if pool == "prefill":
            return PoolBounds(self.min_prefill_workers, self.max_prefill_workers)
        return PoolBounds(self.min_decode_workers, self.max_decode_workers)

    def target_s(self, pool: Pool) -> float:
        return self.ttft_target_s if pool == "prefill" else self.itl_target_s


@dataclass(frozen=True)
class PlannerServiceSettings(PlannerSettings):
    """`tandem planner`: the planner as its own process, scaling Kubernetes Deployments."""

    router_metrics_url: str = field(default="", metadata=described(
        "the router's /metrics URL, scraped when no Prometheus URL is set"))
    kube_namespace: str = field(default="", metadata=described(
        "namespace of the Deployments; empty: the pod's own (service account), else default"))
    prefill_deployment: str = field(default="prefill", metadata=described("Deployment of the prefill pool"))
    decode_deployment: str = field(default="decode", metadata=described("Deployment of the decode pool"))
    kube_api_server: str = field(default="", metadata=described(
        "API server URL; empty: in-cluster config, else ~/.kube/config"))
    planner_metrics_host: str = field(default="127.0.0.1", metadata=described(
        "address the /metrics port binds (0.0.0.0 in a pod)"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.prometheus_url and not self.router_metrics_url:
            raise ValueError("set prometheus_url or router_metrics_url: the planner needs observations")


@dataclass(frozen=True)
class ProfileSettings:
    address: str = field(metadata=described("gRPC host:port of the router (tandem.v1.Inference) or of a worker"))
    via: Literal["router", "worker"] = field(default="router", metadata=described(
        "router: the whole cluster; worker: one decode or aggregated worker, prefilling locally"))
    output: str = field(default="capacity-profile.json", metadata=described("where the JSON profile goes"))
    prefill_workers: int = field(default=1, metadata=described("prefill workers behind the router (per-worker "
                                                               "division); 1 via a worker"))
    decode_workers: int = field(default=1, metadata=described("decode workers behind the router; 1 via a worker"))
    prompt_tokens: int = field(default=128, metadata=described("prefill phase: prompt length"))
    prefill_concurrency: int = field(default=4, metadata=described("prefill phase: clients at once"))
    prefill_s: float = field(default=10.0, metadata=described("prefill phase: seconds; 0: skip it"))
    decode_batches: str = field(default="1,2,4,8,16,32", metadata=described("decode: concurrent streams, rising"))
    decode_tokens: int = field(default=64, metadata=described("decode: tokens per request"))
    decode_prompt_tokens: int = field(default=16, metadata=described("decode: prompt length"))
    step_s: float = field(default=10.0, metadata=described("decode: seconds per batch size"))
    max_itl_s: float = field(default=1.0, metadata=described("decode: stop rising once the ITL p90 passes this"))
    time_budget_s: float = field(default=180.0, metadata=described("the whole profile stops by then"))
    max_token_id: int = field(default=500, metadata=described("prompts use random ids in [4, this)"))
    api_key: str = field(default="", repr=False, metadata=described("the router's API key, if it needs one",
                                                                    secret=True))

    def __post_init__(self) -> None:
        if min(self.prefill_workers, self.decode_workers, self.prompt_tokens, self.prefill_concurrency,
               self.decode_tokens, self.decode_prompt_tokens) < 1 or self.max_token_id <= 4:
            raise ValueError("worker counts, token counts and concurrency must be >= 1, max_token_id > 4")
        if self.prefill_s < 0 or min(self.step_s, self.max_itl_s, self.time_budget_s) <= 0:
            raise ValueError("prefill_s must be >= 0; step_s, max_itl_s and time_budget_s > 0")
        if not self.batches or any(b < 1 for b in self.batches):
            raise ValueError(f"decode_batches must list positive sizes, got {self.decode_batches!r}")

    @property
    def batches(self) -> list[int]:
        return sorted({int(b) for b in self.decode_batches.split(",") if b.strip()})
