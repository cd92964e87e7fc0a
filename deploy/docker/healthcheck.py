"""Docker HEALTHCHECK of the Tandem image, for every role: asks the standard gRPC health service of
the process the container runs (the router of `tandem router` or `tandem up`, the worker of
`tandem worker`). Where it listens is read the way that process read it: PID 1's command line and
TANDEM_* variables through the CLI's own parser. Exit 0: SERVING; 1: anything else. With TLS on
(--tls-cert) a connection to the port is all it checks: workers take mutual TLS only.
(Kubernetes ignores HEALTHCHECK: the manifests in deploy/k8s/ probe the same service with grpc probes.)"""

from __future__ import annotations

import os
import pathlib
import socket
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.cli import _parser


def _target(argv: list[str]) -> tuple[str, int, bool] | None:
    """(host, port, TLS on) of the gRPC server that `tandem <argv>` starts; None when it picks a free port."""
    args = _parser().parse_args(argv)
    if not args.grpc_port:
        return None
    host = "127.0.0.1" if args.host in ("", "0.0.0.0", "::") else args.host
    return host, args.grpc_port, bool(getattr(args, "tls_cert", None))


def _pid1_argv() -> list[str]:
    words = pathlib.Path("/proc/1/cmdline").read_bytes().decode().split("\0")[:-1]
    starts = [i for i, w in enumerate(words) if os.path.basename(w) == "tandem"]
    return words[starts[0] + 1:] if starts else []


def main() -> int:
    found = _target(_pid1_argv())
    if found is None:
        return 0  # port 0: chosen at start, printed on the READY line; nothing to ask here
    host, port, tls = found
    target = f"{host}:{port}"
    if tls:
        try:
            socket.create_connection((host, port), timeout=4).close()
        except OSError as e:
            print(f"{target}: {e}", file=sys.stderr)
            return 1
        return 0
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=4)
        except grpc.RpcError as e:
            print(f"{target}: {e.code().name}", file=sys.stderr)
            return 1
    print(f"{target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
