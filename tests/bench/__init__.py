"""Tests of bench/: the benchmarks count and time what they say."""
