"""Experts over quantized base linears (QLoRA), with the real libraries on CPU, loaded the way users load them
(`from_pretrained(..., quantization_config=...)`): bitsandbytes 4-bit (nf4 with double quantization, fp4) and 8-bit,
torchao int8 weight-only. The base computes base(x) with its own kernels; molora adds the mixture on top.

References: the quantized base itself (identity at init), full forwards (cached decoding), the unquantized base
(how close the quantized one is, so a broken load cannot pass as "identical").
"""

from __future__ import annotations

import warnings

import bitsandbytes  # noqa: F401 - the kinds that name a library match once it is imported, as from_pretrained does
import pytest
import torch
from torch import nn
from torchao.quantization import Int8WeightOnlyConfig
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TorchAoConfig

from molora import MoLoRAConfig, MoLoRAModel, get_molora_model
from molora.core import base_layers
from molora.core.base_layers import BASE_LAYERS, base_kind, prepare_for_kbit_training, register_base_layer
from tests.conftest import VOCAB, build_base, randomize_experts

BACKENDS = {
    "bnb-nf4-double": (
        "bnb-4bit",
        lambda: BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        ),
    ),
    "bnb-fp4": (
        "bnb-4bit",
        lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    ),
    "bnb-int8": ("bnb-8bit", lambda: BitsAndBytesConfig(load_in_8bit=True)),
    "torchao-int8": ("torchao", lambda: TorchAoConfig(Int8WeightOnlyConfig())),
}
# bitsandbytes quantizes in blocks of 64 along a row (its CPU 4-bit matmul needs whole blocks per row)
SIZES = dict(hidden_size=64, intermediate_size=128)
# LLM.int8 computes the input columns that hold an outlier (above llm_int8_threshold anywhere in the batch) in fp16
# and the rest in int8, so a full forward and a cached step split the columns differently: decoding is compared
# with the decomposition off, where every column is int8 whichever tokens share the batch.
DECODING = {**BACKENDS, "bnb-int8": ("bnb-8bit", lambda: BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0))}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    build_base("llama", seed=3, **SIZES).save_pretrained(path)
    return path


def load_quantized(path, backend: str, backends=BACKENDS) -> nn.Module:
    """The saved tiny model, quantized on load, its parameters frozen (bitsandbytes' CPU 4-bit matmul takes another
    path, with other rounding, while its weight requires grad; molora freezes the base, so the reference must too)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=backends[backend][1](), device_map="cpu")
    model.requires_grad_(False)
    return model


def config(**overrides) -> MoLoRAConfig:
    options = dict(target_modules="all-linear", num_experts=4, rank=4, router="topk", top_k=2)
    return MoLoRAConfig(**{**options, **overrides})


def base_logits(model) -> torch.Tensor:
    """What the quantized base computes with the adapters off. Compared instead of its state_dict: bitsandbytes'
    CPU 4-bit path repacks its quantization state on first use, and with double quantization its state_dict quantizes
    the repacked scales again on every call (the weights it computes with do not change)."""
    with torch.no_grad(), model.disable_adapters():
        return model(**batch(5)).logits


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 9), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(params=list(BACKENDS))
def backend(request):
    return request.param


def test_the_quantized_load_is_quantized_and_close_to_the_fp32_model(tiny_dir, backend):
    """The reference for everything below: every linear but the head is of the backend's kind, and the logits are
    near the unquantized model's but not equal to them (a load that silently stayed fp32 would be equal)."""
    model = load_quantized(tiny_dir, backend)
    kinds = {base_kind(m).name for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LINEARS}
    assert kinds == {BACKENDS[backend][0]}
    plain = build_base("llama", seed=3, **SIZES)
    with torch.no_grad():
        error = (model(**batch()).logits - plain(**batch()).logits).abs().max().item()
    assert 0 < error < 0.5


def test_all_linear_finds_every_quantized_linear_and_init_is_the_identity(tiny_dir, backend):
    base = load_quantized(tiny_dir, backend)
    with torch.no_grad():
        reference = base(**batch()).logits
    model = get_molora_model(base, config())
    assert sorted({m.name.rsplit(".", 1)[-1] for m in model.injection_report.modules}) == sorted(LINEARS)
    assert len(model.injection_report.modules) == 2 * len(LINEARS)
    assert model.injection_report.left_out == []
    with torch.no_grad():
        assert torch.equal(model(**batch()).logits, reference)


def test_a_train_step_updates_only_the_adapter_and_leaves_the_quantized_weights_alone(tiny_dir, backend):
    model = get_molora_model(load_quantized(tiny_dir, backend), config())
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    before = model(**batch(1)).logits.detach()
    base_before = base_logits(model)
    out = model(**batch(1), labels=batch(1)["input_ids"])
    loss = out.loss + model.aux_loss()
    assert torch.isfinite(loss)
    loss.backward()
    named = dict(model.named_parameters())
    with_grad = {n for n, p in named.items() if p.grad is not None}
    assert with_grad == {n for n, p in named.items() if p.requires_grad}
    assert all(".experts." in n or ".router." in n for n in with_grad)
    assert all(torch.isfinite(named[n].grad).all() for n in with_grad)
    optimizer.step()
    after = model(**batch(1)).logits.detach()
    assert torch.isfinite(after).all() and not torch.equal(after, before)
    assert torch.equal(base_logits(model), base_before)


def test_save_and_load_onto_a_fresh_quantized_base_gives_the_same_outputs(tiny_dir, backend, tmp_path):
    model = get_molora_model(load_quantized(tiny_dir, backend), config())
    randomize_experts(model)
    model.eval()
    with torch.no_grad():
        expected = model(**batch(2)).logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = MoLoRAModel.from_pretrained(load_quantized(tiny_dir, backend), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(**batch(2)).logits, expected)


def test_merging_into_a_quantized_weight_is_refused_before_anything_changes(tiny_dir, backend):
    model = get_molora_model(load_quantized(tiny_dir, backend), config(target_modules=["q_proj", "v_proj"]))
    randomize_experts(model)
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    base_before = base_logits(model)
    with pytest.raises(ValueError, match=r"cannot merge into model\.layers\.0\.self_attn\.q_proj.*re-rounds"):
        model.merge_and_unload(expert=0)
    assert all(torch.equal(p, adapter[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert torch.equal(base_logits(model), base_before)


def test_the_merge_guard_matters_without_it_an_8bit_merge_is_silently_wrong(tiny_dir, monkeypatch):
    """The refusal's counter-test: with bitsandbytes 8-bit's refusal lifted, the merge "succeeds" and the merged model
    computes something else than the adapter did (the delta is added to the int8 codes)."""
    model = get_molora_model(load_quantized(tiny_dir, "bnb-int8"), config(target_modules=["q_proj", "v_proj"]))
    randomize_experts(model)
    with torch.no_grad():
        expected = model(**batch(), task_ids=None).logits
    kind = BASE_LAYERS["bnb-8bit"]
    monkeypatch.setitem(BASE_LAYERS, "bnb-8bit", type(kind)(**{**kind.__dict__, "merge_refusal": None}))
    merged = model.merge_and_unload(expert=0)
    with torch.no_grad():
        model_expert0 = merged(**batch()).logits
    assert (model_expert0 - expected).abs().max() > 0.1


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_cached_greedy_decoding_equals_full_forwards(tiny_dir, backend):
    model = get_molora_model(load_quantized(tiny_dir, backend, DECODING), config())
    randomize_experts(model)
    model.eval()
    prompt = batch(4)
    with torch.no_grad():
        out = model.generate(
            **prompt,
            max_new_tokens=5,
            min_new_tokens=5,
            do_sample=False,
            use_cache=True,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            eos_token_id=None,
        )
        steps = torch.stack(out.logits, 1)
        full = model(input_ids=out.sequences, attention_mask=torch.ones_like(out.sequences)).logits
    prompt_len = prompt["input_ids"].shape[1]
    error = (steps - full[:, prompt_len - 1 : -1]).abs().max().item()
    # Logits near 0.6. Measured: 3e-5 for the fp32 model; LLM.int8 casts its inputs to fp16 (a step of 1e-3 near 1),
    # 1.6e-4; bitsandbytes fp4 2.5e-4 on this prompt, where rounding moves a top-2 gate (5e-5 with a dense router, or
    # on prompt 7). A cache that broke decoding is off by far more than 1e-3.
    assert error < 1e-3


class ForeignQuantLinear(nn.Linear):
    """An nn.Linear subclass holding int8 codes, as another quantization library might: not a kind molora knows."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__(d_in, d_out, bias=False)
        self.weight = nn.Parameter(torch.zeros(d_out, d_in, dtype=torch.int8), requires_grad=False)

    def forward(self, x):
        return x @ self.weight.float().T


def test_a_quantized_linear_of_an_unknown_kind_is_refused_by_name_and_left_out_of_all_linear():
    base = build_base("llama", **SIZES)
    attention = base.model.layers[0].self_attn
    attention.q_proj = ForeignQuantLinear(attention.q_proj.in_features, attention.q_proj.out_features)
    with pytest.raises(
        ValueError,
        match=r"q_proj.*ForeignQuantLinear is a quantized linear molora does not know.*"
        r"bitsandbytes Linear4bit",
    ):
        get_molora_model(base, config(target_modules=["q_proj"]))
    assert not any(isinstance(m, nn.Module) and hasattr(m, "experts") for m in base.modules())
    model = get_molora_model(base, config())
    assert model.injection_report.left_out == ["model.layers.0.self_attn.q_proj"]


def test_prepare_for_kbit_training_freezes_and_keeps_the_unquantized_parameters_in_fp32(tiny_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(
            tiny_dir,
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16),
            dtype=torch.bfloat16,
            device_map="cpu",
        )
    quantized = {
        id(p): p.dtype
        for m in base.modules()
        if base_kind(m) is not None and base_kind(m).quantized
        for p in m.parameters()
    }
    assert quantized and base.model.norm.weight.dtype == torch.bfloat16
    prepare_for_kbit_training(base)
    assert not any(p.requires_grad for p in base.parameters())
    for param in base.parameters():
        assert param.dtype == quantized.get(id(param), torch.float32)
    model = get_molora_model(base, config())
    loss = model(**batch(), labels=batch()["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_every_registered_kind_is_described_in_the_refusal():
    message = base_layers.unsupported_reason(nn.Conv2d(2, 2, 1))
    assert all(kind.description in message for kind in BASE_LAYERS.values())


def test_another_library_is_one_register_base_layer_call(monkeypatch):
    """The registry is how a backend is added: the foreign linear above, registered with a refusal of its own, takes
    experts (identity at init, gradients) and refuses a merge with that reason."""
    monkeypatch.setattr(base_layers, "BASE_LAYERS", dict(BASE_LAYERS))
    register_base_layer(
        base_layers.BaseLayerKind(
            "foreign-int8",
            "ForeignQuantLinear",
            lambda m: isinstance(m, ForeignQuantLinear),
            lambda m: (m.in_features, m.out_features),
            merge_refusal="its codes are not ours to change",
            quantized=True,
        )
    )
    base = build_base("llama", **SIZES)
    attention = base.model.layers[0].self_attn
    foreign = ForeignQuantLinear(attention.q_proj.in_features, attention.q_proj.out_features)
    with torch.no_grad():
        foreign.weight.copy_(torch.randint(-100, 100, foreign.weight.shape, dtype=torch.int8))
    attention.q_proj = foreign
    with torch.no_grad():
        reference = base(**batch()).logits
    model = get_molora_model(base, config())
    assert "model.layers.0.self_attn.q_proj" in {m.name for m in model.injection_report.modules}
    with torch.no_grad():
        assert torch.equal(model(**batch()).logits, reference)
    model(**batch(), labels=batch()["input_ids"]).loss.backward()
    assert model.base_model.model.layers[0].self_attn.q_proj.experts.lora_B.grad is not None
    with pytest.raises(ValueError, match="its codes are not ours to change"):
        model.merge_and_unload(expert=0)
