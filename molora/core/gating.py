"""From router probabilities to the mixture's gates: the softmax over the experts and the top-k selection, the
two steps every router shares, with the selection's backward written by hand (fewer kernels than autograd's
topk/divide/scatter chain; bench/op_count.py counts them, tests/core/test_routers.py checks it by gradcheck)."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the expert dim. On CPU, the kernel reducing a non-last dim is faster for a handful of experts
    (timed in bench/micro.py), so it runs on the transposed view there."""
    if logits.device.type == "cpu" and logits.dim() >= 2:
        return logits.transpose(-1, -2).softmax(dim=-2).transpose(-1, -2)
    return logits.softmax(dim=-1)


class TopKGates(torch.autograd.Function):
    """probs [..., E] -> (gates: the top-k probabilities, renormalised to sum to 1 or not, zero elsewhere; the
    indices [..., k]).

    Backward in one pass over the k selected: with g = p_sel / S and S = sum of p_sel, dL/dp_i = (G_i - G.g) / S
    for a selected i, 0 elsewhere (without renormalising: G_i). Once differentiable: the saved top-k values and
    their sum are no graph of probs, and a second derivative through routing is nothing molora needs.
    """

    @staticmethod
    def forward(ctx, probs, top_k, renormalize):
        top, indices = probs.topk(top_k, dim=-1)
        total = None
        if renormalize:
            total = top.sum(dim=-1, keepdim=True)
            top = top / total
        gates = torch.zeros_like(probs).scatter_(-1, indices, top)
        ctx.save_for_backward(indices, top, total)
        ctx.mark_non_differentiable(indices)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the indices
        return gates, indices

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_gates, _grad_indices):
        if grad_gates is None:
            return None, None, None
        indices, top, total = ctx.saved_tensors
        grad_top = grad_gates.gather(-1, indices)
        if total is not None:
            grad_top = (grad_top - (grad_top * top).sum(dim=-1, keepdim=True)) / total
        return torch.zeros_like(grad_gates).scatter_(-1, indices, grad_top), None, None


def select_experts(
    probs: torch.Tensor, top_k: int | None, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense gates (the probabilities) when top_k is None; otherwise the top-k probabilities, zero elsewhere."""
    if top_k is None:
        return probs, None
    return TopKGates.apply(probs, top_k, renormalize)
