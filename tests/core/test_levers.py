"""The ablation's levers against plain references: mixture scaling, shared experts, HydraLoRA's shared A, router
init scale and learning-rate multiplier, global-batch balance over a window, and the task mutual-information loss."""

from __future__ import annotations

import math

import pytest
import torch

from molora import MoLoRAConfig, get_molora_model
from molora.core.context import RoutingContext, routing_context
from molora.core.experts import SharedALoRAExperts
from molora.core.losses import AUX_LOSSES, layer_aux_terms, routed_fraction, task_mi_loss
from molora.core.routers import ROUTERS, RouterOutput
from molora.run.config import RunConfig
from molora.run.setup import make_optimizer
from tests.conftest import ROUTERS as TESTED_ROUTERS
from tests.conftest import build_base, make_batch, molora_config, randomize_experts
from tests.core.test_fast_paths import D_IN, D_OUT, inputs, make_layer, reference_logits


def reference_output(layer, x, mask, task_ids, prompt_mask, multiplier: float, shared: int) -> torch.Tensor:
    """base + scaling * (sum over routed e of multiplier * w_e B_e A_e x + sum over shared s of B_s A_s x), a loop."""
    probs = reference_logits(layer, x, mask, task_ids, prompt_mask).softmax(-1)
    top_k = layer.router.top_k
    weights = probs
    if top_k is not None:
        top, indices = probs.topk(top_k, dim=-1)
        if layer.router.renormalize:
            top = top / top.sum(-1, keepdim=True)
        weights = torch.zeros_like(probs).scatter(-1, indices, top)
    experts = layer.experts
    out = x @ layer.base_layer.weight.T + layer.base_layer.bias
    for e in range(weights.shape[-1] + shared):
        a = experts.lora_A if isinstance(experts, SharedALoRAExperts) else experts.lora_A[e]
        gate = weights[..., e : e + 1] * multiplier if e < weights.shape[-1] else 1.0
        out = out + layer.scaling * gate * ((x @ a.T) @ experts.lora_B[e])
    return out


@pytest.mark.parametrize("router", TESTED_ROUTERS)
@pytest.mark.parametrize(
    "lever",
    [
        {"mixture_scaling": "sum"},
        {"shared_experts": 1},
        {"share_lora_a": True},
        {"shared_experts": 2, "mixture_scaling": "sum", "share_lora_a": True},
    ],
)
def test_levers_match_a_loop_reference_in_outputs_and_gradients(router, lever):
    layer = make_layer("linear", router, "lora", **lever).train()
    shared = lever.get("shared_experts", 0)
    assert layer.experts.num_experts == 4 + shared and layer.router.num_experts == 4
    multiplier = float(layer.router.top_k or 4) if lever.get("mixture_scaling") == "sum" else 1.0
    x, mask, task_ids, prompt_mask = inputs(router)
    params = [p for p in layer.parameters() if p.requires_grad]
    grad_out = torch.randn(3, 7, D_OUT, generator=torch.Generator().manual_seed(4))
    x_fast = x.clone().requires_grad_(True)
    with routing_context(RoutingContext(task_ids=task_ids, prompt_mask=prompt_mask, attention_mask=mask)):
        out = layer(x_fast)
    fast = torch.autograd.grad(out, [x_fast, *params], grad_out)
    x_ref = x.clone().requires_grad_(True)
    ref = reference_output(layer, x_ref, mask, task_ids, prompt_mask, multiplier, shared)
    slow = torch.autograd.grad(ref, [x_ref, *params], grad_out)
    assert (out - ref).abs().max() < 1e-5 * max(1.0, ref.abs().max().item())  # fp32 rounding grows with |out|
    for f, s in zip(fast, slow, strict=True):
        assert (f - s).abs().max() < 1e-5 * max(1.0, s.abs().max().item())


def test_the_lever_reference_can_fail():
    """The reference above must tell the levers apart: with the gates left unscaled it disagrees."""
    layer = make_layer("linear", "softmax", "lora", mixture_scaling="sum", shared_experts=1)
    x, mask, task_ids, prompt_mask = inputs("softmax")
    with torch.no_grad(), routing_context(RoutingContext(attention_mask=mask)):
        out = layer(x)
        tolerance = 1e-5 * max(1.0, out.abs().max().item())  # fp32 rounding grows with |out| (here up to ~17)
        assert (out - reference_output(layer, x, mask, task_ids, prompt_mask, 4.0, 1)).abs().max() < tolerance
        assert (out - reference_output(layer, x, mask, task_ids, prompt_mask, 1.0, 1)).abs().max() > 1e-3
        assert (out - reference_output(layer, x, mask, task_ids, prompt_mask, 4.0, 0)).abs().max() > 1e-3


def test_hydra_experts_share_one_input_side_and_count_it_once():
    plain = make_layer("linear", "softmax", "lora")
    hydra = make_layer("linear", "softmax", "lora", share_lora_a=True)
    assert hydra.experts.lora_A.shape == (3, D_IN)
    count = lambda layer: sum(p.numel() for p in layer.experts.parameters())  # noqa: E731
    assert count(plain) - count(hydra) == 3 * 3 * D_IN  # four A of rank 3 -> one


def test_hydra_computes_its_shared_input_side_once():
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulWidths(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.widths = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ in ("mm", "addmm") and args[-2].shape[-1] == D_IN:
                self.widths.append(out.shape[-1])
            return out

    x, *_ = inputs("softmax")
    widths = {}
    for hydra in (False, True):
        layer = make_layer("linear", "softmax", "lora", share_lora_a=hydra).eval()
        with torch.no_grad(), MatmulWidths() as seen:
            layer(x)
        widths[hydra] = sorted(seen.widths)
    # the base layer's matmul (D_OUT), then the experts' input side with the router's 4 rows: E*r = 12 -> r = 3
    assert widths == {False: sorted([D_OUT, 12 + 4]), True: sorted([D_OUT, 3 + 4])}


@pytest.mark.parametrize("task_id", [0, 2])
def test_merging_a_task_router_with_shared_experts_and_sum_scaling_reproduces_the_forward(task_id):
    config = molora_config("llama", "task", shared_experts=1, mixture_scaling="sum", share_lora_a=True)
    model = get_molora_model(build_base("llama"), config)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.3)
    batch = make_batch()
    task_ids = torch.full((2,), task_id)
    expected = model(**batch, task_ids=task_ids).logits
    merged = model.merge_and_unload(task_id=task_id)
    assert torch.allclose(merged(**batch).logits, expected, atol=1e-4)


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_router_init_std_sets_the_scale_of_the_output_weights(router):
    if not ROUTERS[router].learned:  # nothing to scale: no weights at all
        with pytest.warns(UserWarning, match="router_init_std is ignored"):
            config = MoLoRAConfig(router=router, num_experts=8, num_tasks=8, router_init_std=0.5)
        assert not list(ROUTERS[router].from_config(512, 8, config).parameters())
        return
    stds = []
    for seed in range(5):
        torch.manual_seed(seed)
        config = MoLoRAConfig(router=router, num_tasks=200, intuition_hidden=256, router_init_std=0.5)
        built = ROUTERS[router].from_config(512, 8, config)
        weight = built.output_weight()
        stds.append(weight.std().item())
        default = ROUTERS[router].from_config(512, 8, MoLoRAConfig(router=router, num_tasks=200, intuition_hidden=256))
        assert default.output_weight().std().item() < 0.25  # the knob changes something
    assert all(abs(s - 0.5) < 0.05 for s in stds), stds


def test_router_lr_scale_multiplies_the_routers_learning_rate():
    config = RunConfig.from_dict({"molora": {"router": "softmax"}, "train": {"lr": 0.002, "router_lr_scale": 10.0}})
    config.molora = molora_config("llama")
    model = get_molora_model(build_base("llama"), config.molora)
    groups = make_optimizer(model, config).param_groups
    assert [g["lr"] for g in groups] == [0.002, pytest.approx(0.02)]
    assert all(".router." in n for n, p in model.named_parameters() if any(p is q for q in groups[1]["params"]))
    with pytest.raises(ValueError, match="router_lr_scale"):
        RunConfig.from_dict({"train": {"router_lr_scale": 0}})


def _routes(model):
    return {name: layer.last_route for name, layer in model._layers}


@pytest.mark.parametrize("router", ["softmax", "topk"])
def test_global_batch_balance_uses_the_routed_fraction_of_the_whole_window(router):
    window = 3
    model = get_molora_model(
        build_base("llama"), molora_config("llama", router, aux_losses={"balance": 1.0}, balance_window=window)
    ).train()
    randomize_experts(model)
    with torch.no_grad():  # routing far from uniform and different per batch, so the window changes the loss
        for name, param in model.named_parameters():
            if ".router." in name:
                param.mul_(10)
    seen: list[dict] = []
    for step in range(5):
        batch = make_batch(seed=step, pad_last=step % 3)
        model(**batch)
        routes = _routes(model)
        terms = model.aux_loss_terms(per_layer=True)
        seen.append({n: (r, int(r[1].sum())) for n, r in routes.items()})
        apart = []  # per layer: how far the micro-batch alone is from the window's value
        for name, ((route, mask), _) in seen[-1].items():
            recent = seen[-window:]
            total = sum(entry[name][1] for entry in recent)
            fraction = (
                sum(routed_fraction(entry[name][0][0], entry[name][0][1]).detach() * entry[name][1] for entry in recent)
                / total
            )
            # this forward's own fraction keeps its gradient; only the value is compared here
            mean_probs = (route.probs * mask.unsqueeze(-1)).sum((0, 1)) / mask.sum()
            expected = 4 * (fraction * mean_probs).sum()
            assert terms[name]["balance"].item() == pytest.approx(expected.item(), rel=1e-5)
            alone = AUX_LOSSES["balance"](RouterOutput(route.logits, route.probs, route.gates, route.indices), mask)
            apart.append(abs(alone.item() - expected.item()))
        if step > 0:  # the can-fail side: the micro-batch alone gives another number (in some layer, by chance close)
            assert max(apart) > 1e-3
    model.eval()
    model(**make_batch(seed=9))
    assert len(model._balance_window.history[next(iter(seen[-1]))]) == window - 1  # evaluation adds nothing


def hand_mutual_information(probs, mask, task_ids) -> float:
    """I(task; expert) over the non-padding tokens, each weighing the same, by loops."""
    tokens = [(b, t) for b in range(probs.shape[0]) for t in range(probs.shape[1]) if mask[b, t]]
    joint: dict[tuple[int, int], float] = {}
    for b, t in tokens:
        for e in range(probs.shape[2]):
            key = (int(task_ids[b]), e)
            joint[key] = joint.get(key, 0.0) + probs[b, t, e].item() / len(tokens)
    p_task: dict[int, float] = {}
    p_expert: dict[int, float] = {}
    for (task, e), p in joint.items():
        p_task[task] = p_task.get(task, 0.0) + p
        p_expert[e] = p_expert.get(e, 0.0) + p
    return sum(p * math.log(p / (p_task[t] * p_expert[e])) for (t, e), p in joint.items() if p > 0)


@pytest.mark.parametrize("seed", range(10))
def test_task_mi_loss_is_minus_the_mutual_information_by_hand(seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 6, 4, generator=generator) * 2
    mask = torch.rand(5, 6, generator=generator) > 0.2
    mask[:, 0] = True
    task_ids = torch.randint(0, 3, (5,), generator=generator)
    probs = logits.softmax(-1)
    route = RouterOutput(logits, probs, probs, None, task_ids=task_ids)
    assert task_mi_loss(route, mask).item() == pytest.approx(-hand_mutual_information(probs, mask, task_ids), abs=1e-5)


def test_task_mi_is_zero_for_task_blind_routing_and_log_tasks_for_one_expert_per_task():
    probs = torch.full((4, 3, 4), 0.25)
    task_ids = torch.tensor([0, 1, 2, 3])
    blind = RouterOutput(probs.log(), probs, probs, None, task_ids=task_ids)
    assert abs(task_mi_loss(blind, None).item()) < 1e-6
    own = torch.eye(4)[task_ids].unsqueeze(1).expand(4, 3, 4)
    specialised = RouterOutput(own, own, own, None, task_ids=task_ids)
    assert task_mi_loss(specialised, None).item() == pytest.approx(-math.log(4), abs=1e-5)
    with pytest.raises(ValueError, match=r"task_mi.*task_ids"):
        task_mi_loss(RouterOutput(probs.log(), probs, probs, None), None)


def test_task_mi_stacked_over_layers_equals_each_layer_alone():
    torch.manual_seed(0)
    task_ids = torch.tensor([0, 1, 1])
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] * 5])
    logits = [torch.randn(3, 5, 4, requires_grad=True) for _ in range(3)]
    routes = [RouterOutput(lg, lg.softmax(-1), lg.softmax(-1), None, task_ids=task_ids) for lg in logits]
    stacked = layer_aux_terms([(r, mask) for r in routes], ("task_mi",))
    for lg, terms in zip(logits, stacked, strict=True):
        alone = task_mi_loss(RouterOutput(lg, lg.softmax(-1), lg.softmax(-1), None, task_ids=task_ids), mask)
        assert terms["task_mi"].item() == pytest.approx(alone.item(), abs=1e-6)
        (g1,) = torch.autograd.grad(terms["task_mi"], lg, retain_graph=True)
        (g2,) = torch.autograd.grad(alone, lg)
        assert torch.allclose(g1, g2, atol=1e-6)


def test_lever_options_are_validated_by_name():
    for options, field in [
        ({"mixture_scaling": "max"}, "mixture_scaling"),
        ({"shared_experts": -1}, "shared_experts"),
        ({"shared_experts": 1, "dispatch": "grouped", "router": "topk"}, "shared_experts"),
        ({"share_lora_a": True, "expert_type": "rank1"}, "share_lora_a"),
        ({"router_init_std": -1.0}, "router_init_std"),
        ({"balance_window": 0}, "balance_window"),
    ]:
        with pytest.raises(ValueError, match=field):
            MoLoRAConfig(**options)
