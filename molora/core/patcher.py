"""Find target modules, check everything, then swap them for MoLoRALinear layers.

All validation happens before the first module is replaced, so a failure leaves the model untouched.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from molora.core.allocation import describe_preset, is_preset, layer_index
from molora.core.base_layers import PLAIN_FORWARDS, base_kind, keep_input_gradients, unsupported_reason
from molora.core.config import ALL_LINEAR, MoLoRAConfig, pattern_lookup
from molora.core.experts import EXPERTS, RankGates, build_experts
from molora.core.layer import LayerSpec, MoLoRALinear
from molora.core.losses import AUX_LOSSES
from molora.core.routers import ROUTERS

_CROSS_ATTENTION_INPUTS = re.compile(
    r".*(?:EncDecAttention\.(?:k|v)|encoder_attn\.(?:k_proj|v_proj)|crossattention\.self\.(?:key|value))"
)


@dataclass
class InjectedModule:
    name: str
    base_type: str
    in_features: int
    out_features: int
    num_experts: int
    rank: int | None
    alpha: float
    scaling: float
    role: str
    routed_by: str | None = None  # the module whose router decides this one's gates (routing_scope input/block)


@dataclass
class InjectionReport:
    """What was injected where; printed by get_molora_model(verbose=True) and kept on the model."""

    modules: list[InjectedModule]
    router: str
    expert_type: str
    aux_losses: dict[str, float]
    excluded: list[str] = field(default_factory=list)
    unused_patterns: dict[str, list[str]] = field(default_factory=dict)
    trainable_params: int = 0
    total_params: int = 0
    effective_ranks: dict[str, list[int]] | None = None  # after training with rank gates: kept per expert
    experts_per_layer: dict[int, int] = field(default_factory=dict)  # num_experts presets: {layer index: experts}
    allocation: str = ""  # the preset that made experts_per_layer ("hourglass, quarters 8-2-2-8")
    left_out: list[str] = field(default_factory=list)  # target_modules='all-linear': linears whose forward is not one

    def __str__(self) -> str:
        lines = [
            f"MoLoRA injection: {len(self.modules)} modules, router={self.router}, experts={self.expert_type}",
            f"{'module':<48} {'type':<7} {'in':>5} {'out':>5} {'E':>3} {'r':>3} {'scale':>7} {'role':<7} router",
        ]
        for m in self.modules:
            rank = "-" if m.rank is None else str(m.rank)
            lines.append(
                f"{m.name:<48} {m.base_type:<7} {m.in_features:>5} {m.out_features:>5} {m.num_experts:>3} "
                f"{rank:>3} {m.scaling:>7.3g} {m.role:<7} {_router_column(m)}"
            )
        if self.experts_per_layer:
            layers = list(self.experts_per_layer)
            span = f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else layers
            counts = " ".join(str(c) for c in self.experts_per_layer.values())
            lines.append(f"experts per layer {span}: {counts} ({self.allocation})")
        weights = ", ".join(f"{k}={v:g}" for k, v in self.aux_losses.items()) or "none"
        lines.append(f"aux losses: {weights}")
        if self.excluded:
            lines.append(f"excluded by exclude_modules: {', '.join(self.excluded)}")
        if self.left_out:
            lines.append(f"left out of all-linear (their forward is not their linear map): {', '.join(self.left_out)}")
        for name, patterns in self.unused_patterns.items():
            lines.append(f"WARNING {name}: patterns that matched no targeted module: {patterns}")
        if self.effective_ranks:
            lines.append("rank kept by the rank gates, per expert:")
            lines += [f"  {name:<46} {' '.join(map(str, ranks))}" for name, ranks in self.effective_ranks.items()]
        if self.total_params:
            pct = 100 * self.trainable_params / self.total_params
            lines.append(
                f"trainable params: {self.trainable_params:,} || all params: {self.total_params:,} "
                f"|| trainable%: {pct:.4f}"
            )
        return "\n".join(lines)


def _matches(patterns: list[str] | str, name: str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == t or name.endswith("." + t) for t in patterns)


def _role(model: nn.Module, name: str) -> str:
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "self"
    if _CROSS_ATTENTION_INPUTS.fullmatch(name):
        return "cross"
    return "decoder" if "decoder" in name.split(".") else "encoder"


def _features(module: nn.Module) -> tuple[int, int]:
    return base_kind(module).features(module)


def _is_linear(module: nn.Module) -> bool:
    """A linear layer of a kind molora knows (molora.core.base_layers), or an nn.Linear subclass it does not (a
    quantized linear of another library): 'all-linear' considers both, and leaves the second out by name."""
    return base_kind(module) is not None or isinstance(module, nn.Linear)


def _no_match_error(field_name: str, target: str, model: nn.Module) -> ValueError:
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if base_kind(m) is not None})
    return ValueError(
        f"{field_name}: {target!r} matches no module in {type(model).__name__}; "
        f"linear modules it has include: {leaves[:12]}"
    )


def _computes_its_linear_map(module: nn.Module) -> bool:
    """Whether a linear module's forward maps [..., in] to the [..., out] tensor the experts add to: nn.Linear's,
    Conv1D's and the quantized kinds' do (molora.core.base_layers), an unknown quantized linear is not trusted to; a
    subclass with a forward of its own is run once on the meta device (no memory, no compute) and must give that
    tensor there (Llama 4's MoE router returns a tuple, DeepSeek-V4's grouped linear reads its input in
    groups)."""
    kind = base_kind(module)
    if kind is None:
        return False
    if type(module).forward in PLAIN_FORWARDS or kind.quantized:
        return True
    d_in, d_out = _features(module)
    meta = {n: torch.empty_like(t, device="meta") for n, t in [*module.named_parameters(), *module.named_buffers()]}
    try:
        out = torch.func.functional_call(module, meta, (torch.empty(1, d_in, device="meta"),))
    except Exception:
        return False
    return isinstance(out, torch.Tensor) and tuple(out.shape) == (1, d_out)


def all_linear_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """target_modules='all-linear' as PEFT resolves it, every linear (nn.Linear, Conv1D, a quantized linear) but the
    module that get_output_embeddings() returns (the LM head, tied to the input embeddings or not), and the names left
    out of it: linear subclasses whose forward is not their linear map (PEFT adapts them, and the forward fails) and
    quantized linears of a kind molora does not know."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    linear = [(n, m) for n, m in model.named_modules() if n and _is_linear(m) and m is not head]
    left_out = [n for n, m in linear if not _computes_its_linear_map(m)]
    return [n for n, _ in linear if n not in set(left_out)], left_out


def _matched_targets(
    model: nn.Module, named: list[tuple[str, nn.Module]], targets: list[str] | str
) -> list[tuple[str, nn.Module]]:
    """The modules target_modules names; every name in a list and the regex must match something."""
    if targets == ALL_LINEAR:
        wanted = set(all_linear_names(model)[0])
        if not wanted:
            raise ValueError(f"target_modules={ALL_LINEAR!r}: {type(model).__name__} has no linear module but its head")
        return [(n, m) for n, m in named if n in wanted]
    for single in [targets] if isinstance(targets, str) else [[target] for target in targets]:
        if not any(_matches(single, n) for n, _ in named):
            raise _no_match_error("target_modules", single if isinstance(single, str) else single[0], model)
    return [(n, m) for n, m in named if _matches(targets, n)]


def find_targets(model: nn.Module, config: MoLoRAConfig) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """(name, module) pairs to wrap, and the names that exclude_modules removed; raises naming the cause."""
    if any(isinstance(m, MoLoRALinear) for m in model.modules()):
        raise ValueError("the model already has MoLoRA layers; call unload() before injecting again")
    named = [(n, m) for n, m in model.named_modules() if n]
    matched = _matched_targets(model, named, config.target_modules)
    for name, module in matched:
        if base_kind(module) is None:
            raise ValueError(f"target_modules matched {name!r}: {unsupported_reason(module)}")
    excluded = [n for n, _ in matched if config.exclude_modules is not None and _matches(config.exclude_modules, n)]
    kept = [(n, m) for n, m in matched if n not in set(excluded)]
    if not kept:
        raise ValueError(f"exclude_modules={config.exclude_modules!r} excludes every module matched by target_modules")
    if config.layers_to_transform is not None:
        wanted = set(config.layers_to_transform)
        kept = [(n, m) for n, m in kept if layer_index(n) in wanted]
        if not kept:
            raise ValueError(
                f"layers_to_transform={config.layers_to_transform} keeps none of the targeted modules "
                f"(layer indices found: {sorted({layer_index(n) for n, _ in matched} - {None})})"
            )
    return kept, excluded


def _router_column(module: InjectedModule) -> str:
    if module.routed_by is None:
        return "own"
    if module.routed_by == module.name:
        return "own, shared"
    return f"shares {module.routed_by.rpartition('.')[2]}'s"


def _scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _check_scaling(name: str, alpha: float, scaling: float, dtype: torch.dtype) -> None:
    """The experts multiply their output by the scaling in the adapter dtype: 0 there trains nothing (every gradient
    is 0), inf turns the zero-initialised output side into NaN (inf * 0)."""
    value = torch.tensor(scaling, dtype=dtype)
    if value == 0 or not torch.isfinite(value):
        raise ValueError(
            f"alpha={alpha!r} (alpha or alpha_pattern) gives {name} the scaling {scaling:g}, which is {value.item()} "
            f"in {dtype}; choose alpha within a few orders of magnitude of the rank"
        )


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    # As PEFT's autocast_adapter_dtype: half-precision bases get fp32 adapters.
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


def inject(model: nn.Module, config: MoLoRAConfig) -> InjectionReport:
    """Wrap every targeted module in place and freeze the base; returns the report."""
    if not isinstance(config, MoLoRAConfig):
        raise ValueError(f"config must be a MoLoRAConfig, got {type(config).__name__}")
    config.validate()  # again: its fields may have been assigned since construction
    targets, excluded = find_targets(model, config)
    left_out = all_linear_names(model)[1] if config.target_modules == ALL_LINEAR else []
    names = [n for n, _ in targets]
    counts = config.expert_counts(names)  # once for all: a preset spreads over the targets' layers
    layers: list[tuple[str, MoLoRALinear]] = []
    records: list[InjectedModule] = []
    groups = routing_groups(model, targets, config, counts)
    built: dict[str, MoLoRALinear] = {}
    for name, module in targets:  # build everything before touching the model
        layer, record = _build_layer(model, name, module, config, counts[name], groups.get(name), built)
        built[name] = layer
        layers.append((name, layer))
        records.append(record)
    if config.routing_scope == "input":  # the member that runs first computes every member's input side
        for name, layer in layers:
            if name in groups:
                layer.input_group = tuple(built[n] for n, g in groups.items() if g == groups[name])

    for param in model.parameters():
        param.requires_grad_(False)
    keep_input_gradients(model)  # the frozen base must still pass the gradient down
    for name, layer in layers:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        routers = [] if layer.router is None else list(layer.router.parameters())
        for param in list(layer.experts.parameters()) + routers:
            param.requires_grad_(True)

    unused = {}
    for field_name in ("num_experts", "rank_pattern", "alpha_pattern"):
        patterns = getattr(config, field_name)
        if isinstance(patterns, dict) and not is_preset(patterns):
            used = {match[0] for n in names if (match := pattern_lookup(patterns, n))}
            if missing := [p for p in patterns if p not in used]:
                unused[field_name] = missing
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    report = InjectionReport(
        records, config.router, config.expert_type, dict(config.aux_losses), excluded, unused, trainable, total
    )
    report.left_out = left_out
    if is_preset(config.num_experts):
        report.experts_per_layer = dict(sorted({layer_index(n): counts[n] for n in names}.items()))
        report.allocation = describe_preset(config.num_experts)
    return report


def _build_layer(
    model: nn.Module,
    name: str,
    module: nn.Module,
    config: MoLoRAConfig,
    num_experts: int,
    group: tuple[str, str] | None,
    built: dict[str, MoLoRALinear],
) -> tuple[MoLoRALinear, InjectedModule]:
    """The MoLoRA layer for one target (not yet in the model) and its line of the report. `group`: (group key, the
    module that routes the group, built earlier) for routing_scope 'input'/'block'; None when it routes itself."""
    key, owner = group if group is not None else (None, None)
    d_in, d_out = _features(module)
    rank, alpha = config.rank_for(name), config.alpha_for(name)
    role = _role(model, name)
    weight = module.weight
    experts = build_experts(
        config.expert_type,
        d_in,
        d_out,
        num_experts + config.shared_experts,
        rank,
        init_zero=config.init_lora_weights,
        dtype=_adapter_dtype(weight),
        device=weight.device,
        share_a=config.share_lora_a,
    )
    if config.rank_gates:
        experts.rank_gates = RankGates(
            experts.num_experts, experts.rows_per_expert, config.rank_gate_temperature, device=weight.device
        )
    router = None
    if owner is None or owner == name:
        router_class = ROUTERS[config.router]
        overrides = router_class.role_options(config, role)
        if config.top_k is not None and config.top_k > num_experts:  # this module uses all its experts
            overrides["top_k"] = num_experts
        router = router_class.from_config(d_in, num_experts, config, **overrides).to(weight.device)
    scaling = _scaling(alpha, experts.adapter_rank, config.use_rslora)
    _check_scaling(name, alpha, scaling, _adapter_dtype(weight))
    deciding = router if router is not None else built[owner].router
    gate_multiplier = float(deciding.top_k or num_experts) if config.mixture_scaling == "sum" else 1.0
    spec = LayerSpec(
        name=name,
        scaling=scaling,
        dropout=config.dropout,
        role=role,
        aux_loss_names=tuple(n for n in config.aux_losses if n in AUX_LOSSES),  # read from the routing
        dispatch=config.dispatch,
        num_shared=config.shared_experts,
        gate_multiplier=gate_multiplier,
        block=key,
    )
    layer = MoLoRALinear(module, spec, experts, router, None if owner is None or owner == name else built[owner])
    shown_rank = rank if EXPERTS[config.expert_type].has_rank else None
    record = InjectedModule(
        name, type(module).__name__, d_in, d_out, num_experts, shown_rank, alpha, scaling, role, routed_by=owner
    )
    return layer, record


def routing_groups(
    model: nn.Module, targets: list[tuple[str, nn.Module]], config: MoLoRAConfig, counts: dict[str, int]
) -> dict[str, tuple[str, str]]:
    """{module name: (group key, owner)} for the modules that share a router: routing_scope='block', the adapted
    children of one parent; 'input', the children of one parent that match one `input_groups` entry (never
    cross-attention, whose siblings read different tensors). The owner is the group's first module, which routes
    for all of them; a group of one routes itself. Every module of a group must have the same number of experts
    (`counts`; a num_experts preset gives all modules of one layer the same count)."""
    if config.routing_scope == "module":
        return {}
    members: dict[str, list[str]] = {}
    for name, _ in targets:
        parent, _, child = name.rpartition(".")
        if config.routing_scope == "block":
            key = parent
        else:
            entry = next((g for g in config.input_groups if re.fullmatch(g, child)), None)
            if entry is None or _role(model, name) == "cross":
                continue
            key = f"{parent}:{entry}"
        members.setdefault(key, []).append(name)
    groups: dict[str, tuple[str, str]] = {}
    for key, names in members.items():
        if len(names) < 2:
            continue
        owner = names[0]
        for name in names:
            if counts[name] != counts[owner]:
                raise ValueError(
                    f"routing_scope={config.routing_scope!r}: {name} has {counts[name]} experts but "
                    f"{owner}, which routes its group {key!r}, has {counts[owner]}; the modules of a "
                    "group share one routing decision"
                )
            groups[name] = (key, owner)
    return groups


def molora_layers(model: nn.Module) -> list[tuple[str, MoLoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoLoRALinear)]


def unload(model: nn.Module) -> nn.Module:
    """Put the original modules back (adapters dropped) and return the model."""
    for name, layer in molora_layers(model):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base_layer)
    return model
