"""PEFT LoRA adapters in and out of molora, with no dependency on peft itself (only its file format).

export_peft: a fixed weighting of the experts (one expert, a task's gate, user weights) is one LoRA of rank r' = the
rows of the experts it uses, so it is written exactly, without an SVD: A' stacks their input sides, B' their output
sides times their gates, and lora_alpha is chosen so that PEFT's scaling equals the module's.

from_peft_adapters: one expert per existing adapter (X-LoRA's use: route between the adapters you have). Each
adapter's scaling that differs from the module's is folded into its B, smaller ranks can be zero-padded, and an
export of expert i gives adapter i back.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from molora.core.config import MoLoRAConfig
from molora.core.patcher import molora_layers
from molora.deploy.merging import fixed_factors, resolve_fixed_gates
from molora.files.formats import read_json
from molora.files.hub import HUB_OPTIONS, adapter_folder, is_hub_id
from molora.files.tensors import load_tensors
from molora.utils import atomic_write, atomic_write_text

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_FILES = (PEFT_WEIGHTS_NAME, PEFT_CONFIG_NAME)  # what a Hub id downloads: never adapter_model.bin, a pickle
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the Hugging Face model; the adapter name is not saved
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<side>[AB])\.weight$")
# LoraConfig options that change what an adapter computes beyond B @ A (or add tensors molora has no place for).
_UNSUPPORTED_PEFT_OPTIONS = ("use_dora", "lora_bias", "modules_to_save", "trainable_token_indices", "target_parameters")
TRAINABLE_CHOICES = ("router", "all", "none")
# from_peft_adapters derives these from the adapters; an override would no longer describe them.
_DERIVED_OPTIONS = ("target_modules", "num_experts", "expert_type", "rank", "alpha", "rank_pattern", "alpha_pattern")
_DERIVED_OPTIONS += ("use_rslora", "share_lora_a", "shared_experts", "layers_to_transform", "exclude_modules")


def lora_scaling(alpha: float, rank: int, rslora: bool) -> float:
    """PEFT's (and molora's) scaling of B @ A: alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _alpha_for_scaling(scaling: float, rank: int, rslora: bool) -> float:
    return scaling * math.sqrt(rank) if rslora else scaling * rank


def _pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    """The value PEFT picks for `module` from rank_pattern/alpha_pattern: the first key matching a dotted suffix."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _common_and_patterns(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The most common value and {escaped module name: value} for the modules that differ from it."""
    common = Counter(values.values()).most_common(1)[0][0]
    return common, {re.escape(name): value for name, value in values.items() if value != common}


# Export ---------------------------------------------------------------------------------------------------------------
def _task_type(base: nn.Module) -> str | None:
    architectures = getattr(getattr(base, "config", None), "architectures", None) or [type(base).__name__]
    name = architectures[0]
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if name.endswith("ForConditionalGeneration") or name.endswith("ForSeq2SeqLM"):
        return "SEQ_2_SEQ_LM"
    return None


def export_peft(
    model: Any,
    path: str | Path,
    *,
    expert: int | None = None,
    task_id: int | None = None,
    weights: Sequence[float] | torch.Tensor | None = None,
) -> dict[str, Any]:
    """Write a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) that computes the mixture under
    one fixed weighting; returns the adapter config written. `peft.PeftModel.from_pretrained(base, path)` loads it.

    The weighting is resolved as merge_and_unload resolves it (a ValueError before anything is written when a module
    cannot take it); experts with gate 0 are left out of the adapter's rank.
    """
    from safetensors.torch import save_file

    if getattr(model, "molora_config", None) is None:  # a MoLoRAModel (the model sits above this module)
        raise ValueError(f"export_peft needs a MoLoRAModel, got {type(model).__name__}")
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"export_peft: {directory} exists and is not a directory")
    base = model.base_model
    layers = molora_layers(base)
    gates = resolve_fixed_gates(layers, task_id=task_id, expert=expert, weights=weights)
    config = model.molora_config
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    with torch.no_grad():
        for name, layer in layers:
            input_side, output_side = fixed_factors(layer, gates[name], drop_zero=True)
            rank = input_side.shape[0]
            ranks[name] = rank
            if rank == layer.experts.adapter_rank:  # the module's own alpha, exactly (a round trip keeps it)
                alphas[name] = config.alpha_for(name)
            else:
                alphas[name] = _alpha_for_scaling(layer.scaling, rank, config.use_rslora)
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = input_side.detach().contiguous().cpu()
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = output_side.detach().contiguous().cpu()
    rank, rank_pattern = _common_and_patterns(ranks)
    alpha, alpha_pattern = _common_and_patterns(alphas)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": _task_type(base),
        "base_model_name_or_path": getattr(getattr(base, "config", None), "_name_or_path", None) or None,
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": sorted(ranks),
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "fan_in_fan_out": all(not isinstance(layer.base_layer, nn.Linear) for _, layer in layers),
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    atomic_write(directory / PEFT_WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    # not sort_keys: PEFT takes the first rank_pattern/alpha_pattern key that matches
    atomic_write_text(directory / PEFT_CONFIG_NAME, json.dumps(adapter_config, indent=2) + "\n")
    return adapter_config


# Import ---------------------------------------------------------------------------------------------------------------
@dataclass
class PeftAdapter:
    """One PEFT LoRA adapter read from disk: per module (A [r, d_in], B [d_out, r]) and PEFT's scaling of B @ A."""

    path: Path
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    alphas: dict[str, float]
    rslora: bool
    dropout: float

    def rank(self, module: str) -> int:
        return self.factors[module][0].shape[0]

    def scaling(self, module: str) -> float:
        return lora_scaling(self.alphas[module], self.rank(module), self.rslora)


def _read_peft_config(directory: Path) -> dict[str, Any]:
    config_path = directory / PEFT_CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {PEFT_CONFIG_NAME} in {directory} (not a PEFT adapter folder)")
    config = read_json(config_path, "PEFT adapter config")
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{directory}: only LoRA adapters become experts (peft_type 'LORA'), got {config.get('peft_type')!r}"
        )
    used = [key for key in _UNSUPPORTED_PEFT_OPTIONS if config.get(key)]
    if used:
        raise ValueError(
            f"{directory}: {', '.join(f'{key}={config[key]!r:.80}' for key in used)} adds more than B @ A per module, "
            "which a molora expert cannot hold"
        )
    if config.get("bias", "none") != "none":
        raise ValueError(f"{directory}: bias={config['bias']!r:.80} trains base biases; only bias='none' is supported")
    _check_peft_types(config, config_path)
    return config


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_peft_types(config: dict[str, Any], where: Path) -> None:
    """The fields molora reads, type-checked: a file from elsewhere gets a ValueError, not a TypeError later."""
    alphas = config.get("alpha_pattern") or {}
    checks = {
        "lora_alpha": _is_number(config.get("lora_alpha", 8)),
        "alpha_pattern": isinstance(alphas, dict) and all(_is_number(v) for v in alphas.values()),
        "use_rslora": isinstance(config.get("use_rslora", False), bool),
        "lora_dropout": _is_number(config.get("lora_dropout", 0.0)) and 0 <= config.get("lora_dropout", 0.0) < 1,
    }
    for key in alphas:
        try:
            re.compile(key)
        except (re.error, TypeError):
            checks["alpha_pattern"] = False
    wrong = [key for key, ok in checks.items() if not ok]
    if wrong:
        raise ValueError(f"{where}: {wrong[0]}={config.get(wrong[0])!r:.80} is not a value PEFT writes there")


def _read_peft_factors(directory: Path, max_entries: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    weights = directory / PEFT_WEIGHTS_NAME
    if not weights.is_file():
        hint = " (adapter_model.bin found: save it again with safe_serialization=True)"
        raise FileNotFoundError(
            f"no {PEFT_WEIGHTS_NAME} in {directory}" + (hint if (directory / "adapter_model.bin").exists() else "")
        )
    _, state = load_tensors(weights, max_entries)
    sides: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        match = _PEFT_KEY.match(key)
        if match is None or tensor.dim() != 2 or not tensor.is_floating_point():
            unknown.append(key)
            continue
        sides.setdefault(match["module"], {})[match["side"]] = tensor
    if unknown:
        raise ValueError(f"{weights}: tensors that are not LoRA A/B matrices of a linear layer: {unknown[:5]}")
    factors = {}
    for module, pair in sorted(sides.items()):
        if set(pair) != {"A", "B"} or pair["A"].shape[0] != pair["B"].shape[1] or pair["A"].shape[0] == 0:
            shapes = {side: list(t.shape) for side, t in pair.items()}
            raise ValueError(f"{weights}: module {module} needs lora_A [r, d_in] and lora_B [d_out, r], got {shapes}")
        factors[module] = (pair["A"], pair["B"])
    if not factors:
        raise ValueError(f"{weights} holds no LoRA tensors")
    return factors


def read_peft_adapter(path: str | Path, max_entries: int = 100_000) -> PeftAdapter:
    """A PEFT LoRA adapter folder; its weights file may list at most `max_entries` tensors (refused unread past it)."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a folder (a PEFT adapter is a folder with {PEFT_CONFIG_NAME})")
    config = _read_peft_config(directory)
    factors = _read_peft_factors(directory, max_entries)
    default_alpha = config.get("lora_alpha", 8)
    alphas = {module: float(_pattern_value(config.get("alpha_pattern"), module, default_alpha)) for module in factors}
    return PeftAdapter(
        directory, factors, alphas, bool(config.get("use_rslora", False)), float(config.get("lora_dropout", 0.0))
    )


def _check_same_modules(adapters: list[PeftAdapter]) -> list[str]:
    modules = sorted(adapters[0].factors)
    for adapter in adapters[1:]:
        extra = sorted(set(adapter.factors) - set(modules))
        missing = sorted(set(modules) - set(adapter.factors))
        if extra or missing:
            raise ValueError(
                f"every adapter must adapt the same modules: {adapter.path} adds {extra[:4]} and lacks {missing[:4]} "
                f"against {adapters[0].path}"
            )
    if len({adapter.rslora for adapter in adapters}) > 1:
        raise ValueError("the adapters mix use_rslora=True and False; molora scales every expert of a module alike")
    return modules


def _module_plan(adapters: list[PeftAdapter], module: str, pad_ranks: bool) -> tuple[int, float, list[float]]:
    """(molora rank, molora alpha, factor per adapter folded into its B) for one module."""
    ranks = [adapter.rank(module) for adapter in adapters]
    if len(set(ranks)) > 1 and not pad_ranks:
        raise ValueError(
            f"module {module} has ranks {ranks} across the adapters; molora's experts share one rank per module: pass "
            "pad_ranks=True to zero-pad the smaller ones (the same function, more parameters)"
        )
    rank = max(ranks)
    alphas = [adapter.alphas[module] for adapter in adapters]
    if len(set(ranks)) == 1 and len(set(alphas)) == 1:
        return rank, alphas[0], [1.0] * len(adapters)
    rslora = adapters[0].rslora
    alpha = _alpha_for_scaling(adapters[0].scaling(module), rank, rslora)
    scaling = lora_scaling(alpha, rank, rslora)
    return rank, alpha, [adapter.scaling(module) / scaling for adapter in adapters]


@dataclass
class PeftImport:
    """What from_peft_adapters builds, read and checked before the base model is touched."""

    config: MoLoRAConfig
    adapters: list[PeftAdapter]
    plans: dict[str, tuple]
    trainable: str


def plan_from_peft(
    base: nn.Module,
    adapters: Sequence[str | Path],
    *,
    router: str = "softmax",
    trainable: str = "router",
    pad_ranks: bool = False,
    **options: Any,
) -> PeftImport:
    """Everything MoLoRAModel.from_peft_adapters needs, read and checked: the config of the mixture, the adapters,
    each module's plan (rank, alpha, each adapter's factor)."""
    if isinstance(adapters, (str, Path)) or not adapters:
        raise ValueError("adapters must be a non-empty list of PEFT adapter folders")
    if trainable not in TRAINABLE_CHOICES:
        raise ValueError(f"trainable must be one of {list(TRAINABLE_CHOICES)}, got {trainable!r}")
    derived = sorted(set(options) & set(_DERIVED_OPTIONS))
    if derived:
        raise ValueError(f"{derived} are read from the adapters and cannot be given")
    hub = {key: options.pop(key) for key in HUB_OPTIONS if key in options}
    folders = [adapter_folder(path, PEFT_FILES, **hub) if is_hub_id(path) else Path(path) for path in adapters]
    max_entries = 2 * sum(1 for _ in base.modules()) + 16  # A and B per module at most
    read = [read_peft_adapter(folder, max_entries) for folder in folders]
    modules = _check_same_modules(read)
    plans = {module: _module_plan(read, module, pad_ranks) for module in modules}
    rank, rank_pattern = _common_and_patterns({m: plan[0] for m, plan in plans.items()})
    alpha, alpha_pattern = _common_and_patterns({m: plan[1] for m, plan in plans.items()})
    settings = dict(
        target_modules=modules,
        num_experts=len(read),
        expert_type="lora",
        rank=rank,
        alpha=alpha,
        rank_pattern=rank_pattern or None,
        alpha_pattern=alpha_pattern or None,
        use_rslora=read[0].rslora,
        dropout=read[0].dropout,
        router=router,
        mixture_scaling="mean",
    )
    return PeftImport(MoLoRAConfig(**(settings | options)), read, plans, trainable)


def load_peft_experts(model: Any, plan: PeftImport) -> None:
    """The adapters of `plan` into the experts of `model` (the MoLoRAModel built from plan.config), and which parts
    train; a ValueError when their tensors do not fit the base model (the caller takes the layers out again)."""
    _copy_adapters(model, plan.adapters, plan.plans)
    _set_trainable(model, plan.trainable)


@torch.no_grad()
def _copy_adapters(model: Any, adapters: list[PeftAdapter], plans: dict[str, tuple]) -> None:
    layers = dict(molora_layers(model.base_model))
    wrong = []
    for module, layer in layers.items():
        experts = layer.experts
        for adapter in adapters:
            input_side, output_side = adapter.factors[module]
            if input_side.shape[1] != experts.in_features or output_side.shape[0] != experts.out_features:
                wrong.append(
                    f"{module}: {adapter.path} has A {list(input_side.shape)}, B {list(output_side.shape)}; the base "
                    f"layer is {experts.in_features} -> {experts.out_features}"
                )
    if wrong:
        raise ValueError("the adapters do not fit this base model:\n  " + "\n  ".join(wrong[:8]))
    for module, layer in layers.items():
        experts = layer.experts
        experts.lora_A.zero_()
        experts.lora_B.zero_()
        for index, (adapter, factor) in enumerate(zip(adapters, plans[module][2], strict=True)):
            input_side, output_side = adapter.factors[module]
            rank = input_side.shape[0]
            experts.lora_A[index, :rank].copy_(input_side)
            experts.lora_B[index, :rank].copy_((output_side * factor if factor != 1.0 else output_side).T)


def _set_trainable(model: Any, trainable: str) -> None:
    for _, layer in molora_layers(model.base_model):
        layer.experts.requires_grad_(trainable == "all")
        if layer.router is not None:
            layer.router.requires_grad_(trainable != "none")
    if trainable == "none":
        model.eval()
