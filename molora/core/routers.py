"""Routers: one interface over the same experts.

A router maps the layer input [B, L, d_in] (plus the routing inputs: token mask, task ids, prompt mask, decoding
state) to a RouterOutput whose tensors are [B, L, E] and always fp32, whatever the model dtype or autocast.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from molora.core.checks import check_number
from molora.core.gating import select_experts, softmax
from molora.core.pooling import POOLINGS, pool_sequence


@dataclass
class RouterOutput:
    logits: torch.Tensor  # [B, L, E] fp32, temperature applied (z-loss reads these)
    probs: torch.Tensor  # [B, L, E] full softmax (balance losses read these)
    gates: torch.Tensor  # [B, L, E] the mixture's gates, zero outside the selection
    indices: torch.Tensor | None  # [B, L, k] selected experts; None for dense routing
    task_ids: torch.Tensor | None = None  # [B] the task of each sequence, when given (task-aware aux losses read it)
    # Quantities derived from this output that several aux losses share (see molora.core.losses).
    cache: dict[Any, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def weights(self) -> torch.Tensor:
        """The former name of `gates` (molora 0.1.0); kept for reading, with a DeprecationWarning."""
        warnings.warn("RouterOutput.weights is now RouterOutput.gates", DeprecationWarning, stacklevel=2)
        return self.gates


@dataclass
class RouterInputs:
    token_mask: torch.Tensor | None = None  # [B, L] bool, False on padding
    task_ids: torch.Tensor | None = None  # [B] long
    prompt_mask: torch.Tensor | None = None  # [B, L] bool, aligned with the current tokens
    past_len: int = 0  # tokens already in the KV cache before the current ones
    state: dict[str, Any] | None = None  # this layer's slot for running decoding state; None outside decoding
    # Positions of the call that come before the first one the layer was given, and that it never sees (a head-side
    # module after generate()'s logits_to_keep slicing): a pooled running state cannot include them.
    unseen_prefix: int = 0


ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str):
    def decorator(cls: type[Router]) -> type[Router]:
        cls.name = name
        ROUTERS[name] = cls
        return cls

    return decorator


def broadcast(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """tensor.expand(shape), or the tensor itself when it has that shape already (no view op, no autograd node)."""
    return tensor if tensor.shape == shape else tensor.expand(shape)


class Router(nn.Module):
    """The base of every router. What a router needs and allows is declared here, on its class: the config, the
    patcher, the layer and the model ask the class (never compare router names), so a router registered from outside
    takes part in validation, merging, decoding and training like a built-in one."""

    name: ClassVar[str] = ""
    renormalize: ClassVar[bool] = True
    default_top_k: ClassVar[int | None] = None  # top_k when the config gives none; None: dense
    needs_task_ids: ClassVar[bool] = False  # forward()/generate() need task_ids, the config needs num_tasks
    mergeable_per_task: ClassVar[bool] = False  # one gate per task: merge_and_unload(task_id=...) reproduces it
    shareable: ClassVar[bool] = True  # one instance may route several modules (routing_scope "input"/"block")
    learned: ClassVar[bool] = True  # has weights training moves (router_init_std, router_lr_scale act on them)

    @classmethod
    def check_config(cls, config: Any) -> None:
        """Raise ValueError for a MoLoRAConfig this router cannot run; fill in its defaults (top_k)."""
        if cls.needs_task_ids and config.num_tasks is None:
            raise ValueError(f"num_tasks is required for router={cls.name!r}")
        if config.top_k is None:
            config.top_k = cls.default_top_k
        if config.top_k is None:
            return
        check_number("top_k", config.top_k, minimum=1, kind=int)
        # a module with fewer experts than top_k uses all of them (plain LoRA beside routed modules: MixLoRA)
        largest = config.largest_num_experts()
        if config.top_k > largest:
            raise ValueError(f"top_k={config.top_k} is larger than num_experts={largest}")

    @classmethod
    def config_warnings(cls, config: Any) -> list[str]:
        """Options of a valid config that this router ignores, said once when the config is made."""
        return []

    @classmethod
    def role_options(cls, config: Any, role: str) -> dict[str, Any]:
        """Constructor options for a module in `role` ("self", "encoder", "decoder", "cross")."""
        return {}

    @classmethod
    def check_generation(cls, config: Any, *, encoder_decoder: bool, beams: int) -> None:
        """Raise (or warn) before generate() when cached decoding cannot reproduce this router's routing."""

    @classmethod
    def wants_prompt_mask(cls, config: Any) -> bool:
        """generate() derives prompt_mask from the attention mask when none is given."""
        return False

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        *,
        top_k: int | None = None,
        temperature: float = 1.0,
        jitter: float = 0.0,
    ):
        super().__init__()
        if top_k is not None and not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.in_features = in_features
        self.num_experts = num_experts
        self.top_k = top_k
        self.temperature = temperature
        self.jitter = jitter

    @classmethod
    def from_config(cls, in_features: int, num_experts: int, config: Any, **overrides: Any) -> Router:
        options = dict(top_k=config.top_k, temperature=config.router_temperature, jitter=config.router_jitter)
        options.update(overrides)
        router = cls(in_features, num_experts, **options)
        if getattr(config, "router_init_std", None) is not None:
            router.init_output(config.router_init_std)
        return router

    def output_weight(self) -> torch.Tensor | None:
        """The parameter producing the logits last (its scale sets how far from uniform routing starts)."""
        return None

    @torch.no_grad()
    def init_output(self, std: float) -> None:
        weight = self.output_weight()
        if weight is not None:
            nn.init.normal_(weight, std=std)

    def input_projection(self) -> torch.Tensor | None:
        """A [k, d_in] weight the router applies to its input first, or None.

        The layer may compute it in the same matmul as the experts' input side and pass the result as `projected`.
        """
        return None

    def compute_logits(self, x: torch.Tensor, inputs: RouterInputs, projected: torch.Tensor | None) -> torch.Tensor:
        """Raw fp32 logits, [B, L, E] or [B, 1, E] (one gate per sequence)."""
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, inputs: RouterInputs | None = None, projected: torch.Tensor | None = None
    ) -> RouterOutput:
        """x [B, L, d_in]; `projected` [B, L, k] = x @ input_projection().T when the caller computed it already."""
        inputs = inputs or RouterInputs()
        # fp32 routing under autocast; entering the context only when autocast is on saves its cost per layer.
        autocast = torch.is_autocast_enabled(x.device.type)
        with torch.autocast(device_type=x.device.type, enabled=False) if autocast else contextlib.nullcontext():
            if projected is None:
                x = x.float()
                if self.training and self.jitter > 0:
                    x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
                projection = self.input_projection()
                if projection is not None:
                    projected = F.linear(x, projection.float())
            logits = self.compute_logits(x, inputs, None if projected is None else projected.float()).float()
            if self.temperature != 1.0:
                logits = logits / self.temperature
            probs = softmax(logits)
            gates, indices = select_experts(probs, self.top_k, self.renormalize)
            shape = (*x.shape[:-1], self.num_experts)  # per-sequence gates stay broadcast views (no copies)
        probs = broadcast(probs, shape)
        return RouterOutput(
            logits=broadcast(logits, shape),
            probs=probs,
            gates=probs if indices is None else broadcast(gates, shape),
            indices=None if indices is None else broadcast(indices, (*shape[:-1], indices.shape[-1])),
            task_ids=inputs.task_ids,
        )


class LinearRouter(Router):
    """A linear gate on each token (Mixtral/Switch), kept in fp32."""

    def __init__(self, in_features: int, num_experts: int, **kwargs: Any):
        super().__init__(in_features, num_experts, **kwargs)
        self.gate = nn.Linear(in_features, num_experts, bias=False, dtype=torch.float32)

    def input_projection(self) -> torch.Tensor:
        return self.gate.weight

    def output_weight(self) -> torch.Tensor:
        return self.gate.weight

    def compute_logits(self, x: torch.Tensor, inputs: RouterInputs, projected: torch.Tensor | None) -> torch.Tensor:
        return projected


@register_router("softmax")
class SoftmaxRouter(LinearRouter):
    """Dense: every expert, weighted by softmax(logits / T)."""

    def __init__(self, in_features: int, num_experts: int, **kwargs: Any):
        kwargs["top_k"] = None
        super().__init__(in_features, num_experts, **kwargs)

    @classmethod
    def check_config(cls, config: Any) -> None:
        pass  # dense: top_k is ignored (config_warnings says so)

    @classmethod
    def config_warnings(cls, config: Any) -> list[str]:
        return ["top_k is ignored by router='softmax' (dense); use router='topk'"] if config.top_k is not None else []


@register_router("topk")
class TopKRouter(LinearRouter):
    """The k most probable experts per token, gates renormalised to sum to 1."""

    default_top_k = 2


@register_router("switch")
class SwitchRouter(LinearRouter):
    """Top-1; the weight is the router probability (Switch Transformer), so the gate still gets gradient."""

    renormalize = False
    default_top_k = 1

    def __init__(self, in_features: int, num_experts: int, **kwargs: Any):
        kwargs["top_k"] = 1
        super().__init__(in_features, num_experts, **kwargs)

    @classmethod
    def check_config(cls, config: Any) -> None:
        super().check_config(config)
        if config.top_k != 1:
            raise ValueError(f"top_k must be 1 (or None) for router='switch', got {config.top_k}")


@register_router("intuition")
class IntuitionRouter(Router):
    """MoR1E intuition gating: a pooled summary of the sequence, through a small MLP, gates the experts.

    pooling: "causal" — running mean over positions <= t (no token sees the future; continues across cached
    decoding steps); "prompt" — mean over the prompt tokens, one gate per sequence; "mean" — masked mean over the
    whole sequence (encoders). Padding never counts.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        *,
        pooling: str = "causal",
        hidden: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(in_features, num_experts, **kwargs)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if hidden is not None and hidden < 2:
            raise ValueError(f"intuition hidden width must be >= 2 (LayerNorm over one unit is constant), got {hidden}")
        self.pooling = pooling
        # The MLP only has to separate E gates: a width of 2E (at least 16; LayerNorm over a tiny width flattens the
        # gate) costs a fraction of d_in/8, since the MLP runs on every token; the ablation sets it per row.
        hidden = hidden or max(16, 2 * num_experts)
        self.mlp = nn.Sequential(
            nn.Linear(in_features, hidden, dtype=torch.float32),
            nn.GELU(),
            nn.LayerNorm(hidden, dtype=torch.float32),
            nn.Linear(hidden, num_experts, dtype=torch.float32),
        )

    # A decoder's self-attention pools causally whatever the config says; cross-attention reads the whole encoder.
    POOLING_BY_ROLE: ClassVar[dict[str, str]] = {"decoder": "causal", "cross": "mean"}

    @classmethod
    def from_config(cls, in_features: int, num_experts: int, config: Any, **overrides: Any) -> Router:
        overrides.setdefault("pooling", config.intuition_pooling)
        overrides.setdefault("hidden", config.intuition_hidden)
        return super().from_config(in_features, num_experts, config, **overrides)

    @classmethod
    def role_options(cls, config: Any, role: str) -> dict[str, Any]:
        return {"pooling": cls.POOLING_BY_ROLE[role]} if role in cls.POOLING_BY_ROLE else {}

    @classmethod
    def wants_prompt_mask(cls, config: Any) -> bool:
        return config.intuition_pooling == "prompt"

    @classmethod
    def check_generation(cls, config: Any, *, encoder_decoder: bool, beams: int) -> None:
        if config.intuition_pooling == "mean" and not encoder_decoder:
            warnings.warn(
                "intuition_pooling='mean' lets every token see the whole sequence, so cached generation differs "
                "from uncached; use 'causal' or 'prompt' for decoders",
                stacklevel=4,
            )
        running_state = encoder_decoder or config.intuition_pooling != "prompt"
        if beams > 1 and running_state:
            raise NotImplementedError(
                "beam search reorders the KV cache but not the intuition router's running pooled state; use greedy "
                "or sampling, or intuition_pooling='prompt'"
            )

    def input_projection(self) -> torch.Tensor:
        return self.mlp[0].weight

    def output_weight(self) -> torch.Tensor:
        return self.mlp[3].weight

    def compute_logits(self, x: torch.Tensor, inputs: RouterInputs, projected: torch.Tensor | None) -> torch.Tensor:
        # Pooling is a weighted mean, so it commutes with the first linear map: pool(x) W^T + b = pool(x W^T) + b.
        # Pooling the projected [B, L, hidden] instead of x [B, L, d_in] moves d_in/hidden times less data, and
        # the projection can share the experts' matmul.
        first, activation, norm, last = self.mlp
        return last(norm(activation(self.pool(projected, inputs) + first.bias)))

    def pool(self, x: torch.Tensor, inputs: RouterInputs) -> torch.Tensor:
        return pool_sequence(
            x, self.pooling, inputs.token_mask, inputs.prompt_mask, inputs.past_len, inputs.state, inputs.unseen_prefix
        )


@register_router("task")
class TaskRouter(Router):
    """MOELoRA-style: the gate comes from a learned embedding of the task id, one per sequence."""

    needs_task_ids = True
    mergeable_per_task = True

    def __init__(self, in_features: int, num_experts: int, *, num_tasks: int, **kwargs: Any):
        super().__init__(in_features, num_experts, **kwargs)
        self.num_tasks = num_tasks
        self.task_embedding = nn.Embedding(num_tasks, num_experts, dtype=torch.float32)
        nn.init.normal_(self.task_embedding.weight, std=0.02)

    @classmethod
    def from_config(cls, in_features: int, num_experts: int, config: Any, **overrides: Any) -> Router:
        overrides.setdefault("num_tasks", config.num_tasks)
        return super().from_config(in_features, num_experts, config, **overrides)

    def output_weight(self) -> torch.Tensor:
        return self.task_embedding.weight

    def compute_logits(self, x: torch.Tensor, inputs: RouterInputs, projected: torch.Tensor | None) -> torch.Tensor:
        if inputs.task_ids is None:
            raise ValueError("router='task' needs task_ids ([batch] ints) passed to MoLoRAModel.forward/generate")
        return self.task_embedding.weight.float()[inputs.task_ids].unsqueeze(1)


@register_router("domain")
class DomainRouter(Router):
    """One LoRA per domain with the domain known: task t goes to expert t alone, by a rule, not a learned gate. The
    multi-domain oracle beside which a learned router is judged (what a task router learns at best), with no
    parameters of its own. A module with one expert is shared by every task (MixLoRA's plain q/v)."""

    needs_task_ids = True
    mergeable_per_task = True
    default_top_k = 1
    learned = False

    def __init__(self, in_features: int, num_experts: int, *, num_tasks: int, **kwargs: Any):
        super().__init__(in_features, num_experts, **kwargs)
        if 1 < num_experts < num_tasks:
            raise ValueError(
                f"router='domain' gives each of the {num_tasks} tasks an expert of its own: a module needs "
                f"num_experts >= num_tasks (or 1, shared by all), got {num_experts}"
            )
        self.num_tasks = num_tasks

    @classmethod
    def check_config(cls, config: Any) -> None:
        super().check_config(config)
        if config.top_k != 1:
            raise ValueError(f"router='domain' sends each task to its one expert: top_k must be 1, got {config.top_k}")
        if 1 < config.largest_num_experts() < config.num_tasks:
            raise ValueError(
                f"router='domain' gives each of the {config.num_tasks} tasks an expert of its own: num_experts must "
                f"be at least num_tasks, got {config.largest_num_experts()}"
            )

    @classmethod
    def config_warnings(cls, config: Any) -> list[str]:
        said = []
        unused = config.largest_num_experts() - config.num_tasks
        if unused > 0:
            said.append(f"router='domain': {unused} expert(s) per routed module serve no task and stay at init")
        if config.router_init_std is not None:
            said.append("router_init_std is ignored: router='domain' has no weights")
        return said

    @classmethod
    def from_config(cls, in_features: int, num_experts: int, config: Any, **overrides: Any) -> Router:
        overrides.setdefault("num_tasks", config.num_tasks)
        return super().from_config(in_features, num_experts, config, **overrides)

    def compute_logits(self, x: torch.Tensor, inputs: RouterInputs, projected: torch.Tensor | None) -> torch.Tensor:
        if inputs.task_ids is None:
            raise ValueError("router='domain' needs task_ids ([batch] ints) passed to MoLoRAModel.forward/generate")
        if self.num_experts == 1:
            return torch.zeros(inputs.task_ids.shape[0], 1, 1, device=x.device)
        return F.one_hot(inputs.task_ids, self.num_experts).float().unsqueeze(1)
