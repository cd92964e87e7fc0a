"""Conventions of the gRPC links between the router and the workers, beside their protos (tandem/v1)."""

from __future__ import annotations

# trailing metadata of a worker's admission refusal (RESOURCE_EXHAUSTED): tells it apart from gRPC's own
# RESOURCE_EXHAUSTED (a message over the size limit), which retrying on another worker would not cure
QUEUE_FULL = "tandem-queue-full"

# the largest request message a worker takes: anything the router's 16 MiB HTTP limit let through fits
MAX_WORKER_MESSAGE_BYTES = 64 << 20
