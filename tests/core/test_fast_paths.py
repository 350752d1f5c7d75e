"""The layer's fast paths (router gate fused into the experts' matmul, intuition pooling after the projection,
per-sequence gates kept compact, in-place addmm into the base output) against a plain reference: the router
computed from its definition and a Python loop over experts, outputs and gradients within 1e-5 in fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from molora import MoLoRAConfig, get_molora_model
from molora.core.context import RoutingContext, routing_context
from molora.core.layer import MoLoRALinear
from molora.core.patcher import inject
from tests.conftest import EXPERT_TYPES, ROUTERS, build_base, make_batch, molora_config, outputs_of, randomize_experts
from tests.reference import loop_delta

D_IN, D_OUT, NUM_EXPERTS, NUM_TASKS = 12, 10, 4, 3


class Holder(nn.Module):
    def __init__(self, base: str):
        super().__init__()
        self.proj = nn.Linear(D_IN, D_OUT) if base == "linear" else Conv1D(D_OUT, D_IN)


def make_layer(base: str, router: str, expert_type: str, **overrides) -> MoLoRALinear:
    torch.manual_seed(0)
    holder = Holder(base)
    options = dict(
        target_modules=["proj"],
        num_experts=NUM_EXPERTS,
        rank=3,
        expert_type=expert_type,
        router=router,
        num_tasks=NUM_TASKS if router == "task" else None,
        aux_losses={},
    )
    options.update(overrides)
    inject(holder, MoLoRAConfig(**options))
    randomize_experts(holder)
    return holder.proj


def reference_logits(layer: MoLoRALinear, x: torch.Tensor, mask: torch.Tensor, task_ids, prompt_mask) -> torch.Tensor:
    """Router logits from the router's definition (pool x first, then the whole MLP)."""
    router = layer.router
    if router.name == "task":
        return router.task_embedding.weight[task_ids].unsqueeze(1).expand(*x.shape[:2], -1)
    if router.name != "intuition":
        return x @ router.gate.weight.T
    weights = mask.float().unsqueeze(-1)
    if router.pooling == "causal":
        pooled = (x * weights).cumsum(1) / weights.cumsum(1).clamp_min(1)
    else:
        if router.pooling == "prompt":
            weights = weights * prompt_mask.float().unsqueeze(-1)
        pooled = ((x * weights).sum(1) / weights.sum(1).clamp_min(1)).unsqueeze(1).expand_as(x)
    return router.mlp(pooled)


def reference_forward(layer: MoLoRALinear, x: torch.Tensor, mask, task_ids, prompt_mask) -> torch.Tensor:
    probs = reference_logits(layer, x, mask, task_ids, prompt_mask).softmax(-1)
    top_k = layer.router.top_k
    if top_k is None:
        weights = probs
    else:
        top, indices = probs.topk(top_k, dim=-1)
        if layer.router.renormalize:
            top = top / top.sum(-1, keepdim=True)
        weights = torch.zeros_like(probs).scatter(-1, indices, top)
    base = x @ layer.base_layer.weight.T if isinstance(layer.base_layer, nn.Linear) else x @ layer.base_layer.weight
    flat = x.reshape(-1, D_IN)
    delta = loop_delta(layer.experts, flat, weights.reshape(-1, NUM_EXPERTS)).reshape(*x.shape[:2], D_OUT)
    return base + layer.base_layer.bias + layer.scaling * delta


def inputs(router: str):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 7, D_IN, generator=generator)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0  # right padding
    mask[2, :2] = 0  # left padding
    prompt_mask = torch.zeros(3, 7, dtype=torch.bool)
    prompt_mask[:, :4] = True
    task_ids = torch.tensor([2, 0, 1]) if router == "task" else None
    return x, mask, task_ids, prompt_mask


def compare(layer: MoLoRALinear, router: str) -> None:
    x, mask, task_ids, prompt_mask = inputs(router)
    ctx = RoutingContext(task_ids=task_ids, prompt_mask=prompt_mask, attention_mask=mask)
    params = [p for p in layer.parameters() if p.requires_grad]
    grad_out = torch.randn(3, 7, D_OUT, generator=torch.Generator().manual_seed(4))

    x_fast = x.clone().requires_grad_(True)
    with routing_context(ctx):
        out = layer(x_fast)
    fast_grads = torch.autograd.grad(out, [x_fast, *params], grad_out)

    x_ref = x.clone().requires_grad_(True)
    ref = reference_forward(layer, x_ref, mask, task_ids, prompt_mask)
    ref_grads = torch.autograd.grad(ref, [x_ref, *params], grad_out)

    assert (out - ref).abs().max() < 1e-5
    for fast, slow in zip(fast_grads, ref_grads, strict=True):
        # 1e-5 absolute, relative for the few router gradients above 1 (fp32 has ~1e-7 relative resolution)
        assert (fast - slow).abs().max() < 1e-5 * max(1.0, slow.abs().max().item())


@pytest.mark.parametrize("base", ["linear", "conv1d"])
@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
@pytest.mark.parametrize("router", ROUTERS)
def test_layer_matches_reference_outputs_and_gradients(base, expert_type, router):
    layer = make_layer(base, router, expert_type)
    compare(layer.train(), router)  # train mode, no dropout: the router's gate rides in the experts' matmul
    compare(layer.eval(), router)


@pytest.mark.parametrize("pooling", ["causal", "prompt", "mean"])
def test_intuition_pooling_after_projection_matches_pooling_first(pooling):
    compare(make_layer("linear", "intuition", "lora", intuition_pooling=pooling), "intuition")


@pytest.mark.parametrize("router", ["topk", "switch", "task"])
@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_grouped_dispatch_matches_reference(router, expert_type):
    # the task router with top_k gives one sparse gate per sequence (broadcast along the tokens)
    top_k = {"task": 2}.get(router)
    layer = make_layer("linear", router, expert_type, dispatch="grouped", **({"top_k": top_k} if top_k else {}))
    assert layer.grouped_dispatch(torch.zeros(1, D_IN))
    compare(layer.train(), router)


def test_auto_dispatch_follows_the_measured_crossover():
    assert not make_layer("linear", "topk", "lora").grouped_dispatch(torch.zeros(1, D_IN))  # E=4, k=2
    wide = make_layer("linear", "topk", "lora", num_experts=32)
    assert wide.grouped_dispatch(torch.zeros(1, D_IN))
    assert not make_layer("linear", "topk", "lora", num_experts=32, dispatch="dense").grouped_dispatch(wide.weight)


def test_unfused_path_matches_the_fused_one():
    # Dropout active in training keeps the router on the clean input; with p -> 0 both paths must agree.
    layer = make_layer("linear", "topk", "lora", dropout=1e-12)
    assert not isinstance(layer.dropout, nn.Identity)
    compare(layer.train(), "topk")


def test_in_place_accumulation_leaves_hooked_and_repeated_outputs_intact():
    layer = make_layer("linear", "softmax", "lora")
    x, mask, _, _ = inputs("softmax")
    with routing_context(RoutingContext(attention_mask=mask)):
        first = layer(x)
        assert torch.equal(first, layer(x))  # nothing the first call returned was overwritten by the second
        seen = []
        handle = layer.base_layer.register_forward_hook(lambda m, i, o: seen.append(o))
        hooked = layer(x)
        handle.remove()
    assert torch.equal(hooked, first)
    assert torch.allclose(seen[0], F.linear(x, layer.base_layer.weight, layer.base_layer.bias).reshape(-1, D_OUT))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_merge_and_unload_reproduces_the_task_router(arch, expert_type):
    batch = make_batch(batch=3)
    model = get_molora_model(build_base(arch), molora_config(arch, "task", expert_type))
    randomize_experts(model)
    model.eval()
    with torch.no_grad():
        expected = outputs_of(model(**batch, task_ids=torch.full((3,), 1)))
        plain = model.merge_and_unload(task_id=1)
        assert not any(isinstance(m, MoLoRALinear) for m in plain.modules())
        merged = outputs_of(plain(**batch))
    assert (merged - expected).abs().max() < 1e-5


def test_merge_refuses_token_dependent_routing_and_bad_task_ids():
    model = get_molora_model(build_base("llama"), molora_config("llama", "softmax"))
    randomize_experts(model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="router 'softmax' weighs the experts per token"):
        model.merge_and_unload(task_id=0)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert any(isinstance(m, MoLoRALinear) for m in model.modules())
    task_model = get_molora_model(build_base("llama"), molora_config("llama", "task"))
    with pytest.raises(ValueError, match="task_id must be in"):
        task_model.merge_and_unload(task_id=7)
    with pytest.raises(ValueError, match="needs task_id"):
        task_model.merge_and_unload()


@pytest.mark.parametrize("router", ["softmax", "task"])  # a gate per token and one per sequence
def test_autocast_mixture_matches_fp32_within_bf16_precision(router):
    layer = make_layer("linear", router, "lora").train()
    x, mask, task_ids, prompt_mask = inputs(router)
    params = [p for p in layer.parameters() if p.requires_grad]
    with routing_context(RoutingContext(task_ids=task_ids, prompt_mask=prompt_mask, attention_mask=mask)):
        x_ref = x.clone().requires_grad_(True)
        ref = layer(x_ref)
        ref_grads = torch.autograd.grad(ref.sum(), [x_ref, *params])
        x_bf16 = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x_bf16)
        grads = torch.autograd.grad(out.float().sum(), [x_bf16, *params])
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 2e-2 * ref.abs().max()
    for fast, slow in zip(grads, ref_grads, strict=True):
        assert fast.dtype == slow.dtype
        assert (fast.float() - slow).abs().max() < 3e-2 * slow.abs().max()
