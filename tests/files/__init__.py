"""Tests of molora.files: the hub, malformed files."""
