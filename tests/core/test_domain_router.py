"""router='domain': one LoRA per domain with the domain known (the multi-domain oracle). Task t's output is a PEFT
LoRA model's with expert t's weights, training touches only the experts of the tasks in the batch, a per-task merge
reproduces it, and cached decoding equals full forwards."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from molora import MoLoRAConfig, get_molora_model
from molora.core.layer import MoLoRALinear
from tests.conftest import TARGETS, build_base, make_batch, molora_config
from tests.model.test_generation import max_step_error

TASKS = 3


def domain_model(seed: int, **overrides):
    options = dict(num_experts=TASKS, num_tasks=TASKS, rank=4, alpha=8, **overrides)
    model = get_molora_model(build_base("llama", seed=seed), molora_config("llama", "domain", **options))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


def peft_with_expert(seed: int, model, expert: int):
    """PEFT LoRA on the same modules, rank and alpha, holding `expert`'s A and B in every module."""
    peft = get_peft_model(
        build_base("llama", seed=seed), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"])
    )
    layers = {name.split("model.", 1)[1]: m for name, m in model.named_modules() if isinstance(m, MoLoRALinear)}
    copied = 0
    with torch.no_grad():
        for name, module in peft.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                layer = layers[name.split("model.", 2)[2]]
                module.lora_A["default"].weight.copy_(layer.experts.lora_A[expert])
                module.lora_B["default"].weight.copy_(layer.experts.lora_B[expert].T)
                copied += 1
    assert copied == len(layers) > 0
    return peft.eval()


@pytest.mark.parametrize("seed", range(4))
def test_each_task_runs_its_own_lora_exactly_as_peft_would(seed):
    model = domain_model(seed).eval()
    batch = make_batch(batch=2, pad_last=2, seed=seed)
    assert not [p for n, p in model.named_parameters() if ".router." in n]  # nothing learned: a rule
    outputs = []
    for task in range(TASKS):
        with torch.no_grad():
            routed = model(**batch, task_ids=torch.full((2,), task)).logits
            expected = peft_with_expert(seed, model, task)(**batch).logits
        assert (routed - expected).abs().max() < 1e-5, task
        outputs.append(routed)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3  # the tasks do differ
    with torch.no_grad():  # a mixed batch: each row its own task's LoRA
        mixed = model(**batch, task_ids=torch.tensor([2, 0])).logits
    assert torch.allclose(mixed[0], outputs[2][0], atol=1e-5) and torch.allclose(mixed[1], outputs[0][1], atol=1e-5)


def test_a_step_moves_only_the_experts_of_the_tasks_in_the_batch():
    model = domain_model(0).train()
    batch = make_batch(batch=2, seed=3)
    out = model(**batch, labels=batch["input_ids"], task_ids=torch.tensor([1, 1]))
    (out.loss + model.aux_loss()).backward()
    layers = [m for m in model.modules() if isinstance(m, MoLoRALinear)]
    for layer in layers:
        grads = layer.experts.lora_A.grad.flatten(1).abs().sum(1)
        assert grads[1] > 0 and grads[0] == 0 and grads[2] == 0


def test_merging_a_task_reproduces_its_routing():
    model = domain_model(1).eval()
    batch = make_batch(batch=2, seed=5)
    with torch.no_grad():
        expected = model(**batch, task_ids=torch.tensor([2, 2])).logits
        merged = model.merge_and_unload(task_id=2)
        assert (merged(**batch).logits - expected).abs().max() < 1e-4


def test_cached_decoding_equals_full_forwards():
    errors = [max_step_error("llama", "domain", None, 3, True, 1, seed) for seed in range(3)]
    assert max(errors) < 1e-4, errors


def test_configs_it_cannot_run_are_refused_by_name():
    with pytest.raises(ValueError, match="top_k must be 1, got 2"):
        MoLoRAConfig(router="domain", num_experts=4, num_tasks=4, top_k=2)
    with pytest.raises(ValueError, match="each of the 5 tasks an expert of its own: num_experts must be at least"):
        MoLoRAConfig(router="domain", num_experts=4, num_tasks=5)
    with pytest.raises(ValueError, match="num_tasks is required"):
        MoLoRAConfig(router="domain", num_experts=4)
    with pytest.warns(UserWarning, match="1 expert\\(s\\) per routed module serve no task"):
        MoLoRAConfig(router="domain", num_experts=4, num_tasks=3)
    # MixLoRA's layout: the one-expert modules are shared by every task
    shared = MoLoRAConfig(router="domain", num_experts={"q_proj": 1, ".*": 3}, num_tasks=3)
    model = get_molora_model(build_base("llama"), shared)
    with torch.no_grad():
        model(**make_batch(), task_ids=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="needs task_ids"):
        model(**make_batch())
