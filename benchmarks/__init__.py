"""Benchmarks print figures (a table and JSON); they never assert on time."""
