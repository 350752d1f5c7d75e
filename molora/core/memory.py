"""Autograd memory machinery of the mixture: what the experts' two matmuls keep for backward, and what they rebuild.

RebuildSaved keeps the concatenated input-side weight (experts' rows plus the router's) as a recipe instead of a
tensor; GatedMix gates the [N, E*r] intermediate and applies the output side, keeping only what the router and the
input side keep anyway. What each saves is measured in docs/guides/performance.md and tests/core/test_memory.py.
"""

from __future__ import annotations

import torch


def stack_rows(output_side: torch.Tensor) -> torch.Tensor:
    """[E, r, d_out] (or [E, d_out]) as the [E*r, d_out] rows the mixing matmul reads: a view, no copy."""
    return output_side.reshape(-1, output_side.shape[-1])


def unstack_rows(stacked: torch.Tensor, output_side: torch.Tensor) -> torch.Tensor:
    """The inverse of stack_rows: [E*r, d_out] back to output_side's shape (for its gradient), a view."""
    return stacked.view(output_side.shape)


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling * (a @ b) as one kernel (addmm ignores its input when beta is 0, so it may be uninitialised)."""
    return torch.addmm(a.new_empty(a.shape[0], b.shape[1]), a, b, beta=0, alpha=scaling)


def by_expert(hidden: torch.Tensor, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, E*r] as [B, L, E, r], and the gates [B, L or 1, E] as [B, L or 1, E, 1] in hidden's dtype: a
    broadcast multiply gates each expert's r rows."""
    batch, experts = gates.shape[0], gates.shape[-1]
    return hidden.view(batch, -1, experts, hidden.shape[1] // experts), gates.to(hidden.dtype).unsqueeze(-1)


def gate_hidden(hidden4: torch.Tensor, gates4: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The gated intermediate [N, E*r] from by_expert()'s pair: each expert's r rows times its gate."""
    return (hidden4 * gates4).view(shape)


class RebuildSaved(torch.autograd.graph.saved_tensors_hooks):
    """Autograd keeps `derived` (a concatenation of `parts`) for backward as a recipe instead: `parts` are there
    anyway (parameters), and rebuilding a weight-sized tensor in backward costs microseconds. The concatenated weight
    is (E*r + k) * d_in numbers per layer (what that saves at a step's peak: docs/guides/performance.md).

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
    """out + scaling * (hidden gated per expert) @ stacked output sides, for hidden [N, E*r] and gates
    [B, L or 1, E].

    Written by hand for what autograd would keep and dispatch. Autograd would keep the gated [N, E*r] product (for
    the gradient of the output side) and the stacked copy of the output sides; this keeps hidden, the gates (the
    router keeps both anyway) and the output-side parameter, and recomputes the rest in backward. That saves E*r
    numbers per token and layer: a PEFT LoRA of rank E*r stores E*r per token, and the 1.05x memory budget next to
    it leaves no room for a second such activation. And it dispatches fewer kernels (bench/op_count.py): the
    gating is one broadcast multiply, and the scaling rides in the matmuls (addmm's alpha).
    """

    @staticmethod
    def forward(ctx, hidden, gates, output_side, out, inplace, scaling):
        rows = stack_rows(output_side)
        hidden4, gates4 = by_expert(hidden, gates)
        gated = gate_hidden(hidden4, gates4, hidden.shape)
        if out is None:
            result = scaled_mm(gated, rows, scaling)
        elif inplace:
            out.addmm_(gated, rows, alpha=scaling)
            ctx.mark_dirty(out)
            result = out  # the input itself: what torch.compile needs of a dirty input
        else:
            result = torch.addmm(out, gated, rows, alpha=scaling)
        ctx.save_for_backward(hidden, gates, output_side)
        ctx.scaling = scaling
        return result

    @staticmethod
    def backward(ctx, grad):
        hidden, gates, output_side = ctx.saved_tensors
        scaling = ctx.scaling
        hidden4, gates4 = by_expert(hidden, gates)
        grad_hidden = grad_gates = grad_out_side = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_gated = scaled_mm(grad, stack_rows(output_side).T, scaling).view(hidden4.shape)
            if ctx.needs_input_grad[0]:
                grad_hidden = (grad_gated * gates4).view(hidden.shape)
            if ctx.needs_input_grad[1]:
                # a dot product over each expert's r rows (hidden is a slice of a joint matmul's output, which a
                # batched matmul would first copy); a per-sequence gate also sums over its positions
                dims = (1, 3) if gates.shape[1] == 1 and hidden4.shape[1] > 1 else (3,)
                grad_gates = (grad_gated * hidden4).sum(dims).view(gates.shape).to(gates.dtype)
        if ctx.needs_input_grad[2]:
            gated = gate_hidden(hidden4, gates4, hidden.shape)
            grad_out_side = unstack_rows(scaled_mm(gated.T, grad, scaling), output_side)
        grad_base = grad if ctx.needs_input_grad[3] else None
        return grad_hidden, grad_gates, grad_out_side, grad_base, None, None
