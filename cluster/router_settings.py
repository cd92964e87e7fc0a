"""Settings of the router process. Flags and TANDEM_* variables map onto these fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.api_keys import ApiKeys
from cluster.key_limits import KeyLimits, load_key_limits
from cluster.routing import POLICIES, PolicyName
from common.security import SecuritySettings
from common.settings import described


@dataclass(frozen=True)
class RouterSettings(SecuritySettings):
    etcd: str = field(metadata=described("etcd endpoint host:port"))
    cluster: str = field(default="default", metadata=described("cluster name: the etcd key prefix"))
    model: str | None = field(default=None, metadata=described("model path (for the tokenizer); default SmolLM2"))
    served_model_name: str = field(default="", metadata=described("model id clients use; empty: the workers' model"))
    host: str = field(default="127.0.0.1", metadata=described("address to bind"))
    grpc_port: int = field(default=50051, metadata=described("tandem.v1.Inference port; 0: any free port"))
    http_port: int = field(default=8000, metadata=described("OpenAI-compatible HTTP port; 0: any free port"))
    policy: PolicyName = field(default="kv_aware", metadata=described("routing policy"))
    kv_overlap_weight: float = field(default=1.0, metadata=described("kv_aware: cost of one block to prefill, "
                                                                    "in units of one in-flight request"))
    max_inflight: int = field(default=512, metadata=described("requests in flight before RESOURCE_EXHAUSTED / 429"))
    request_timeout_s: float = field(default=600.0, metadata=described("deadline of a request that sets none"))
    retry_after_s: int = field(default=1, metadata=described(
        "seconds an overloaded (429 / RESOURCE_EXHAUSTED) or unavailable (503) client is told to wait: "
        "HTTP Retry-After, gRPC retry-after trailer"))
    grace_s: float = field(default=30.0, metadata=described("SIGTERM: seconds in-flight requests get to finish"))
    api_keys_file: str | None = field(default=None, metadata=described(
        "API keys of the public APIs, one per line (# comments); with api_keys: either is accepted"))
    api_keys: str = field(default="", repr=False, metadata=described(
        "API keys, comma separated; prefer the variable to the flag (flags show in `ps`)", secret=True))
    api_key_limits: str | None = field(default=None, metadata=described(
        "JSON file of per-key limits (cluster.key_limits): key name -> max_inflight, tokens_per_minute"))
    shared_prefix_cache: bool = field(default=False, metadata=described(
        "with API keys: every key shares the prefix cache (one tenant); default: a key reuses only "
        "the blocks its own requests cached, so no key can time another's prompts"))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.key_limits()
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.max_inflight < 1 or self.request_timeout_s <= 0 or self.kv_overlap_weight < 0:
            raise ValueError("max_inflight must be >= 1, request_timeout_s > 0 and kv_overlap_weight >= 0")
        if self.retry_after_s < 0:
            raise ValueError("retry_after_s must be >= 0")

    def api_key_set(self) -> ApiKeys | None:
        """None: the public APIs are open."""
        return ApiKeys.load(self.api_keys_file, self.api_keys)

    def key_limits(self) -> KeyLimits | None:
        """The per-key limits (None: none); ValueError for a file that names no key, or no keys."""
        return load_key_limits(self.api_key_limits, self.api_key_set())
