"""A training run's configuration: YAML sections model / data / molora / train mirror the dataclasses here.

Unknown keys are errors that name the key and suggest the closest one; `key.sub=value` overrides use YAML values.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from molora.core.config import MoLoRAConfig, peft_hint
from molora.core.rank_gates import check_rank_schedule
from molora.core.routers import ROUTERS
from molora.run.data import DataConfig
from molora.run.quantization import check_quantization
from molora.run.reporting import REPORTERS
from molora.run.sharding import SHARDINGS

ADAPTERS = ("molora", "peft-lora", "none")


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  # built-in name, local folder, or hub id (from_pretrained unchanged)
    task: str = "causal-lm"
    gradient_checkpointing: bool = False
    # "molora": the mixture in the molora section; "peft-lora": a plain PEFT LoRA baseline on the same target
    # modules (peft_rank None: the rank whose trainable parameters match the mixture's); "none": the base model.
    adapter: str = "molora"
    peft_rank: int | None = None
    # null, or a quantized base (QLoRA): nf4, fp4, int8 (bitsandbytes) or torchao-int8 (molora.run.quantization)
    quantization: str | None = None

    def __post_init__(self) -> None:
        if self.adapter not in ADAPTERS:
            raise ValueError(f"model.adapter must be one of {ADAPTERS}, got {self.adapter!r}")
        if self.peft_rank is not None and (not isinstance(self.peft_rank, int) or self.peft_rank < 1):
            raise ValueError(f"model.peft_rank must be an int >= 1 or null, got {self.peft_rank!r}")
        check_quantization(self.quantization)


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    router_lr: float | None = None  # None: lr * router_lr_scale
    router_lr_scale: float = 1.0
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    bf16: bool = False
    # "fsdp": the model sharded over the processes of a torchrun launch (FSDP2; molora.run.sharding)
    sharding: str = "none"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: only at start and end
    eval_at_start: bool = True  # the step-0 evaluation ("before"); ablations skip it (the base row has it)
    eval_batch_size: int = 8
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    stop_after: int | None = None  # end this invocation after N steps (time-sliced jobs); --resume continues
    # Steps whose loss, aux terms or gradients are not finite: 0 stops the run at the first one (the last good
    # checkpoint stays); N skips up to N of them (no optimizer update), counted in metrics.jsonl.
    max_bad_steps: int = 0
    progress: bool = True
    # Collapse alarm, checked at every evaluation: an expert under 1/(10E) of the load for `alarm_evals`
    # consecutive evaluations, or mean routing entropy under alarm_entropy_ratio * ln(E).
    alarm_evals: int = 2
    alarm_entropy_ratio: float = 0.1
    # Grow each module's rank by masking (molora.core.rank_gates): {start: fraction of the rank used at step 0, full_at:
    # fraction of train.steps at which the whole rank is used}, linear in between; null: the whole rank throughout.
    rank_schedule: dict[str, float] | None = None
    rank_gate_lr: float = 0.05  # molora.core.rank_gates: the learning rate of the gate logits
    # Also send metrics.jsonl's records, and the task x expert heatmap of each evaluation, to these (run.reporting):
    # "tensorboard" (RUN/tensorboard), "wandb". Off by default.
    report_to: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.report_to = _reporter_names(self.report_to)
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_batch_size", "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"train.{name} must be an int >= 1, got {value!r}")
        for name in ("warmup_steps", "eval_every", "save_every", "max_bad_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"train.{name} must be an int >= 0, got {value!r}")
        if not self.router_lr_scale > 0:
            raise ValueError(f"train.router_lr_scale must be > 0, got {self.router_lr_scale!r}")
        if not self.lr > 0 or (self.router_lr is not None and not self.router_lr > 0):
            raise ValueError(f"train.lr and train.router_lr must be > 0, got {self.lr!r}, {self.router_lr!r}")
        if self.stop_after is not None and (not isinstance(self.stop_after, int) or self.stop_after < 1):
            raise ValueError(f"train.stop_after must be an int >= 1 or null, got {self.stop_after!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.rank_schedule is not None:
            check_rank_schedule(self.rank_schedule)
        if not self.rank_gate_lr > 0:
            raise ValueError(f"train.rank_gate_lr must be > 0, got {self.rank_gate_lr!r}")
        if self.sharding not in SHARDINGS:
            raise ValueError(f"train.sharding must be one of {SHARDINGS}, got {self.sharding!r}")


def _reporter_names(value: Any) -> list[str]:
    """train.report_to as a list of known names; a single name (`report_to: tensorboard`) is a list of one."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"train.report_to must be a list of names from {list(REPORTERS)}, got {value!r}")
    for name in names:
        if name not in REPORTERS:
            close = difflib.get_close_matches(name, list(REPORTERS), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"train.report_to: unknown reporter {name!r}; {hint}choices are {list(REPORTERS)}")
    if len(set(names)) < len(names):
        raise ValueError(f"train.report_to names a reporter twice: {list(names)}")
    return list(names)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    molora: MoLoRAConfig = field(default_factory=MoLoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a run config is a mapping with sections {list(SECTIONS)}, got {type(data).__name__}")
        check_keys(data)
        molora = dict(data.get("molora") or {})
        name = molora.get("router", MoLoRAConfig.router)
        router = ROUTERS.get(name) if isinstance(name, str) else None  # MoLoRAConfig names a bad value below
        if router is not None and router.needs_task_ids and molora.get("num_tasks") is None:  # one task per domain
            domains = DataConfig(**_coerce_floats(DataConfig, data.get("data") or {})).domains  # a suite expanded
            molora["num_tasks"] = len(domains)
            data = {**data, "molora": molora}
        return cls(
            **{name: SECTIONS[name](**_coerce_floats(SECTIONS[name], data.get(name) or {})) for name in SECTIONS}
        )


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "molora": MoLoRAConfig, "train": TrainConfig}


def _coerce_floats(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """YAML 1.1 reads `1e-3` as a string; float fields take it as the number it is."""
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    out = dict(values)
    for key, value in values.items():
        if isinstance(value, str) and "float" in types.get(key, ""):
            try:
                out[key] = float(value)
            except ValueError:
                raise ValueError(f"{key} must be a number, got {value!r}") from None
    return out


def _all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _unknown(key: str) -> ValueError:
    section, _, name = key.partition(".")
    peft = peft_hint(name, "molora.") if section == "molora" else None
    if peft is not None:
        return ValueError(f"unknown config key {key!r}; {peft}")
    close = difflib.get_close_matches(key, _all_keys() + list(SECTIONS), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; sections are {list(SECTIONS)}"
    return ValueError(f"unknown config key {key!r}{hint}")


def check_keys(data: dict[str, Any]) -> None:
    for section, values in data.items():
        if section not in SECTIONS:
            raise _unknown(section)
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ValueError(f"config section {section!r} must be a mapping, got {values!r}")
        names = {f.name for f in dataclasses.fields(SECTIONS[section])}
        for key in values:
            if key not in names:
                raise _unknown(f"{section}.{key}")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`train.steps=10 molora.router=switch`; values are parsed as YAML."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"override {item!r} must look like section.key=value")
        section, name = key.split(".", 1)
        if section not in SECTIONS or name not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
            raise _unknown(key)
        data.setdefault(section, {})
        if data[section] is None:
            data[section] = {}
        data[section][name] = yaml.safe_load(raw)
    return data


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {err}") from None
    return RunConfig.from_dict(apply_overrides(data, overrides or []))


def read_as_current(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved run config (a checkpoint's) as this version reads it: a field added since it was written takes its
    default, which keeps the behaviour of the version that wrote it, so an upgrade does not block --resume."""
    try:
        return RunConfig.from_dict(saved).to_dict()
    except (ValueError, TypeError):  # a config this version cannot read: compared as saved, keys named
        return saved
