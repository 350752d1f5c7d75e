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

if TYPE_CHECKING:
    from molora.layer import MoLoRALinear


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
            gates[name] = layer.fixed_gates(task_id)
    if wrong:
        asked = f"expert={expert}" if expert is not None else f"{len(values)} weights"
        raise ValueError(f"{asked} does not fit {len(wrong)} module(s): {', '.join(wrong[:8])}")
    return gates


@torch.no_grad()
def merge_fixed_gates(
    layers: Sequence[tuple[str, MoLoRALinear]], gates: dict[str, torch.Tensor], safe_merge: bool = False
) -> None:
    """Write each module's fixed mixture into its base weight. safe_merge: first compute every merged weight and
    refuse, changing none, if any holds NaN or inf (a half-precision base can overflow where fp32 experts did not)."""
    if safe_merge:
        broken = [name for name, layer in layers if not torch.isfinite(layer.merged_weight(gates[name])).all()]
        if broken:
            raise ValueError(
                f"safe_merge: the merged weights of {len(broken)} module(s) hold NaN or inf ({', '.join(broken[:8])}); "
                "no weight was changed"
            )
    for name, layer in layers:
        layer.merge_into_base(gates[name])
