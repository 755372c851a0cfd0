"""Simulated inference nodes and workloads (demo, tests, benchmarks)."""
