"""Helpers for tests, benchmarks and demos: random checkpoints in the release layout."""
