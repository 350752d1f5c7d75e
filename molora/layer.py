"""MoLoRALinear: y = base(x) + scaling * sum_e w_e(x) * B_e A_e drop(x), with w from a pluggable router."""

from __future__ import annotations

import torch
from torch import nn

from molora.context import RoutingContext, current_context, in_backward
from molora.experts import Experts
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


def per_sequence(weights: torch.Tensor) -> torch.Tensor:
    """[B, 1, E] when the [B, L, E] weights are one gate per sequence broadcast along L, else the weights."""
    if weights.shape[1] > 1 and weights.stride(1) == 0:
        return weights[:, :1]
    return weights


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
        dispatch: str = "auto",
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
        self.dispatch = dispatch
        # (router output, token mask) of the last forward, for the aux losses (MoLoRAModel computes them for all
        # layers at once); None when there are no aux losses or the adapters were disabled.
        self.last_route: tuple[RouterOutput, torch.Tensor | None] | None = None
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
        mask_field = "decoder_attention_mask" if self.role == "decoder" else "attention_mask"
        mask = getattr(ctx, mask_field)
        past_len = 0
        if self.role in ("self", "decoder") and ctx.past_len is not None:
            past_len = ctx.past_len
        token_mask = None
        if mask is not None:
            if mask.shape[1] < length:
                raise ValueError(f"attention_mask covers {mask.shape[1]} positions, the input has {length}")
            if self.role in ("self", "decoder") and ctx.past_len is None:
                past_len = mask.shape[1] - length
            source, derived = ctx.token_masks.get(mask_field, (None, {}))
            if source is not mask:
                derived = {}
                ctx.token_masks[mask_field] = (mask, derived)
            token_mask = derived.get((batch, length))
            if token_mask is None:
                token_mask = derived[(batch, length)] = align_batch(mask, batch, "attention_mask")[:, -length:].bool()
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

    def routing_context(self, x3: torch.Tensor) -> RouterInputs:
        ctx = current_context()
        if ctx is None and in_backward():
            raise RuntimeError(
                "a MoLoRA layer is being recomputed by gradient checkpointing without its routing context (masks, "
                "task ids): enable checkpointing through MoLoRAModel.gradient_checkpointing_enable()"
            )
        return self.routing_inputs(ctx, x3.shape[0], x3.shape[1])

    def grouped_dispatch(self, x: torch.Tensor) -> bool:
        top_k = self.router.top_k
        if top_k is None or self.dispatch == "dense":
            return False
        if self.dispatch == "grouped":
            return True
        # Measured crossover (bench/bench_dispatch.py, 4096 tokens, 256 -> 688, r=8, k=2): on 2 CPU cores grouped is
        # 0.90x dense at E=32 and 0.59x at E=64; on an H100 it stayed slower up to E=128 (launch-bound).
        return x.device.type == "cpu" and self.experts.num_experts >= 16 * top_k

    def shares_router_matmul(self, x: torch.Tensor, expert_x: torch.Tensor) -> bool:
        """Whether the router's input projection can ride in the experts' matmul: both must read the same fp32
        numbers (no dropout or jitter active, no autocast, which would run the router in half precision)."""
        if self.training and (not isinstance(self.dropout, nn.Identity) or self.router.jitter > 0):
            return False
        return (
            x.dtype == torch.float32
            and expert_x.dtype == torch.float32
            and not torch.is_autocast_enabled(x.device.type)
        )

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_depth > 0:
            self.last_route = None
            return self.base_layer(x, *args, **kwargs)
        x3 = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() >= 3 else x.reshape(1, -1, x.shape[-1])
        flat_x = x3.reshape(-1, x3.shape[-1])
        # A 2-D nn.Linear output is a fresh tensor that its backward does not need: the experts add into it in place.
        plain_linear = type(self.base_layer) is nn.Linear and not args and not kwargs
        result = self.base_layer(flat_x) if plain_linear else self.base_layer(x, *args, **kwargs)
        inputs = self.routing_context(x3)
        expert_x = self.dropout(flat_x).to(self.experts_dtype)
        out_shape = (*x.shape[:-1], result.shape[-1])
        if self.grouped_dispatch(flat_x):
            route = self.router(x3, inputs)
            self.last_route = (route, inputs.token_mask) if self.aux_loss_names else None
            # [N, E] per token (a per-sequence gate is expanded here): grouped dispatch sorts tokens, not sequences
            flat_weights = route.weights.reshape(-1, route.weights.shape[-1]) * self.scaling
            indices = route.indices.reshape(-1, route.indices.shape[-1])
            delta = self.experts.mix_grouped(expert_x, flat_weights, indices)
            return result.view(out_shape) + delta.to(result.dtype).view(out_shape)
        projection = self.router.input_projection()
        if projection is not None and self.shares_router_matmul(flat_x, expert_x):
            hidden, projected = self.experts.project(expert_x, projection)
            route = self.router(x3, inputs, projected=projected.view(*x3.shape[:-1], -1))
        else:
            hidden, _ = self.experts.project(expert_x)
            route = self.router(x3, inputs)
        self.last_route = (route, inputs.token_mask) if self.aux_loss_names else None
        weights = per_sequence(route.weights)
        flat_result = result if result.dim() == 2 else result.reshape(-1, result.shape[-1])
        if flat_result.dtype != hidden.dtype:
            delta = self.experts.mix(hidden, weights, scaling=self.scaling)
            return result.view(out_shape) + delta.to(result.dtype).view(out_shape)
        inplace = (
            plain_linear
            and flat_result._base is None
            and not self.base_layer._forward_hooks
            and not torch.is_autocast_enabled(x.device.type)  # in-place ops are not autocast
        )
        return self.experts.mix(hidden, weights, flat_result, inplace, self.scaling).view(out_shape)

    # Merging ------------------------------------------------------------------------------------------------------
    def merged_delta(self, expert_weights: torch.Tensor) -> torch.Tensor:
        """scaling * sum_e w_e B_e A_e as one [d_out, d_in] matrix, for fixed expert weights [E]."""
        rows = expert_weights.to(self.experts_dtype).repeat_interleave(self.experts.rows_per_expert)
        return self.scaling * (self.experts.stacked_out() * rows.unsqueeze(-1)).T @ self.experts.stacked_in()

    def fixed_expert_weights(self, task_id: int | None) -> torch.Tensor:
        """The expert weights [E] when they do not depend on the tokens: the task router's gate for one task."""
        num_experts = self.experts.num_experts
        if num_experts == 1:
            return torch.ones(1, device=self.weight.device)
        if self.router.name != "task":
            raise ValueError(
                f"{self.layer_name}: router {self.router.name!r} weighs the experts per token, so no single matrix "
                "reproduces it; only router='task' (one gate per task) or a single expert can be merged"
            )
        if task_id is None:
            raise ValueError("merging a task router needs task_id: the gate differs per task")
        if not 0 <= task_id < self.router.num_tasks:
            raise ValueError(f"task_id must be in [0, num_tasks={self.router.num_tasks}), got {task_id}")
        probe = torch.zeros(1, 1, self.in_features, device=self.weight.device)
        task_ids = torch.tensor([task_id], device=self.weight.device)
        return self.router(probe, RouterInputs(task_ids=task_ids)).weights[0, 0]

    @torch.no_grad()
    def merge_into_base(self, task_id: int | None = None) -> nn.Module:
        """Add the (fixed) mixture to the base weight in place and return the base layer."""
        delta = self.merged_delta(self.fixed_expert_weights(task_id))
        weight = self.base_layer.weight
        if not isinstance(self.base_layer, nn.Linear):  # transformers' Conv1D stores [d_in, d_out]
            delta = delta.T
        weight.add_(delta.to(weight.dtype))
        return self.base_layer

    @property
    def experts_dtype(self) -> torch.dtype:
        return next(self.experts.parameters()).dtype
