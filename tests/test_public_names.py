"""Public names no other test exercised: a Router subclassed directly, a custom aux loss registered and used through
the config (stackable and not), verbose=True, MoLoRAModel.from_peft_adapters and activation_checkpointing_enable.
Each is checked against a hand computation or the path it stands for."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from molora import MoLoRAModel, get_molora_model
from molora.core.losses import AUX_LOSSES, STACKABLE, register_aux_loss
from molora.core.routers import ROUTERS, Router, register_router
from tests.conftest import build_base, make_batch, molora_config, randomize_experts


@pytest.fixture
def registered():
    """Names registered by a test are taken out again, so the registries stay as the library made them."""
    routers, losses, stackable = dict(ROUTERS), dict(AUX_LOSSES), set(STACKABLE)
    yield
    ROUTERS.clear()
    ROUTERS.update(routers)
    AUX_LOSSES.clear()
    AUX_LOSSES.update(losses)
    STACKABLE.clear()
    STACKABLE.update(stackable)


def test_a_router_subclassed_directly_gets_no_projection_and_routes_by_its_own_logits(registered):
    seen = []

    @register_router("first-feature")
    class FirstFeatureRouter(Router):  # no input projection: compute_logits receives projected=None
        def __init__(self, in_features, num_experts, **kwargs):
            super().__init__(in_features, num_experts, **kwargs)
            self.scale = torch.nn.Parameter(torch.ones(num_experts))

        def compute_logits(self, x, inputs, projected):
            seen.append(projected)
            return x[..., :1] * self.scale  # expert e's logit: feature 0 times scale_e

    model = get_molora_model(build_base("llama"), molora_config("llama", "first-feature"))
    randomize_experts(model)
    batch = make_batch(pad_last=2)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert seen and all(p is None for p in seen)
    layer = next(layer for _, layer in model._layers)
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("router.scale"))
    with torch.no_grad():  # the gates are the softmax of the hand logits on the layer's input
        x = torch.randn(2, 3, layer.in_features)
        out = layer.router(x)
        torch.testing.assert_close(out.gates, torch.softmax(x[..., :1] * layer.router.scale, -1))


@pytest.mark.parametrize("stackable", [False, True])
def test_a_custom_aux_loss_is_weighted_and_averaged_over_layers(registered, stackable):
    @register_aux_loss("mean-top-prob", stackable=stackable)
    def mean_top_prob(route, token_mask=None):
        top = route.probs.amax(-1)  # [..., B, L]
        if token_mask is None:
            return top.mean((-2, -1))
        weights = token_mask.to(top.dtype)
        return (top * weights).sum((-2, -1)) / weights.sum()

    model = get_molora_model(
        build_base("llama"), molora_config("llama", "softmax", aux_losses={"mean-top-prob": 0.5, "balance": 0.01})
    )
    randomize_experts(model)
    batch = make_batch(pad_last=2)
    model(**batch)
    per_layer = model.aux_loss_terms(per_layer=True)
    by_hand = []
    for name, layer in model._layers:
        route, mask = layer.last_route
        top = route.probs.amax(-1)
        by_hand.append((top * mask).sum() / mask.sum())
        assert per_layer[name]["mean-top-prob"].item() == pytest.approx(by_hand[-1].item(), rel=1e-5)
    mean = torch.stack(by_hand).mean()
    assert model.aux_loss_terms()["mean-top-prob"].item() == pytest.approx(mean.item(), rel=1e-5)
    expected = 0.5 * mean + 0.01 * model.aux_loss_terms()["balance"]
    assert model.aux_loss().item() == pytest.approx(expected.item(), rel=1e-5)


def test_verbose_prints_the_injection_report(capsys):
    model = get_molora_model(build_base("llama"), molora_config("llama", "softmax"), verbose=True)
    printed = capsys.readouterr().out
    assert printed.strip() == str(model.injection_report).strip()
    assert "model.layers.0.self_attn.q_proj" in printed and "trainable params" in printed


def test_from_peft_adapters_on_the_model_class_makes_one_expert_per_adapter(tmp_path):
    """Each expert alone (merge expert=i) reproduces its PEFT adapter's model."""
    folders, expected = [], []
    batch = make_batch()
    for i in range(2):
        torch.manual_seed(i)
        peft_model = get_peft_model(
            build_base("llama"),
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        )
        with torch.no_grad():
            expected.append(peft_model(**batch).logits)
        peft_model.save_pretrained(tmp_path / f"a{i}")
        folders.append(tmp_path / f"a{i}")
    model = MoLoRAModel.from_peft_adapters(build_base("llama"), folders)
    assert isinstance(model, MoLoRAModel) and model.molora_config.num_experts == 2
    for i in range(2):
        again = MoLoRAModel.from_peft_adapters(build_base("llama"), folders)
        with torch.no_grad():
            merged = again.merge_and_unload(expert=i)(**batch).logits
        torch.testing.assert_close(merged, expected[i], rtol=1e-4, atol=1e-4)


def test_activation_checkpointing_enable_is_gradient_checkpointing_by_its_transformers_5_name():
    batch = make_batch(pad_last=2)
    grads = []
    for checkpointed in (False, True):
        model = get_molora_model(build_base("llama"), molora_config("llama", "intuition", aux_losses={"balance": 0.1}))
        randomize_experts(model)
        model.train()
        if checkpointed:
            model.activation_checkpointing_enable()
            assert model.base_model.is_gradient_checkpointing
        out = model(**batch, labels=batch["input_ids"])
        (out.loss + model.aux_loss()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6)


def test_a_custom_router_registration_stays_out_of_the_other_tests(registered):
    assert "first-feature" not in ROUTERS and "mean-top-prob" not in AUX_LOSSES
