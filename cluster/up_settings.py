"""Settings of `tandem up` (a whole cluster on this machine, or on Ray with --ray). Flags and
TANDEM_* variables map onto these fields (common.settings)."""

from __future__ import annotations

import secrets
import ssl
from dataclasses import dataclass, field
from typing import Literal

from cluster.api_keys import ApiKeys
from cluster.key_limits import load_key_limits
from cluster.router_settings import RouterSettings
from cluster.routing import PolicyName
from cluster.up_events import OUTPUT_FORMATS, OutputFormat
from common.security import SecuritySettings
from common.settings import described, settings_from_argv
from common.tls import client_ssl_context
from engine.config import ComputeDtype
from kv_store.settings import KVStoreSettings
from worker_runtime.settings import WorkerSettings

# where Ray places the actors (cluster.ray_backend.placement)
PlacementMode = Literal["auto", "resources", "gpus", "any"]
PLACEMENT_MODES: tuple[PlacementMode, ...] = ("auto", "resources", "gpus", "any")


@dataclass(frozen=True)
class UpSettings(SecuritySettings):
    prefill: int = field(default=1, metadata=described("prefill workers"))
    decode: int = field(default=1, metadata=described("decode workers"))
    both: int = field(default=0, metadata=described("aggregated workers (prefill and decode in one)"))
    etcd: str = field(default="", metadata=described("existing etcd host:port; empty: start a local one"))
    cluster: str = field(default="default", metadata=described("cluster name"))
    model: str | None = field(default=None, metadata=described("HF folder or .gguf; default SmolLM2-135M-Instruct"))
    dtype: ComputeDtype = field(default="auto", metadata=described("compute dtype of the workers"))
    num_kv_blocks: int | None = field(default=None, metadata=described("KV blocks per worker"))
    kv_offload_gib: float = field(default=0.0, metadata=described(
        "each worker's second KV tier in GiB (cached blocks kept past the pool's eviction; see worker); 0: none"))
    kv_offload_dir: str | None = field(default=None, metadata=described("directory of the second tiers' files"))
    kv_store: int = field(default=0, metadata=described(
        "cluster KV store processes (tandem kvstore): the disaggregated workers put the blocks they free there and "
        "read a prompt's blocks from there instead of computing them; each worker's second tier is the staging "
        "area (--kv-offload-gib, 0.25 when not given)"))
    kv_store_gib: float = field(default=1.0, metadata=described("memory of each KV store, GiB"))
    max_num_seqs: int = field(default=64, metadata=described("most sequences in one worker's batch"))
    min_remote_prefill_tokens: int = field(default=32, metadata=described("shorter prompts prefill on decode"))
    num_threads: int | None = field(default=None, metadata=described("torch threads per worker on CPU"))
    deterministic: bool = field(default=False, metadata=described(
        "batch-invariant workers: greedy tokens independent of batching, so migration and remote prefill "
        "stay exact in bf16 too (CPU only)"))
    async_scheduling: bool = field(default=False, metadata=described(
        "workers schedule the next step while the current one runs"))
    hybrid_kv_cache: bool = field(default=True, metadata=described(
        "workers keep a windowed-and-global model's windowed layers' KV in blocks of their own (see worker)"))
    speculative_model: str | None = field(default=None, metadata=described(
        "decode (and aggregated) workers speculate with this draft model, or self-int4 (see worker); none: off"))
    num_speculative_tokens: int = field(default=4, metadata=described("most draft tokens per step (see worker)"))
    speculative_adaptive: bool = field(default=True, metadata=described(
        "speculate only as far as predicted to pay (see worker)"))
    tensor_parallel_size: int = field(default=1, metadata=described(
        "ranks (processes, devices) of each worker's tensor-parallel group (see worker)"))
    prefill_tensor_parallel_size: int = field(default=0, metadata=described(
        "the prefill workers' degree, if other than --tensor-parallel-size (0)"))
    decode_tensor_parallel_size: int = field(default=0, metadata=described(
        "the decode workers' degree, if other than --tensor-parallel-size (0)"))
    simulate: str | None = field(default=None, metadata=described(
        "simulation profile (JSON): every worker runs a simulated engine with its step times (engine.simulated)"))
    prefill_timeout_s: float = field(default=30.0, metadata=described("deadline of one remote prefill"))
    max_queued_requests: int = field(default=256, metadata=described("requests a worker queues beyond a full batch"))
    max_inflight: int = field(default=512, metadata=described("requests in flight at the router before 429"))
    kv_backends: str = field(default="", metadata=described("transfer backends, comma separated; empty: all"))
    policy: PolicyName = field(default="kv_aware", metadata=described("routing policy"))
    host: str = field(default="127.0.0.1", metadata=described("address every component binds"))
    http_port: int = field(default=8000, metadata=described("OpenAI-compatible HTTP port"))
    grpc_port: int = field(default=50051, metadata=described("tandem.v1.Inference gRPC port"))
    lease_ttl_s: int = field(default=3, metadata=described("etcd lease of each worker record"))
    grace_s: float = field(default=10.0, metadata=described("on stop: seconds in-flight requests get"))
    start_timeout_s: float = field(default=600.0, metadata=described("how long the processes get to start"))
    api_keys_file: str | None = field(default=None, metadata=described("the router's API key file (see router)"))
    api_keys: str = field(default="", repr=False, metadata=described(
        "the router's API keys, comma separated; handed on as a variable, not a flag", secret=True))
    shared_prefix_cache: bool = field(default=False, metadata=described(
        "with API keys: every key shares the prefix cache (see router)"))
    api_key_limits: str | None = field(default=None, metadata=described(
        "the router's per-key limits file (see router)"))
    planner: bool = field(default=False, metadata=described(
        "run the SLO planner: it scales the prefill and decode pools (its flags: --itl-target-s, ...)"))
    ray: str = field(default="", metadata=described(
        "a Ray cluster's address (host:port, or auto): the router and the pools run as Ray actors there "
        "(docs/deployment-ray.md); empty: local processes"))
    ray_placement: PlacementMode = field(default="auto", metadata=described(
        "with --ray: resources (custom resources prefill / decode / router), gpus (one per worker), any, "
        "or auto (resources if defined, else gpus if any, else any)"))
    ray_worker_cpus: float = field(default=1.0, metadata=described(
        "with --ray: CPUs each worker actor reserves (on CPU nodes also its torch threads)"))
    ray_max_restarts: int | None = field(default=None, metadata=described(
        "with --ray: restarts Ray gives an actor that died before replacing it; default unlimited"))
    output_format: OutputFormat = field(default="text", metadata=described(
        "what this command prints about its cluster: text lines, or json (one event per line, for programs)"))

    def __post_init__(self) -> None:
        if self.kv_secret is None:  # the cluster's own: its workers' KV links are authenticated
            object.__setattr__(self, "kv_secret", secrets.token_hex(32))
        super().__post_init__()
        load_key_limits(self.api_key_limits, ApiKeys.load(self.api_keys_file, self.api_keys))
        etcd_access = self.etcd_access()
        if not self.etcd and (etcd_access.tls or etcd_access.user is not None):
            raise ValueError("etcd TLS and user options need --etcd: the local etcd is plaintext, without auth")
        if not self.kv_offload_gib >= 0:
            raise ValueError(f"kv_offload_gib must be >= 0, got {self.kv_offload_gib}")
        if self.kv_store < 0 or not self.kv_store_gib > 0:
            raise ValueError("kv_store must be >= 0 and kv_store_gib > 0")
        if self.kv_store and not self.kv_offload_gib:
            object.__setattr__(self, "kv_offload_gib", 0.25)  # the stores are reached through the tier
        if min(self.prefill, self.decode, self.both) < 0 or self.decode + self.both == 0:
            raise ValueError("need at least one decode or aggregated worker, and no negative counts")
        if self.planner and self.both:
            raise ValueError("the planner scales the prefill and decode pools: no aggregated workers with it")
        if self.ray_placement not in PLACEMENT_MODES:
            raise ValueError(f"ray_placement must be one of {PLACEMENT_MODES}, got {self.ray_placement!r}")
        if self.speculative_model is not None and (self.async_scheduling or self.simulate is not None):
            raise ValueError("speculative_model runs a real model without async scheduling: drop one of them")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if self.tensor_parallel_size < 1 or min(self.prefill_tensor_parallel_size,
                                                self.decode_tensor_parallel_size) < 0:
            raise ValueError("tensor_parallel_size must be >= 1, and the pools' degrees >= 0 (0: that one)")
        if (self.prefill_tensor_parallel_size and not self.prefill) or (self.decode_tensor_parallel_size
                                                                        and not self.decode):
            raise ValueError("a pool's tensor-parallel degree is given for a pool of no workers (--prefill / --decode)")
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {self.output_format!r}")
        if not self.ray_worker_cpus >= 0 or (self.ray_max_restarts is not None and self.ray_max_restarts < 0):
            raise ValueError("ray_worker_cpus and ray_max_restarts must be >= 0")

    def degree(self, role: str) -> int:
        """The tensor-parallel degree of `role`'s workers."""
        own = {"prefill": self.prefill_tensor_parallel_size, "decode": self.decode_tensor_parallel_size}.get(role, 0)
        return own or self.tensor_parallel_size

    def worker_args(self, role: str, etcd: str) -> list[str]:
        args = ["worker", "--role", role, "--etcd", etcd, "--cluster", self.cluster, "--dtype", self.dtype,
                "--host", self.host, "--max-num-seqs", str(self.max_num_seqs), "--lease-ttl-s", str(self.lease_ttl_s),
                "--min-remote-prefill-tokens", str(self.min_remote_prefill_tokens), "--grace-s", str(self.grace_s),
                "--prefill-timeout-s", str(self.prefill_timeout_s),
                "--max-queued-requests", str(self.max_queued_requests), "--deterministic", str(self.deterministic),
                "--async-scheduling", str(self.async_scheduling), "--hybrid-kv-cache", str(self.hybrid_kv_cache),
                "--tensor-parallel-size", str(self.degree(role))]
        for flag, value in (("--model", self.model), ("--num-kv-blocks", self.num_kv_blocks),
                            ("--kv-offload-gib", self.kv_offload_gib or None),
                            ("--kv-offload-dir", self.kv_offload_dir),
                            ("--simulate", self.simulate), ("--num-threads", self.num_threads),
                            ("--kv-backends", self.kv_backends or None)):
            if value is not None:
                args += [flag, str(value)]
        if self.kv_store and role != "both":
            args += ["--use-kv-store", "true"]
        if self.speculative_model is not None and role != "prefill":  # a prefill worker decodes nothing
            args += ["--speculative-model", self.speculative_model,
                     "--num-speculative-tokens", str(self.num_speculative_tokens),
                     "--speculative-adaptive", str(self.speculative_adaptive)]
        return args + self.security_args()

    def kv_store_args(self, etcd: str) -> list[str]:
        args = ["kvstore", "--etcd", etcd, "--cluster", self.cluster, "--host", self.host,
                "--capacity-gib", str(self.kv_store_gib), "--lease-ttl-s", str(self.lease_ttl_s)]
        args += ["--kv-backends", self.kv_backends] if self.kv_backends else []
        return args + self.security_args()

    def router_args(self, etcd: str) -> list[str]:
        args = ["router", "--etcd", etcd, "--cluster", self.cluster, "--host", self.host, "--policy", self.policy,
                "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port), "--grace-s", str(self.grace_s),
                "--max-inflight", str(self.max_inflight), "--shared-prefix-cache", str(self.shared_prefix_cache)]
        args += ["--model", self.model] if self.model else []
        args += ["--api-keys-file", self.api_keys_file] if self.api_keys_file else []
        args += ["--api-key-limits", self.api_key_limits] if self.api_key_limits else []
        return args + self.security_args()

    def worker_settings(self, role: str, etcd: str) -> WorkerSettings:
        """What `tandem worker` with worker_args and security_env would run (for in-process workers)."""
        return settings_from_argv(WorkerSettings, self.worker_args(role, etcd)[1:], etcd_password=self.etcd_password,
                                  kv_secret=self.kv_secret)

    def kv_store_settings(self, etcd: str) -> KVStoreSettings:
        """What `tandem kvstore` with kv_store_args and security_env would run (for in-process stores)."""
        return settings_from_argv(KVStoreSettings, self.kv_store_args(etcd)[1:], etcd_password=self.etcd_password,
                                  kv_secret=self.kv_secret)

    def router_settings(self, etcd: str) -> RouterSettings:
        return settings_from_argv(RouterSettings, self.router_args(etcd)[1:], etcd_password=self.etcd_password,
                                  api_keys=self.api_keys)

    def router_env(self) -> dict[str, str]:
        """Secrets for the router, as variables: argv is world-readable."""
        secrets_ = {k: v for k, v in self.security_env().items() if k != "TANDEM_KV_SECRET"}  # workers' only
        return {**secrets_, **({"TANDEM_API_KEYS": self.api_keys} if self.api_keys else {})}

    def https_context(self) -> ssl.SSLContext | None:
        files = self.tls_files()
        return None if files is None else client_ssl_context(files)
