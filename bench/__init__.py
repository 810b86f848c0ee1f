"""Benchmarks: each module is a command (`python -m bench.<name>`) that prints tables and writes CSV/PNG."""
