"""Rank analysis: how many singular directions the targeted weights and the trained updates use.

For each targeted module: the spectrum of its base weight, of each expert's update dW_e = scaling * B_e A_e, and,
given the routing of a run's eval sets, of each task's routing-weighted mean update sum_e g_te dW_e (g_te: the mean
gate of expert e on task t's tokens). The effective rank at energy p is the smallest k whose top-k singular values
hold a fraction p of sum(s^2).

Recommended rank per module (only with trained experts): the 90 % effective rank of the task updates (of the expert
updates when no routing is given), the largest over tasks, rounded up to a power of two and clipped to [1, the
trained rank]. A base weight's spectrum says how spread the pretrained map is, not how large an update the data needs,
so nothing is recommended from it alone.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from molora.patcher import molora_layers
from molora.utils import atomic_write, atomic_write_text

ENERGIES = (0.8, 0.9, 0.95)
RECOMMEND_AT = 0.9


def effective_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest k with sum_{i<k} s_i^2 >= energy * sum s^2 (0 for an all-zero spectrum)."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    power = singular_values.double().square().sort(descending=True).values
    total = float(power.sum())
    if total == 0:
        return 0
    cumulative = power.cumsum(0) / total
    return int((cumulative < energy - 1e-12).sum()) + 1


def low_rank_singular_values(output_side: torch.Tensor, input_side: torch.Tensor) -> torch.Tensor:
    """The singular values of B @ A (B [d_out, r], A [r, d_in]) from an r x r problem, in float64.

    With A^T = Q_a R_a and B = Q_b R_b (thin QR, orthonormal Q), B A = Q_b (R_b R_a^T) Q_a^T: the same nonzero
    singular values as R_b R_a^T, without forming the d_out x d_in product."""
    _, r_b = torch.linalg.qr(output_side.detach().double())
    _, r_a = torch.linalg.qr(input_side.detach().double().T)
    return torch.linalg.svdvals(r_b @ r_a.T)


@dataclass
class Spectrum:
    module: str
    kind: str  # "base", "expert 2", "task news"
    rank: int | None  # the trained rank (None for a base weight)
    singular_values: list[float]

    def effective(self, energy: float) -> int:
        return effective_rank(torch.tensor(self.singular_values), energy)


@dataclass
class RankReport:
    spectra: list[Spectrum] = field(default_factory=list)
    recommended: dict[str, int] = field(default_factory=dict)


def _round_up_power_of_two(value: int) -> int:
    return 1 if value <= 1 else 2 ** math.ceil(math.log2(value))


def _task_gates(stats: dict[str, Any] | None, owner: str) -> dict[str, torch.Tensor]:
    """{task: mean gates [E]} of the router deciding `owner`, from RoutingRecorder.stats()."""
    if stats is None or owner not in stats["layers"]:
        return {}
    rows = stats["layers"][owner]["task_expert"]
    return {task: torch.tensor(row, dtype=torch.float64) for task, row in zip(stats["tasks"], rows, strict=True)}


@torch.no_grad()
def analyze_ranks(model: nn.Module, routing: dict[str, Any] | None = None, base: bool = True) -> RankReport:
    """Spectra of every targeted module of a MoLoRAModel; `routing` (RoutingRecorder.stats() of its eval sets)
    adds each task's routing-weighted update. Experts still at zero (untrained, B = 0) are left out."""
    layers = molora_layers(getattr(model, "base_model", model))
    if not layers:
        raise ValueError("analyze_ranks: the model holds no MoLoRA layers (inject experts first)")
    report = RankReport()
    for name, layer in layers:
        if base:
            weight = layer.base_layer.weight.detach().double()
            report.spectra.append(Spectrum(name, "base", None, torch.linalg.svdvals(weight).tolist()))
        experts = layer.experts
        rows = experts.rows_per_expert
        if not experts.stacked_out().any():
            continue
        input_side = experts.stacked_in().view(experts.num_experts, rows, -1)
        output_side = experts.stacked_out().view(experts.num_experts, rows, -1)
        updates = []
        for e in range(experts.num_experts):
            values = low_rank_singular_values(output_side[e].T, input_side[e]) * abs(layer.scaling)
            report.spectra.append(Spectrum(name, f"expert {e}", rows, values.tolist()))
            updates.append(report.spectra[-1])
        tasks = []
        for task, gates in _task_gates(routing, layer.group_owner.layer_name).items():
            shared = gates.new_ones(experts.num_experts - gates.shape[0])  # shared experts: always on, weight 1
            coefficients = torch.cat([gates * layer.gate_multiplier, shared]).repeat_interleave(rows)
            coefficients = coefficients.to(output_side.dtype)
            stacked_b = (output_side.reshape(-1, output_side.shape[-1]) * coefficients.unsqueeze(-1)).T
            values = low_rank_singular_values(stacked_b, input_side.reshape(-1, input_side.shape[-1]))
            tasks.append(Spectrum(name, f"task {task}", rows, (values * abs(layer.scaling)).tolist()))
        report.spectra += tasks
        needed = max(s.effective(RECOMMEND_AT) for s in (tasks or updates))
        report.recommended[name] = min(max(_round_up_power_of_two(needed), 1), rows)
    return report


def rank_table(report: RankReport) -> list[dict[str, Any]]:
    rows = []
    for spectrum in report.spectra:
        row = {"module": spectrum.module, "kind": spectrum.kind, "trained_rank": spectrum.rank}
        row |= {f"rank@{int(e * 100)}%": spectrum.effective(e) for e in ENERGIES}
        row["top_singular_value"] = max(spectrum.singular_values, default=0.0)
        row["recommended"] = report.recommended.get(spectrum.module) if spectrum.kind == "base" else None
        rows.append(row)
    return rows


def _markdown(report: RankReport, title: str) -> str:
    lines = [f"# {title}", "", "Effective rank: the fewest singular directions holding 80/90/95 % of sum(s^2)."]
    if report.recommended:
        lines += ["", "## Recommended rank per module", "", "| module | trained rank | recommended |", "|---|---|---|"]
        trained = {s.module: s.rank for s in report.spectra if s.rank is not None}
        lines += [f"| {m} | {trained.get(m, '-')} | {r} |" for m, r in report.recommended.items()]
    lines += ["", "## Spectra", "", "| module | kind | " + " | ".join(f"rank@{int(e * 100)}%" for e in ENERGIES)]
    lines[-1] += " | top s |"
    lines.append("|---|---|" + "---|" * (len(ENERGIES) + 1))
    for row in rank_table(report):
        ranks = " | ".join(str(row[f"rank@{int(e * 100)}%"]) for e in ENERGIES)
        lines.append(f"| {row['module']} | {row['kind']} | {ranks} | {row['top_singular_value']:.4g} |")
    return "\n".join(lines) + "\n"


def _plot(report: RankReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kinds, title in ((axes[0], ("base",), "base weights"), (axes[1], ("expert", "task"), "updates")):
        for spectrum in report.spectra:
            if not spectrum.kind.startswith(kinds) or not spectrum.singular_values:
                continue
            power = torch.tensor(spectrum.singular_values).double().square()
            if power.sum() > 0:
                curve = (power.sort(descending=True).values.cumsum(0) / power.sum()).tolist()
                ax.plot(range(1, len(curve) + 1), curve, alpha=0.3, linewidth=0.8)
        ax.set(title=f"cumulative spectral energy: {title}", xlabel="k", ylabel="energy of the top k", ylim=(0, 1.02))
        ax.set_xscale("log")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write_rank_report(report: RankReport, directory: Path, title: str = "Rank analysis") -> list[Path]:
    """ranks.md, ranks.csv (one line per spectrum) and ranks.png (cumulative energy curves)."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / "ranks.md", _markdown(report, title))
    rows = rank_table(report)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(directory / "ranks.csv", buffer.getvalue())
    _plot(report, directory / "ranks.png")
    return [directory / name for name in ("ranks.md", "ranks.csv", "ranks.png")]


def analyze_run(run_dir: Path, model_name: str | None = None) -> tuple[RankReport, str]:
    """The rank report of a finished run: its adapter, and the routing of its eval sets for the task updates."""
    from molora.base_models import load_base
    from molora.data import MultiDomainData
    from molora.evaluation import evaluate
    from molora.model import MoLoRAModel
    from molora.run_config import load_run_config

    if not (run_dir / "adapter").is_dir():
        raise FileNotFoundError(f"{run_dir} has no adapter/ (is it a finished molora-train run?)")
    config = load_run_config(run_dir / "config.yaml")
    name = model_name or config.model.name
    base, tokenizer = load_base(name, task=config.model.task)
    model = MoLoRAModel.from_pretrained(base, run_dir / "adapter")
    data = MultiDomainData(config.data, tokenizer)
    recorder = model.record_routing(domains=data.names)
    evaluate(model, data, config, torch.device("cpu"), recorder)
    return analyze_ranks(model, recorder.stats()), f"Rank analysis of {run_dir.name} ({name})"


def analyze_base(model_name: str, targets: list[str]) -> tuple[RankReport, str]:
    """The base weights' spectra of a model's targeted modules (no adapter: nothing to recommend)."""
    from molora.base_models import load_base
    from molora.config import MoLoRAConfig
    from molora.model import MoLoRAModel

    base, _ = load_base(model_name)
    model = MoLoRAModel(base, MoLoRAConfig(target_modules=targets, num_experts=1, router="softmax", aux_losses={}))
    return analyze_ranks(model), f"Rank analysis of {model_name}'s {', '.join(targets)} weights"
