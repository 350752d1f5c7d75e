"""Autograd memory machinery of the mixture: what the experts' two matmuls keep for backward, and what they rebuild.

RebuildSaved keeps the concatenated input-side weight (experts' rows plus the router's) as a recipe instead of a
tensor; GatedMix gates the [N, E*r] intermediate and applies the output side, keeping only what the router and the
input side keep anyway. What each saves is measured in the README's Performance section and tests/test_memory.py.
"""

from __future__ import annotations

import torch


def stack_rows(output_side: torch.Tensor) -> torch.Tensor:
    """[E, d_out, r] -> [E*r, d_out] (a copy of E*r*d_out numbers, small next to the activations); [E, d_out] stays."""
    if output_side.dim() == 2:
        return output_side
    return output_side.transpose(1, 2).reshape(-1, output_side.shape[1])


def unstack_rows(stacked: torch.Tensor, output_side: torch.Tensor) -> torch.Tensor:
    """The inverse of stack_rows: [E*r, d_out] back to output_side's layout (for its gradient)."""
    return stacked.view(output_side.shape[0], -1, stacked.shape[1]).transpose(1, 2).reshape(output_side.shape)


def gate_rows(hidden: torch.Tensor, gates: torch.Tensor, spread: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, E*r] as [B, L, E*r], and the gate of each of its rows, [B, L or 1, E*r]."""
    return hidden.view(gates.shape[0], -1, hidden.shape[1]), gates.to(hidden.dtype) @ spread


class RebuildSaved(torch.autograd.graph.saved_tensors_hooks):
    """Autograd keeps `derived` (a concatenation of `parts`) for backward as a recipe instead: `parts` are there
    anyway (parameters), and rebuilding a weight-sized tensor in backward costs microseconds. The concatenated weight
    is (E*r + k) * d_in numbers per layer (what that saves at a step's peak: the README's Performance section).

    For use where other_saved_tensor_hooks() is False.
    """

    def __init__(self, derived: torch.Tensor, parts: tuple[torch.Tensor, ...]):
        self.derived, self.parts = derived, parts
        super().__init__(self.pack, self.unpack)

    def __exit__(self, *exc_info) -> None:
        super().__exit__(*exc_info)
        # autograd keeps the hooks (bound to this object) with what they packed: drop the tensors from here
        self.derived = self.parts = None

    def pack(self, tensor: torch.Tensor):
        if tensor is not self.derived and tensor._base is not self.derived:
            return tensor
        # the saved tensor is the concatenation or a view of it (linear keeps its transpose): keep how to view it
        view = (tensor.shape, tensor.stride(), tensor.storage_offset())
        return self.parts, tuple(part._version for part in self.parts), view

    @staticmethod
    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        parts, versions, (shape, stride, offset) = packed
        if any(part._version != version for part, version in zip(parts, versions, strict=True)):
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace operation: "
                "an expert or router weight changed between this forward and its backward"
            )
        return torch.cat(parts).as_strided(shape, stride, offset)


def other_saved_tensor_hooks() -> bool:
    """Whether saved-tensor hooks of someone else are active (activation checkpointing and offloading bring their
    own, and only the innermost pair applies), or torch.compile is tracing: then autograd keeps what it keeps."""
    if torch.compiler.is_compiling():
        return True
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


class GatedMix(torch.autograd.Function):
    """out + (hidden * spread gates) @ stacked_out, for hidden [N, E*r] and gates [B, L or 1, E].

    `spread` [E, E*r] copies each expert's gate onto its r rows (times the scaling), so the gating is one small
    matmul and a plain multiply instead of a [B, L, E, 1] broadcast multiply (timed in bench/micro.py), and the
    gates' gradient is the transposed matmul instead of a sum over r.
    Autograd would keep the gated [N, E*r] product (for the gradient of the output side) and the stacked copy of
    the output sides; this keeps hidden, the gates (the router keeps both anyway) and the output-side parameter,
    and recomputes the rest in backward. That saves E*r numbers per token and layer: a PEFT LoRA of rank E*r stores
    E*r per token, and the 1.05x memory budget next to it leaves no room for a second such activation.
    """

    @staticmethod
    def forward(ctx, hidden, gates, spread, output_side, out, inplace):
        stacked_out = stack_rows(output_side)
        hidden3, row_gates = gate_rows(hidden, gates, spread)
        gated = (hidden3 * row_gates).view(hidden.shape)
        if out is None:
            result = gated @ stacked_out
        elif inplace:
            out.addmm_(gated, stacked_out)
            ctx.mark_dirty(out)
            result = out  # the input itself: what torch.compile needs of a dirty input
        else:
            result = torch.addmm(out, gated, stacked_out)
        ctx.save_for_backward(hidden, gates, spread, output_side)
        return result

    @staticmethod
    def backward(ctx, grad):
        hidden, gates, spread, output_side = ctx.saved_tensors
        stacked_out = stack_rows(output_side)
        hidden3, row_gates = gate_rows(hidden, gates, spread)
        grad_hidden = grad_gates = grad_out_side = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_gated = (grad @ stacked_out.T).view(hidden3.shape)
            if ctx.needs_input_grad[0]:
                grad_hidden = (grad_gated * row_gates).view(hidden.shape)
            if ctx.needs_input_grad[1]:
                # back through the spread (a sum over each expert's rows, times the scaling); a per-sequence gate
                # also sums over its positions
                grad_gates = ((grad_gated * hidden3) @ spread.T).sum_to_size(gates.shape).to(gates.dtype)
        if ctx.needs_input_grad[3]:
            grad_out_side = unstack_rows((hidden3 * row_gates).view(hidden.shape).T @ grad, output_side)
        grad_base = grad if ctx.needs_input_grad[4] else None
        return grad_hidden, grad_gates, None, grad_out_side, grad_base, None
