"""Adapter files: writing and reading them (fp32 or int8), and what a load could use and what it could not,
reported the way torch's load_state_dict does."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from molora.core.config import CONFIG_NAME, WEIGHTS_NAME, MoLoRAConfig, read_config_file
from molora.deploy.quantize import (
    QUANTIZATION_FORMAT,
    QUANTIZED_SUFFIX,
    SCALE_SUFFIX,
    dequantize_state_dict,
    is_quantized,
)
from molora.files.formats import ADAPTER_FORMAT, FORMAT_KEY, canonical_json, sha256_file
from molora.files.tensors import FLOATING, check_finite_values, load_tensors
from molora.utils import atomic_write


@dataclass
class AdapterLoadResult:
    """What an adapter load could not use (as torch's load_state_dict result), plus shape mismatches."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[tuple[str, list[int], list[int]]] = field(default_factory=list)  # key, checkpoint, model
    loaded_keys: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing_keys or self.unexpected_keys or self.mismatched_keys)

    def __str__(self) -> str:
        if self.ok:
            return f"adapter checkpoint fits: {len(self.loaded_keys)} tensors loaded"
        lines = [
            f"adapter checkpoint does not fit this model ({len(self.loaded_keys)} tensors fit, "
            f"{len(self.missing_keys)} missing, {len(self.unexpected_keys)} unexpected, "
            f"{len(self.mismatched_keys)} of another shape):"
        ]
        for title, keys in (
            ("missing (in the model, not in the checkpoint)", self.missing_keys),
            ("unexpected (in the checkpoint, not in the model)", self.unexpected_keys),
        ):
            if keys:
                lines.append(f"  {title}:")
                lines += _limited([f"    {m}: {', '.join(t)}" for m, t in _by_module(keys).items()], "modules")
        if self.mismatched_keys:
            lines.append("  shape mismatches (another base model, num_experts, rank or num_tasks):")
            lines += _limited([f"    {k}: checkpoint {c} vs model {m}" for k, c, m in self.mismatched_keys], "tensors")
        return "\n".join(lines)


_REPORT_LINES = 20


def _limited(lines: list[str], what: str) -> list[str]:
    if len(lines) <= _REPORT_LINES:
        return lines
    return [*lines[:_REPORT_LINES], f"    ... and {len(lines) - _REPORT_LINES} more {what}"]


def _by_module(keys: list[str]) -> dict[str, list[str]]:
    """{module: [tensor, ...]}, split at the last '.experts.' or '.router.' (module names may hold either word)."""
    grouped: dict[str, list[str]] = {}
    for key in keys:
        cut = max(key.rfind(".experts."), key.rfind(".router."))
        module, tensor = (key[:cut], key[cut + 1 :]) if cut >= 0 else key.rpartition(".")[::2]
        grouped.setdefault(module, []).append(tensor)
    return grouped


def adapter_file_digest(weights: Path, fields: dict[str, Any]) -> str:
    """sha256 of the weights file followed by the config's other fields as canonical JSON: one value that changes
    when either file does (integrity against a damaged or edited adapter, not trust: anyone can recompute it)."""
    digest = hashlib.sha256()
    sha256_file(weights, digest)
    digest.update(canonical_json(fields))
    return digest.hexdigest()


def write_adapter_files(directory: Path, state: dict[str, torch.Tensor], config: MoLoRAConfig) -> None:
    """adapter_model.safetensors (each file replaced whole, never half-written) and molora_config.json."""
    from safetensors.torch import save_file

    if directory.exists() and not directory.is_dir():
        raise ValueError(f"save_pretrained: {directory} exists and is not a directory")
    metadata = {"format": "pt"}
    if is_quantized(state):
        metadata["molora_quantization"] = QUANTIZATION_FORMAT
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    config.to_json_file(
        directory / CONFIG_NAME, sha256=adapter_file_digest(directory / WEIGHTS_NAME, config.file_fields())
    )


def read_adapter_config(directory: Path) -> tuple[MoLoRAConfig, int]:
    """The config of an adapter folder and its format version, the checksum checked (core.config.read_config_file)."""
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
    config, data = read_config_file(directory / CONFIG_NAME)
    if "sha256" in data:
        fields = {key: value for key, value in data.items() if key != "sha256"}
        if adapter_file_digest(weights, fields) != data["sha256"]:
            raise ValueError(
                f"{directory}: {WEIGHTS_NAME} or {CONFIG_NAME} changed since they were saved (their sha256 differs "
                f'from the one {CONFIG_NAME} records); if you edited the config on purpose, delete its "sha256" '
                "field to load it as it is now"
            )
    return config, data.get(FORMAT_KEY, 1)


def _b_as_rows(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Format 2 -> 3: LoRA B from PEFT's [E, d_out, r] to [E, r, d_out] (its int8 values and scales alike)."""
    suffixes = (".experts.lora_B", ".experts.lora_B" + QUANTIZED_SUFFIX, ".experts.lora_B" + SCALE_SUFFIX)
    return {k: v.transpose(1, 2).contiguous() if k.endswith(suffixes) and v.dim() == 3 else v for k, v in state.items()}


# An adapter's tensors from format v to v + 1, applied in turn up to ADAPTER_FORMAT (molora.files.formats).
ADAPTER_UPGRADES = {1: lambda state: state, 2: _b_as_rows}


def upgrade_tensors(state: dict[str, torch.Tensor], version: int) -> dict[str, torch.Tensor]:
    """Tensors named as the adapter's (any prefix) from format `version`'s layout to the current one: the adapter
    itself, or what an optimizer keeps per parameter (Adam's moments have the parameter's layout)."""
    for step in range(version, ADAPTER_FORMAT):
        state = ADAPTER_UPGRADES[step](state)
    return state


def read_adapter_tensors(
    directory: Path, expected: dict[str, torch.Tensor], strict: bool, version: int = ADAPTER_FORMAT
) -> dict[str, torch.Tensor]:
    """The adapter's tensors in the current format (converted from `version`'s), dequantised, after the header
    checks of molora.files.tensors; `expected` (the model's adapter state) bounds how many tensors the file may list:
    three per expected one covers int8 files (values and scales) and a strict=False load of a larger adapter."""
    weights = directory / WEIGHTS_NAME
    header, state = load_tensors(weights, max_entries=3 * len(expected) + 16)
    for name, entry in header.entries.items():
        allowed = ("I8",) if name.endswith(QUANTIZED_SUFFIX) else FLOATING
        if entry.dtype not in allowed:
            raise ValueError(f"{weights}: tensor {name!r} is {entry.dtype}; it must be one of {list(allowed)}")
    state = upgrade_tensors(state, version)
    if not is_quantized(state):
        return state
    try:
        plain = dequantize_state_dict(state)
    except ValueError as err:
        raise ValueError(f"{directory}: {err}") from None
    check_finite_values(weights, plain)  # finite int8 values times a finite scale can still overflow
    return plain


def _copy_into(target: torch.Tensor, source: torch.Tensor) -> None:
    """target <- source; a target sharded over processes (a DTensor, train.sharding=fsdp) takes its own part."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor) and not isinstance(source, DTensor):
        source = distribute_tensor(source.to(target.device), target.device_mesh, target.placements)
    target.copy_(source)


def copy_adapter_state(
    expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], strict: bool
) -> AdapterLoadResult:
    """Copy checkpoint tensors into the model's (`expected`); never re-initialises what does not fit.

    strict=True: a ValueError listing missing/unexpected keys by module and every shape mismatch, raised before any
    tensor is copied. strict=False: copy what fits, warn with the same report and return it.
    """
    result = AdapterLoadResult(
        missing_keys=sorted(set(expected) - set(state)), unexpected_keys=sorted(set(state) - set(expected))
    )
    for key, target in expected.items():
        if key not in state:
            continue
        if state[key].shape != target.shape:
            result.mismatched_keys.append((key, list(state[key].shape), list(target.shape)))
        else:
            result.loaded_keys.append(key)
    if strict and not result.ok:
        raise ValueError(str(result))
    with torch.no_grad():
        for key in result.loaded_keys:
            _copy_into(expected[key], state[key])
    if not result.ok:
        warnings.warn(f"{result}\n(strict=False: those tensors keep their current values)", stacklevel=3)
    return result
