"""Benchmarks: `make bench` (bench.run), `make bench-compare` (bench.compare), `make soak` (bench.soak)."""
