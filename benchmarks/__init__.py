"""Throughput, memory and data-pipeline benchmarks; `python -m benchmarks` runs them all."""
