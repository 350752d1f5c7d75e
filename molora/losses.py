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


def _token_weights(route: RouterOutput, token_mask: torch.Tensor | None) -> torch.Tensor:
    """[N, 1] fp32 weights that average over the non-padding tokens."""
    num_tokens = route.probs.shape[:-1].numel()
    if token_mask is None:
        mask = route.probs.new_ones(num_tokens)
    else:
        mask = token_mask.reshape(num_tokens).to(route.probs.dtype)
    return (mask / mask.sum().clamp_min(1)).unsqueeze(-1)


def _mean_probs(route: RouterOutput, token_mask: torch.Tensor | None) -> torch.Tensor:
    return (_flat(route.probs) * _token_weights(route, token_mask)).sum(dim=0)


def routed_fraction(route: RouterOutput, token_mask: torch.Tensor | None) -> torch.Tensor:
    """f_e: the fraction of routing slots (tokens x k) sent to each expert; the mean weight for dense routers."""
    per_token = _token_weights(route, token_mask)
    if route.indices is None:
        return (_flat(route.weights) * per_token).sum(dim=0)
    num_experts = route.probs.shape[-1]
    indices = route.indices.reshape(-1, route.indices.shape[-1])
    slots = F.one_hot(indices, num_experts).sum(dim=1).to(per_token.dtype) / indices.shape[-1]
    return (slots * per_token).sum(dim=0)


@register_aux_loss("balance")
def balance_loss(route: RouterOutput, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/Mixtral: E * sum_e f_e * P_e; exactly 1.0 for a uniform router."""
    num_experts = route.probs.shape[-1]
    return num_experts * (routed_fraction(route, token_mask) * _mean_probs(route, token_mask)).sum()


@register_aux_loss("z")
def z_loss(route: RouterOutput, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean of logsumexp(logits)^2, keeps logits small."""
    lse = torch.logsumexp(_flat(route.logits), dim=-1, keepdim=True)
    return (lse.square() * _token_weights(route, token_mask)).sum()


@register_aux_loss("cv")
def cv_loss(route: RouterOutput, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Shazeer et al.: squared coefficient of variation of expert importance (summed routing weight)."""
    importance = (_flat(route.weights) * _token_weights(route, token_mask)).sum(dim=0)
    return importance.var(unbiased=False) / importance.mean().square().clamp_min(1e-10)


@register_aux_loss("entropy")
def entropy_loss(route: RouterOutput, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Negative entropy of the batch-mean routing distribution; minimising it spreads the load."""
    mean_probs = _mean_probs(route, token_mask)
    return (mean_probs * mean_probs.clamp_min(1e-12).log()).sum()
