"""Settings of one worker process (any role). Flags and TANDEM_* variables map onto these fields
(common/settings.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.security import SecuritySettings
from common.settings import described
from common.worker_record import ROLES, WorkerRole
from engine.config import ComputeDtype, EngineConfig, SpeculativeConfig


@dataclass(frozen=True)
class WorkerSettings(SecuritySettings):
    etcd: str = field(metadata=described("etcd endpoint host:port"))
    role: WorkerRole = field(default="both", metadata=described("prefill, decode, or both (aggregated)"))
    cluster: str = field(default="default", metadata=described("cluster name: the etcd key prefix"))
    worker_id: str = field(default="", metadata=described("unique id; empty: <role>-<host>-<port>"))
    model: str | None = field(default=None, metadata=described("HF folder or .gguf; default SmolLM2-135M-Instruct"))
    dtype: ComputeDtype = field(default="auto", metadata=described("compute dtype; auto: bf16 where fast"))
    host: str = field(default="127.0.0.1", metadata=described("address to bind and to advertise"))
    grpc_port: int = field(default=0, metadata=described("0: any free port"))
    metrics_port: int = field(default=0, metadata=described("Prometheus /metrics port; 0: any free port"))
    num_kv_blocks: int | None = field(default=None, metadata=described("KV cache size in blocks; default from memory"))
    kv_offload_gib: float = field(default=0.0, metadata=described(
        "a second KV tier of this many GiB: cached blocks the pool frees are copied there, and loaded back on a prefix "
        "hit once the pool has evicted them (a memory-mapped file on CPU, pinned host memory on GPU); 0: none"))
    kv_offload_dir: str | None = field(default=None, metadata=described(
        "directory of the second tier's file on CPU, on local disk (its space is allocated at start); default: the "
        "temp dir, which may be in memory (tmpfs)"))
    use_kv_store: bool = field(default=False, metadata=described(
        "use the cluster KV stores listed in etcd (tandem kvstore): blocks the pool frees are put there, and a "
        "prompt's blocks held there are read instead of computed; needs --kv-offload-gib (the staging area) and "
        "a disaggregated role"))
    kv_store_put: Literal["all", "repeated"] = field(default="all", metadata=described(
        "which freed blocks go to the KV store: all, or only those of prompts this worker saw more than once"))
    kv_store_timeout_s: float = field(default=1.0, metadata=described(
        "the most a KV store read delays a prompt (then its blocks are computed), and a put's deadline"))
    speculative_model: str | None = field(default=None, metadata=described(
        "speculative decoding with this draft model: a smaller HF folder or .gguf sharing the model's tokenizer, "
        "or self-int4 (the model's own weights in int4); each step drafts only as far as measured acceptance and "
        "step costs predict a gain (decode and aggregated workers; not with --async-scheduling); none: off"))
    num_speculative_tokens: int = field(default=4, metadata=described(
        "with --speculative-model: most draft tokens per sequence and step"))
    speculative_adaptive: bool = field(default=True, metadata=described(
        "with --speculative-model: speculate only as far as predicted to pay (false: every step, all the drafts)"))
    max_num_seqs: int = field(default=64, metadata=described("most sequences in one batch"))
    max_model_len: int | None = field(default=None, metadata=described("context length cap"))
    num_threads: int | None = field(default=None, metadata=described(
        "torch threads on CPU (per rank); default: torch's, or with tensor parallelism each rank's share of the cores"))
    deterministic: bool = field(default=False, metadata=described(
        "batch-invariant engine: a request's greedy tokens do not depend on what else is batched with it "
        "(bf16 too; CPU only)"))
    async_scheduling: bool = field(default=False, metadata=described(
        "schedule the next step while the current one runs (on a CPU it takes cores from the forward)"))
    hybrid_kv_cache: bool = field(default=True, metadata=described(
        "a model with windowed and global layers (Gemma 2/3, Qwen with max_window_layers) keeps its windowed "
        "layers' KV in blocks of their own, given back behind the window (engine.kv_groups; not with a second KV "
        "tier or the KV store); the prefill and decode workers of a model must agree on it"))
    tensor_parallel_size: int = field(default=1, metadata=described(
        "ranks of a tensor-parallel group: one process (and device) each, this one rank 0, the worker one endpoint "
        "and one etcd record; the model's heads, MLP columns and vocabulary are split over them. Between prefill "
        "and decode workers of any degrees each prefill rank pushes its KV heads to the decode ranks holding them"))
    simulate: str | None = field(default=None, metadata=described(
        "simulation profile (JSON, bench.sim_profile): run no model, take its measured step times (engine.simulated)"))
    replicas: int = field(default=1, metadata=described(
        "with --simulate: simulated workers in this process, each with its own gRPC server, etcd record, "
        "metrics port and engine (ids <worker-id>-<i>; ports must be 0)"))
    grace_s: float = field(default=30.0, metadata=described("SIGTERM: seconds in-flight requests get to finish"))
    lease_ttl_s: int = field(default=3, metadata=described("etcd lease of the worker's record"))
    kv_backends: str = field(default="", metadata=described("transfer backends in order, comma separated; "
                                                            "empty: every one available"))
    min_remote_prefill_tokens: int = field(default=32, metadata=described(
        "decode role: prompts with fewer uncached tokens than this prefill locally"))
    prefill_timeout_s: float = field(default=30.0, metadata=described("decode role: deadline of one remote prefill"))
    max_queued_requests: int = field(default=256, metadata=described(
        "requests admitted beyond --max-num-seqs (queued in the engine) before RESOURCE_EXHAUSTED"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.grace_s < 0 or self.lease_ttl_s < 2:
            raise ValueError("grace_s must be >= 0 and lease_ttl_s >= 2")
        if self.min_remote_prefill_tokens < 0 or self.prefill_timeout_s <= 0:
            raise ValueError("min_remote_prefill_tokens must be >= 0 and prefill_timeout_s > 0")
        if self.max_queued_requests < 0:
            raise ValueError("max_queued_requests must be >= 0")
        if not self.kv_offload_gib >= 0:
            raise ValueError(f"kv_offload_gib must be >= 0, got {self.kv_offload_gib}")
        if self.use_kv_store and (not self.kv_offload_gib or self.role == "both" or self.simulate is not None):
            raise ValueError("use_kv_store needs kv_offload_gib > 0 (the store's staging area), a prefill or decode "
                             "role (a transfer engine) and a real model")
        if self.kv_store_put not in ("all", "repeated") or not self.kv_store_timeout_s > 0:
            raise ValueError("kv_store_put must be all or repeated, and kv_store_timeout_s > 0")
        if self.speculative_model is not None and (self.role == "prefill" or self.simulate is not None
                                                   or self.async_scheduling):
            raise ValueError("speculative_model is for decode and aggregated workers running a real model without "
                             "async scheduling")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if self.tensor_parallel_size < 1 or (self.tensor_parallel_size > 1 and (
                self.simulate is not None or self.use_kv_store)):
            raise ValueError("tensor_parallel_size must be >= 1; above 1 the worker runs a real model and shares no "
                             "KV through the cluster KV store (its second tier stays its own)")
        if self.replicas < 1 or (self.replicas > 1 and (self.simulate is None or self.grpc_port or self.metrics_port)):
            raise ValueError("replicas must be >= 1; more than one needs --simulate and ports 0 (each picks its own)")

    @property
    def max_admitted(self) -> int:
        """Generate / Prefill calls a worker takes at once: a full batch plus the queue."""
        return self.max_num_seqs + self.max_queued_requests

    @property
    def disaggregated(self) -> bool:
        return self.role != "both"

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(b.strip() for b in self.kv_backends.split(",") if b.strip())

    def engine_config(self) -> EngineConfig:
        return EngineConfig(model=self.model, dtype=self.dtype, num_kv_blocks=self.num_kv_blocks,
                            max_num_seqs=self.max_num_seqs, max_model_len=self.max_model_len,
                            num_threads=self.num_threads, record_kv_events=True, deterministic=self.deterministic,
                            async_scheduling=self.async_scheduling, simulate=self.simulate,
                            hybrid_kv_cache=self.hybrid_kv_cache, tensor_parallel_size=self.tensor_parallel_size,
                            kv_offload_bytes=int(self.kv_offload_gib * (1 << 30)), kv_offload_dir=self.kv_offload_dir,
                            speculative=None if self.speculative_model is None else SpeculativeConfig(
                                num_draft_tokens=self.num_speculative_tokens, method="draft",
                                draft_model=self.speculative_model, adaptive=self.speculative_adaptive))
