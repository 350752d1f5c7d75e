"""Tests of moloramodel: save/load, decoding, every architecture transformers registers."""
