"""What `tandem up` reports as its cluster comes up and changes: one typed event per line on stdout.

With `--output-format text` (the default) each event is a line for people; with `--output-format json`
it is one JSON object per line (`{"event": "worker", ...}`) for programs (cluster.up_process reads them).

  etcd <host:port>
  worker <id> <role> <grpc address> pid=<pid> metrics=<port> [node=<id> actor=<name>]
  kvstore <id> <grpc address> pid=<pid> metrics=<port> [node=<id> actor=<name>]   (with --kv-store N)
  router grpc=<host:port> http=<url> pid=<pid> [node=<id> actor=<name>]   (url: https://... with TLS)
  planner metrics=<port>                                                 (with --planner true)
  READY                                                                  (every part serves)

Worker lines come again later for workers the planner starts, or Ray restarts or replaces.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, fields
from typing import Literal

OutputFormat = Literal["text", "json"]
OUTPUT_FORMATS: tuple[OutputFormat, ...] = ("text", "json")


@dataclass(frozen=True)
class EtcdUp:
    endpoint: str

    def text(self) -> str:
        return f"etcd {self.endpoint}"


@dataclass(frozen=True)
class WorkerUp:
    worker_id: str
    role: str
    address: str
    pid: int
    metrics_port: int
    node: str = ""  # on Ray: the node's id and the actor's name
    actor: str = ""

    @classmethod
    def from_ready(cls, ready: list[str], role: str, pid: int, node: str = "", actor: str = "") -> WorkerUp:
        """From a worker's READY fields (id, address, metrics port)."""
        worker_id, address, metrics = ready
        return cls(worker_id, role, address, pid, int(metrics), node, actor)

    def text(self) -> str:
        return (f"worker {self.worker_id} {self.role} {self.address} pid={self.pid} metrics={self.metrics_port}"
                + _ray_suffix(self.node, self.actor))


@dataclass(frozen=True)
class KVStoreUp:
    store_id: str
    address: str
    pid: int
    metrics_port: int
    node: str = ""  # on Ray: the node's id and the actor's name
    actor: str = ""

    @classmethod
    def from_ready(cls, ready: list[str], pid: int, node: str = "", actor: str = "") -> KVStoreUp:
        """From a KV store's READY fields (id, address, metrics port)."""
        store_id, address, metrics = ready
        return cls(store_id, address, pid, int(metrics), node, actor)

    def text(self) -> str:
        return (f"kvstore {self.store_id} {self.address} pid={self.pid} metrics={self.metrics_port}"
                + _ray_suffix(self.node, self.actor))


@dataclass(frozen=True)
class RouterUp:
    grpc_address: str
    http_url: str
    pid: int
    node: str = ""
    actor: str = ""

    @classmethod
    def from_ready(cls, ready: list[str], pid: int, node: str = "", actor: str = "") -> RouterUp:
        """From the router's READY fields ("router", gRPC address, HTTP URL)."""
        _, grpc_address, http_url = ready
        return cls(grpc_address, http_url, pid, node, actor)

    def text(self) -> str:
        return f"router grpc={self.grpc_address} http={self.http_url} pid={self.pid}" + _ray_suffix(self.node,
                                                                                                     self.actor)


@dataclass(frozen=True)
class PlannerUp:
    metrics_port: int

    def text(self) -> str:
        return f"planner metrics={self.metrics_port}"


@dataclass(frozen=True)
class ClusterReady:
    def text(self) -> str:
        return "READY"


UpEvent = EtcdUp | WorkerUp | KVStoreUp | RouterUp | PlannerUp | ClusterReady
_KINDS: dict[str, type[UpEvent]] = {"etcd": EtcdUp, "worker": WorkerUp, "kvstore": KVStoreUp, "router": RouterUp,
                                    "planner": PlannerUp, "ready": ClusterReady}
_NAMES = {cls: name for name, cls in _KINDS.items()}


def _ray_suffix(node: str, actor: str) -> str:
    return f" node={node} actor={actor}" if node or actor else ""


def to_json(event: UpEvent) -> str:
    return json.dumps({"event": _NAMES[type(event)], **asdict(event)}, sort_keys=True)


def from_json(line: str) -> UpEvent:
    """The event of one `--output-format json` line; ValueError for anything else."""
    try:
        body = json.loads(line)
        cls = _KINDS[body.pop("event")]
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in body.items() if k in known})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"not a tandem up event: {line!r} ({e})") from e


@dataclass(frozen=True)
class Announcer:
    """Prints events in one output format, flushed at once (a reader may wait on each)."""

    output: OutputFormat = "text"

    def __call__(self, event: UpEvent) -> None:
        print(to_json(event) if self.output == "json" else event.text(), file=sys.stdout, flush=True)
