"""Fixed expert weightings: which gates replace routing when a mixture is merged into the base or exported.

A mixture can leave the router behind only where its gates do not depend on the tokens: a module with a single
expert, the task router for one task, or a weighting the user fixes (one expert, or weights over the experts). Every
module's gates are resolved, and refused with the reason, before anything is changed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from molora.core.base_layers import base_kind
from molora.core.routers import ROUTERS, RouterInputs

if TYPE_CHECKING:
    from molora.core.layer import MoLoRALinear


def _check_expert(expert: object) -> int:
    if not isinstance(expert, int) or isinstance(expert, bool) or expert < 0:
        raise ValueError(f"expert must be a non-negative int (an expert's index), got {expert!r}")
    return expert


def _check_weights(weights: object) -> list[float]:
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 1:
            raise ValueError(f"weights must be one value per expert (1-D), got a tensor of shape {list(weights.shape)}")
        weights = weights.tolist()
    if not isinstance(weights, Sequence) or isinstance(weights, str) or not weights:
        raise ValueError(f"weights must be a non-empty list of numbers, one per expert, got {weights!r}")
    values = []
    for value in weights:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"weights must be finite numbers, got {weights!r}")
        values.append(float(value))
    return values


def mixture_coefficients(layer: MoLoRALinear, gates: torch.Tensor) -> torch.Tensor:
    """[E + shared]: each routed expert's gate times the gate multiplier, as the forward weighs it; shared experts 1."""
    coefficients = gates * layer.gate_multiplier
    if layer.num_shared:
        coefficients = torch.cat([coefficients, coefficients.new_ones(layer.num_shared)])
    return coefficients


def fixed_factors(
    layer: MoLoRALinear, fixed_gates: torch.Tensor, drop_zero: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """A module's mixture under fixed gates [E] as one LoRA: (A [r', d_in], B [d_out, r']), delta = scaling * B @ A.

    Each expert's output side is multiplied by its gate times gate_multiplier (shared experts by 1), exactly as the
    forward weighs it, with the rank gates as in eval whatever the mode; r' is every expert's rows, or with drop_zero
    only those of experts with a nonzero gate (at least one expert's, so that a PEFT adapter has rank >= 1)."""
    experts = layer.experts
    coefficients = mixture_coefficients(layer, fixed_gates.to(layer.experts_dtype))
    keep = coefficients != 0 if drop_zero else torch.ones_like(coefficients, dtype=torch.bool)
    if not keep.any():
        keep[0] = True
    rows, count = experts.rows_per_expert, coefficients.shape[0]
    input_side = experts.stacked_in().view(count, rows, layer.in_features)[keep]
    output_side = experts.stacked_out(hard=True).view(count, rows, layer.out_features)[keep]
    output_side = output_side * coefficients[keep].view(-1, 1, 1)
    return input_side.reshape(-1, layer.in_features), output_side.reshape(-1, layer.out_features).T


def merged_delta(layer: MoLoRALinear, fixed_gates: torch.Tensor) -> torch.Tensor:
    """scaling * sum_e w_e B_e A_e as one [d_out, d_in] matrix, for fixed gates [E] (shared experts added)."""
    input_side, output_side = fixed_factors(layer, fixed_gates)
    return layer.scaling * output_side @ input_side


@torch.no_grad()
def merged_weight(layer: MoLoRALinear, fixed_gates: torch.Tensor) -> torch.Tensor:
    """The base weight with the fixed mixture added, in the base layer's layout and dtype (a new tensor)."""
    check_mergeable([(layer.layer_name, layer)])
    delta = merged_delta(layer, fixed_gates)
    weight = layer.base_layer.weight
    if base_kind(layer.base_layer).weight_layout == "in_out":  # transformers' Conv1D stores [d_in, d_out]
        delta = delta.T
    return weight + delta.to(weight.dtype)


def task_gates(layer: MoLoRALinear, task_id: int | None) -> torch.Tensor:
    """A module's gates [E] when they do not depend on the tokens: its single expert, or the task router's gate for
    one task; a ValueError naming the alternatives for a router that weighs each token."""
    router = layer.routing_router
    if router.num_experts == 1:
        return torch.ones(1, device=layer.weight.device)
    if not router.mergeable_per_task:
        mergeable = sorted(name for name, cls in ROUTERS.items() if cls.mergeable_per_task)
        raise ValueError(
            f"{layer.layer_name}: router {router.name!r} weighs the experts per token, so no single matrix "
            f"reproduces it; only a router with one gate per task ({', '.join(mergeable)}) can be merged as it "
            "routes. To deploy a fixed choice instead, give expert=i (one expert) or weights=[w_1, ..., w_E]"
        )
    if task_id is None:
        raise ValueError("merging a task router needs task_id: the gate differs per task")
    if not 0 <= task_id < router.num_tasks:
        raise ValueError(f"task_id must be in [0, num_tasks={router.num_tasks}), got {task_id}")
    probe = torch.zeros(1, 1, layer.in_features, device=layer.weight.device)
    task_ids = torch.tensor([task_id], device=layer.weight.device)
    return router(probe, RouterInputs(task_ids=task_ids)).gates[0, 0]


def resolve_fixed_gates(
    layers: Sequence[tuple[str, MoLoRALinear]],
    *,
    task_id: int | None = None,
    expert: int | None = None,
    weights: Sequence[float] | torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """{module: gates [E]} that replace each module's routing; a ValueError naming every module that cannot take them.

    expert=i: expert i alone (gate 1). weights=[w_1, ..., w_E]: those gates, applied as the router's would be
    (times the gate multiplier of mixture_scaling; shared experts stay on). Neither: the task router's gate for
    task_id. A module with one expert has no routing and keeps it in every case.
    """
    choices = {"task_id": task_id, "expert": expert, "weights": weights}
    given = [name for name, value in choices.items() if value is not None]
    if len(given) > 1:
        raise ValueError(f"give one of task_id, expert and weights, got {', '.join(given)}")
    if expert is not None:
        expert = _check_expert(expert)
    values = _check_weights(weights) if weights is not None else None
    gates: dict[str, torch.Tensor] = {}
    wrong: list[str] = []
    for name, layer in layers:
        count = layer.routing_router.num_experts
        device = layer.weight.device
        if count == 1:
            gates[name] = torch.ones(1, device=device)
        elif expert is not None:
            if expert >= count:
                wrong.append(f"{name} ({count} experts)")
                continue
            gates[name] = torch.nn.functional.one_hot(torch.tensor(expert), count).float().to(device)
        elif values is not None:
            if len(values) != count:
                wrong.append(f"{name} ({count} experts)")
                continue
            gates[name] = torch.tensor(values, device=device)
        else:
            gates[name] = task_gates(layer, task_id)
    if wrong:
        asked = f"expert={expert}" if expert is not None else f"{len(values)} weights"
        raise ValueError(f"{asked} does not fit {len(wrong)} module(s): {', '.join(wrong[:8])}")
    return gates


@torch.no_grad()
def check_mergeable(layers: Sequence[tuple[str, MoLoRALinear]]) -> None:
    """A ValueError, before any weight changes, naming the modules whose base weight cannot take a fixed mixture and
    why (a quantized base: molora.core.base_layers)."""
    refused = [(name, kind) for name, layer in layers if (kind := base_kind(layer.base_layer)).merge_refusal]
    if refused:
        more = f" and {len(refused) - 8} more" if len(refused) > 8 else ""
        names = ", ".join(name for name, _ in refused[:8]) + more
        kind = refused[0][1]
        raise ValueError(f"cannot merge into {names} ({kind.description}): {kind.merge_refusal}")


def merge_fixed_gates(
    layers: Sequence[tuple[str, MoLoRALinear]], gates: dict[str, torch.Tensor], safe_merge: bool = False
) -> None:
    """Write each module's fixed mixture into its base weight. safe_merge: first compute every merged weight and
    refuse, changing none, if any holds NaN or inf (a half-precision base can overflow where fp32 experts did not)."""
    check_mergeable(layers)
    if safe_merge:
        broken = [name for name, layer in layers if not torch.isfinite(merged_weight(layer, gates[name])).all()]
        if broken:
            raise ValueError(
                f"safe_merge: the merged weights of {len(broken)} module(s) hold NaN or inf ({', '.join(broken[:8])}); "
                "no weight was changed"
            )
    for name, layer in layers:
        layer.base_layer.weight.copy_(merged_weight(layer, gates[name]))
