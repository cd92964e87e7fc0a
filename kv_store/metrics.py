"""Prometheus metrics of a KV store process: its calls, and its index read at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kv_store.index import StoreIndex

STORE_CALLS = Counter("tandem_kvstore_calls", "KVStore calls answered, by call and outcome", ["call", "outcome"])


class StoreCollector(Collector):
    def __init__(self, store_id: str, index: StoreIndex) -> None:
        self.store_id, self.index = store_id, index

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.index.stats()
        capacity = GaugeMetricFamily("tandem_kvstore_capacity_blocks", "Blocks the store holds at most (0 until "
                                     "the first put fixes the block size)", labels=["store"])
        capacity.add_metric([self.store_id], s.capacity_blocks)
        used = GaugeMetricFamily("tandem_kvstore_used_blocks", "Blocks in the store, by state (readable, or "
                                 "reserved: being written)", labels=["store", "state"])
        used.add_metric([self.store_id, "readable"], s.readable_blocks)
        used.add_metric([self.store_id, "reserved"], s.reserved_blocks)
        lookups = CounterMetricFamily("tandem_kvstore_lookup_blocks", "Blocks looked up, by result",
                                      labels=["store", "result"])
        lookups.add_metric([self.store_id, "hit"], s.hits)
        lookups.add_metric([self.store_id, "miss"], s.lookups - s.hits)
        blocks = CounterMetricFamily("tandem_kvstore_blocks", "Blocks committed (readable), rejected at commit "
                                     "(checksum mismatch, lapsed), evicted for room, whose reservation lapsed, or "
                                     "dropped (a reader found it corrupt, and so did the store)",
                                     labels=["store", "op"])
        for op, count in (("commit", s.committed), ("reject", s.rejected), ("evict", s.evicted),
                          ("lapse", s.lapsed), ("drop", s.dropped)):
            blocks.add_metric([self.store_id, op], count)
        block_bytes = GaugeMetricFamily("tandem_kvstore_block_bytes", "Bytes of one block", labels=["store"])
        block_bytes.add_metric([self.store_id], s.block_bytes)
        yield from (capacity, used, lookups, blocks, block_bytes)


def register_store(store_id: str, index: StoreIndex) -> StoreCollector:
    collector = StoreCollector(store_id, index)
    REGISTRY.register(collector)
    return collector
