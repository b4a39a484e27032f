"""Benchmarks: the side-by-side tables (run.py), the false-alarm budget sweep, synthesis speed."""
