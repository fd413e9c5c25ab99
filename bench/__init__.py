"""Throughput benchmark of train_gpt.py: `python3 bench/throughput.py` (see bench/README.md)."""
