"""The cluster KV store (`tandem kvstore`): KV blocks any worker computed, in memory registered with the
transfer engine, found by content hash; workers read them instead of recomputing (docs/architecture.md)."""
