"""`model.quantization`: a training run on a quantized base (QLoRA) learns, and reloads onto the same quantized base;
bad settings are named before anything loads."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from molora.core.base_layers import base_kind
from molora.model import MoLoRAModel
from molora.run.base_models import load_run_base
from molora.run.config import RunConfig
from molora.run.data import MultiDomainData
from molora.run.evaluation import evaluate
from molora.run.quantization import QUANTIZATIONS
from molora.run.training import train
from tests.tiny import save_tiny_model, tiny_run_config, write_toy_domains

KINDS = {"nf4": "bnb-4bit", "fp4": "bnb-4bit", "int8": "bnb-8bit", "torchao-int8": "torchao"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-quantized")
    # bitsandbytes' CPU 4-bit matmul works on whole blocks of 64 inputs: every linear here reads 64 or 128
    return save_tiny_model(root / "model", hidden_size=64, intermediate_size=128), write_toy_domains(root / "toy.jsonl")


def test_every_setting_has_its_kind():
    assert set(KINDS) == set(QUANTIZATIONS)


@pytest.mark.parametrize("setting", ["nf4", "torchao-int8"])  # int8: tests/core/test_quantized_bases.py
def test_a_run_on_a_quantized_base_learns_and_its_adapter_reloads_onto_that_base(tiny, tmp_path, setting):
    model_dir, data_file = tiny
    spec = tiny_run_config(model_dir, data_file, steps=30)
    spec["model"]["quantization"] = setting
    config = RunConfig.from_dict(spec)
    result = train(config, tmp_path / "run")
    for domain in ("upper", "reverse"):
        assert result["after"][domain]["loss"] < result["before"][domain]["loss"] - 0.3, domain
    base, tokenizer = load_run_base(config)
    q_proj = base.model.layers[0].self_attn.q_proj
    assert base_kind(q_proj).name == KINDS[setting]
    assert base.model.norm.weight.dtype == torch.float32 and not any(p.requires_grad for p in base.parameters())
    model = MoLoRAModel.from_pretrained(base, tmp_path / "run" / "adapter")
    scores = evaluate(model, MultiDomainData(config.data, tokenizer), config, torch.device("cpu"))
    for domain in ("upper", "reverse"):
        assert scores[domain]["loss"] == pytest.approx(result["after"][domain]["loss"], abs=1e-5), domain


def test_an_unknown_setting_is_named_with_the_closest_one(tiny):
    spec = tiny_run_config(*tiny)
    spec["model"]["quantization"] = "nf5"
    with pytest.raises(ValueError, match=r"model\.quantization: unknown setting 'nf5'; did you mean 'nf4'\?"):
        RunConfig.from_dict(spec)


def test_a_missing_library_is_named_with_its_install_line_before_the_model_loads(tiny, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    spec = tiny_run_config(*tiny)
    spec["model"]["quantization"] = "torchao-int8"
    with pytest.raises(ImportError, match=r"needs the package torchao.*pip install torchao"):
        load_run_base(RunConfig.from_dict(spec))
