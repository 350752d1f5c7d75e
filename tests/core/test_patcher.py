import pytest
import torch
from torch import nn

from molora import MoLoRAConfig, MoLoRALinear, MoLoRAModel, get_molora_model
from tests.conftest import build_base, molora_config


def _layers(model):
    if isinstance(model, MoLoRAModel):
        model = model.base_model
    return {n: m for n, m in model.named_modules() if isinstance(m, MoLoRALinear)}


def _assert_untouched(model):
    assert not _layers(model)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(target_modules=["q_proj", "qkv_proj"]), r"'qkv_proj' matches no module.*'q_proj'"),
        (dict(target_modules=r".*\.attn\.qkv"), "matches no module"),
        (dict(target_modules=["self_attn"]), "LlamaAttention.*nn.Linear"),
        (dict(target_modules=["q_proj"], exclude_modules=["q_proj"]), "exclude_modules"),
        (dict(target_modules=["q_proj"], layers_to_transform=[7]), "layers_to_transform"),
        (dict(target_modules=["q_proj"], num_experts={"v_proj": 2}), "num_experts"),
    ],
)
def test_bad_targets_raise_naming_the_cause_and_leave_the_model_untouched(kwargs, message):
    model = build_base("llama")
    with pytest.raises(ValueError, match=message):
        get_molora_model(model, MoLoRAConfig(**kwargs))
    _assert_untouched(model)


def test_list_targets_match_names_and_dotted_suffixes_and_regex_matches_full_names():
    model = get_molora_model(build_base("llama"), MoLoRAConfig(target_modules=["self_attn.q_proj", "down_proj"]))
    assert sorted(_layers(model)) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    model = get_molora_model(build_base("llama"), MoLoRAConfig(target_modules=r".*\.1\.self_attn\.(k|o)_proj"))
    assert sorted(_layers(model)) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.o_proj"]


def test_freezes_the_base_and_trains_only_experts_and_routers():
    model = get_molora_model(build_base("llama"), molora_config("llama", router="intuition"))
    for name, param in model.named_parameters():
        assert param.requires_grad == (".experts." in name or ".router." in name), name
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == model.injection_report.trainable_params and total == model.injection_report.total_params


def test_per_module_experts_ranks_alphas_layers_and_exclusions():
    config = MoLoRAConfig(
        target_modules=["q_proj", "v_proj", "up_proj"],
        exclude_modules=[r"layers.0.mlp.up_proj"],
        num_experts={"q_proj": 6, ".*": 2},
        rank_pattern={"v_proj": 2, "never_there": 3},
        alpha_pattern={"q_proj": 4},
        layers_to_transform=[0],
        router="topk",
        top_k=2,
    )
    model = get_molora_model(build_base("llama"), config)
    layers = _layers(model)
    assert sorted(layers) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    q, v = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.0.self_attn.v_proj"]
    assert q.experts.lora_A.shape == (6, 8, 32) and q.scaling == pytest.approx(4 / 8)
    assert v.experts.lora_A.shape == (2, 2, 32) and v.scaling == pytest.approx(16 / 2)
    report = model.injection_report
    assert report.excluded == ["model.layers.0.mlp.up_proj"]
    assert report.unused_patterns == {"rank_pattern": ["never_there"]}
    text = str(report)
    assert "q_proj" in text and "balance=0.01" in text and "never_there" in text


def test_rslora_and_rank1_scaling():
    lora = _layers(get_molora_model(build_base("llama"), MoLoRAConfig(rank=4, alpha=8, use_rslora=True)))
    assert next(iter(lora.values())).scaling == pytest.approx(8 / 2)
    rank1 = _layers(get_molora_model(build_base("llama"), MoLoRAConfig(expert_type="rank1", num_experts=4, alpha=8)))
    assert next(iter(rank1.values())).scaling == pytest.approx(8 / 4)


def test_gpt2_conv1d_is_supported_with_its_transposed_weight():
    model = get_molora_model(build_base("gpt2"), molora_config("gpt2"))
    layer = _layers(model)["transformer.h.0.attn.c_attn"]
    assert (layer.in_features, layer.out_features) == (32, 96)
    assert type(layer.base_layer).__name__ == "Conv1D"


def test_injecting_twice_is_an_error():
    model = get_molora_model(build_base("llama"), MoLoRAConfig())
    with pytest.raises(ValueError, match="already"):
        get_molora_model(model.base_model, MoLoRAConfig())


def test_encoder_decoder_roles_pick_masks_and_pooling():
    model = get_molora_model(
        build_base("bart"),
        MoLoRAConfig(target_modules=["q_proj", "k_proj"], router="intuition", intuition_pooling="mean"),
    )
    by_name = {n: m.role for n, m in _layers(model).items()}
    pooling = {n: m.router.pooling for n, m in _layers(model).items()}
    assert by_name["model.encoder.layers.0.self_attn.q_proj"] == "encoder"
    assert by_name["model.decoder.layers.0.self_attn.q_proj"] == "decoder"
    assert by_name["model.decoder.layers.0.encoder_attn.k_proj"] == "cross"
    assert by_name["model.decoder.layers.0.encoder_attn.q_proj"] == "decoder"
    assert pooling["model.encoder.layers.0.self_attn.q_proj"] == "mean"
    assert pooling["model.decoder.layers.0.self_attn.q_proj"] == "causal"
    assert pooling["model.decoder.layers.0.encoder_attn.k_proj"] == "mean"
    ids = torch.randint(3, 64, (2, 6))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=ids[:, :4])
    assert torch.isfinite(out.logits).all()


def test_unsupported_module_type_in_a_regex_target():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)

    with pytest.raises(ValueError, match="LayerNorm"):
        get_molora_model(Tiny(), MoLoRAConfig(target_modules="proj|norm"))
