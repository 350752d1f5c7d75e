"""Pooling a sequence for a router: the running (causal), prompt or whole-sequence mean of each token's features,
padding excluded, continued across cached decoding steps through a state dict."""

from __future__ import annotations

from typing import Any

import torch

POOLINGS = ("causal", "prompt", "mean")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over dim 1 of x·mask and the count; [B, d] and [B]."""
    mask = mask.to(x.dtype)
    return (x * mask.unsqueeze(-1)).sum(dim=1), mask.sum(dim=1)


def pool_sequence(
    x: torch.Tensor,
    pooling: str,
    token_mask: torch.Tensor | None,
    prompt_mask: torch.Tensor | None,
    past_len: int,
    state: dict[str, Any] | None,
    unseen_prefix: int = 0,
) -> torch.Tensor:
    """x [B, L, d] -> [B, L, d] (causal) or [B, 1, d]. `state` carries the earlier tokens' sums while decoding;
    `unseen_prefix`: positions before x that the module was never given (RouterInputs.unseen_prefix)."""
    batch, length, _ = x.shape
    mask = token_mask
    if state is not None and unseen_prefix:
        raise ValueError(
            f"a module routed by pooling reads only the last {length} of the call's {length + unseen_prefix} "
            "positions (generate() computes the last logits only), so its running state cannot hold the sequence: "
            "pass logits_to_keep=0 to generate(), or leave that module out of target_modules"
        )
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.bool, device=x.device)
    continuing = past_len > 0
    if continuing and (state is None or state.get("seen") != past_len):
        raise RuntimeError(
            "cached decoding with a pooling router needs the running pooled state of the earlier "
            "tokens: decode through MoLoRAModel.generate() or inside `with model.decoding_session():`"
        )
    if state is not None:
        state["seen"] = past_len + length
    if pooling == "prompt":
        if continuing:
            return state["pooled"]
        if prompt_mask is None:
            raise ValueError("intuition_pooling='prompt' needs prompt_mask ([batch, seq] bools) in forward()")
        total, count = _masked_mean(x, mask & prompt_mask)
        pooled = (total / count.clamp_min(1).unsqueeze(-1)).unsqueeze(1)
        if state is not None:
            state["pooled"] = pooled.detach()
        return pooled
    if pooling == "mean":
        total, count = _masked_mean(x, mask)
        if continuing:
            total, count = total + state["sum"], count + state["count"]
        if state is not None:
            state.update(sum=total.detach(), count=count.detach())
        return (total / count.clamp_min(1).unsqueeze(-1)).unsqueeze(1)
    weights = mask.to(x.dtype)
    running = (x * weights.unsqueeze(-1)).cumsum(dim=1)
    count = weights.cumsum(dim=1)
    if continuing:
        running = running + state["sum"].unsqueeze(1)
        count = count + state["count"].unsqueeze(1)
    if state is not None:
        state.update(sum=running[:, -1].detach(), count=count[:, -1].detach())
    return running / count.clamp_min(1).unsqueeze(-1)
