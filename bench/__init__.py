"""Benchmarks: our gateway against a reference gateway in the same namespace topology."""
