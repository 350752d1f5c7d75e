"""Load-balancing losses: functions of (RouterOutput, token_mask) -> scalar, in a registry by name.

Padding (token_mask False) never counts. Every statistic is a masked mean, so no boolean indexing (and no
host sync on GPU).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from molora.routers import RouterOutput

AuxLossFn = Callable[[RouterOutput, "torch.Tensor | None"], torch.Tensor]
AUX_LOSSES: dict[str, AuxLossFn] = {}


def register_aux_loss(name: str):
    def decorator(fn: AuxLossFn) -> AuxLossFn:
        AUX_LOSSES[name] = fn
        return fn

    return decorator


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1, tensor.shape[-1])


def _cached(route: RouterOutput, key: tuple, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Several losses read the same token weights and mean probabilities: compute them once per router output."""
    if key not in route.cache:
        route.cache[key] = compute()
    return route.cache[key]


def _token_weights(route: RouterOutput, token_mask: torch.Tensor | None) -> torch.Tensor:
    """[N] fp32 weights that average over the non-padding tokens."""

    def compute() -> torch.Tensor:
        num_tokens = route.probs.shape[:-1].numel()
        if token_mask is None:
            return route.probs.new_full((num_tokens,), 1.0 / max(num_tokens, 1))
        mask = token_mask.reshape(num_tokens).to(route.probs.dtype)
        return mask / mask.sum().clamp_min(1)

    return _cached(route, ("token_weights", id(token_mask)), compute)


def _mean_probs(route: RouterOutput, token_mask: torch.Tensor | None) -> torch.Tensor:
    return _cached(
        route, ("mean_probs", id(token_mask)), lambda: _token_weights(route, token_mask) @ _flat(route.probs)
    )


def routed_fraction(route: RouterOutput, token_mask: torch.Tensor | None) -> torch.Tensor:
    """f_e: the fraction of routing slots (tokens x k) sent to each expert; the mean weight for dense routers."""
    per_token = _token_weights(route, token_mask)
    if route.indices is None:
        if route.weights is route.probs:
            return _mean_probs(route, token_mask)
        return per_token @ _flat(route.weights)
    num_experts = route.probs.shape[-1]
    indices = route.indices.reshape(-1, route.indices.shape[-1])
    slots = F.one_hot(indices, num_experts).sum(dim=1).to(per_token.dtype) / indices.shape[-1]
    return per_token @ slots


@register_aux_loss("balance")
def balance_loss(route: RouterOutput, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/Mixtral: E * sum_e f_e * P_e; exactly 1.0 for a uniform router."""
    num_experts = route.probs.shape[-1]
    return num_experts * (routed_fraction(route, token_mask) * _mean_probs(route, token_mask)).sum()


@register_aux_loss("z")
def z_loss(route: RouterOutput, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean of logsumexp(logits)^2, keeps logits small."""
    lse = torch.logsumexp(_flat(route.logits), dim=-1)
    return _token_weights(route, token_mask) @ lse.square()


@register_aux_loss("cv")
def cv_loss(route: RouterOutput, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Shazeer et al.: squared coefficient of variation of expert importance (summed routing weight)."""
    importance = _token_weights(route, token_mask) @ _flat(route.weights)
    return importance.var(unbiased=False) / importance.mean().square().clamp_min(1e-10)


@register_aux_loss("entropy")
def entropy_loss(route: RouterOutput, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Negative entropy of the batch-mean routing distribution; minimising it spreads the load."""
    mean_probs = _mean_probs(route, token_mask)
    return (mean_probs * mean_probs.clamp_min(1e-12).log()).sum()
