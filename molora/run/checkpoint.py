"""Checkpoints a killed run can trust: written whole or not at all, verified on load, one writer per run folder.

A checkpoint is `checkpoints/step-N/` with the adapter, the trainer state (optimizer, scheduler, RNG, the run's
config; molora.run.trainer_state) and `manifest.json` (the checkpoint's format version, the sha256 and size of every
other file). It is built in a hidden staging folder,
each file flushed to disk, and renamed into place only when complete, so a kill leaves either the whole folder or
none. Loading checks the manifest; `--resume` skips a checkpoint that fails it and says so. The manifest guards
against a torn or corrupted file, not against whoever wrote the folder: anyone can rewrite it to match their files,
which is why nothing in a checkpoint is read in a way that could run code.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from molora.files.formats import (
    CHECKPOINT_FORMAT,
    FORMAT_KEY,
    FormatVersionError,
    check_keys,
    format_version,
    read_json,
    sha256_file,
)
from molora.run.trainer_state import (
    JSON_NAME,
    LEGACY_NAME,
    TENSORS_NAME,
    read_legacy_trainer_state,
    read_trainer_state,
    write_trainer_state,
)

MANIFEST_NAME = "manifest.json"
MANIFEST_KEYS = (FORMAT_KEY, "step", "files")
LOCK_NAME = ".molora-train.lock"
# Config keys a resumed run may change: how far it goes, and how it reports.
RESUMABLE_CHANGES = ("train.steps", "train.stop_after", "train.progress", "train.report_to")


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupt or does not belong to this run."""


class NonFiniteError(RuntimeError):
    """NaN or inf where a finite number is required (a loss, a gradient, a weight about to be saved)."""


def _fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_finite(named_tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raise NonFiniteError naming the first tensors with NaN or inf (checked before anything is written)."""
    bad = [name for name, tensor in named_tensors.items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise NonFiniteError(f"{what}: non-finite values in {len(bad)} tensor(s), e.g. {bad[:3]}; nothing written")


def write_manifest(folder: Path, step: int) -> None:
    files = {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST_NAME
    }
    manifest = {FORMAT_KEY: CHECKPOINT_FORMAT, "step": step, "files": files}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


# The trainer state files of each checkpoint format (molora.files.formats lists the formats).
STATE_FILES = {1: (LEGACY_NAME,), 2: (TENSORS_NAME, JSON_NAME), 3: (TENSORS_NAME, JSON_NAME)}


def verify_checkpoint(folder: Path) -> dict[str, Any]:
    """The manifest of a complete, unaltered checkpoint; CheckpointError naming the first file that is not.

    A checkpoint in a newer format is a FormatVersionError (it is not damaged: this molora is too old for it).
    """
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST_NAME} (incomplete checkpoint)")
    try:
        manifest = read_json(manifest_path, "checkpoint manifest", limit=1 << 20)
        version = format_version(manifest, manifest_path, CHECKPOINT_FORMAT, "checkpoint")
        check_keys(manifest, MANIFEST_KEYS, str(manifest_path))
        files = _listed_files(manifest, manifest_path)
    except FormatVersionError:
        raise
    except ValueError as err:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({err})") from None
    needed = [name for name in STATE_FILES[version] if name not in files]
    if needed:
        raise CheckpointError(f"{manifest_path}: lists no {needed} (a format-{version} checkpoint has them)")
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST_NAME})")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, the manifest says {expected['bytes']} (truncated?)")
        if sha256_file(path) != expected["sha256"]:
            raise CheckpointError(f"{path}: sha256 differs from the manifest (file altered or corrupt)")
    return {**manifest, FORMAT_KEY: version}


def _listed_files(manifest: dict[str, Any], where: Path) -> dict[str, dict[str, Any]]:
    """{file name: {sha256, bytes}}: plain names in the checkpoint's own folder (no path leads elsewhere)."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ValueError("'files' must map file names to their sha256 and size")
    for name, entry in files.items():
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"{name!r} is not a file name in the checkpoint's folder")
        if not (isinstance(entry, dict) and set(entry) == {"sha256", "bytes"} and type(entry["bytes"]) is int):
            raise ValueError(f"{name!r}: needs exactly sha256 and bytes")
    return files


def save_checkpoint(
    run_dir: Path, adapter: dict[str, torch.Tensor], save_adapter, state: dict[str, Any], step: int, keep: int
) -> Path:
    """checkpoints/step-N/: staged in a hidden folder, verified finite, fsynced, then renamed into place.

    adapter: the tensors save_adapter(folder) writes, checked finite first; state is the trainer state
    (molora.run.trainer_state).
    """
    check_finite(adapter, f"checkpoint at step {step}")
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".step-", dir=root))
    try:
        save_adapter(staging)
        write_trainer_state(staging, {**state, "step": step})
        write_manifest(staging, step)
        for path in staging.iterdir():
            _fsync_file(path)
        _fsync_dir(staging)
        final = root / f"step-{step:06d}"
        if final.exists():
            shutil.rmtree(final)
        os.rename(staging, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in checkpoint_folders(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """Renamed-in checkpoints, oldest first (staging folders start with a dot and are never listed)."""
    return sorted(p for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir())


def remove_staging(run_dir: Path) -> list[Path]:
    """Delete what a killed writer left half-done; returns the folders removed."""
    leftovers = sorted((run_dir / "checkpoints").glob(".step-*"))
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


@dataclass
class ResumePoint:
    folder: Path
    state: dict[str, Any]
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (newer checkpoint, why it was skipped)


def latest_good_checkpoint(run_dir: Path, max_tensors: int) -> ResumePoint | None:
    """The newest checkpoint that passes its manifest and whose trainer state loads; the ones skipped, and why.

    `max_tensors` bounds the tensors a trainer state file may list. A checkpoint in a newer format stops the search
    (FormatVersionError): falling back past it would quietly throw its steps away.
    """
    skipped: list[tuple[Path, str]] = []
    for folder in reversed(checkpoint_folders(run_dir)):
        try:
            version = verify_checkpoint(folder)[FORMAT_KEY]
            if version == 1:
                state = read_legacy_trainer_state(folder / LEGACY_NAME)
            else:
                state = read_trainer_state(folder, max_tensors)
        except FormatVersionError:
            raise
        except (ValueError, OSError) as err:
            skipped.append((folder, str(err)))
            continue
        return ResumePoint(folder, state, skipped)
    if skipped:
        reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped)
        raise CheckpointError(f"--resume: no usable checkpoint in {run_dir / 'checkpoints'} ({reasons})")
    return None


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key not in ("aux_losses", "rank_pattern", "alpha_pattern"):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) where two run configs differ, except what a resume may change."""
    old, new = _flatten(saved), _flatten(current)
    keys = sorted(set(old) | set(new))
    return [(k, old.get(k), new.get(k)) for k in keys if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k)]


class RunInUseError(ValueError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """An exclusive flock on RUN/.molora-train.lock: one writer per run folder.

    The kernel drops the lock when its process dies, however it dies, so a killed run never leaves it stuck; the
    file only records the holder's pid for the message.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_NAME
        self._handle = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise RunInUseError(
                f"run folder {self.path.parent} is in use by another molora-train (pid {holder}); wait for it to "
                "finish or choose another --output-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
