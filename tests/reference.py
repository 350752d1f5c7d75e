"""Independent, deliberately simple reference implementations (a Python loop over experts)."""

from __future__ import annotations

import torch

from molora.core.experts import Experts, LoRAExperts, Rank1Experts


def loop_delta(experts: Experts, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.shape[0], experts.out_features, dtype=x.dtype)
    for e in range(experts.num_experts):
        if isinstance(experts, LoRAExperts):
            expert_out = (x @ experts.lora_A[e].T) @ experts.lora_B[e]
        elif isinstance(experts, Rank1Experts):
            expert_out = (x @ experts.u[e]).unsqueeze(-1) * experts.v[e]
        else:
            raise TypeError(type(experts))
        out = out + gates[:, e : e + 1] * expert_out
    return out
