"""Expert banks stored as stacked tensors; the mixture is two matmuls with the gate applied in between.

forward(x [N, d_in], weights [N, E]) -> scaling-free delta [N, d_out] = sum_e w_e * B_e A_e x.

The layer calls the two halves itself: project() (one matmul with every expert's input side stacked, plus any
extra rows, such as a router's gate, that read the same input) and mix() (gate the E*r intermediate, then one
matmul with the output sides stacked, accumulated into the base output by addmm). Both expert types are the same
computation with r rows per expert (rank-1: r = 1).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


class Experts(nn.Module):
    expert_type: ClassVar[str] = ""

    def __init__(self, in_features: int, out_features: int, num_experts: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.num_experts = num_experts

    def delta_weight(self, expert: int) -> torch.Tensor:
        """The expert's update as a [d_out, d_in] matrix (before scaling), for merging."""
        raise NotImplementedError

    @property
    def adapter_rank(self) -> int:
        """Rank of the whole mixture (the denominator of alpha/r scaling)."""
        raise NotImplementedError

    @property
    def rows_per_expert(self) -> int:
        raise NotImplementedError

    def stacked_in(self) -> torch.Tensor:
        """Every expert's input side as one [E*r, d_in] matrix."""
        raise NotImplementedError

    def stacked_out(self) -> torch.Tensor:
        """Every expert's output side as one [E*r, d_out] matrix."""
        raise NotImplementedError

    def project(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [N, d_in] -> (the E*r intermediate [N, E*r], x @ extra.T or None) from a single matmul."""
        weight = self.stacked_in()
        if extra is None:
            return F.linear(x, weight), None
        return SharedProjection.apply(x, weight, extra.to(weight.dtype))

    def mix(
        self,
        hidden: torch.Tensor,
        weights: torch.Tensor,
        out: torch.Tensor | None = None,
        inplace: bool = False,
        scaling: float = 1.0,
    ) -> torch.Tensor:
        """scaling * sum_e w_e B_e h_e for hidden [N, E*r] and weights [B, L, E] (N = B*L) or [B, 1, E] (one per
        sequence).

        With `out` [N, d_out] the result is out + mixture from one addmm; with inplace=True it is accumulated into
        `out` itself (no [N, d_out] temporary, which on CPU is a fresh allocation with its page faults). In place is
        only for a tensor nothing else reads and that is not a view (autograd would copy the whole base in backward).
        """
        if torch.is_autocast_enabled(hidden.device.type):
            # Autocast casts in a custom forward but not in its backward: plain ops here, which it handles throughout.
            gates = GatedMix.scaled(weights, hidden.dtype, scaling)
            gated = (hidden.view(gates.shape[0], -1, gates.shape[2], self.rows_per_expert) * gates).view(hidden.shape)
            return gated @ self.stacked_out() if out is None else torch.addmm(out, gated, self.stacked_out())
        return GatedMix.apply(hidden, weights, self.stacked_out(), out, inplace, scaling)

    def mix_grouped(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The sparse mixture computing only the selected experts, each on its own tokens: x [N, d_in], weights
        [N, E] (zero outside the selection), indices [N, k]. E small matmuls and a host sync for the counts instead
        of two matmuls of width E*r; it wins once E/k is large (see bench/bench_dispatch.py)."""
        num_tokens, top_k = indices.shape
        flat = indices.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // top_k
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        gates = weights.gather(1, indices).reshape(-1)[order].unsqueeze(-1).to(x.dtype)
        rows = self.rows_per_expert
        stacked_in = self.stacked_in().view(self.num_experts, rows, -1)
        stacked_out = self.stacked_out().view(self.num_experts, rows, -1)
        pieces = [
            (chunk @ stacked_in[e].T) @ stacked_out[e] for e, chunk in enumerate(x[token].split(counts)) if counts[e]
        ]
        return x.new_zeros(num_tokens, self.out_features).index_add_(0, token, torch.cat(pieces) * gates)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.mix(self.project(x)[0], weights.unsqueeze(0))


class SharedProjection(torch.autograd.Function):
    """(x @ weight.T, x @ extra.T) from one matmul: the experts' input side and a router's first layer.

    The same computation as linear(x, cat(weight, extra)) split in two, except that the concatenated weight is
    rebuilt in backward instead of kept for it ((E*r + k) * d_in numbers per layer).
    """

    @staticmethod
    def forward(ctx, x, weight, extra):
        ctx.save_for_backward(x, weight, extra)
        return (x @ torch.cat([weight, extra]).T).split([weight.shape[0], extra.shape[0]], dim=1)

    @staticmethod
    def backward(ctx, grad_hidden, grad_projected):
        x, weight, extra = ctx.saved_tensors
        grad = torch.cat([grad_hidden, grad_projected], dim=1)
        grad_x = grad @ torch.cat([weight, extra]) if ctx.needs_input_grad[0] else None
        grad_weight = grad_extra = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_weight, grad_extra = (grad.T @ x).split([weight.shape[0], extra.shape[0]])
        return grad_x, grad_weight, grad_extra


class GatedMix(torch.autograd.Function):
    """out + (hidden * scaling * gates) @ stacked_out, for hidden [N, E*r] and gates [B, L or 1, E].

    Autograd would keep the gated [N, E*r] product (for the gradient of the output side) and a contiguous copy of the
    gates; this keeps hidden and the gates as given (the router keeps them anyway) and recomputes the rest in
    backward, which saves E*r + E numbers per token and layer: a PEFT LoRA of rank E*r stores r*E per token, and
    the 1.05x memory budget next to it leaves no room for a second such activation.
    """

    @staticmethod
    def scaled(gates: torch.Tensor, dtype: torch.dtype, scaling: float) -> torch.Tensor:
        """[B, L, E, 1] contiguous: the CPU softmax leaves an expert-major layout, which the [N, E*r] gating reads
        ~1.5x slower."""
        scaled = gates.to(dtype).contiguous()
        if scaling != 1.0:
            scaled = scaled * scaling if scaled is gates else scaled.mul_(scaling)
        return scaled.unsqueeze(-1)

    @staticmethod
    def forward(ctx, hidden, gates, stacked_out, out, inplace, scaling):
        batch, _, num_experts = gates.shape
        scaled_gates = GatedMix.scaled(gates, hidden.dtype, scaling)
        gated = (hidden.view(batch, -1, num_experts, hidden.shape[1] // num_experts) * scaled_gates).view(hidden.shape)
        if out is None:
            result = gated @ stacked_out
        elif inplace:
            out.addmm_(gated, stacked_out)
            ctx.mark_dirty(out)
            result = out  # the input itself: what torch.compile needs of a dirty input
        else:
            result = torch.addmm(out, gated, stacked_out)
        ctx.save_for_backward(hidden, gates, stacked_out)
        ctx.scaling = scaling
        return result

    @staticmethod
    def backward(ctx, grad):
        hidden, gates, stacked_out = ctx.saved_tensors
        batch, _, num_experts = gates.shape
        hidden4 = hidden.view(batch, -1, num_experts, hidden.shape[1] // num_experts)
        scaled_gates = GatedMix.scaled(gates, hidden.dtype, ctx.scaling)
        grad_hidden = grad_gates = grad_out_side = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_gated = (grad @ stacked_out.T).view(hidden4.shape)
            if ctx.needs_input_grad[0]:
                grad_hidden = (grad_gated * scaled_gates).view(hidden.shape)
            if ctx.needs_input_grad[1]:
                # a sum over each expert's rows (and over the positions when one gate covers a whole sequence)
                grad_gates = (grad_gated * hidden4).sum_to_size(scaled_gates.shape).squeeze(-1)
                grad_gates = (grad_gates * ctx.scaling if ctx.scaling != 1.0 else grad_gates).to(gates.dtype)
        if ctx.needs_input_grad[2]:
            grad_out_side = (hidden4 * scaled_gates).view(hidden.shape).T @ grad
        grad_base = grad if ctx.needs_input_grad[3] else None
        return grad_hidden, grad_gates, grad_out_side, grad_base, None, None


class LoRAExperts(Experts):
    """E LoRA experts of rank r: A [E, r, d_in] (kaiming-uniform), B [E, d_out, r] (zero unless random init)."""

    expert_type = "lora"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int,
        rank: int,
        *,
        init_zero: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ):
        super().__init__(in_features, out_features, num_experts)
        self.rank = rank
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(num_experts, out_features, rank, dtype=dtype, device=device))
        self.reset_parameters(init_zero)

    def reset_parameters(self, init_zero: bool = True) -> None:
        # Same bounds as PEFT's kaiming_uniform_(a=sqrt(5)) on each [r, d_in] / [d_out, r] matrix.
        nn.init.uniform_(self.lora_A, -1 / math.sqrt(self.in_features), 1 / math.sqrt(self.in_features))
        if init_zero:
            nn.init.zeros_(self.lora_B)
        else:
            nn.init.uniform_(self.lora_B, -1 / math.sqrt(self.rank), 1 / math.sqrt(self.rank))

    @property
    def adapter_rank(self) -> int:
        return self.rank

    @property
    def rows_per_expert(self) -> int:
        return self.rank

    def stacked_in(self) -> torch.Tensor:
        return self.lora_A.reshape(self.num_experts * self.rank, self.in_features)

    def stacked_out(self) -> torch.Tensor:
        # [E, d_out, r] -> [E*r, d_out]: a copy of E*r*d_out numbers per call, small next to the activations.
        return self.lora_B.transpose(1, 2).reshape(self.num_experts * self.rank, self.out_features)

    def delta_weight(self, expert: int) -> torch.Tensor:
        return self.lora_B[expert] @ self.lora_A[expert]


class Rank1Experts(Experts):
    """MoR1E: expert e is v_e u_e^T, u [E, d_in] (input side), v [E, d_out] (output side, zero at init)."""

    expert_type = "rank1"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int,
        *,
        init_zero: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ):
        super().__init__(in_features, out_features, num_experts)
        self.u = nn.Parameter(torch.empty(num_experts, in_features, dtype=dtype, device=device))
        self.v = nn.Parameter(torch.empty(num_experts, out_features, dtype=dtype, device=device))
        self.reset_parameters(init_zero)

    def reset_parameters(self, init_zero: bool = True) -> None:
        nn.init.uniform_(self.u, -1 / math.sqrt(self.in_features), 1 / math.sqrt(self.in_features))
        if init_zero:
            nn.init.zeros_(self.v)
        else:
            nn.init.uniform_(self.v, -1.0, 1.0)

    @property
    def adapter_rank(self) -> int:
        # The mixture of E rank-1 experts is a rank-E adapter, so it is scaled as one.
        return self.num_experts

    @property
    def rows_per_expert(self) -> int:
        return 1

    def stacked_in(self) -> torch.Tensor:
        return self.u

    def stacked_out(self) -> torch.Tensor:
        return self.v

    def delta_weight(self, expert: int) -> torch.Tensor:
        return torch.outer(self.v[expert], self.u[expert])


EXPERTS: dict[str, type[Experts]] = {"lora": LoRAExperts, "rank1": Rank1Experts}


def build_experts(
    expert_type: str,
    in_features: int,
    out_features: int,
    num_experts: int,
    rank: int,
    *,
    init_zero: bool,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> Experts:
    if expert_type == "lora":
        return LoRAExperts(
            in_features, out_features, num_experts, rank, init_zero=init_zero, dtype=dtype, device=device
        )
    if expert_type == "rank1":
        return Rank1Experts(in_features, out_features, num_experts, init_zero=init_zero, dtype=dtype, device=device)
    raise ValueError(f"expert_type must be one of {sorted(EXPERTS)}, got {expert_type!r}")
