"""Merging a fixed weighting into the base weights: equal logits to the unmerged model under the same gates, against
a delta computed by hand from the expert tensors, and refusals that leave the model untouched."""

from __future__ import annotations

import contextlib

import pytest
import torch

from molora import MoLoRALinear, get_molora_model
from molora.core.routers import RouterOutput
from tests.conftest import EXPERT_TYPES, build_base, make_batch, molora_config, outputs_of, randomize_experts

CASES = {  # name: (arch, router, expert_type, config overrides)
    "softmax-lora": ("llama", "softmax", "lora", {}),
    "topk-rank1": ("llama", "topk", "rank1", {}),
    "switch-gpt2": ("gpt2", "switch", "lora", {}),
    "intuition-sum": ("llama", "intuition", "lora", {"mixture_scaling": "sum"}),
    "shared-hydra": ("llama", "softmax", "lora", {"shared_experts": 1, "share_lora_a": True}),
    "mixlora": (
        "llama",
        "topk",
        "lora",
        dict(
            target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
            num_experts={"q_proj|v_proj": 1, ".*": 4},
            routing_scope="block",
            mixture_scaling="sum",
            top_k=2,
        ),
    ),
}


def build(case: str, seed: int = 0):
    arch, router, expert_type, overrides = CASES[case]
    model = get_molora_model(build_base(arch), molora_config(arch, router, expert_type, **overrides))
    torch.manual_seed(seed)
    randomize_experts(model)
    with torch.no_grad():  # a different draw per seed (randomize_experts reseeds)
        for param in model.parameters():
            if param.requires_grad:
                param.mul_(1 + 0.5 * torch.rand_like(param))
    return model.eval()


@contextlib.contextmanager
def forced_gates(model, gates_for):
    """Every router returns the fixed gates gates_for(num_experts) on every token (the unmerged reference)."""
    routers = {id(layer.routing_router): layer.routing_router for _, layer in model._layers}
    originals = {}
    for key, router in routers.items():
        gates = gates_for(router.num_experts)

        def forward(x, inputs=None, projected=None, gates=gates):
            shape = (*x.shape[:-1], gates.shape[0])
            fixed = gates.float().expand(shape)
            return RouterOutput(logits=torch.zeros(shape), probs=fixed, gates=fixed, indices=None)

        originals[key] = router.forward
        router.forward = forward
    try:
        yield
    finally:
        for key, router in routers.items():
            router.forward = originals[key]


def factors(case: str, name: str) -> tuple[float, float]:
    """(scaling, gate multiplier) of a module, from the case's config by the documented rules, not from the layer:
    alpha/r for LoRA experts, alpha/E for a bank of E rank-1 experts; mixture_scaling='sum' multiplies the routed gates
    by the experts each token uses (k of top-k, capped at the module's count; all of them when dense)."""
    arch, router, expert_type, overrides = CASES[case]
    config = molora_config(arch, router, expert_type, **overrides)
    routed = 1 if isinstance(config.num_experts, dict) and name.endswith(("q_proj", "v_proj")) else 4
    bank = routed + config.shared_experts
    scaling = config.alpha / (bank if expert_type == "rank1" else config.rank)
    if config.mixture_scaling != "sum":
        return scaling, 1.0
    return scaling, float(min(config.top_k, routed) if config.top_k else routed)


def hand_delta(layer: MoLoRALinear, gates: torch.Tensor, scaling: float, multiplier: float) -> torch.Tensor:
    """scaling * (multiplier * sum_e g_e B_e A_e + sum_shared B_s A_s) from the stored tensors, expert by expert."""
    experts = layer.experts
    total = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
    count = experts.num_experts
    for e in range(count):
        weight = multiplier * float(gates[e]) if e < gates.shape[0] else 1.0
        if experts.expert_type == "rank1":
            product = torch.outer(experts.v[e].double(), experts.u[e].double())
        else:
            a = experts.lora_A if experts.lora_A.dim() == 2 else experts.lora_A[e]
            product = experts.lora_B[e].double().T @ a.double()
        total += weight * product
    return scaling * total


def one_hot(expert: int):
    return lambda count: torch.nn.functional.one_hot(torch.tensor(min(expert, count - 1)), count).float()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merged_expert_and_weights_match_the_unmerged_model(case, seed):
    batch = make_batch(batch=3)
    weights = torch.tensor([0.1, 0.55, 0.0, 0.35]) + 0.05 * seed
    for fixed in ({"expert": seed % 4}, {"weights": weights}):
        model = build(case, seed)
        gates_for = one_hot(fixed["expert"]) if "expert" in fixed else (lambda n: weights if n == 4 else torch.ones(1))
        layers = dict(model._layers)
        base_weights = {name: layer.base_layer.weight.detach().clone() for name, layer in layers.items()}
        hand = {
            name: hand_delta(layer, gates_for(layer.routing_router.num_experts), *factors(case, name))
            for name, layer in layers.items()
        }
        with torch.no_grad(), forced_gates(model, gates_for):
            expected = outputs_of(model(**batch))
        plain = model.merge_and_unload(**fixed)
        assert not any(isinstance(m, MoLoRALinear) for m in plain.modules())
        with torch.no_grad():
            merged = outputs_of(plain(**batch))
        assert (merged - expected).abs().max() < 1e-4, fixed
        for name, delta in hand.items():
            written = plain.get_submodule(name).weight.double() - base_weights[name].double()
            written = written if isinstance(plain.get_submodule(name), torch.nn.Linear) else written.T
            assert torch.allclose(written, delta, atol=1e-5), name


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_the_hand_delta_detects_a_wrong_gate(expert_type):
    """The reference can fail: merging expert 1 does not match the hand delta of expert 0."""
    case = "softmax-lora" if expert_type == "lora" else "topk-rank1"
    model = build(case)
    name, layer = model._layers[0]
    before = layer.base_layer.weight.detach().clone()
    plain = model.merge_and_unload(expert=1)
    written = plain.get_submodule(name).weight.double() - before.double()
    assert torch.allclose(written, hand_delta(layer, one_hot(1)(4), *factors(case, name)), atol=1e-5)
    assert not torch.allclose(written, hand_delta(layer, one_hot(0)(4), *factors(case, name)), atol=1e-5)


def unchanged(model, before) -> bool:
    return all(torch.equal(before[n], p) for n, p in model.named_parameters()) and any(
        isinstance(m, MoLoRALinear) for m in model.modules()
    )


def test_refusals_name_the_cause_and_change_nothing():
    model = build("mixlora")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"weighs the experts per token.*expert=i.*weights="):
        model.merge_and_unload()
    with pytest.raises(ValueError, match=r"expert=4 does not fit .*mlp.gate_proj \(4 experts\)"):
        model.merge_and_unload(expert=4)
    with pytest.raises(ValueError, match=r"3 weights does not fit"):
        model.merge_and_unload(weights=[0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="finite numbers"):
        model.merge_and_unload(weights=[0.2, float("nan"), 0.3, 0.5])
    with pytest.raises(ValueError, match="give one of task_id, expert and weights, got task_id, expert"):
        model.merge_and_unload(task_id=0, expert=1)
    with pytest.raises(ValueError, match="non-negative int"):
        model.merge_and_unload(expert=True)
    assert unchanged(model, before)


def test_safe_merge_refuses_non_finite_weights_before_writing_any():
    model = build("softmax-lora")
    last_name, last = model._layers[-1]
    with torch.no_grad():
        last.experts.lora_B[2].fill_(float("inf"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=rf"safe_merge: .*{last_name}.*no weight was changed"):
        model.merge_and_unload(expert=2, safe_merge=True)
    assert unchanged(model, before)  # the first modules, checked before the broken last one, were not written
    # The guard is what stopped it: without safe_merge the same merge writes inf.
    plain = model.merge_and_unload(expert=2)
    assert not torch.isfinite(plain.get_submodule(last_name).weight).all()


def test_safe_merge_of_finite_weights_equals_the_plain_merge():
    first = build("topk-rank1").merge_and_unload(weights=[0.25, 0.25, 0.25, 0.25], safe_merge=True)
    second = build("topk-rank1").merge_and_unload(weights=[0.25, 0.25, 0.25, 0.25])
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))
