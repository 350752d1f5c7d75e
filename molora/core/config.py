"""MoLoRAConfig: everything needed to inject a mixture of LoRA experts, validated before the model is touched."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from molora.core import allocation
from molora.core.allocation import NUM_QUARTERS, is_preset
from molora.core.checks import check_number
from molora.files.formats import ADAPTER_FORMAT, FORMAT_KEY, check_keys, format_version, read_json
from molora.version import __version__

# PEFT's shorthand for target_modules: every nn.Linear and Conv1D of the model but its output head.
ALL_LINEAR = "all-linear"

MIXTURE_SCALINGS = ("mean", "sum")
ROUTING_SCOPES = ("module", "input", "block")
# routing_scope="input": siblings that read the same input tensor, by child name (fullmatch) within one parent.
DEFAULT_INPUT_GROUPS = ["q_proj|k_proj|v_proj", "gate_proj|up_proj", "query|key|value", "wq|wk|wv", "w1|w3"]
DISPATCHES = ("auto", "dense", "grouped")
# Routers divide fp32 logits by the temperature: at 1e-3 logits of ~100 become 1e5 and their squared logsumexp (the
# z-loss) 1e10, far from fp32's 3e38; 5e-324 is 0 in fp32 and gave NaN outputs. Lower is an argmax in all but name.
MIN_ROUTER_TEMPERATURE = 1e-3
CONFIG_NAME = "molora_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _check_patterns(name: str, value: Any, *, minimum: int | float, kind: type, strict: bool = False) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict {{regex: value}} or None, got {type(value).__name__}")
    for key, val in value.items():
        if not isinstance(key, str):
            raise ValueError(f"{name}: keys must be regex strings, got {key!r}")
        try:
            # compiled as pattern_lookup uses it: a global flag such as (?i) is an error there, not at the start
            re.compile(_suffix_regex(key))
        except re.error as err:
            raise ValueError(f"{name}: pattern {key!r} is not a valid regex ({err})") from None
        check_number(f"{name}[{key!r}]", val, minimum=minimum, kind=kind, strict=strict)


def _check_expert_preset(name: str, value: dict[str, Any]) -> None:
    """The preset form of num_experts: {preset: NAME, min: a, max: b} or {preset: [q0, q1, q2, q3]} (allocation.py)."""
    if unknown := sorted(set(value) - set(allocation.PRESET_KEYS), key=str):
        # an ablation row's preset merged over a base {regex: int} dict lands here too
        raise ValueError(
            f"{name}: a preset takes only the keys {list(allocation.PRESET_KEYS)}, got also {unknown} "
            "(a preset cannot be mixed with {regex: int} entries)"
        )
    preset = value["preset"]
    if isinstance(preset, (list, tuple)):
        if len(preset) != NUM_QUARTERS or "min" in value or "max" in value:
            raise ValueError(
                f"{name}: explicit per-quarter counts are a list of {NUM_QUARTERS} ints without min/max, got {value!r}"
            )
        for quarter, count in enumerate(preset):
            check_number(f"{name}['preset'][{quarter}]", count, minimum=1, kind=int)
        return
    if not isinstance(preset, str) or preset not in allocation.PRESETS:
        raise ValueError(
            f"{name}['preset'] must be one of {sorted(allocation.PRESETS)} or a list of {NUM_QUARTERS} per-quarter "
            f"counts, got {preset!r}"
        )
    if "min" not in value or "max" not in value:
        raise ValueError(f"{name}: preset {preset!r} needs 'min' and 'max' (experts per layer), got {value!r}")
    check_number(f"{name}['min']", value["min"], minimum=1, kind=int)
    check_number(f"{name}['max']", value["max"], minimum=1, kind=int)
    if value["max"] < value["min"]:
        raise ValueError(f"{name}: max ({value['max']}) must be >= min ({value['min']})")


def _check_choice(name: str, value: Any, choices: Any) -> None:
    # isinstance first: an unhashable value (a list) would raise TypeError from `in` on a dict.
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


def _suffix_regex(key: str) -> str:
    return rf"(?:.*\.)?(?:{key})"


def pattern_lookup(patterns: dict[str, Any] | None, module_name: str) -> tuple[str, Any] | None:
    """First {regex: value} entry matching the module name or one of its dotted suffixes (as PEFT's rank_pattern)."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(_suffix_regex(key), module_name):
            return key, value
    return None


# PEFT LoraConfig's names, for a PEFT user's first keyword: the field molora calls it, or why molora has none.
PEFT_SPELLINGS = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout"}
PEFT_ONLY = {
    "task_type": "molora needs no task type: it wraps the model it is given, whatever its head",
    "bias": "molora trains no biases (PEFT's default, bias='none')",
    "fan_in_fan_out": "molora reads GPT-2's Conv1D layout by itself",
    "modules_to_save": "molora trains only the experts and routers; unfreeze other modules yourself",
}


def peft_hint(key: str, prefix: str = "") -> str | None:
    """'did you mean ...' for a PEFT LoraConfig name that is not a MoLoRAConfig field, or None; `prefix` is put
    before the field name suggested (a YAML key's section, 'molora.')."""
    if key in PEFT_SPELLINGS:
        return f"did you mean {prefix + PEFT_SPELLINGS[key]!r}? ({key!r} is PEFT's name for it)"
    if key in PEFT_ONLY:
        return f"{key!r} is a PEFT LoraConfig field: {PEFT_ONLY[key]}"
    return None


@dataclass
class MoLoRAConfig:
    """Configuration of a mixture of LoRA experts; keys mirror the YAML configs.

    target_modules: list -> exact module name or dotted suffix (as PEFT); str -> regex matched against the full name;
        "all-linear" (PEFT's shorthand) -> every nn.Linear and Conv1D but the output head.
    num_experts: int; {regex: int} per module, the first matching key wins; or a per-layer preset (MoLA),
        {preset: uniform|increasing|decreasing|hourglass, min: int, max: int} or {preset: [q0, q1, q2, q3]}, counts
        per quarter of the adapted layers (molora/core/allocation.py states the rule).
    """

    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    exclude_modules: list[str] | str | None = None
    num_experts: int | dict[str, Any] = 4
    expert_type: str = "lora"
    rank: int = 8
    alpha: float = 16
    dropout: float = 0.0
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    use_rslora: bool = False
    router: str = "softmax"
    top_k: int | None = None
    # Sparse routers: "dense" computes every expert and zeroes the unselected gates, "grouped" computes each expert
    # on its own tokens only; "auto" picks grouped on CPU from E/k >= 16 (bench/bench_dispatch.py), dense elsewhere.
    dispatch: str = "auto"
    router_temperature: float = 1.0
    router_jitter: float = 0.0
    intuition_pooling: str = "causal"
    intuition_hidden: int | None = None
    num_tasks: int | None = None
    aux_losses: dict[str, float] = field(default_factory=lambda: {"balance": 0.01, "z": 0.001})
    layers_to_transform: int | list[int] | None = None
    init_lora_weights: bool = True
    # How the routed gates scale the experts. "mean": the gates sum to 1, so a near-uniform dense mixture of E experts
    # is one rank-E*r LoRA scaled by 1/E; "sum": the gates are multiplied by the number of experts each token uses
    # (E dense, k top-k), so a uniform mixture starts with the update size of E LoRAs at alpha/r, as one LoRA does.
    mixture_scaling: str = "mean"
    # Always-on experts (DeepSeekMoE's shared experts) of the same rank, gate 1, beside the routed ones.
    shared_experts: int = 0
    # HydraLoRA: one input side A shared by every expert of a module, a routed output side B per expert.
    share_lora_a: bool = False
    # Std of the router's output weights at initialisation (normal); None keeps each router's default.
    router_init_std: float | None = None
    # Global-batch load balancing: the balance loss reads the routed fraction over the last N forwards (this one
    # plus N-1 earlier, detached), not one micro-batch, so single sequences may specialise.
    balance_window: int = 1
    # "module": every adapted linear routes on its own input. "input": the adapted siblings that read one input
    # tensor (an `input_groups` entry within one parent: q/k/v, gate/up) share one router and one input-side matmul
    # (their experts' input sides and the router's rows stacked), made by the first of them. "block": the adapted
    # linears of one parent module (an FFN's gate/up/down, MixLoRA's layout) share one routing decision, made by the
    # first of them on the block input.
    routing_scope: str = "module"
    input_groups: list[str] = field(default_factory=lambda: list(DEFAULT_INPUT_GROUPS))
    # A learned gate on every rank component of every expert (relaxed Bernoulli while training, hard in eval), with
    # aux loss rank_sparsity pushing gates closed; molora.core.rank_gates.prune_ranks then removes the closed ones.
    rank_gates: bool = False
    rank_gate_temperature: float = 0.5

    def __post_init__(self) -> None:
        self.validate()
        from molora.core.routers import ROUTERS

        for message in ROUTERS[self.router].config_warnings(self):
            warnings.warn(message, stacklevel=3)

    def validate(self) -> None:
        """Check every field (ValueError naming it) and normalise the shorthands (top_k defaults, an int layer).

        Injection calls it again: the fields are plain attributes, so a config can be changed after construction.
        """
        self._validate_targets()
        self._validate_experts()
        self._validate_routing()
        self._validate_losses_and_levers()

    def _validate_targets(self) -> None:
        if self.target_modules is None:
            raise ValueError(
                "target_modules=None (PEFT's per-architecture default list) is not supported: name the modules, give "
                f"a regex, or {ALL_LINEAR!r}"
            )
        if isinstance(self.target_modules, (list, tuple, set, frozenset)):
            # a set (as PEFT allows) in a fixed order, so the config round-trips through JSON unchanged
            names = sorted(self.target_modules) if isinstance(self.target_modules, (set, frozenset)) else None
            self.target_modules = names if names is not None else list(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(
                    f"target_modules must be a non-empty list of names or a regex, got {self.target_modules!r}"
                )
            if any(t.lower() == ALL_LINEAR for t in self.target_modules):
                raise ValueError(
                    f"target_modules: {ALL_LINEAR!r} is a shorthand on its own, not a module name: give "
                    f"target_modules={ALL_LINEAR!r} (a string, as in PEFT), not a list holding it"
                )
        elif isinstance(self.target_modules, str):
            if self.target_modules.lower() == ALL_LINEAR:
                self.target_modules = ALL_LINEAR  # PEFT compares it case-insensitively
            else:
                self._check_regex("target_modules", self.target_modules)
        else:
            raise ValueError(f"target_modules must be a list of names or a regex string, got {self.target_modules!r}")
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = list(self.exclude_modules)
            if not all(isinstance(t, str) and t for t in self.exclude_modules):
                raise ValueError(
                    f"exclude_modules must be a list of names, a regex or None, got {self.exclude_modules!r}"
                )
        elif isinstance(self.exclude_modules, str):
            self._check_regex("exclude_modules", self.exclude_modules)
        elif self.exclude_modules is not None:
            raise ValueError(f"exclude_modules must be a list, a regex string or None, got {self.exclude_modules!r}")
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_to_transform is not None:
            if not isinstance(self.layers_to_transform, (list, tuple)) or not self.layers_to_transform:
                raise ValueError(
                    f"layers_to_transform must be an int or a non-empty list, got {self.layers_to_transform!r}"
                )
            self.layers_to_transform = list(self.layers_to_transform)
            for index in self.layers_to_transform:
                check_number("layers_to_transform", index, minimum=0, kind=int)

    def _validate_experts(self) -> None:
        # Imported here so that the registries (which users may extend) stay below the config in the dependency order.
        from molora.core.experts import EXPERTS

        if is_preset(self.num_experts):
            _check_expert_preset("num_experts", self.num_experts)
            if isinstance(self.num_experts["preset"], tuple):  # a list, as it comes back from JSON
                self.num_experts = {**self.num_experts, "preset": list(self.num_experts["preset"])}
        elif isinstance(self.num_experts, dict):
            if not self.num_experts:
                raise ValueError("num_experts must be an int or a non-empty {regex: int} dict")
            _check_patterns("num_experts", self.num_experts, minimum=1, kind=int)
        else:
            check_number("num_experts", self.num_experts, minimum=1, kind=int)
        _check_choice("expert_type", self.expert_type, EXPERTS)
        check_number("rank", self.rank, minimum=1, kind=int)
        check_number("alpha", self.alpha, minimum=0, kind=float, strict=True)
        check_number("dropout", self.dropout, minimum=0, kind=float)
        if self.dropout >= 1:
            raise ValueError(f"dropout must be < 1, got {self.dropout!r}")
        _check_patterns("rank_pattern", self.rank_pattern, minimum=1, kind=int)
        # > 0 as alpha: a zero scaling would leave the module's experts without gradient
        _check_patterns("alpha_pattern", self.alpha_pattern, minimum=0, kind=float, strict=True)

        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora must be True or False, got {self.use_rslora!r}")
        if not isinstance(self.init_lora_weights, bool):
            raise ValueError(f"init_lora_weights must be True or False, got {self.init_lora_weights!r}")
        check_number("shared_experts", self.shared_experts, minimum=0, kind=int)
        if not isinstance(self.share_lora_a, bool):
            raise ValueError(f"share_lora_a must be True or False, got {self.share_lora_a!r}")
        if self.share_lora_a and not EXPERTS[self.expert_type].can_share_input_side:
            sharing = sorted(name for name, cls in EXPERTS.items() if cls.can_share_input_side)
            raise ValueError(f"share_lora_a (HydraLoRA) needs expert_type in {sharing}, got {self.expert_type!r}")

    def _validate_routing(self) -> None:
        from molora.core.pooling import POOLINGS
        from molora.core.routers import ROUTERS

        _check_choice("router", self.router, ROUTERS)
        check_number("router_temperature", self.router_temperature, minimum=0, kind=float, strict=True)
        if self.router_temperature < MIN_ROUTER_TEMPERATURE:
            raise ValueError(
                f"router_temperature must be >= {MIN_ROUTER_TEMPERATURE:g} (the fp32 logits are divided by it, and "
                f"a tinier one overflows them or the z-loss to inf/NaN), got {self.router_temperature!r}"
            )
        check_number("router_jitter", self.router_jitter, minimum=0, kind=float)
        _check_choice("dispatch", self.dispatch, DISPATCHES)
        _check_choice("intuition_pooling", self.intuition_pooling, POOLINGS)
        if self.intuition_hidden is not None:
            check_number("intuition_hidden", self.intuition_hidden, minimum=2, kind=int)
        if self.num_tasks is not None:
            check_number("num_tasks", self.num_tasks, minimum=1, kind=int)
        ROUTERS[self.router].check_config(self)  # after the fields it reads (num_experts, num_tasks) are checked
        if self.shared_experts and self.dispatch == "grouped":
            raise ValueError("shared_experts needs dispatch 'dense' or 'auto': grouped dispatch sorts routed tokens")
        if self.router_init_std is not None:
            check_number("router_init_std", self.router_init_std, minimum=0, kind=float)
        _check_choice("routing_scope", self.routing_scope, ROUTING_SCOPES)
        if self.routing_scope != "module" and not ROUTERS[self.router].shareable:
            raise ValueError(
                f"routing_scope={self.routing_scope!r} shares one router across modules; router={self.router!r} "
                "cannot be shared"
            )
        if not isinstance(self.input_groups, (list, tuple)) or not all(isinstance(g, str) for g in self.input_groups):
            raise ValueError(f"input_groups must be a list of regex strings, got {self.input_groups!r}")
        self.input_groups = list(self.input_groups)
        for pattern in self.input_groups:
            self._check_regex("input_groups", pattern)

    def _validate_losses_and_levers(self) -> None:
        from molora.core.experts import EXPERTS
        from molora.core.losses import known_aux_losses

        if not isinstance(self.aux_losses, dict):
            raise ValueError(f"aux_losses must be a dict {{name: weight}}, got {self.aux_losses!r}")
        for name, weight in self.aux_losses.items():
            if name not in known_aux_losses():
                raise ValueError(f"aux_losses: unknown loss {name!r}; known: {known_aux_losses()}")
            check_number(f"aux_losses[{name!r}]", weight, minimum=0, kind=float)
        if not isinstance(self.rank_gates, bool):
            raise ValueError(f"rank_gates must be True or False, got {self.rank_gates!r}")
        check_number("rank_gate_temperature", self.rank_gate_temperature, minimum=0, kind=float, strict=True)
        if self.rank_gates and not EXPERTS[self.expert_type].has_rank:
            raise ValueError(
                f"rank_gates needs experts with a rank (expert_type 'lora'); a {self.expert_type!r} expert is one "
                "rank component, so gating it would remove whole experts"
            )
        if "rank_sparsity" in self.aux_losses and not self.rank_gates:
            raise ValueError("aux_losses: rank_sparsity penalises rank gates; set rank_gates=True to have them")
        _check_choice("mixture_scaling", self.mixture_scaling, MIXTURE_SCALINGS)
        check_number("balance_window", self.balance_window, minimum=1, kind=int)

    @staticmethod
    def _check_regex(name: str, pattern: str) -> None:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{name}: {pattern!r} is not a valid regex ({err})") from None

    # Per-module values -------------------------------------------------------------------------------------------
    def experts_for(self, module_name: str) -> int:
        if isinstance(self.num_experts, int):
            return self.num_experts
        if is_preset(self.num_experts):
            raise ValueError(
                f"num_experts: a preset allocates by position among the adapted layers, so module {module_name!r} "
                "alone does not fix its count; use expert_counts(every targeted name)"
            )
        match = pattern_lookup(self.num_experts, module_name)
        if match is None:
            raise ValueError(
                f"num_experts: no pattern in {list(self.num_experts)} matches module {module_name!r}; "
                "add a catch-all such as '.*'"
            )
        return match[1]

    def expert_counts(self, module_names: list[str]) -> dict[str, int]:
        """{module: experts} for every targeted module; a preset needs them all at once (it spreads over their
        layers), so the patcher asks once, after finding the targets and before building any layer."""
        if is_preset(self.num_experts):
            per_layer = allocation.layer_allocation(self.num_experts, module_names)
            return {name: per_layer[allocation.layer_index(name)] for name in module_names}
        return {name: self.experts_for(name) for name in module_names}

    def largest_num_experts(self) -> int:
        """The most experts any module can get (top_k may not exceed it; modules with fewer use all of theirs)."""
        if is_preset(self.num_experts):
            return max(allocation.preset_quarters(self.num_experts))
        if isinstance(self.num_experts, dict):
            return max(self.num_experts.values())
        return self.num_experts

    def rank_for(self, module_name: str) -> int:
        match = pattern_lookup(self.rank_pattern, module_name)
        return self.rank if match is None else match[1]

    def alpha_for(self, module_name: str) -> float:
        match = pattern_lookup(self.alpha_pattern, module_name)
        return self.alpha if match is None else match[1]

    # Serialisation -----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["molora_version"] = __version__
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoLoRAConfig:
        """The config of `data`'s fields (and the molora_version to_dict adds); an unknown key is a ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        check_keys(data, known | {"molora_version"}, "MoLoRAConfig")
        return cls(**{key: value for key, value in data.items() if key in known})

    def to_json_file(self, path: str | Path, sha256: str | None = None) -> None:
        """The config as an adapter file of the current format; `sha256` as adapter_file_digest computed it."""
        from molora.utils import atomic_write_text

        # Top-level keys sorted; pattern dicts (num_experts, rank_pattern, ...) keep their order: the first match wins.
        data = dict(sorted(self.file_fields().items()))
        if sha256 is not None:
            data["sha256"] = sha256
        atomic_write_text(Path(path), json.dumps(data, indent=2) + "\n")

    def file_fields(self) -> dict[str, Any]:
        """What molora_config.json holds but for its checksum: the fields, molora_version and format_version."""
        return {**self.to_dict(), FORMAT_KEY: ADAPTER_FORMAT}

    @classmethod
    def from_json_file(cls, path: str | Path) -> MoLoRAConfig:
        return read_config_file(Path(path))[0]


# Keys an adapter config holds besides the fields, by format version (molora.files.formats lists the formats).
_CHECKSUMMED_KEYS = ("molora_version", FORMAT_KEY, "sha256")  # format 2 on
_FILE_KEYS = {1: ("molora_version",), 2: _CHECKSUMMED_KEYS, 3: _CHECKSUMMED_KEYS}


def read_config_file(path: Path) -> tuple[MoLoRAConfig, dict[str, Any]]:
    """The config in molora_config.json and the file's JSON as written; every problem a ValueError naming the file.

    A newer format is refused; the fields of formats 1-3 are the same (what changed is in the weights file).
    """
    data = read_json(path, "molora adapter config")
    version = format_version(data, path, ADAPTER_FORMAT, "molora adapter")
    fields = {key: value for key, value in data.items() if key not in _FILE_KEYS[version]}
    known = {f.name for f in dataclasses.fields(MoLoRAConfig)}
    check_keys(fields, known | set(_FILE_KEYS[version]), str(path))
    for key in ("molora_version", "sha256"):
        if key in data and not isinstance(data[key], str):
            raise ValueError(f"{path}: {key} must be a string, got {data[key]!r}")
    try:
        return MoLoRAConfig.from_dict(fields), data
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: {err}") from None


_dataclass_init = MoLoRAConfig.__init__


@functools.wraps(_dataclass_init)
def _init_naming_unknown_fields(self: MoLoRAConfig, *args: Any, **kwargs: Any) -> None:
    """The dataclass __init__, but an unknown keyword is a TypeError that names the field meant (PEFT's r, lora_alpha,
    ...; or the closest field name), as an unknown YAML key is."""
    fields = [f.name for f in dataclasses.fields(MoLoRAConfig)]
    for key in kwargs:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
            hint = peft_hint(key) or (f"did you mean {close[0]!r}?" if close else f"fields are {fields}")
            raise TypeError(f"MoLoRAConfig got an unknown field {key!r}; {hint}")
    _dataclass_init(self, *args, **kwargs)


MoLoRAConfig.__init__ = _init_naming_unknown_fields
