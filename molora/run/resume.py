"""Continuing a run: where it stands (Progress), the newest good checkpoint it resumes from, and the run folder
opened at that step (metrics.jsonl cut back to it, the reporters).

A checkpoint must come from the same config, but for the keys listed in molora.run.checkpoint.RESUMABLE_CHANGES.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import yaml

from molora.deploy.adapter_files import upgrade_tensors
from molora.run.checkpoint import (
    RESUMABLE_CHANGES,
    CheckpointError,
    config_differences,
    latest_good_checkpoint,
    remove_staging,
)
from molora.run.config import read_as_current
from molora.run.reporting import open_reporters
from molora.run.setup import load_adapter_weights
from molora.run.sharding import shard_optimizer_state
from molora.run.trainer_state import set_rng_state
from molora.utils import atomic_write_text

if TYPE_CHECKING:
    from molora.run.state import Run


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint so a resumed run continues exactly."""

    step: int = 0
    before: dict[str, Any] | None = None  # eval at step 0
    bad_steps: int = 0


def resume_from_checkpoint(run: Run) -> Progress:
    """Load the newest good checkpoint into the run; refuse one written by a different config."""
    removed = remove_staging(run.run_dir) if run.is_main else []
    for path in removed:
        run.say(f"resume: removed {path.name}, a checkpoint whose writing was interrupted")
    trainable = sum(1 for p in run.model.parameters() if p.requires_grad)
    point = latest_good_checkpoint(run.run_dir, max_tensors=4 * trainable + 16)  # Adam: step, two moments per tensor
    if point is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {run.run_dir / 'checkpoints'}")
    for folder, why in point.skipped:
        run.say(f"resume: skipped {folder.name}: {why}")
    saved = point.state.get("config")
    if saved is not None:
        differing = config_differences(read_as_current(saved), run.config.to_dict())
        if differing:
            changes = ", ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in differing)
            raise ValueError(
                f"--resume: the config differs from the checkpoint's ({point.folder.name}) in {changes}; only "
                f"{', '.join(RESUMABLE_CHANGES)} may change when resuming"
            )
    version = load_adapter_weights(run.model, point.folder)
    try:
        run.optimizer.load_state_dict(_moments_in_current_layout(run, point.state["optimizer"], version))
        if run.sharded:  # the checkpoint holds whole moments; each rank keeps its parameters' part
            shard_optimizer_state(run.optimizer)
        run.scheduler.load_state_dict(point.state["scheduler"])
        set_rng_state(_own_rng_state(run, point.state))
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as err:
        raise CheckpointError(f"--resume: {point.folder}'s trainer state does not fit this run ({err})") from None
    run.say(f"resume: continuing from {point.folder.name}")
    return Progress(point.state["step"], point.state["eval_before"], point.state.get("bad_steps", 0))


def _own_rng_state(run: Run, state: dict[str, Any]) -> dict[str, Any]:
    """This rank's random state from the checkpoint; rank 0's where the checkpoint has no per-rank states (one
    process, or a format before 3) or was written by another number of processes (said, since dropout and router
    jitter then do not repeat the uninterrupted run on the other ranks)."""
    ranks = state.get("rng_ranks")
    if ranks is None:
        return state["rng"]
    if len(ranks) != run.world_size:
        run.say(
            f"resume: the checkpoint was written by {len(ranks)} processes and this run has {run.world_size}: every "
            "process continues from rank 0's random state"
        )
        return state["rng"]
    return ranks[run.rank]


def _moments_in_current_layout(run: Run, saved: dict[str, Any], version: int | None) -> dict[str, Any]:
    """The optimizer's per-parameter tensors converted as the adapter's were (a checkpoint of adapter format 2 keeps
    Adam's moments of LoRA B in [E, d_out, r], like B itself)."""
    if version is None:
        return saved
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    names = {id(p): name for name, p in run.model.named_parameters()}
    state = saved["state"]
    owned = {index: names[id(params[index])] for index in state if 0 <= index < len(params)}
    kinds = {key for index in owned for key, value in state[index].items() if torch.is_tensor(value) and value.dim()}
    for kind in kinds:
        by_name = upgrade_tensors({owned[i]: state[i][kind] for i in owned if kind in state[i]}, version)
        for index in owned:
            if kind in state[index]:
                state[index][kind] = by_name[owned[index]]
    return saved


def open_run_folder(run: Run, start_step: int) -> None:
    """config.yaml, metrics.jsonl cut back to what was logged up to the checkpoint resumed from, the reporters."""
    if not run.is_main:
        return
    atomic_write_text(run.run_dir / "config.yaml", yaml.safe_dump(run.config.to_dict(), sort_keys=False))
    kept = []
    if start_step and run.metrics_path.exists():
        for line in run.metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by a kill
                continue
            if record["step"] <= start_step:
                kept.append(line)
    atomic_write_text(run.metrics_path, "".join(line + "\n" for line in kept))
    run.reporter = open_reporters(run.config.train.report_to, run.run_dir, start_step, run.config.to_dict())
