"""Benchmarks and studies for drsvc (not part of the installed package)."""
