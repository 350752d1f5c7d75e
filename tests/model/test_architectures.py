"""Every architecture transformers registers (tests/architectures.py builds each as a tiny model): experts in every
linear but the head, identity at init, a train step with aux losses, save/load, and cached decoding equal to full
forwards for every router (greedy: every router decodes). The base model alone decides what is excluded
(docs/architectures.md lists it)."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from molora import MoLoRAConfig, MoLoRAModel, get_molora_model
from molora.core.routers import ROUTERS
from tests.architectures import (
    DECODE_TOLERANCE,
    FAMILY,
    Excluded,
    base_check,
    build,
    decoding_gap,
    forward_inputs,
    grid,
    labels_for,
    model_inputs,
)

NUM_TASKS = 2
TASK_IDS = torch.tensor([0, 1])
# Every router with a path of its own through a layer; the domain router takes the task router's (one gate per
# sequence from the task ids) and is checked on its own in tests/core/test_domain_router.py: 218 types x one more
# router would add a sixth to this file's time for no path not already taken.
ARCH_ROUTERS = [name for name in ROUTERS if name != "domain"]


def config_for(router: str, **overrides) -> MoLoRAConfig:
    options = dict(
        target_modules="all-linear",
        num_experts=4,
        rank=2,
        alpha=4,
        router=router,
        num_tasks=NUM_TASKS if ROUTERS[router].needs_task_ids else None,
        aux_losses={"balance": 0.01, "z": 0.001},
    )
    if router == "topk":
        options["top_k"] = 2
    return MoLoRAConfig(**{**options, **overrides})


def routing_inputs(router: str) -> dict:
    return {"task_ids": TASK_IDS} if ROUTERS[router].needs_task_ids else {}


def randomise_adapter(model: MoLoRAModel, seed: int) -> None:
    """Non-zero experts and routers, so the mixture and its routing change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def base_or_skip(family: str, model_type: str) -> str | None:
    try:
        return base_check(family, model_type)
    except Excluded as err:
        pytest.skip(f"{model_type}: {err}")


def every_linear_but_the_head(model: torch.nn.Module) -> set[str]:
    """The explicit list 'all-linear' stands for (PEFT's rule; tests/core/test_patcher.py compares with PEFT itself)."""
    head = model.get_output_embeddings()
    return {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head}


def check_train_step_and_save_load(family: str, model_type: str, router: str, tmp_path) -> None:
    model = build(family, model_type)
    inputs = model_inputs(model)
    plain = forward_inputs(model, inputs)
    with torch.no_grad():
        expected = model(**plain).logits
    molora = get_molora_model(model, config_for(router))
    with torch.no_grad():
        # identity at init up to fp32 rounding (the fused path sums in another order: 1.6e-6 relative on cpmant)
        torch.testing.assert_close(molora(**plain, **routing_inputs(router)).logits, expected, rtol=1e-5, atol=1e-6)

    molora.train()
    adapter = {n for n, p in molora.named_parameters() if p.requires_grad}
    assert adapter and all(".experts." in n or ".router." in n for n in adapter)
    before = {n: p.detach().clone() for n, p in molora.named_parameters()}
    out = molora(**inputs, **labels_for(model, inputs), **routing_inputs(router))
    aux = molora.aux_loss()
    assert torch.isfinite(out.loss) and torch.isfinite(aux) and aux > 0
    (out.loss + aux).backward()
    grads = {n: p.grad for n, p in molora.named_parameters() if p.grad is not None}
    assert set(grads) <= adapter, f"base tensors got gradients: {sorted(set(grads) - adapter)[:3]}"
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if ".experts." in n)
    torch.optim.SGD([p for p in molora.parameters() if p.requires_grad], lr=0.1).step()
    changed = {n for n, p in molora.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= adapter

    molora.eval()
    with torch.no_grad():
        trained = molora(**plain, **routing_inputs(router)).logits
    molora.save_pretrained(tmp_path / router)
    loaded = MoLoRAModel.from_pretrained(build(family, model_type), tmp_path / router)
    trained_buffers = dict(molora.named_buffers())  # the base's own running statistics (BatchNorm) moved in training
    with torch.no_grad():
        for name, buffer in loaded.named_buffers():
            buffer.copy_(trained_buffers[name])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**plain, **routing_inputs(router)).logits, trained, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("family", "model_type"), grid(), ids=[f"{f}-{t}" for f, t in grid()])
def test_every_architecture_takes_experts_in_every_linear(family, model_type, tmp_path):
    decoding_note = base_or_skip(family, model_type)
    model = build(family, model_type)
    molora = get_molora_model(model, config_for("softmax"))
    report = molora.injection_report
    expected = every_linear_but_the_head(build(family, model_type))
    assert {m.name for m in report.modules} | set(report.left_out) == expected
    for name in report.left_out:  # only a linear subclass whose forward is not its linear map (Llama 4's router)
        module = model.get_submodule(name)
        try:
            returned = module(torch.randn(1, module.in_features))
        except Exception:
            continue
        assert not isinstance(returned, torch.Tensor) or returned.shape != (1, module.out_features)
    head = model.get_output_embeddings()
    assert head is None or not any(m is head for m in molora.modules() if hasattr(m, "base_layer"))

    # Token routers on every family; the routers that pool a sequence and the task router too where nothing
    # decodes (encoders, vision), so a module that sees [batch, features] (a pooler) is covered by each.
    trained = ["topk"] if FAMILY[family].generates else ARCH_ROUTERS
    for router in trained:
        check_train_step_and_save_load(family, model_type, router, tmp_path)
    if not FAMILY[family].generates:
        return
    if decoding_note is not None:
        pytest.skip(f"{model_type}: {decoding_note}")
    inputs = model_inputs(build(family, model_type))
    for seed, router in enumerate(ARCH_ROUTERS):
        molora = get_molora_model(build(family, model_type), config_for(router))
        randomise_adapter(molora, seed)
        molora.eval()
        try:
            gap = decoding_gap(molora, inputs, relative=True, **routing_inputs(router))
        except ValueError as err:  # a head-side module behind logits_to_keep: the error names the remedy
            assert "logits_to_keep=0" in str(err) and router == "intuition", err
            gap = decoding_gap(molora, inputs, {"logits_to_keep": 0}.items(), relative=True, **routing_inputs(router))
        assert gap <= DECODE_TOLERANCE, (
            f"{model_type}, router={router}: cached decoding differs from full forwards by {gap:.2g} (of the top logit)"
        )
