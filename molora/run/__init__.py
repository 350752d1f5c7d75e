"""The training run: run config, data, the loop, checkpoints and resume, evaluation, reporting."""
