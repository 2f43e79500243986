"""Benchmarks: plain scripts that print side-by-side tables (python -m bench.<name>)."""
