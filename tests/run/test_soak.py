"""A long run leaks nothing: resident memory stays flat over 2,000 steps with everything on.

Routing recording (every logged step), logging, evaluation and checkpointing all run; a hook, an autograd graph or
a cache kept across steps would grow the process. Not in the default run (its timing swings from seconds on an
idle machine to minutes beside other work); CI runs it:
`python -m pytest -m soak tests/run/test_soak.py -s`.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

import molora.run.training
from molora.run.config import RunConfig
from molora.run.training import train
from tests.tiny import save_tiny_model, tiny_run_config, write_toy_domains

STEPS = 2000
WARMUP_FRACTION = 0.1
MAX_GROWTH_MB = 16.0


def rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class StepProbe:
    """Samples resident memory at every logged training step (wrapping the logger, so sampling costs nothing)."""

    def __init__(self, monkeypatch):
        self.samples: list[tuple[int, float]] = []
        real = molora.run.training.log_train_step

        def log_and_sample(run, progress, *args):
            real(run, progress, *args)
            self.samples.append((progress.step, rss_mb()))

        monkeypatch.setattr(molora.run.training, "log_train_step", log_and_sample)


def soak(tmp_path, monkeypatch, steps: int, leak_mb: float = 0.0) -> tuple[float, float, float]:
    """(RSS growth after warm-up to the end, its peak, seconds) of a tiny run with everything on.

    leak_mb > 0 keeps that much per training step alive on purpose (a stand-in for a leaked graph or cache).
    """
    spec = tiny_run_config(save_tiny_model(tmp_path / "model"), write_toy_domains(tmp_path / "toy.jsonl"))
    spec["train"].update(steps=steps, log_every=10, eval_every=200, save_every=100, batch_size=4)
    probe = StepProbe(monkeypatch)
    if leak_mb:
        kept = []
        real_step = molora.run.training.train_step

        def leaking_step(run, step, record_health):
            kept.append(torch.ones(int(leak_mb * 2**20 / 4)))
            return real_step(run, step, record_health)

        monkeypatch.setattr(molora.run.training, "train_step", leaking_step)
    started = time.perf_counter()
    train(RunConfig.from_dict(spec), tmp_path / "run")
    seconds = time.perf_counter() - started
    settled = [rss for step, rss in probe.samples if step >= steps * WARMUP_FRACTION]
    return settled[-1] - settled[0], max(settled) - settled[0], seconds


@pytest.mark.soak
def test_resident_memory_stays_flat_over_2000_steps(tmp_path, monkeypatch):
    growth, peak_growth, seconds = soak(tmp_path, monkeypatch, STEPS)
    print(
        f"\nsoak: {STEPS} steps in {seconds:.0f} s; RSS growth after warm-up {growth:+.1f} MB (peak {peak_growth:+.1f})"
    )
    assert growth < MAX_GROWTH_MB and peak_growth < 2 * MAX_GROWTH_MB
    assert threading.active_count() < 8  # no thread per step (progress bars, writers)


@pytest.mark.soak
def test_the_soak_test_can_fail_when_a_step_leaks(tmp_path, monkeypatch):
    growth, _, _ = soak(tmp_path, monkeypatch, 300, leak_mb=0.25)  # 0.25 MB x 270 steps after warm-up
    assert growth > MAX_GROWTH_MB
