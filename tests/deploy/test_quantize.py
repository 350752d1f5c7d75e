"""INT8 adapter files: each value within half a step of its scale, the loaded model within the stated output bound,
a file about 4x smaller, and clear errors for what cannot be quantised or loaded."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from molora import MoLoRAModel, get_molora_model
from molora.deploy.merging import merged_delta
from molora.deploy.quantize import dequantize_tensor, quantize_adapters, quantize_tensor
from tests.adapter_files import resign
from tests.conftest import build_base, make_batch, molora_config, outputs_of

# Relative errors (Frobenius) that int8 factors stay within: of each module's update B @ A (about 1 % for Gaussian
# factors: two factors at ~0.7 % each), and of the adapter's whole contribution to the logits (top-k routing may flip
# a near tie, which moves a token by a whole expert, so the output bound is checked on dense routing).
DELTA_BOUND = 2e-2
OUTPUT_BOUND = 3e-2


def random_experts(model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def relative(new: torch.Tensor, old: torch.Tensor) -> float:
    return float((new - old).norm() / old.norm())


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shape, axis", [((4, 8, 32), -1), ((4, 48, 8), -2), ((6, 32), -1), ((8, 16), -1)])
def test_every_value_is_within_half_a_step_of_its_scale(seed, shape, axis):
    torch.manual_seed(seed)
    tensor = torch.randn(shape) * torch.rand(shape).pow(4) * 10  # heavy-tailed, several magnitudes
    quantized, scale = quantize_tensor(tensor, axis)
    assert quantized.dtype == torch.int8 and quantized.abs().max() <= 127
    assert scale.shape[axis] == 1 and scale.dim() == tensor.dim()
    error = (dequantize_tensor(quantized, scale) - tensor).abs()
    assert (error <= scale / 2 + 1e-7 * tensor.abs()).all()
    assert torch.allclose(scale, tensor.abs().amax(axis, keepdim=True) / 127)


def test_zero_slices_stay_zero_and_non_finite_values_are_refused():
    tensor = torch.zeros(2, 3, 5)
    tensor[1, 2] = torch.arange(5.0)
    quantized, scale = quantize_tensor(tensor, -1)
    assert torch.equal(dequantize_tensor(quantized, scale)[0], torch.zeros(3, 5))
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_tensor(torch.tensor([[1.0, float("nan")]]), -1)


def contribution(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        full = outputs_of(model(**batch))
        with model.disable_adapters():
            base = outputs_of(model(**batch))
    return full, full - base


CONFIGS = {
    "lora": dict(),
    "rank1": dict(expert_type="rank1"),
    "hydra-shared": dict(share_lora_a=True, shared_experts=1),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("seed", range(4))
def test_an_int8_file_loads_within_the_output_bound(name, seed, tmp_path):
    config = molora_config("llama", "softmax", rank=8, **CONFIGS[name])
    model = get_molora_model(build_base("llama", hidden_size=64, intermediate_size=96), config)
    random_experts(model, seed)
    model.eval()
    batch = make_batch(batch=3)
    _, delta = contribution(model, batch)
    with torch.no_grad():
        deltas = {module: merged_delta(layer, torch.full((4,), 0.25)) for module, layer in model._layers}
    model.save_pretrained(tmp_path / "fp32")
    model.save_pretrained(tmp_path / "int8", bits=8)
    stored = load_file(str(tmp_path / "int8" / "adapter_model.safetensors"))
    factors = [key for key in model.adapter_state_dict() if ".experts." in key]
    assert all(stored[key + ".int8"].dtype == torch.int8 for key in factors)
    assert not any(key.endswith(".int8") for key in stored if ".router." in key)  # routers stay fp32
    base = build_base("llama", hidden_size=64, intermediate_size=96)
    loaded = MoLoRAModel.from_pretrained(base, tmp_path / "int8")
    _, loaded_delta = contribution(loaded, batch)
    assert 0 < relative(loaded_delta, delta) < OUTPUT_BOUND
    for module, layer in loaded._layers:
        with torch.no_grad():
            assert 0 < relative(merged_delta(layer, torch.full((4,), 0.25)), deltas[module]) < DELTA_BOUND, module
    fp32_size = (tmp_path / "fp32" / "adapter_model.safetensors").stat().st_size
    int8_size = (tmp_path / "int8" / "adapter_model.safetensors").stat().st_size
    # ~3x at this tiny size (fp32 routers and the header included), ~4x on SmolLM2; rank-1 factors are smaller
    # than their routers, so the whole file shrinks less
    assert int8_size < (0.45 if name != "rank1" else 0.8) * fp32_size


def test_the_output_bound_catches_a_corrupted_value(tmp_path):
    """The check can fail: one module's int8 output sides flipped in sign move the logits beyond the bound."""
    model = get_molora_model(build_base("llama"), molora_config("llama", "softmax"))
    random_experts(model, 0)
    model.eval()
    batch = make_batch(batch=3)
    _, delta = contribution(model, batch)
    state = quantize_adapters(model)
    key = next(k for k in state if k.endswith("lora_B.int8"))
    state[key].mul_(-1)
    model.save_pretrained(tmp_path / "int8", bits=8)
    save_file(state, str(tmp_path / "int8" / "adapter_model.safetensors"))
    resign(tmp_path / "int8")
    loaded = MoLoRAModel.from_pretrained(build_base("llama"), tmp_path / "int8")
    _, loaded_delta = contribution(loaded, batch)
    assert relative(loaded_delta, delta) > OUTPUT_BOUND


def test_bad_bits_and_broken_files_are_clear_errors(tmp_path):
    model = get_molora_model(build_base("llama"), molora_config("llama", "softmax"))
    with pytest.raises(ValueError, match=r"bits must be one of \[8\]"):
        model.save_pretrained(tmp_path / "x", bits=4)
    assert not (tmp_path / "x" / "adapter_model.safetensors").exists()
    model.save_pretrained(tmp_path / "int8", bits=8)
    state = load_file(str(tmp_path / "int8" / "adapter_model.safetensors"))
    key = next(k for k in state if k.endswith(".scale"))
    del state[key]
    save_file(state, str(tmp_path / "int8" / "adapter_model.safetensors"))
    resign(tmp_path / "int8")
    with pytest.raises(ValueError, match=r"needs int8 values and a .*\.scale tensor"):
        MoLoRAModel.from_pretrained(build_base("llama"), tmp_path / "int8")


@pytest.mark.parametrize("gated", [False, True])
def test_the_deploy_report_measures_a_finished_run(tmp_path, gated):
    from bench.deploy_report import main
    from molora.run.config import RunConfig
    from molora.run.training import train
    from tests.tiny import save_tiny_model, tiny_run_config, write_toy_domains

    spec = tiny_run_config(save_tiny_model(tmp_path / "model"), write_toy_domains(tmp_path / "toy.jsonl"), steps=8)
    if gated:
        spec["molora"] |= {"rank_gates": True, "aux_losses": {"rank_sparsity": 1.0}}
    train(RunConfig.from_dict(spec), tmp_path / "run")
    main(["--run", str(tmp_path / "run"), "--out", str(tmp_path / "report.md")])
    report = (tmp_path / "report.md").read_text()
    assert "x smaller" in report and "mean eval loss" in report and "per output channel of B" in report
    assert ("## prune_ranks" in report) == gated
