"""routing_scope='block' (MixLoRA's layout): the adapted linears of one module share the routing decision that the
first of them makes on the block input. Checked against a hand-written block forward with a loop over experts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from molora import MoLoRAConfig, get_molora_model
from molora.core.context import RoutingContext, routing_context
from molora.model import MoLoRAModel
from tests.conftest import build_base, make_batch, randomize_experts
from tests.reference import loop_delta

FFN = ["gate_proj", "up_proj", "down_proj"]


def block_model(router: str = "topk", **overrides) -> MoLoRAModel:
    options = dict(target_modules=FFN, num_experts=4, rank=4, alpha=8, router=router, routing_scope="block")
    options.update(overrides)
    model = get_molora_model(build_base("llama"), MoLoRAConfig(**options))
    randomize_experts(model)
    return model


def block_reference(mlp, x: torch.Tensor, router) -> torch.Tensor:
    """The hand-written block forward: one routing decision (`router` on the block input) for gate, up and down."""
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    weights = router(x).gates.reshape(-1, 4) * gate.gate_multiplier
    flat = x.reshape(-1, x.shape[-1])

    def adapted(layer, inputs):
        return layer.base_layer(inputs) + layer.scaling * loop_delta(layer.experts, inputs, weights)

    hidden = F.silu(adapted(gate, flat)) * adapted(up, flat)
    return adapted(down, hidden).reshape(*x.shape[:-1], -1)


def test_only_the_first_module_of_a_block_has_a_router():
    model = block_model()
    with_router = [name for name, layer in model._layers if layer.router is not None]
    assert with_router == [f"model.layers.{i}.mlp.gate_proj" for i in range(2)]
    routers = [n for n, _ in model.named_parameters() if ".router." in n]
    assert len(routers) == 2  # one gate weight per block
    assert "routed by model.layers.0.mlp.gate_proj" in repr(model.base_model.model.layers[0].mlp.down_proj)


@pytest.mark.parametrize("router", ["softmax", "topk", "switch"])
@pytest.mark.parametrize("seed", range(3))
def test_a_block_forward_matches_one_routing_decision_applied_to_every_module(router, seed):
    model = block_model(router, mixture_scaling="sum").train()
    mlp = model.base_model.model.layers[1].mlp
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    with routing_context(RoutingContext()):
        out = mlp(x)
    expected = block_reference(mlp, x, mlp.gate_proj.router)
    assert (out - expected).abs().max() < 1e-5 * max(1.0, expected.abs().max().item())  # fp32, values ~300
    params = [p for p in model.parameters() if p.requires_grad and p.grad is None]
    fast = torch.autograd.grad(out.sum(), [x, *params], allow_unused=True)
    slow = torch.autograd.grad(expected.sum(), [x, *params], allow_unused=True)
    for f, s in zip(fast, slow, strict=True):
        assert (f is None) == (s is None)
        if f is not None:
            assert (f - s).abs().max() < 1e-5 * max(1.0, s.abs().max().item())


@pytest.mark.parametrize("seed", range(3))
def test_the_block_reference_can_fail_when_modules_route_on_their_own(seed):
    """The same experts and gate_proj router, but up and down routing themselves (routing_scope ignored): the hand
    reference, which applies gate_proj's one decision to all three, must tell the two apart."""
    shared = block_model("topk")
    alone = get_molora_model(
        build_base("llama"), MoLoRAConfig(target_modules=FFN, num_experts=4, rank=4, alpha=8, router="topk")
    )
    missing, _ = alone.load_state_dict(shared.state_dict(), strict=False)
    own_routers = [n for n in missing if ".router." in n]  # up's and down's: the only tensors not copied
    assert own_routers and all(".up_proj." in n or ".down_proj." in n for n in own_routers)
    assert all(".router." in n for n in missing if ".experts." in n or ".router." in n)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), routing_context(RoutingContext()):
        shared_mlp, alone_mlp = shared.base_model.model.layers[1].mlp, alone.base_model.model.layers[1].mlp
        expected = block_reference(shared_mlp, x, shared_mlp.gate_proj.router)
        scale = max(1.0, expected.abs().max().item())
        assert (shared_mlp(x) - expected).abs().max() < 1e-5 * scale
        assert (block_reference(alone_mlp, x, alone_mlp.gate_proj.router) - expected).abs().max() < 1e-5 * scale
        assert (alone_mlp(x) - expected).abs().max() > 1e-3 * scale


def test_a_follower_before_its_owner_is_refused_by_name():
    model = block_model()
    down = model.base_model.model.layers[0].mlp.down_proj
    with routing_context(RoutingContext()), pytest.raises(RuntimeError, match=r"block 'model.layers.0.mlp'.*gate_proj"):
        down(torch.randn(1, 3, 48))


def test_a_block_with_different_expert_counts_is_refused():
    with pytest.raises(ValueError, match=r"routing_scope='block'.*down_proj has 2 experts"):
        block_model(num_experts={"down_proj": 2, ".*": 4})


def test_aux_losses_count_each_block_once_and_save_load_round_trips(tmp_path):
    model = block_model("topk", aux_losses={"balance": 0.01})
    batch = make_batch(pad_last=2)
    logits = model(**batch).logits
    assert sorted(model.aux_loss_terms(per_layer=True)) == [f"model.layers.{i}.mlp.gate_proj" for i in range(2)]
    model.save_pretrained(tmp_path)
    loaded = MoLoRAModel.from_pretrained(build_base("llama"), tmp_path)
    assert torch.allclose(loaded(**batch).logits, logits, atol=1e-6)


def test_cached_generation_matches_the_full_forward():
    model = block_model("topk").eval()
    ids = make_batch(batch=2, length=6)["input_ids"]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        full = model(input_ids=out.sequences).logits
    for step, logits in enumerate(out.logits):
        assert torch.allclose(logits, full[:, ids.shape[1] - 1 + step], atol=1e-4)


def test_mixlora_layout_plain_lora_on_attention_beside_routed_ffn_experts():
    options = dict(
        target_modules=["q_proj", "v_proj", *FFN],
        num_experts={"q_proj|v_proj": 1, ".*": 4},
        rank=2,
        rank_pattern={"q_proj|v_proj": 6},
        router="topk",
        top_k=2,
        routing_scope="block",
        mixture_scaling="sum",
    )
    model = get_molora_model(build_base("llama"), MoLoRAConfig(**options))
    randomize_experts(model)
    attention = model.base_model.model.layers[0].self_attn
    assert attention.q_proj.router.top_k == 1 and attention.v_proj.router is None
    assert model.base_model.model.layers[0].mlp.gate_proj.router.top_k == 2
    x = torch.randn(2, 5, 32)
    with routing_context(RoutingContext()), torch.no_grad():
        for layer in (attention.q_proj, attention.v_proj):  # one expert, gate 1: a plain LoRA
            experts = layer.experts
            plain = layer.base_layer(x) + layer.scaling * (x @ experts.lora_A[0].T) @ experts.lora_B[0]
            assert torch.allclose(layer(x), plain, atol=1e-5)
    with pytest.raises(ValueError, match="top_k=5 is larger than num_experts=4"):
        MoLoRAConfig(**{**options, "top_k": 5})
