"""Rank analysis: how many singular directions the targeted weights and the trained updates use.

For each targeted module: the spectrum of its base weight, of each expert's update dW_e = scaling * B_e A_e, and,
given the routing of a run's eval sets, of each task's routing-weighted mean update sum_e g_te dW_e (g_te: the mean
gate of expert e over task t's tokens, so the update of the task's average token). The effective rank at energy p is
the smallest k whose top-k singular values hold a fraction p of sum(s^2).

Recommended rank per module (only with trained experts): the 90 % effective rank of the task updates (of the expert
updates when no routing is given), the largest over tasks, rounded up to a power of two and clipped to [1, the
trained rank]. A base weight's spectrum says how spread the pretrained map is, not how large an update the data needs,
so nothing is recommended from it alone. Writers (markdown, CSV, plot) are in molora.analysis.rank_report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import einops
import torch
from torch import nn

from molora.core.config import ALL_LINEAR, MoLoRAConfig
from molora.core.layer import MoLoRALinear
from molora.core.patcher import _matches, find_targets, molora_layers
from molora.core.recording import RoutingRecorder
from molora.deploy.merging import mixture_coefficients
from molora.model import MoLoRAModel

ENERGIES = (0.8, 0.9, 0.95)
RECOMMEND_AT = 0.9
Targets = list[str] | str | MoLoRAConfig


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
    """The singular values of B @ A (B [d_out, r], A [r, d_in]) from an r x r problem, in float64 on the CPU.

    With A^T = Q_a R_a and B = Q_b R_b (thin QR, orthonormal Q), B A = Q_b (R_b R_a^T) Q_a^T: the same nonzero
    singular values as R_b R_a^T, without forming the d_out x d_in product."""
    _, r_b = torch.linalg.qr(output_side.detach().to("cpu", torch.float64))
    _, r_a = torch.linalg.qr(input_side.detach().to("cpu", torch.float64).T)
    return torch.linalg.svdvals(r_b @ r_a.T)


@dataclass
class Spectrum:
    module: str
    kind: str  # "base", "expert 2", "shared 0", "task news"
    rank: int | None  # the trained rank per expert (None for a base weight)
    singular_values: list[float]

    def effective(self, energy: float) -> int:
        return effective_rank(torch.tensor(self.singular_values), energy)


@dataclass
class RankReport:
    spectra: list[Spectrum] = field(default_factory=list)
    needed: dict[str, int] = field(default_factory=dict)  # the 90 % rank the rule reads, before rounding/clipping
    recommended: dict[str, int] = field(default_factory=dict)


def recommend(needed: int, trained_rank: int) -> int:
    """The rule: `needed` rounded up to a power of two, clipped to [1, trained_rank]."""
    rounded = 1 if needed <= 1 else 2 ** math.ceil(math.log2(needed))
    return max(1, min(rounded, trained_rank))


def mean_task_gates(routing: RoutingRecorder | Mapping[str, Any] | None) -> dict[str, dict[str, torch.Tensor]]:
    """{router layer: {task: mean gate per routed expert [E]}} from a RoutingRecorder (summed gates / tokens: what
    the task's average token applies) or from its stats() (task_expert: each task's share of the summed gates, the
    same when every token's gates sum to 1, as with softmax and renormalised top-k; switch's are smaller)."""
    if routing is None:
        return {}
    if isinstance(routing, RoutingRecorder):
        result = {}
        for layer in routing.layers:
            if routing.weight[layer]:
                weight, _, tokens = routing.matrices(layer)
                means = weight.double() / tokens.double().clamp_min(1).unsqueeze(-1)
                pairs = zip(routing.task_names(), means, tokens, strict=True)
                result[layer] = {task: gates for task, gates, count in pairs if count > 0}
        return result
    if not isinstance(routing, Mapping) or "layers" not in routing or "tasks" not in routing:
        raise ValueError("routing must be a RoutingRecorder or its stats() (a dict with 'tasks' and 'layers')")
    return {
        layer: {
            t: torch.tensor(row, dtype=torch.float64) for t, row in zip(routing["tasks"], s["task_expert"], strict=True)
        }
        for layer, s in routing["layers"].items()
    }


def _base_spectrum(name: str, weight: torch.Tensor) -> Spectrum:
    if not weight.is_floating_point():
        raise ValueError(f"{name}: its weight is {weight.dtype} (quantised?); load the model unquantised to analyse it")
    return Spectrum(name, "base", None, torch.linalg.svdvals(weight.detach().to("cpu", torch.float64)).tolist())


def _factors(layer: MoLoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(input sides [E, r, d_in], output sides [E, r, d_out]) in float64 on the CPU, with the eval-mode rank gates and
    rank schedule applied to the output side, as the forward in eval uses them."""
    experts = layer.experts
    count, rows = experts.num_experts, experts.rows_per_expert
    input_side = experts.stacked_in().detach().to("cpu", torch.float64).view(count, rows, -1)
    output_side = experts.stacked_out(hard=True).detach().to("cpu", torch.float64).view(count, rows, -1)
    return input_side, output_side


def _update_spectra(name: str, layer: MoLoRALinear, task_gates: dict[str, torch.Tensor]) -> list[Spectrum]:
    """Each expert's update, then each task's mean update (routed gates times gate_multiplier, shared experts 1)."""
    input_side, output_side = _factors(layer)
    count, rows = input_side.shape[:2]
    routed = count - layer.num_shared
    spectra = []
    for e in range(count):
        values = low_rank_singular_values(output_side[e].T, input_side[e]) * abs(layer.scaling)
        kind = f"expert {e}" if e < routed else f"shared {e - routed}"
        spectra.append(Spectrum(name, kind, rows, values.tolist()))
    stacked_in = einops.rearrange(input_side, "e r i -> (e r) i")
    for task, gates in task_gates.items():
        if gates.shape[0] != routed:
            raise ValueError(f"{name}: the routing has {gates.shape[0]} gates per token, the module {routed} experts")
        coefficients = mixture_coefficients(layer, gates.double())
        weighted = einops.rearrange(output_side * coefficients.view(-1, 1, 1), "e r o -> o (e r)")
        values = low_rank_singular_values(weighted, stacked_in) * abs(layer.scaling)
        spectra.append(Spectrum(name, f"task {task}", rows, values.tolist()))
    return spectra


def _select(layers: list[tuple[str, MoLoRALinear]], targets: Targets | None) -> list[tuple[str, MoLoRALinear]]:
    if targets is None:
        return layers
    patterns = targets.target_modules if isinstance(targets, MoLoRAConfig) else targets
    if isinstance(patterns, str) and patterns.lower() == ALL_LINEAR:  # every adapted module is a linear one
        return layers
    adapted = sorted({n.rsplit(".", 1)[-1] for n, _ in layers})
    singles = [patterns] if isinstance(patterns, str) else [[pattern] for pattern in patterns]  # regex, or names
    for single in singles:
        if not any(_matches(single, n) for n, _ in layers):
            pattern = single if isinstance(single, str) else single[0]
            raise ValueError(f"target {pattern!r} matches none of the adapted modules; adapted: {adapted}")
    return [(n, layer) for n, layer in layers if _matches(patterns, n)]


@torch.no_grad()
def analyze_ranks(
    model: nn.Module,
    routing: RoutingRecorder | Mapping[str, Any] | None = None,
    *,
    targets: Targets | None = None,
    base: bool = True,
) -> RankReport:
    """Spectra of the targeted modules. A MoLoRAModel: its adapted modules (`targets`, names/suffixes, a regex or a
    MoLoRAConfig's target_modules, narrows them), their base weights (unless base=False) and trained updates;
    `routing` (the RoutingRecorder of its eval sets, or its stats()) adds each task's mean update. A plain model:
    the base weights `targets` selects (as MoLoRAConfig.target_modules, or a MoLoRAConfig), nothing recommended.
    Experts still at zero (B = 0) give no update spectra."""

    root = model.base_model if isinstance(model, MoLoRAModel) else model
    layers = molora_layers(root)
    report = RankReport()
    if not layers:
        if targets is None:
            raise ValueError(
                "the model holds no MoLoRA layers: give targets (module names or a regex) to analyse its base weights"
            )
        if routing is not None:
            raise ValueError("routing was given but the model holds no MoLoRA layers to weigh")
        config = targets if isinstance(targets, MoLoRAConfig) else MoLoRAConfig(target_modules=targets)
        report.spectra = [_base_spectrum(name, module.weight) for name, module in find_targets(root, config)[0]]
        return report
    gates = mean_task_gates(routing)
    for name, layer in _select(layers, targets):
        if base:
            report.spectra.append(_base_spectrum(name, layer.base_layer.weight))
        if not layer.experts.output_side.any():
            continue
        updates = _update_spectra(name, layer, gates.get(layer.group_owner.layer_name, {}))
        report.spectra += updates
        tasks = [s for s in updates if s.kind.startswith("task ")]
        report.needed[name] = max(s.effective(RECOMMEND_AT) for s in (tasks or updates))
        report.recommended[name] = recommend(report.needed[name], layer.experts.rows_per_expert)
    if gates and report.needed and not any(s.kind.startswith("task ") for s in report.spectra):
        raise ValueError(f"the routing was recorded on other routers ({sorted(gates)[:3]}...) than this model's")
    return report
