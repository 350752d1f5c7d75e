"""MoLoRALinear: y = base(x) + scaling * sum_e w_e(x) * B_e A_e drop(x), with w from a pluggable router."""

from __future__ import annotations

import torch
from torch import nn

from molora.context import RoutingContext, current_context, in_backward
from molora.experts import Experts
from molora.losses import AUX_LOSSES
from molora.routers import Router, RouterInputs, RouterOutput

# Where a layer sits decides which attention mask describes its input tokens and how its router may pool:
# "self" (decoder-only or encoder-only model), "encoder", "decoder" (always causal), "cross" (reads encoder states).
ROLES = ("self", "encoder", "decoder", "cross")


def align_batch(tensor: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """Repeat per-sequence inputs when generation expanded the batch (beams, num_return_sequences)."""
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] > 0 and batch % tensor.shape[0] == 0:
        return tensor.repeat_interleave(batch // tensor.shape[0], dim=0)
    raise ValueError(f"{what} has batch size {tensor.shape[0]}, but the model input has batch size {batch}")


class MoLoRALinear(nn.Module):
    def __init__(
        self,
        base_layer: nn.Module,
        *,
        name: str,
        experts: Experts,
        router: Router,
        scaling: float,
        dropout: float = 0.0,
        role: str = "self",
        aux_loss_names: tuple[str, ...] = (),
    ):
        super().__init__()
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.base_layer = base_layer
        self.experts = experts
        self.router = router
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling
        self.role = role
        self.layer_name = name
        self.aux_loss_names = tuple(aux_loss_names)
        self.aux_terms: dict[str, torch.Tensor] | None = None
        self.disable_depth = 0

    # Look like the wrapped layer to code that reads its attributes.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.experts.in_features

    @property
    def out_features(self) -> int:
        return self.experts.out_features

    def extra_repr(self) -> str:
        return (
            f"experts={self.experts.num_experts}, type={self.experts.expert_type}, router={self.router.name}, "
            f"scaling={self.scaling:g}, role={self.role}"
        )

    def routing_inputs(self, ctx: RoutingContext | None, batch: int, length: int) -> RouterInputs:
        if ctx is None:
            return RouterInputs()
        mask = ctx.decoder_attention_mask if self.role == "decoder" else ctx.attention_mask
        past_len = 0
        if self.role in ("self", "decoder") and ctx.past_len is not None:
            past_len = ctx.past_len
        token_mask = None
        if mask is not None:
            mask = align_batch(mask, batch, "attention_mask")
            if mask.shape[1] < length:
                raise ValueError(f"attention_mask covers {mask.shape[1]} positions, the input has {length}")
            if self.role in ("self", "decoder") and ctx.past_len is None:
                past_len = mask.shape[1] - length
            token_mask = mask[:, -length:].bool()
        prompt_mask = None
        if ctx.prompt_mask is not None and self.role != "decoder":
            prompt_mask = align_batch(ctx.prompt_mask, batch, "prompt_mask").bool()
            end = past_len + length
            if prompt_mask.shape[1] < end:  # generation without cache: generated tokens are not prompt
                prompt_mask = nn.functional.pad(prompt_mask, (0, end - prompt_mask.shape[1]), value=False)
            prompt_mask = prompt_mask[:, past_len:end]
        task_ids = None if ctx.task_ids is None else align_batch(ctx.task_ids, batch, "task_ids")
        state = None if ctx.decode_state is None else ctx.decode_state.setdefault(self.layer_name, {})
        return RouterInputs(token_mask, task_ids, prompt_mask, past_len, state)

    def route(self, x: torch.Tensor) -> tuple[RouterOutput, torch.Tensor | None]:
        """Router output [B, L, E] for x [B, L, d_in] ([N, d_in] is one sequence) and its token mask."""
        x3 = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() >= 3 else x.reshape(1, -1, x.shape[-1])
        ctx = current_context()
        if ctx is None and in_backward():
            raise RuntimeError(
                "a MoLoRA layer is being recomputed by gradient checkpointing without its routing context (masks, "
                "task ids): enable checkpointing through MoLoRAModel.gradient_checkpointing_enable()"
            )
        inputs = self.routing_inputs(ctx, x3.shape[0], x3.shape[1])
        return self.router(x3, inputs), inputs.token_mask

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_depth > 0:
            self.aux_terms = None
            return result
        route, token_mask = self.route(x)
        self.aux_terms = {name: AUX_LOSSES[name](route, token_mask) for name in self.aux_loss_names}
        expert_dtype = self.experts_dtype
        flat_x = self.dropout(x).reshape(-1, x.shape[-1]).to(expert_dtype)
        weights = route.weights.reshape(-1, route.weights.shape[-1])
        delta = self.experts(flat_x, weights) * self.scaling
        return result + delta.to(result.dtype).reshape(result.shape)

    @property
    def experts_dtype(self) -> torch.dtype:
        return next(self.experts.parameters()).dtype
