"""Helpers for tests and benchmarks: the published algorithm, re-implemented for comparison."""
