"""routing_scope='input': siblings that read one tensor (q/k/v, gate/up) share one router and one input-side matmul.
Checked against the per-module path with the routers tied (the followers' routers set to the owner's): the same
outputs, the same expert gradients, and the owner's router gradient equal to the sum of the tied routers'."""

from __future__ import annotations

import pytest
import torch

from molora import MoLoRAConfig, get_molora_model
from molora.core.context import RoutingContext, routing_context
from tests.conftest import build_base, make_batch, randomize_experts, task_ids_for

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FOLLOWS = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


def config(router: str, expert_type: str = "lora", scope: str = "input", **overrides) -> MoLoRAConfig:
    options = dict(
        target_modules=ALL,
        num_experts=4,
        rank=4,
        alpha=8,
        expert_type=expert_type,
        router=router,
        num_tasks=3 if router == "task" else None,
        routing_scope=scope,
        aux_losses={"balance": 0.01, "z": 0.001},
    )
    options.update(overrides)
    return MoLoRAConfig(**options)


def tied_pair(router: str, expert_type: str, dtype: torch.dtype = torch.float32):
    """(input-scope model, per-module model with the same experts and every follower's router tied to its owner's)."""
    shared = get_molora_model(build_base("llama", dtype=dtype), config(router, expert_type))
    randomize_experts(shared)
    alone = get_molora_model(build_base("llama", dtype=dtype), config(router, expert_type, scope="module"))
    state = dict(shared.named_parameters())
    with torch.no_grad():
        for name, param in alone.named_parameters():
            if not param.requires_grad:
                continue
            source = name
            for follower, owner in FOLLOWS.items():
                if f".{follower}.router." in name:
                    source = name.replace(f".{follower}.router.", f".{owner}.router.")
            param.copy_(state[source])
    return shared, alone


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_followers_have_no_router_and_the_report_says_whose_they_share():
    model = get_molora_model(build_base("llama"), config("softmax"))
    routed = sorted({name.rsplit(".", 1)[1] for name, layer in model._layers if layer.router is not None})
    assert routed == ["down_proj", "gate_proj", "o_proj", "q_proj"]
    report = str(model.injection_report)
    assert "shares q_proj's" in report and "shares gate_proj's" in report and "own, shared" in report
    followers = [layer for name, layer in model._layers if name.endswith("k_proj")]
    assert all(f.shares_input and f.router is None for f in followers)


# fp32 runs the fused path (router rows in the joint matmul); its sums run in another order than three separate
# matmuls, so gradients agree to 1e-4 of their scale (the randomized experts make activations ~10-100). In fp64 the
# experts' matmul is fused alone (routers stay fp32) and everything agrees to 1e-5.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("expert_type", ["lora", "rank1"])
@pytest.mark.parametrize("router", ["softmax", "topk", "switch", "intuition", "task"])
def test_equals_the_per_module_path_with_tied_routers(router, expert_type, dtype):
    shared, alone = tied_pair(router, expert_type, dtype)
    batch = make_batch(batch=3, pad_last=2)
    task_ids = task_ids_for(router, 3) if router != "task" else torch.tensor([0, 1, 2])
    outputs = []
    for model in (shared, alone):
        model.train()
        out = model(**batch, labels=batch["input_ids"], task_ids=task_ids)
        (out.loss + model.aux_loss() * 0).backward()  # aux losses differ (one router per group): not compared
        outputs.append(out.logits)
    tolerance = TOLERANCE[dtype]
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-5 * max(1.0, outputs[1].abs().max().item())
    g_shared, g_alone = grads(shared), grads(alone)
    for name, grad in g_shared.items():
        expected = g_alone[name]
        if ".router." in name and any(f".{owner}." in name for owner in set(FOLLOWS.values())):
            owner = next(o for o in set(FOLLOWS.values()) if f".{o}." in name)
            for follower in (f for f, o in FOLLOWS.items() if o == owner):
                expected = expected + g_alone[name.replace(f".{owner}.", f".{follower}.")]
        assert (grad - expected).abs().max() <= tolerance * max(1.0, expected.abs().max().item()), name


def test_a_member_given_another_tensor_is_routed_on_its_own_input():
    shared, alone = tied_pair("softmax", "lora")
    attn, attn_alone = shared.base_model.model.layers[0].self_attn, alone.base_model.model.layers[0].self_attn
    x = torch.randn(2, 5, 32)
    other = x + 1
    with routing_context(RoutingContext()) as ctx, torch.no_grad():
        attn.q_proj(x)
        first = ctx.shared_inputs[attn.k_proj.block]
        same = attn.k_proj(x)  # its part of q_proj's matmul
        assert ctx.shared_inputs[attn.k_proj.block] is first
        moved = attn.k_proj(other)  # not the tensor q_proj read: computed and routed on `other`
        assert ctx.shared_inputs[attn.k_proj.block] is not first
    with routing_context(RoutingContext()), torch.no_grad():
        assert torch.allclose(same, attn_alone.k_proj(x), atol=1e-5)
        assert torch.allclose(moved, attn_alone.k_proj(other), atol=1e-5)
        # what the identity check prevents: q_proj's part for x is not k_proj's input side on `other`
        assert not torch.allclose(
            first.hiddens[attn.k_proj.layer_name], attn.k_proj.experts.project(other.view(-1, 32))[0]
        )


def test_the_member_that_runs_first_computes_for_the_group_whatever_the_definition_order():
    # BartAttention defines k_proj, v_proj, q_proj and calls q_proj first: k_proj holds the router, q_proj routes
    model = get_molora_model(
        build_base("bart"), MoLoRAConfig(target_modules=["q_proj", "k_proj", "v_proj"], routing_scope="input")
    )
    self_attn = model.base_model.model.encoder.layers[0].self_attn
    assert self_attn.k_proj.router is not None and self_attn.q_proj.router is None
    randomize_experts(model)
    # the per-module path with q's and v's self-attention routers tied to k's (cross-attention routes per module)
    alone = get_molora_model(build_base("bart"), MoLoRAConfig(target_modules=["q_proj", "k_proj", "v_proj"]))
    state = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in alone.named_parameters():
            source = name
            if ".self_attn." in name:
                for follower in ("q_proj", "v_proj"):
                    source = source.replace(f".{follower}.router.", ".k_proj.router.")
            if param.requires_grad:
                param.copy_(state[source])
    batch = make_batch(batch=2, pad_last=2)
    with torch.no_grad():
        grouped = model(**batch, decoder_input_ids=batch["input_ids"]).logits
        per_module = alone(**batch, decoder_input_ids=batch["input_ids"]).logits
    assert (grouped - per_module).abs().max() <= 1e-5 * max(1.0, per_module.abs().max().item())


def test_cross_attention_is_not_grouped():
    model = get_molora_model(
        build_base("bart"), MoLoRAConfig(target_modules=["q_proj", "k_proj", "v_proj"], routing_scope="input")
    )
    routed = {name for name, layer in model._layers if layer.router is not None}
    cross = [name for name, _ in model._layers if "encoder_attn" in name]
    assert cross and set(cross) <= routed  # k/v read the encoder, q the decoder: each routes itself
    assert not any(name.endswith(("self_attn.q_proj", "self_attn.v_proj")) for name in routed)


def test_save_load_and_cached_generation(tmp_path):
    model = get_molora_model(build_base("llama"), config("intuition"))
    randomize_experts(model)
    model.eval()
    batch = make_batch(batch=2)
    expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(build_base("llama"), tmp_path)
    assert loaded.molora_config.routing_scope == "input"
    assert torch.allclose(loaded(**batch).logits, expected, atol=1e-6)
    prompt = {k: v[:, :5] for k, v in batch.items()}
    cached = loaded.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    uncached = loaded.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)


def test_gradient_checkpointing_gives_the_same_gradients():
    results = []
    for checkpointing in (False, True):
        model = get_molora_model(build_base("llama"), config("topk"))
        randomize_experts(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        batch = make_batch()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        results.append(grads(model))
    for name, grad in results[0].items():
        assert torch.allclose(grad, results[1][name], atol=1e-6), name


def test_bad_input_groups_are_refused():
    with pytest.raises(ValueError, match="input_groups"):
        MoLoRAConfig(routing_scope="input", input_groups=["q_proj|("])
    with pytest.raises(ValueError, match="input_groups must be a list"):
        MoLoRAConfig(routing_scope="input", input_groups="q_proj|k_proj")


def test_a_task_router_shared_per_input_merges_into_the_weights():
    model = get_molora_model(build_base("llama"), config("task"))
    randomize_experts(model)
    model.eval()
    batch = make_batch(batch=2)
    with torch.no_grad():
        expected = model(**batch, task_ids=[1, 1]).logits
        merged = model.merge_and_unload(task_id=1)
        assert torch.allclose(merged(**batch).logits, expected, atol=1e-4)
