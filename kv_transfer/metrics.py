"""Prometheus metrics of the transfer engine, per backend and per peer (`tandem_kv_transfer_*`)."""

from __future__ import annotations

import functools

from prometheus_client import Counter, Histogram

from kv_transfer.batch import Batch
from kv_transfer.datatypes import BatchStatus

_LABELS = ("backend", "peer", "op")

TRANSFER_BYTES = Counter("tandem_kv_transfer_bytes", "Bytes moved by completed batches", _LABELS)
TRANSFERS = Counter("tandem_kv_transfer_batches", "Batches that ended, by outcome", (*_LABELS, "outcome"))
FAILURES = Counter("tandem_kv_transfer_failures", "Failed batches, by error type", (*_LABELS, "error"))
LATENCY = Histogram("tandem_kv_transfer_seconds", "Submit-to-completion time of successful batches", _LABELS,
                    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                             0.5, 1.0, 2.5, 5.0, 10.0))


@functools.lru_cache(maxsize=4096)
def _ok_children(backend: str, peer: str, op: str) -> tuple[Counter, Counter, Histogram]:
    """Label lookups cost more than the updates themselves: resolve them once per (backend, peer, op)."""
    return (TRANSFERS.labels(backend, peer, op, "ok"), TRANSFER_BYTES.labels(backend, peer, op),
            LATENCY.labels(backend, peer, op))


def record(batch: Batch) -> None:
    """Account for a batch that just ended (a done-callback)."""
    labels = (batch.backend, batch.remote.owner, batch.op.value)
    if batch.status is BatchStatus.DONE:
        transfers, nbytes, latency = _ok_children(*labels)
        transfers.inc()
        nbytes.inc(batch.ranges.total_bytes)
        assert batch.finished_at is not None
        latency.observe(batch.finished_at - batch.submitted_at)
    else:
        TRANSFERS.labels(*labels, "failed").inc()
        FAILURES.labels(*labels, type(batch.error).__name__).inc()
