"""Learned rank: a gate on every rank component of every expert, and pruning of the components it closes.

AutoLoRA-style selection with a relaxed Bernoulli (Gumbel-sigmoid) gate g_k per component (a_k, b_k): while
training g_k = sigmoid((l_k + logistic noise) / temperature), in eval the hard g_k = [l_k > 0]. The rank_sparsity
aux loss is the mean of sigmoid(l_k), the probability that a component is kept, so its weight trades quality
against rank. The gate multiplies the component's output side (b_k), which changes nothing else in the fast path.

A rank schedule (`set_active_fraction`) grows the rank during training by masking the same way: components past the
active fraction get gate 0, with no re-allocation (the tensors keep their full size).

prune_ranks then removes the closed components for real: each module keeps the largest number any of its experts
keeps (the others zero-padded), the open gates are folded into B (they are 1) and the gates dropped, so the pruned
model computes exactly what the gated one computes in eval, with fewer parameters.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from molora.core.patcher import molora_layers


def set_active_fraction(model: nn.Module, fraction: float | None) -> None:
    """The rank schedule: each module uses its first ceil(fraction * r) components (at least 1); None: all."""
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"the active rank fraction must be in (0, 1], got {fraction!r}")
    base = getattr(model, "base_model", model)
    for _, layer in molora_layers(base):
        rows = layer.experts.rows_per_expert
        limit = None if fraction is None or fraction >= 1 else max(1, math.ceil(fraction * rows))
        layer.experts.rank_limit = limit


def check_rank_schedule(schedule: object) -> None:
    if not isinstance(schedule, dict) or set(schedule) != {"start", "full_at"}:
        raise ValueError(
            f"train.rank_schedule must be {{start: fraction, full_at: fraction}} or null, got {schedule!r}"
        )
    for key, value in schedule.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"train.rank_schedule.{key} must be a fraction in (0, 1], got {value!r}")


def scheduled_fraction(schedule: dict[str, float] | None, step: int, steps: int) -> float | None:
    """The active rank fraction at `step` (0-based) of `steps`: a pure function of the step, so resuming needs no
    state; None (the whole rank) without a schedule or once it is reached."""
    if schedule is None:
        return None
    progress = step / max(schedule["full_at"] * steps, 1)
    fraction = schedule["start"] + (1 - schedule["start"]) * progress
    return None if fraction >= 1 else fraction


def effective_ranks(model: nn.Module) -> dict[str, list[int]]:
    """{module: components each expert keeps (hard gates and the rank schedule)}; modules without gates report r."""
    base = getattr(model, "base_model", model)
    ranks = {}
    for name, layer in molora_layers(base):
        experts = layer.experts
        with torch.no_grad():
            mask = experts.component_mask(hard=True)
        if mask is None:
            ranks[name] = [experts.rows_per_expert] * experts.num_experts
        else:
            ranks[name] = [int(count) for count in (mask != 0).sum(-1).tolist()]
    return ranks


def _kept_order(mask: torch.Tensor) -> torch.Tensor:
    """[E, r] bool -> [E, r] component indices, the kept ones first (in their order), then the closed ones."""
    order = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.argsort((~mask).int() * mask.shape[1] + order, dim=1)


@torch.no_grad()
def _prune_layer(name: str, layer: nn.Module) -> int:
    experts = layer.experts
    mask = experts.component_mask(hard=True) != 0
    shared_input = experts.lora_A.dim() == 2  # HydraLoRA: components are rows of the one shared A
    if shared_input:
        keep = mask.any(0)  # a row of A stays if any expert keeps it; the others zero it in their B
        rank = max(int(keep.sum()), 1)
        rows = _kept_order(keep.unsqueeze(0))[0, :rank]
        output_side = experts.lora_B * mask.unsqueeze(-1).to(experts.lora_B.dtype)
        new_a, new_b = experts.lora_A[rows].clone(), output_side[:, rows].clone()
    else:
        rank = max(int(mask.sum(1).max()), 1)
        order = _kept_order(mask)[:, :rank]  # [E, rank]
        kept = torch.gather(mask, 1, order).to(experts.lora_B.dtype)  # 0 where an expert keeps fewer than rank
        new_a = torch.gather(experts.lora_A, 1, order.unsqueeze(-1).expand(-1, -1, experts.in_features)).clone()
        new_b = torch.gather(experts.lora_B, 1, order.unsqueeze(-1).expand(-1, -1, experts.out_features))
        new_b = (new_b * kept.unsqueeze(-1)).clone()
    experts.lora_A = nn.Parameter(new_a, requires_grad=experts.lora_A.requires_grad)
    experts.lora_B = nn.Parameter(new_b, requires_grad=experts.lora_B.requires_grad)
    experts.rank = rank
    experts.rank_gates = None
    experts.rank_limit = None
    return rank


def _first(module_values: dict, patterns: dict | None) -> dict:
    """The per-module values ahead of the user's patterns (the first matching pattern wins)."""
    return {**module_values, **{k: v for k, v in (patterns or {}).items() if k not in module_values}}


def prune_ranks(model) -> dict[str, object]:
    """Remove the components the hard rank gates close, for real; returns {"ranks": {module: (before, after)},
    "params_before", "params_after"}.

    The module's scaling is kept (its alpha is rewritten for the new rank in the config's alpha_pattern, and the
    rank in rank_pattern), so `save_pretrained` / `from_pretrained` rebuild the pruned model.
    """
    config = model.molora_config
    if not config.rank_gates:
        raise ValueError("prune_ranks needs a model trained with rank_gates=True (there are no gates to read)")
    layers = molora_layers(model.base_model)
    before = sum(p.numel() for _, layer in layers for p in layer.experts.parameters())
    was_training = model.training
    model.eval()
    ranks, rank_pattern, alpha_pattern = {}, {}, {}
    for name, layer in layers:
        old = layer.experts.rows_per_expert
        new = _prune_layer(name, layer)
        ranks[name] = (old, new)
        rank_pattern[re.escape(name)] = new
        root = math.sqrt(new) if config.use_rslora else new
        alpha_pattern[re.escape(name)] = layer.scaling * root
    model.train(was_training)
    # the module names first: the first matching pattern wins
    config.rank_pattern = {
        **rank_pattern,
        **{k: v for k, v in (config.rank_pattern or {}).items() if k not in rank_pattern},
    }
    config.alpha_pattern = {
        **alpha_pattern,
        **{k: v for k, v in (config.alpha_pattern or {}).items() if k not in alpha_pattern},
    }
    config.rank_gates = False
    config.aux_losses = {name: weight for name, weight in config.aux_losses.items() if name != "rank_sparsity"}
    after = sum(p.numel() for _, layer in layers for p in layer.experts.parameters())
    return {"ranks": ranks, "params_before": before, "params_after": after}
