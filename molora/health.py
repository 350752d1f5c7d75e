"""Router health from router outputs, collected by hooks that exist only inside a `with` block."""

from __future__ import annotations

import torch
from torch import nn

from molora.layer import MoLoRALinear
from molora.losses import routed_fraction


class RouterHealth:
    """with RouterHealth(model) as health: model(...); health.summary()

    Accumulates, per MoLoRA layer, the fraction of routing slots each expert receives and the mean per-token
    routing entropy over non-padding tokens.
    """

    def __init__(self, model: nn.Module):
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, MoLoRALinear)}
        self.load: dict[str, torch.Tensor] = {}
        self.entropy: dict[str, list[float]] = {}
        self._handles: list = []

    def __enter__(self) -> RouterHealth:
        for name, layer in self.layers.items():
            self._handles.append(layer.router.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, route) -> None:
            inputs = args[1] if len(args) > 1 else None
            mask = None if inputs is None else inputs.token_mask
            with torch.no_grad():
                load = routed_fraction(route, mask).detach().float().cpu()
                probs = route.probs.reshape(-1, route.probs.shape[-1])
                token_entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
                weights = torch.ones_like(token_entropy) if mask is None else mask.reshape(-1).float()
                entropy = float((token_entropy * weights).sum() / weights.sum().clamp_min(1))
            self.load[name] = self.load.get(name, 0) + load
            self.entropy.setdefault(name, []).append(entropy)

        return hook

    def per_layer(self) -> dict[str, dict[str, float]]:
        stats = {}
        for name, total in self.load.items():
            load = total / total.sum().clamp_min(1e-12)
            num_experts = load.numel()
            stats[name] = {
                "entropy": sum(self.entropy[name]) / len(self.entropy[name]),
                "load_cv": float(load.std(unbiased=False) / load.mean()),
                "dead_experts": int((load < 1 / (10 * num_experts)).sum()),
            }
        return stats

    def summary(self) -> dict[str, float]:
        """Mean routing entropy and load CV over layers; dead experts (< 1/(10E) of the load) summed over layers."""
        stats = self.per_layer()
        if not stats:
            return {}
        return {
            "router_entropy": sum(s["entropy"] for s in stats.values()) / len(stats),
            "load_cv": sum(s["load_cv"] for s in stats.values()) / len(stats),
            "dead_experts": sum(s["dead_experts"] for s in stats.values()),
        }
