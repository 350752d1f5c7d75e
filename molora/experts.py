"""Expert banks stored as stacked tensors; the mixture is two matmuls with the gate applied in between.

forward(x [N, d_in], weights [N, E]) -> scaling-free delta [N, d_out] = sum_e w_e * B_e A_e x.
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

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        num_experts, rank = self.num_experts, self.rank
        hidden = F.linear(x, self.lora_A.reshape(num_experts * rank, self.in_features))  # [N, E*r]
        hidden = (hidden.view(-1, num_experts, rank) * weights.to(hidden.dtype).unsqueeze(-1)).flatten(1)
        stacked_B = self.lora_B.permute(1, 0, 2).reshape(self.out_features, num_experts * rank)
        return F.linear(hidden, stacked_B)

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

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(x, self.u) * weights.to(x.dtype)  # [N, E]
        return hidden @ self.v

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
