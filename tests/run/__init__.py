"""Tests of molora.run: training, resume, checkpoints, data, evaluation, reporting, the cli."""
