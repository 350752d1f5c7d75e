"""Tests of molora.deploy: merging, int8 files, peft's format."""
