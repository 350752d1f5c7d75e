"""torch.compile traces a MoLoRA model whole: the routing context is a plain slot (ContextVar.get was a graph break
in every layer), and the compiled model computes what the eager one does, outputs, aux loss and gradients."""

from __future__ import annotations

import pytest
import torch

from molora import get_molora_model
from tests.conftest import ROUTERS, build_base, make_batch, molora_config, outputs_of, randomize_experts, task_ids_for


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def model_and_batch(router: str, arch: str = "llama", pad_last: int = 2, seed: int = 1):
    model = get_molora_model(build_base(arch), molora_config(arch, router, aux_losses={"balance": 0.01, "z": 0.001}))
    randomize_experts(model)
    batch = make_batch(pad_last=pad_last, seed=seed)
    task_ids = task_ids_for(router)
    if task_ids is not None:
        batch["task_ids"] = task_ids
    return model, batch


@pytest.mark.parametrize("router", ROUTERS)
def test_the_model_traces_as_one_graph(router):
    model, batch = model_and_batch(router)
    explained = torch._dynamo.explain(model)(**batch)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("router", ["topk", "intuition", "task"])
def test_compiled_matches_eager_outputs_aux_and_gradients_across_calls(router, arch):
    model, _ = model_and_batch(router, arch)
    compiled = torch.compile(model, backend="aot_eager", dynamic=False)
    for call in range(3):  # new masks and task ids each call: same graph, no stale routing context
        _, batch = model_and_batch(router, arch, pad_last=call, seed=call)
        results = []
        for runner in (model, compiled):
            model.zero_grad(set_to_none=True)
            out = outputs_of(runner(**batch))
            loss = out.float().square().mean() + model.aux_loss()
            loss.backward()
            grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
            results.append((out.detach(), loss.detach(), grads))
        (out, loss, grads), (c_out, c_loss, c_grads) = results
        torch.testing.assert_close(c_out, out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c_loss, loss, atol=1e-5, rtol=1e-5)
        for got, want in zip(c_grads, grads, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scope", ["input", "block"])
def test_shared_routing_traces_as_one_graph_and_matches_eager(scope):
    targets = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    config = molora_config("llama", "topk", routing_scope=scope, target_modules=targets)
    model = get_molora_model(build_base("llama"), config)
    randomize_experts(model)
    batch = make_batch(pad_last=2)
    explained = torch._dynamo.explain(model)(**batch)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()
    expected = model(**batch).logits
    backend = "inductor" if scope == "input" else "aot_eager"  # the default backend's codegen once (~10 s), not twice
    assert torch.allclose(torch.compile(model, backend=backend)(**batch).logits, expected, atol=1e-4)
