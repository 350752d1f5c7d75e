"""Tests of molora.analysis: routing reports, rank analysis."""
