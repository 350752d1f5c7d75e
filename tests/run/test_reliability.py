"""Runs survive faults: SIGKILL and --resume, checkpoint integrity, one writer per run folder, non-finite steps."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import molora.run.checkpoint
import molora.run.training
from molora.cli import train_main
from molora.run.checkpoint import (
    CheckpointError,
    NonFiniteError,
    RunInUseError,
    RunLock,
    checkpoint_folders,
    config_differences,
    latest_good_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from molora.run.config import RunConfig, read_as_current
from molora.run.training import train
from tests.tiny import save_tiny_model, tiny_run_config, write_toy_domains

REPO = Path(__file__).resolve().parents[2]
STEPS, SAVE_EVERY = 12, 4


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    spec = tiny_run_config(
        save_tiny_model(root / "model"), write_toy_domains(root / "toy.jsonl"), steps=STEPS, save_every=SAVE_EVERY
    )
    spec["molora"].update(dropout=0.1, router_jitter=0.05)  # RNG inside the loop must be restored too
    spec["train"]["keep_checkpoints"] = 3
    return spec


@pytest.fixture(scope="module")
def uninterrupted(spec, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The reference run, in a subprocess like the killed ones."""
    root = tmp_path_factory.mktemp("whole")
    proc = _start("none", 0, _config_file(spec, root / "c.yaml"), root / "run")
    proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 0, _stderr_tail(proc)
    return _adapter(root / "run")


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _config_file(spec: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


DEADLINE_S = 300  # every wait on a child has one: a hung child fails its test instead of hanging the suite


def _start(mode: str, step: int, config: Path, run: Path, *extra: str) -> subprocess.Popen:
    """The training driver in a child process; its stderr goes to a file (a pipe nobody drains could fill and block
    the child), its stdout is read line by line against a deadline (_wait_for_pause)."""
    command = [sys.executable, "-m", "tests.train_driver", mode, str(step), "--"]
    command += ["--config", str(config), "--output-dir", str(run), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the child
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    proc.stderr_file = stderr
    return proc


def _stderr_tail(proc: subprocess.Popen) -> str:
    proc.stderr_file.seek(0)
    return proc.stderr_file.read()[-2000:]


def _wait_for_pause(proc: subprocess.Popen, deadline: float = DEADLINE_S) -> bool:
    """True once the child prints PAUSED, False if it ends first; past the deadline it is killed and the test fails."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    end = time.monotonic() + deadline
    while True:
        try:
            line = lines.get(timeout=max(0.0, end - time.monotonic()))
        except queue.Empty:
            proc.kill()
            proc.wait(timeout=60)
            raise AssertionError(f"no PAUSED from the child within {deadline:g} s: {_stderr_tail(proc)}") from None
        if line is None:
            return False
        if line.strip() == "PAUSED":
            return True


def test_a_hung_child_fails_at_the_deadline_instead_of_hanging_the_suite():
    stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the child
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"], stdout=subprocess.PIPE, stderr=stderr
    )
    proc.stderr_file = stderr
    started = time.monotonic()
    with pytest.raises(AssertionError, match="no PAUSED from the child within 1 s"):
        _wait_for_pause(proc, deadline=1)
    assert time.monotonic() - started < 30 and proc.returncode is not None  # killed, not left running


def _kill_when_paused(proc: subprocess.Popen) -> None:
    paused = _wait_for_pause(proc)
    if paused:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert paused, f"the run ended without pausing: {_stderr_tail(proc)}"


def _resume(config: Path, run: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "molora.cli", "--config", str(config), "--output-dir", str(run), "--resume"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=DEADLINE_S)


# Kill and resume -----------------------------------------------------------------------------------------------------
def test_sigkill_right_after_a_checkpoint_then_resume_is_bitwise_the_uninterrupted_run(spec, uninterrupted, tmp_path):
    config, run = _config_file(spec, tmp_path / "c.yaml"), tmp_path / "run"
    _kill_when_paused(_start("after-save", 8, config, run))
    assert [p.name for p in checkpoint_folders(run)] == ["step-000004", "step-000008"]
    assert not (run / "adapter").exists()
    done = _resume(config, run)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "continuing from step-000008" in done.stdout
    _assert_bitwise_equal(_adapter(run), uninterrupted)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)


def test_sigkill_while_a_checkpoint_is_written_leaves_no_half_checkpoint(spec, uninterrupted, tmp_path):
    config, run = _config_file(spec, tmp_path / "c.yaml"), tmp_path / "run"
    _kill_when_paused(_start("in-write", 8, config, run))
    assert [p.name for p in checkpoint_folders(run)] == ["step-000004"]  # step 8 never renamed into place
    assert len(list((run / "checkpoints").glob(".step-*"))) == 1  # the staging folder the kill left
    done = _resume(config, run)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "removed .step-" in done.stdout and "continuing from step-000004" in done.stdout
    assert not list((run / "checkpoints").glob(".step-*"))
    _assert_bitwise_equal(_adapter(run), uninterrupted)


def test_a_resume_with_a_different_config_is_refused_naming_the_keys(spec, tmp_path):
    stopped = {**spec, "train": {**spec["train"], "stop_after": 4}}
    train(RunConfig.from_dict(stopped), tmp_path / "run")
    changed = {**spec, "train": {**spec["train"], "lr": 0.02}, "molora": {**spec["molora"], "rank": 8}}
    with pytest.raises(
        ValueError, match=r"differs from the checkpoint's .* molora.rank: 4 -> 8, train.lr: 0.01 -> 0.02"
    ):
        train(RunConfig.from_dict(changed), tmp_path / "run", resume=True)
    longer = {**spec, "train": {**spec["train"], "steps": STEPS + 2}}  # steps and stop_after may change
    assert train(RunConfig.from_dict(longer), tmp_path / "run", resume=True)["steps"] == STEPS + 2


def test_a_checkpoint_written_before_a_config_field_existed_resumes(spec, tmp_path):
    current = RunConfig.from_dict(spec).to_dict()
    older = {name: dict(section) for name, section in current.items()}
    del older["molora"]["input_groups"]  # as a checkpoint written before routing_scope='input' existed
    assert config_differences(read_as_current(older), current) == []
    # the guard matters: compared as saved, the missing field reads as a change and blocks the resume
    assert [key for key, _, _ in config_differences(older, current)] == ["molora.input_groups"]
    # a field the checkpoint does have keeps counting
    older["molora"]["rank"] = current["molora"]["rank"] + 1
    assert [key for key, _, _ in config_differences(read_as_current(older), current)] == ["molora.rank"]


# Checkpoint integrity ------------------------------------------------------------------------------------------------
def _two_checkpoints(spec: dict, run: Path) -> list[Path]:
    train(RunConfig.from_dict({**spec, "train": {**spec["train"], "stop_after": 8}}), run)
    return checkpoint_folders(run)


@pytest.mark.parametrize("damage", ["truncate", "alter", "delete-manifest"])
def test_a_damaged_checkpoint_is_named_and_resume_falls_back_to_the_newest_good_one(
    spec, uninterrupted, tmp_path, capsys, damage
):
    run = tmp_path / "run"
    older, newest = _two_checkpoints(spec, run)
    weights = newest / "adapter_model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
        message = "adapter_model.safetensors: .* bytes, the manifest says"
    elif damage == "alter":
        weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
        message = "adapter_model.safetensors: sha256 differs"
    else:
        (newest / "manifest.json").unlink()
        message = "no manifest.json"
    with pytest.raises(CheckpointError, match=message):
        verify_checkpoint(newest)
    verify_checkpoint(older)
    capsys.readouterr()
    train(RunConfig.from_dict(spec), run, resume=True)
    out = capsys.readouterr().out
    assert "resume: skipped step-000008" in out and "continuing from step-000004" in out
    _assert_bitwise_equal(_adapter(run), uninterrupted)


def test_resume_with_no_usable_checkpoint_says_why(spec, tmp_path):
    run = tmp_path / "run"
    for folder in _two_checkpoints(spec, run):
        (folder / "trainer_state.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint .*step-000008: .*trainer_state.safetensors"):
        latest_good_checkpoint(run, max_tensors=100)


def test_every_checkpoint_file_is_in_its_manifest(spec, tmp_path):
    folder = _two_checkpoints(spec, tmp_path / "run")[-1]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["step"] == 8
    assert set(manifest["files"]) == {p.name for p in folder.iterdir()} - {"manifest.json"}
    names = {"adapter_model.safetensors", "molora_config.json", "trainer_state.safetensors", "trainer_state.json"}
    assert set(manifest["files"]) == names


# One writer per run folder -------------------------------------------------------------------------------------------
def test_a_second_writer_into_a_live_run_folder_exits_2_and_a_killed_run_leaves_no_stuck_lock(spec, tmp_path, capsys):
    config, run = _config_file(spec, tmp_path / "c.yaml"), tmp_path / "run"
    proc = _start("after-save", 4, config, run)
    assert _wait_for_pause(proc), _stderr_tail(proc)
    try:
        assert train_main(["--config", str(config), "--output-dir", str(run), "--resume"]) == 2
        err = capsys.readouterr().err
        assert f"run folder {run} is in use by another molora-train (pid {proc.pid})" in err
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert train_main(["--config", str(config), "--output-dir", str(run), "--resume"]) == 0  # lock gone with it


def test_the_lock_test_can_fail_without_flock(tmp_path, monkeypatch):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(RunInUseError):
        RunLock(tmp_path).acquire()
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: None)
    RunLock(tmp_path).acquire()  # without the kernel lock nothing stops a second writer
    first.release()


# Non-finite steps ----------------------------------------------------------------------------------------------------
NAN_LAYER = "model.layers.1.self_attn.q_proj"


def _poison_router(monkeypatch, at_forwards: set[int]) -> None:
    """Make one router's output NaN on the given training forwards (1-based), as an overflow would."""
    real_build = molora.run.training.build_model

    def build(base, config):
        model = real_build(base, config)
        router = dict(model.base_model.named_modules())[f"{NAN_LAYER}.router"]
        calls = {"n": 0}

        def hook(module, args, out):
            if not module.training:
                return out
            calls["n"] += 1
            if calls["n"] in at_forwards:
                nan = float("nan")
                return dataclasses.replace(out, logits=out.logits * nan, probs=out.probs * nan, gates=out.gates * nan)
            return out

        router.register_forward_hook(hook)
        return model

    monkeypatch.setattr(molora.run.training, "build_model", build)


def _finite_checkpoints(run: Path) -> bool:
    return all(
        all(torch.isfinite(t).all() for t in load_file(str(f / "adapter_model.safetensors")).values())
        for f in checkpoint_folders(run)
    )


def test_a_non_finite_step_stops_the_run_naming_step_terms_and_layer(spec, tmp_path, monkeypatch):
    _poison_router(monkeypatch, {6})
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError) as raised:
        train(RunConfig.from_dict({**spec, "train": {**spec["train"], "save_every": 4}}), run)
    message = str(raised.value)
    assert message.startswith("step 6: non-finite lm_loss, aux/balance, aux/z, grad_norm")
    assert f"first layer whose router produced non-finite values: {NAN_LAYER}" in message
    assert "step-000004" in message
    assert [p.name for p in checkpoint_folders(run)] == ["step-000004"]  # the last good checkpoint stays
    assert _finite_checkpoints(run) and not (run / "adapter").exists()


def test_max_bad_steps_skips_them_and_counts_them(spec, tmp_path, monkeypatch):
    _poison_router(monkeypatch, {3, 7})
    run = tmp_path / "run"
    result = train(RunConfig.from_dict({**spec, "train": {**spec["train"], "max_bad_steps": 2}}), run)
    assert math.isfinite(result["after"]["mean"]["loss"])
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    bad = [r for r in records if r["type"] == "bad_step"]
    assert [(r["step"], r["bad_steps"], r["router"]) for r in bad] == [(3, 1, NAN_LAYER), (7, 2, NAN_LAYER)]
    assert [r["bad_steps"] for r in records if r["type"] == "train"][-1] == 2
    assert _finite_checkpoints(run)
    assert all(torch.isfinite(t).all() for t in _adapter(run).values())


def test_the_cli_exits_1_on_a_non_finite_step(spec, tmp_path, monkeypatch, capsys):
    _poison_router(monkeypatch, {2})
    config = _config_file(spec, tmp_path / "c.yaml")
    assert train_main(["--config", str(config), "--output-dir", str(tmp_path / "run")]) == 1
    assert "molora-train: error: step 2: non-finite" in capsys.readouterr().err


def test_non_finite_weights_are_never_written(spec, tmp_path):
    from molora import get_molora_model
    from molora.run.base_models import load_base

    model = get_molora_model(load_base(spec["model"]["name"])[0], RunConfig.from_dict(spec).molora)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad)[0] = float("inf")
    with pytest.raises(NonFiniteError, match="checkpoint at step 3: non-finite values in 1 tensor"):
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        save_checkpoint(tmp_path, trainable, model.save_pretrained, {}, 3, keep=2)
    assert not (tmp_path / "checkpoints").exists()


def test_the_nan_guard_test_can_fail_without_the_guard(spec, tmp_path, monkeypatch):
    """With the step check and the save check both off, the poisoned step reaches the weights on disk."""
    _poison_router(monkeypatch, {3})
    monkeypatch.setattr(molora.run.checkpoint, "check_finite", lambda tensors, what: None)
    monkeypatch.setattr(molora.run.training, "check_finite", lambda tensors, what: None)
    monkeypatch.setattr(math, "isfinite", lambda value: True)  # the step check in train_step
    run = tmp_path / "run"
    train(RunConfig.from_dict({**spec, "train": {**spec["train"], "steps": 4, "save_every": 4}}), run)
    assert not _finite_checkpoints(run)
