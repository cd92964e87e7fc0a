"""Benchmarks and load generators for Tandem (`python -m bench.throughput`)."""
