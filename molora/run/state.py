"""Run: what one training invocation works with (config, model, data, optimizer, reporters), shared by the loop
(molora.run.training) and resuming (molora.run.resume) without either importing the other for it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from molora.model import MoLoRAModel
from molora.run.config import RunConfig
from molora.run.data import MultiDomainData
from molora.run.evaluation import CollapseAlarm
from molora.run.reporting import Reporter


@dataclass
class Run:
    """What one training invocation works with; built by prepare_run() once config, model and data are valid."""

    config: RunConfig
    run_dir: Path
    model: nn.Module
    data: MultiDomainData
    device: torch.device
    rank: int
    world_size: int
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    alarm: CollapseAlarm | None = None
    reporter: Reporter = field(default_factory=Reporter)  # train.report_to, opened with the run folder

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.config.train.sharding == "fsdp"

    @property
    def routed(self) -> bool:
        return isinstance(self.model, MoLoRAModel)

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def log(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with self.metrics_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            self.reporter.log_scalars(record["step"], record)

    def say(self, message: str, bar=None) -> None:
        if self.is_main:
            (bar.write if bar is not None else print)(message)
