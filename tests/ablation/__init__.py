"""Tests of molora.ablation."""
