"""Per-task routing recording: a recorder scoped to a `with` block and its statistics (load, entropy, CV, dead
experts, task x expert utilisation, mutual information). Its exports (CSV, heatmaps, a markdown report) are
molora.analysis.routing_report.

    with model.record_routing(domains=["news", "code"]) as rec:
        model(**batch)                      # task ids of each batch come from task_ids=... as usual
    rec.stats()["aggregate"]["mi_bits"]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from molora.core.layer import MoLoRALinear

DEAD_LOAD_SHARE = 0.1  # an expert with under a tenth of its uniform load share (1/E) is dead


class RoutingRecorder:
    """Accumulates, per MoLoRA layer and task: summed routing weight, selection counts and token counts per expert.

    Selections are the experts in each token's top-k for sparse routers and the most probable expert for dense
    ones, so selection counts add up to tokens x k. Only forward hooks on the routers are used; they are removed
    on exit and change no output or gradient.
    """

    def __init__(self, model: nn.Module, task_ids: Any = None, domains: list[str] | None = None):
        # a block's followers (routing_scope='block') route through their owner: recorded once, under the owner
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, MoLoRALinear) and m.router is not None}
        self.fixed_task_ids = None if task_ids is None else torch.as_tensor(task_ids, dtype=torch.long)
        self.domains = list(domains) if domains is not None else None
        self.weight: dict[str, dict[int, torch.Tensor]] = {n: {} for n in self.layers}
        self.selected: dict[str, dict[int, torch.Tensor]] = {n: {} for n in self.layers}
        self.tokens: dict[str, dict[int, int]] = {n: {} for n in self.layers}
        self.entropy_sum: dict[str, float] = dict.fromkeys(self.layers, 0.0)
        self._handles: list = []

    def __enter__(self) -> RoutingRecorder:
        for name, layer in self.layers.items():
            self._handles.append(layer.router.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, route) -> None:
            inputs = args[1] if len(args) > 1 else None
            with torch.no_grad():
                self._record(name, route, inputs)

        return hook

    def _record(self, name: str, route, inputs) -> None:
        batch, length, num_experts = route.gates.shape
        mask = inputs.token_mask if inputs is not None and inputs.token_mask is not None else None
        mask = torch.ones(batch, length, dtype=torch.bool) if mask is None else mask.bool().cpu()
        tasks = self.fixed_task_ids
        if tasks is None and inputs is not None and inputs.task_ids is not None:
            tasks = inputs.task_ids
        tasks = torch.zeros(batch, dtype=torch.long) if tasks is None else tasks.cpu().long()
        if tasks.shape[0] != batch:
            tasks = tasks.repeat_interleave(batch // tasks.shape[0])
        weights = route.gates.detach().float().cpu()
        indices = route.probs.argmax(-1, keepdim=True) if route.indices is None else route.indices
        selected = torch.nn.functional.one_hot(indices.cpu(), num_experts).sum(-2).float()  # [B, L, E]
        probs = route.probs.detach().float().cpu()
        token_entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
        self.entropy_sum[name] += float((token_entropy * mask).sum())
        for task in tasks.unique().tolist():
            rows = (tasks == task).unsqueeze(-1) & mask  # [B, L]
            w = rows.unsqueeze(-1).float()
            self.weight[name][task] = self.weight[name].get(task, 0) + (weights * w).sum((0, 1))
            self.selected[name][task] = self.selected[name].get(task, 0) + (selected * w).sum((0, 1))
            self.tokens[name][task] = self.tokens[name].get(task, 0) + int(rows.sum())

    # Statistics -------------------------------------------------------------------------------------------------
    def task_names(self) -> list[str]:
        seen = sorted({t for per_task in self.weight.values() for t in per_task})
        if self.domains is None:
            return [str(t) for t in seen]
        return [self.domains[t] if 0 <= t < len(self.domains) else str(t) for t in seen]

    def matrices(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Summed weight [T, E], selections [T, E] and tokens [T] for one layer, tasks in sorted order."""
        tasks = sorted({t for per_task in self.weight.values() for t in per_task})
        num_experts = self.layers[name].router.num_experts
        zeros = torch.zeros(num_experts)
        weight = torch.stack([self.weight[name].get(t, zeros) for t in tasks])
        selected = torch.stack([self.selected[name].get(t, zeros) for t in tasks])
        tokens = torch.tensor([self.tokens[name].get(t, 0) for t in tasks], dtype=torch.float)
        return weight, selected, tokens

    def stats(self) -> dict[str, Any]:
        layers = {}
        for name in self.layers:
            if not self.weight[name]:
                continue
            weight, selected, tokens = self.matrices(name)
            layers[name] = layer_stats(weight, selected, tokens, self.entropy_sum[name])
        aggregate: dict[str, Any] = {"tasks": self.task_names()}
        if layers:
            for key in ("entropy", "load_cv", "mi_bits", "mi_normalized"):
                aggregate[key] = sum(s[key] for s in layers.values()) / len(layers)
            aggregate["dead_experts"] = sum(s["dead_experts"] for s in layers.values())
            aggregate["layer_expert_load"] = [s["load"] for s in layers.values()]
        return {"tasks": self.task_names(), "layers": layers, "aggregate": aggregate}


def health_summary(recorder: RoutingRecorder) -> dict[str, float]:
    """Router health for training logs: mean routing entropy and load CV over layers, dead experts summed."""
    aggregate = recorder.stats()["aggregate"]
    if "entropy" not in aggregate:
        return {}
    return {
        "router_entropy": aggregate["entropy"],
        "load_cv": aggregate["load_cv"],
        "dead_experts": aggregate["dead_experts"],
    }


def mutual_information(joint: torch.Tensor) -> tuple[float, float]:
    """I(task; expert) in bits from an unnormalised joint [T, E], and H(task) in bits."""
    total = joint.sum()
    if total <= 0:
        return 0.0, 0.0
    p = (joint / total).double()
    p_task, p_expert = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nonzero = p > 0
    mi = float((p[nonzero] * (p / (p_task * p_expert))[nonzero].log2()).sum())
    h_task = float(-(p_task[p_task > 0] * p_task[p_task > 0].log2()).sum())
    return max(mi, 0.0), h_task


def dead_load(num_experts: int) -> float:
    """The load share under which an expert counts as dead: a tenth of its uniform share."""
    return DEAD_LOAD_SHARE / num_experts


def layer_stats(weight: torch.Tensor, selected: torch.Tensor, tokens: torch.Tensor, entropy_sum: float) -> dict:
    num_experts = weight.shape[1]
    load = weight.sum(0) / weight.sum().clamp_min(1e-12)
    utilisation = weight / weight.sum(1, keepdim=True).clamp_min(1e-12)
    mi, h_task = mutual_information(weight)
    return {
        "load": load.tolist(),
        "selections": selected.sum(0).tolist(),
        "tokens": int(tokens.sum()),
        "entropy": entropy_sum / max(float(tokens.sum()), 1.0),
        "load_cv": float(load.std(unbiased=False) / load.mean()),
        "dead_experts": int((load < dead_load(num_experts)).sum()),
        "task_expert": utilisation.tolist(),
        "mi_bits": mi,
        "mi_normalized": mi / h_task if h_task > 0 else 0.0,
    }


# Exports ----------------------------------------------------------------------------------------------------------
