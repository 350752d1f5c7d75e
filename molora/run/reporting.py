"""Where a run's metrics go besides metrics.jsonl (`train.report_to`): TensorBoard, Weights & Biases.

Every record written to metrics.jsonl is sent as scalars under the same step, tagged `type/key` (`train/loss`,
`train/aux/balance`, `eval/news`, `val/mean`); each evaluation also sends the task x expert heatmap as an image. Only
the main rank reports. The packages are imported only when asked for, and `check_reporters` says before the run starts
which one is missing and how to install it.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from molora.analysis.routing_report import task_expert_figure
from molora.utils import atomic_write_text

HEATMAP_TAG = "routing/task_expert"


def scalar_tags(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as {tag: number}: nested mappings joined with '/', anything not a number dropped
    (alarm messages, bad-step term lists), `step` and `type` used for the step and the tag's prefix."""
    prefix = str(record.get("type", "metrics"))
    tags: dict[str, float] = {}

    def add(name: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                add(f"{name}/{key}", inner)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            tags[name] = float(value)

    for key, value in record.items():
        if key not in ("step", "type"):
            add(key if key.startswith(f"{prefix}/") else f"{prefix}/{key}", value)
    return tags


class Reporter:
    """The interface, and what `report_to: []` gets: every call does nothing."""

    package = ""  # what pip installs
    module = ""  # what must import for this reporter to work
    install = ""  # the command that installs it

    def log_scalars(self, step: int, record: dict[str, Any]) -> None:
        pass

    def log_routing(self, step: int, stats: dict[str, Any]) -> None:
        """stats: RoutingRecorder.stats() of an evaluation."""

    def close(self) -> None:
        pass


class TensorBoardReporter(Reporter):
    """Event files in RUN/tensorboard; a resumed run appends new files there, and TensorBoard hides what the lost
    steps after the checkpoint had written (purge_step), as metrics.jsonl drops them."""

    package, module = "tensorboard", "torch.utils.tensorboard"
    install = "pip install tensorboard  (or pip install 'molora[tensorboard]')"

    def __init__(self, run_dir: Path, start_step: int, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log_scalars(self, step: int, record: dict[str, Any]) -> None:
        for tag, value in scalar_tags(record).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a few records per logged step: cheap, and the dashboard is never minutes behind

    def log_routing(self, step: int, stats: dict[str, Any]) -> None:
        figure = task_expert_figure(stats)
        if figure is not None:
            self.writer.add_figure(HEATMAP_TAG, figure, step, close=True)
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbReporter(Reporter):
    """One W&B run per run folder: its id is kept in RUN/wandb-run-id so that --resume continues the same run
    (W&B ignores steps it already has; the project is $WANDB_PROJECT, else "molora")."""

    package, module = "wandb", "wandb"
    install = "pip install wandb"

    def __init__(self, run_dir: Path, start_step: int, config: dict[str, Any]):
        import wandb

        id_file = run_dir / "wandb-run-id"
        run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
        atomic_write_text(id_file, run_id + "\n")
        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "molora"),
            name=run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
        )

    def log_scalars(self, step: int, record: dict[str, Any]) -> None:
        tags = scalar_tags(record)
        if tags:
            self.run.log(tags, step=step)

    def log_routing(self, step: int, stats: dict[str, Any]) -> None:
        import matplotlib.pyplot as plt

        figure = task_expert_figure(stats)
        if figure is not None:
            self.run.log({HEATMAP_TAG: self.wandb.Image(figure)}, step=step)
            plt.close(figure)

    def close(self) -> None:
        self.run.finish()


REPORTERS: dict[str, type[Reporter]] = {"tensorboard": TensorBoardReporter, "wandb": WandbReporter}


class Reporters(Reporter):
    """Several reporters as one; closing closes each, even when one of them fails."""

    def __init__(self, reporters: list[Reporter]):
        self.reporters = reporters

    def log_scalars(self, step: int, record: dict[str, Any]) -> None:
        for reporter in self.reporters:
            reporter.log_scalars(step, record)

    def log_routing(self, step: int, stats: dict[str, Any]) -> None:
        for reporter in self.reporters:
            reporter.log_routing(step, stats)

    def close(self) -> None:
        errors = []
        for reporter in self.reporters:
            try:
                reporter.close()
            except Exception as err:  # the others still close; the first failure is raised after
                errors.append(err)
        if errors:
            raise errors[0]


def check_reporters(names: list[str]) -> None:
    """Import what each named reporter needs now, so a missing package stops the run before anything is written."""
    for name in names:
        reporter = REPORTERS[name]
        try:
            importlib.import_module(reporter.module)
        except ImportError as err:
            raise ValueError(
                f"train.report_to: {name!r} needs the package {reporter.package}, which is not "
                f"installed ({err}): {reporter.install}"
            ) from None


def open_reporters(names: list[str], run_dir: Path, start_step: int, config: dict[str, Any]) -> Reporter:
    """The reporters of train.report_to for a run that starts (or resumes) after `start_step`."""
    opened: list[Reporter] = []
    try:
        for name in names:
            opened.append(REPORTERS[name](run_dir, start_step, config))
    except BaseException:
        Reporters(opened).close()
        raise
    return Reporters(opened) if opened else Reporter()
