"""The rank analysis of a finished run folder or of a base model's weights (`molora-ranks`): the run machinery loads
the model, its data and routing; molora.analysis.ranks does the analysis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from molora.analysis.ranks import RankReport, Targets, analyze_ranks
from molora.model import MoLoRAModel
from molora.run.base_models import BUILTIN_MODELS, load_base
from molora.run.config import load_run_config
from molora.run.data import MultiDomainData
from molora.run.evaluation import evaluate
from molora.run.setup import setup_distributed


def _load_base(name: str, task: str = "causal-lm") -> tuple[nn.Module, Any]:
    """load_base, with a missing local folder named as such (not as a malformed hub id)."""
    if name.startswith(("/", "./", "../")) and not Path(name).is_dir():
        raise FileNotFoundError(f"no model folder at {name} (built-in names: {sorted(BUILTIN_MODELS)})")
    return load_base(name, task=task)


def analyze_run(run_dir: Path, model_name: str | None = None, targets: Targets | None = None) -> tuple[RankReport, str]:
    """The rank report of a finished run: its adapter, and the routing of its eval sets for the task updates
    (evaluated on the GPU when there is one; the SVDs run on the CPU)."""
    run_dir = Path(run_dir)
    if not (run_dir / "adapter").is_dir():
        raise FileNotFoundError(f"{run_dir} has no adapter/ (is it a finished molora-train run?)")
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} has no config.yaml (is it a molora-train run folder?)")
    config = load_run_config(run_dir / "config.yaml")
    if config.model.adapter != "molora":
        raise ValueError(f"{run_dir} trained model.adapter={config.model.adapter!r}, not a mixture: no experts to read")
    name = model_name or config.model.name
    base, tokenizer = _load_base(name, config.model.task)
    _, _, device = setup_distributed()
    model = MoLoRAModel.from_pretrained(base, run_dir / "adapter").to(device)
    data = MultiDomainData(config.data, tokenizer)
    recorder = model.record_routing(domains=data.names)
    evaluate(model, data, config, device, recorder)
    return analyze_ranks(model, recorder, targets=targets), f"Rank analysis of {run_dir.name} ({name})"


def analyze_base(model_name: str, targets: list[str] | str) -> tuple[RankReport, str]:
    """The base weights' spectra of a model's targeted modules (no adapter: nothing to recommend)."""
    base, _ = _load_base(model_name)
    shown = targets if isinstance(targets, str) else ", ".join(targets)
    return analyze_ranks(base, targets=targets), f"Rank analysis of {model_name}: base weights of {shown}"
