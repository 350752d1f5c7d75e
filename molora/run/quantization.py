"""`model.quantization`: load a run's base model quantized (QLoRA), by the libraries' own transformers configs.

A registry of named settings: a new one is an entry here. The experts sit on top of the quantized linears
(molora.core.base_layers) and train in fp32; the base computes in `train.bf16`'s dtype where the library lets it.
"""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Quantization:
    package: str  # the module that must be importable
    install: str  # what pip takes
    description: str
    make: Callable[[torch.dtype], Any]  # compute dtype -> the transformers quantization_config


def _bnb_4bit(quant_type: str, double: bool) -> Callable[[torch.dtype], Any]:
    def make(dtype: torch.dtype) -> Any:
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double,
            bnb_4bit_compute_dtype=dtype,
        )

    return make


def _bnb_8bit(dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)


def _torchao_int8(dtype: torch.dtype) -> Any:
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


BNB = "pip install bitsandbytes  (or pip install 'molora[quantized]')"
TORCHAO = "pip install torchao  (or pip install 'molora[quantized]')"
QUANTIZATIONS: dict[str, Quantization] = {
    "nf4": Quantization("bitsandbytes", BNB, "bitsandbytes 4-bit NF4, double quantization", _bnb_4bit("nf4", True)),
    "fp4": Quantization("bitsandbytes", BNB, "bitsandbytes 4-bit FP4", _bnb_4bit("fp4", False)),
    "int8": Quantization("bitsandbytes", BNB, "bitsandbytes LLM.int8()", _bnb_8bit),
    "torchao-int8": Quantization("torchao", TORCHAO, "torchao int8 weight-only", _torchao_int8),
}


def check_quantization(name: Any) -> None:
    """model.quantization: null or a name in QUANTIZATIONS; a near miss is suggested."""
    if name is None:
        return
    if not isinstance(name, str) or name not in QUANTIZATIONS:
        close = difflib.get_close_matches(str(name), list(QUANTIZATIONS), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        choices = "; ".join(f"{key}: {q.description}" for key, q in QUANTIZATIONS.items())
        raise ValueError(f"model.quantization: unknown setting {name!r}; {hint}choices are null or {choices}")


def quantization_config(name: str, compute_dtype: torch.dtype) -> Any:
    """The transformers quantization_config for a named setting; an ImportError with the install line when its
    library is missing (checked before the model loads)."""
    check_quantization(name)
    setting = QUANTIZATIONS[name]
    if importlib.util.find_spec(setting.package) is None:
        raise ImportError(
            f"model.quantization={name!r} ({setting.description}) needs the package {setting.package}, which is not "
            f"installed: {setting.install}"
        )
    return setting.make(compute_dtype)
