"""MoLoRALinear: y = base(x) + scaling * sum_e w_e(x) * B_e A_e drop(x), with w from a pluggable router."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from molora.core.base_layers import is_plain_linear
from molora.core.context import current_context, in_backward
from molora.core.experts import Experts
from molora.core.positions import ROLES, Site, as_sequences, sequence_first, state_slot
from molora.core.routers import Router, RouterInputs, RouterOutput


@dataclass
class SharedInput:
    """What the first module of a routing_scope='input' group to run on a tensor leaves for the others: the tensor,
    every member's input side from one joint matmul, and the group's routing of it."""

    x: torch.Tensor
    hiddens: dict[str, torch.Tensor]  # {layer name: its experts' input side}; empty under grouped dispatch
    route: RouterOutput


def per_sequence(gates: torch.Tensor) -> torch.Tensor:
    """[B, 1, E] when the [B, L, E] gates are one gate per sequence broadcast along L, else the gates."""
    if gates.shape[1] > 1 and gates.stride(1) == 0:
        return gates[:, :1]
    return gates


@dataclass(frozen=True)
class LayerSpec:
    """What the patcher decided for one module, beside its experts and router."""

    name: str
    scaling: float  # alpha / r (or alpha / sqrt(r) with rsLoRA) of the mixture
    dropout: float = 0.0
    role: str = "self"  # what the layer's input is to the call's tokens (molora.core.positions.ROLES)
    aux_loss_names: tuple[str, ...] = ()  # the aux losses read from this layer's routing
    dispatch: str = "auto"
    # The experts bank holds the router's E routed experts, then num_shared always-on ones. The routed gates are
    # multiplied by gate_multiplier (config.mixture_scaling), the shared experts keep gate 1 times the scaling.
    num_shared: int = 0
    gate_multiplier: float = 1.0
    block: str | None = None  # the routing group's key (routing_scope 'input'/'block'), None when routing alone


class MoLoRALinear(nn.Module):
    def __init__(
        self,
        base_layer: nn.Module,
        spec: LayerSpec,
        experts: Experts,
        router: Router | None,
        block_owner: MoLoRALinear | None = None,
    ):
        super().__init__()
        self.spec = spec
        name, role, block = spec.name, spec.role, spec.block
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.base_layer = base_layer
        self.experts = experts
        # None for a follower (routing_scope 'input' or 'block'): it reuses the routing its group's owner published
        self.router = router
        if (router is None) != (block_owner is not None):
            raise ValueError("a layer needs a router, or (shared routing) the group owner whose routing it reuses")
        self.block = block  # the routing group's key (routing_scope 'input'/'block'), None when routing alone
        self._owner = (block_owner,) if block_owner is not None else ()  # a tuple: not a submodule of this layer
        self._block_route: RouterOutput | None = None  # the owner's route of its last forward, outside a context
        # routing_scope='input': the group reads one tensor, so whichever member runs first on it computes every
        # member's input side in one matmul and routes it with the group's router; the others take their part.
        self.input_group: tuple[MoLoRALinear, ...] = ()  # every member, this one included (set by the patcher)
        self._shared_input: SharedInput | None = None  # the group's last, outside a routing context (on the owner)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.scaling = spec.scaling
        self.role = role
        self.layer_name = name
        self.site = Site(name, role)  # what its routing inputs depend on (molora.core.positions)
        self.aux_loss_names = spec.aux_loss_names
        self.dispatch = spec.dispatch
        self.num_shared = spec.num_shared
        self.gate_multiplier = spec.gate_multiplier
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

    @property
    def routing_router(self) -> Router:
        """The router deciding this layer's gates: its own, or its block owner's."""
        return self.router if self.router is not None else self._owner[0].router

    def extra_repr(self) -> str:
        shared = "" if self.router is not None else f", routed by {self._owner[0].layer_name}"
        return (
            f"experts={self.experts.num_experts}, type={self.experts.expert_type}, router={self.routing_router.name}"
            f"{shared}, scaling={self.scaling:g}, role={self.role}"
        )

    def publish_route(self, route: RouterOutput) -> None:
        """Block owner: leave this forward's routing for the block's other layers."""
        ctx = current_context()
        if ctx is not None:
            ctx.block_routes[self.block] = route
        else:
            self._block_route = route

    def block_route(self, tokens: tuple[int, int]) -> RouterOutput:
        """Block follower: the routing its owner published in this forward."""
        owner = self._owner[0]
        ctx = current_context()
        route = ctx.block_routes.get(self.block) if ctx is not None else owner._block_route
        if route is None or tuple(route.gates.shape[:2]) != tokens:
            raise RuntimeError(
                f"{self.layer_name} shares the routing of block {self.block!r}, decided by {owner.layer_name}, which "
                "has not run on these tokens in this forward; routing_scope='block' needs the block's first adapted "
                "layer to run first (as gate_proj does in a Llama MLP)"
            )
        return route

    def sequences(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterInputs]:
        """The input as [batch, length, d] sequences and their routing inputs (molora.core.positions)."""
        ctx = current_context()
        if ctx is None and in_backward():
            raise RuntimeError(
                "a MoLoRA layer is being recomputed by gradient checkpointing without its routing context (masks, "
                "task ids): enable checkpointing through MoLoRAModel.gradient_checkpointing_enable()"
            )
        return as_sequences(x, ctx, self.site, self.routing_router.needs_task_ids)

    def decoding_slot(self, inputs: RouterInputs) -> RouterInputs:
        """The same routing inputs with this layer's own decoding-state slot (a group owner routing for a member)."""
        ctx = current_context()
        if inputs.state is None or ctx is None or ctx.decode_state is None:
            return inputs
        return dataclasses.replace(inputs, state=state_slot(ctx, self.layer_name))

    @property
    def mix_scaling(self) -> float:
        """The scaling the mixture applies to every row of the bank (routed gates times gate_multiplier)."""
        return self.scaling * self.gate_multiplier

    def bank_gates(self, gates: torch.Tensor) -> torch.Tensor:
        """Router gates [..., E] -> the gates of the whole bank [..., E + num_shared] (shared experts always on)."""
        if not self.num_shared:
            return gates
        shared = gates.new_full((*gates.shape[:-1], self.num_shared), 1.0 / self.gate_multiplier)
        return torch.cat([gates, shared], dim=-1)

    def grouped_dispatch(self, x: torch.Tensor) -> bool:
        top_k = self.routing_router.top_k
        if top_k is None or self.dispatch == "dense" or self.num_shared:
            return False
        if self.dispatch == "grouped":
            return True
        # The crossover measured by bench/bench_dispatch.py (docs/guides/performance.md, "Top-k dispatch"): grouped
        # wins on CPU from E/k = 16; on a GPU it stayed slower up to E=128 (launch-bound).
        return x.device.type == "cpu" and self.routing_router.num_experts >= 16 * top_k

    def shares_router_matmul(self, x: torch.Tensor, expert_x: torch.Tensor) -> bool:
        """Whether the router's input projection can ride in the experts' matmul: both must read the same fp32
        numbers (no dropout or jitter active, no autocast, which would run the router in half precision)."""
        if self.training and (not isinstance(self.dropout, nn.Identity) or self.routing_router.jitter > 0):
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
        if sequence_first(x, current_context(), self.site):  # routed as [batch, length, d], given back as it came
            return self.forward(x.transpose(0, 1), *args, **kwargs).transpose(0, 1).contiguous()
        x3, inputs = self.sequences(x)
        flat_x = x3.reshape(-1, x3.shape[-1])
        # A 2-D nn.Linear output is a fresh tensor that its backward does not need: the experts add into it in place.
        plain_linear = is_plain_linear(self.base_layer) and not args and not kwargs
        result = self.base_layer(flat_x) if plain_linear else self.base_layer(x, *args, **kwargs)
        if not isinstance(result, torch.Tensor) or result.shape[-1] != self.out_features:
            got = f"shape {list(result.shape)}" if isinstance(result, torch.Tensor) else f"a {type(result).__name__}"
            raise TypeError(
                f"{self.layer_name} ({type(self.base_layer).__name__}) returns {got}, not the [..., "
                f"{self.out_features}] output of a linear map that the experts add to; leave it out of target_modules"
            )
        expert_x = self.dropout(flat_x).to(self.experts_dtype)
        out_shape = (*x.shape[:-1], result.shape[-1])
        if self.grouped_dispatch(flat_x):
            delta = self.grouped_delta(x, x3, flat_x, expert_x, inputs)
            return result.view(out_shape) + delta.to(result.dtype).view(out_shape)
        hidden, route = self.project_and_route(x, x3, flat_x, expert_x, inputs)
        gates = self.bank_gates(per_sequence(route.gates))
        return self.add_mixture(result, hidden, gates, plain_linear).view(out_shape)

    def decide_route(self, x3: torch.Tensor, inputs: RouterInputs, projected: torch.Tensor | None = None):
        """This forward's routing: the layer's own router's, or (block follower) its owner's; kept for aux losses."""
        follower = self.router is None
        route = self.block_route(tuple(x3.shape[:2])) if follower else self.route(x3, inputs, projected)
        self.last_route = (route, inputs.token_mask) if self.aux_loss_names and not follower else None
        return route

    def grouped_delta(
        self, x: torch.Tensor, x3: torch.Tensor, flat_x: torch.Tensor, expert_x: torch.Tensor, inputs: RouterInputs
    ) -> torch.Tensor:
        """Top-k, each token sent to its k experts only (tokens sorted by expert): the delta [N, d_out]."""
        if self.shares_input:
            shared = self.find_shared_input(x)
            route = (shared or self.share_input(x, x3, flat_x, expert_x, inputs, False)).route
        else:
            route = self.decide_route(x3, inputs)
        # [N, E] per token (a per-sequence gate is expanded here): grouped dispatch sorts tokens, not sequences
        flat_gates = route.gates.reshape(-1, route.gates.shape[-1]) * self.mix_scaling
        indices = route.indices.reshape(-1, route.indices.shape[-1])
        return self.experts.mix_grouped(expert_x, flat_gates, indices)

    def project_and_route(
        self, x: torch.Tensor, x3: torch.Tensor, flat_x: torch.Tensor, expert_x: torch.Tensor, inputs: RouterInputs
    ) -> tuple[torch.Tensor, RouterOutput]:
        """The experts' input side [N, E*r] and the routing; the router's input projection rides in the experts'
        matmul when both read the same numbers (and, routing_scope='input', the whole group's input sides do)."""
        if self.shares_input:
            shared = self.find_shared_input(x) or self.share_input(x, x3, flat_x, expert_x, inputs, True)
            return shared.hiddens[self.layer_name], shared.route
        projection = None if self.router is None else self.router.input_projection()
        if projection is not None and self.shares_router_matmul(flat_x, expert_x):
            hidden, (projected,) = self.experts.project(expert_x, (projection,))
            return hidden, self.decide_route(x3, inputs, projected.view(*x3.shape[:-1], -1))
        hidden, _ = self.experts.project(expert_x)
        return hidden, self.decide_route(x3, inputs)

    @property
    def shares_input(self) -> bool:
        return bool(self.input_group)

    @property
    def group_owner(self) -> MoLoRALinear:
        return self if self.router is not None else self._owner[0]

    def find_shared_input(self, x: torch.Tensor) -> SharedInput | None:
        """routing_scope='input': what a member that ran first left for this very tensor, or None."""
        ctx = current_context()
        shared = ctx.shared_inputs.get(self.block) if ctx is not None else self.group_owner._shared_input
        return shared if shared is not None and shared.x is x else None

    def share_input(
        self,
        x: torch.Tensor,
        x3: torch.Tensor,
        flat_x: torch.Tensor,
        expert_x: torch.Tensor,
        inputs: RouterInputs,
        project: bool,
    ) -> SharedInput:
        """routing_scope='input', the first member to run on x: every member's input side in one matmul (with the
        router's rows when they read the same numbers) and the routing by the group's router, left for the others.
        A member given another tensor than its siblings gets here too: its input is routed on its own (as with
        routing per module and the routers tied)."""
        owner = self.group_owner
        router = owner.router
        projection = router.input_projection()
        fused = project and projection is not None and self.shares_router_matmul(flat_x, expert_x)
        others = [m for m in self.input_group if m is not self] if project else []
        hiddens: dict[str, torch.Tensor] = {}
        projected = None
        if project:
            extras = tuple(m.experts.stacked_in() for m in others) + ((projection,) if fused else ())
            hidden, outputs = self.experts.project(expert_x, extras)
            hiddens = {self.layer_name: hidden} | {m.layer_name: h for m, h in zip(others, outputs, strict=False)}
            projected = outputs[-1].view(*x3.shape[:-1], -1) if fused else None
        route_inputs = inputs if owner is self else owner.decoding_slot(inputs)  # siblings: same masks and role
        route = router(x3, route_inputs, projected=projected)
        owner.last_route = (route, route_inputs.token_mask) if owner.aux_loss_names else None
        shared = SharedInput(x, hiddens, route)
        ctx = current_context()
        if ctx is not None:
            ctx.shared_inputs[self.block] = shared
        else:
            owner._shared_input = shared
        return shared

    def add_mixture(
        self, result: torch.Tensor, hidden: torch.Tensor, gates: torch.Tensor, plain_linear: bool
    ) -> torch.Tensor:
        """The base output plus the gated mixture, [N, d_out]: one addmm, into the base output itself where nothing
        else reads it."""
        flat_result = result if result.dim() == 2 else result.reshape(-1, result.shape[-1])
        if flat_result.dtype != hidden.dtype:
            delta = self.experts.mix(hidden, gates, scaling=self.mix_scaling)
            return flat_result + delta.to(flat_result.dtype)
        inplace = (
            plain_linear
            and flat_result._base is None
            and not self.base_layer._forward_hooks
            and not torch.is_autocast_enabled(hidden.device.type)  # in-place ops are not autocast
        )
        return self.experts.mix(hidden, gates, flat_result, inplace, self.mix_scaling)

    def route(self, x3: torch.Tensor, inputs: RouterInputs, projected: torch.Tensor | None = None) -> RouterOutput:
        route = self.router(x3, inputs, projected=projected)
        if self.block is not None:
            self.publish_route(route)
        return route

    @property
    def experts_dtype(self) -> torch.dtype:
        return next(self.experts.parameters()).dtype
