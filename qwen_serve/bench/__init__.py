"""Benchmarks: offline engine throughput/latency (offline.py) and the HTTP load generator (serving.py)."""
