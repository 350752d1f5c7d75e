"""What a MoLoRA layer keeps for backward, next to a PEFT LoRA of the same rank (E*r): the experts' [N, E*r]
intermediate once, plus the router's own per-token numbers; no second [N, E*r] activation (the gated product is
recomputed in backward) and no stacked copy of the output sides."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from molora import MoLoRAConfig
from molora.core.context import RoutingContext, routing_context
from molora.core.patcher import inject

N_BATCH, N_LEN, D_IN, D_OUT, NUM_EXPERTS, RANK = 4, 64, 48, 40, 4, 16


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D_IN, D_OUT, bias=False)


def saved_bytes(module: nn.Module, x: torch.Tensor, **call) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps from one forward."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x, **call).sum().backward()
    return sum(storages.values())


def peft_layer() -> nn.Module:
    import peft

    holder = Holder()
    holder.requires_grad_(False)
    return peft.get_peft_model(holder, peft.LoraConfig(r=NUM_EXPERTS * RANK, target_modules=["proj"])).base_model.model


@pytest.mark.parametrize("router", ["softmax", "topk", "task"])
def test_layer_keeps_no_more_than_peft_plus_the_router(router):
    torch.manual_seed(0)
    x = torch.randn(N_BATCH, N_LEN, D_IN, requires_grad=True)
    peft_bytes = saved_bytes(peft_layer().proj, x)

    holder = Holder()
    holder.requires_grad_(False)
    config = MoLoRAConfig(
        target_modules=["proj"],
        num_experts=NUM_EXPERTS,
        rank=RANK,
        router=router,
        num_tasks=2 if router == "task" else None,
        aux_losses={},
    )
    inject(holder, config)
    ctx = RoutingContext(task_ids=torch.tensor([0, 1, 0, 1]) if router == "task" else None)
    with routing_context(ctx):
        molora_bytes = saved_bytes(holder.proj.train(), x)
    tokens = N_BATCH * N_LEN
    # the router's numbers: its logits (the E extra columns of the shared matmul) and probabilities, the top-k
    # selection (weights, int64 indices), plus the [E*r + E, d_in] weight of the shared matmul (experts + gate)
    router_bytes = 4 * tokens * NUM_EXPERTS * 2 + (4 + 8) * tokens * NUM_EXPERTS
    assert molora_bytes <= peft_bytes + router_bytes + 4 * (NUM_EXPERTS * RANK + NUM_EXPERTS) * D_IN
    # and far below a second [N, E*r] activation: autograd through plain ops would keep the gated product too
    assert molora_bytes < peft_bytes + 4 * tokens * NUM_EXPERTS * RANK


def wide_layer(router: str) -> nn.Module:
    """A MoLoRA layer whose input is wide and whose batch is tiny: the weight of the shared matmul (experts' input
    sides + the router's first layer, [E*r + k, d_in]) outweighs every activation."""
    torch.manual_seed(0)
    holder = nn.Module()
    holder.proj = nn.Linear(2048, 8, bias=False)
    holder.requires_grad_(False)
    config = MoLoRAConfig(target_modules=["proj"], num_experts=NUM_EXPERTS, rank=RANK, router=router, aux_losses={})
    inject(holder, config)
    for param in holder.parameters():
        if param.requires_grad:
            nn.init.normal_(param)
    return holder.proj.train()


def bytes_left_allocated(fn) -> tuple[torch.Tensor, int]:
    """fn()'s result and the bytes torch allocated during the call that are still allocated after it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = prof.profiler.kineto_results.events()
    return result, sum(e.nbytes() for e in events if e.name() == "[memory]")


@pytest.mark.parametrize("router", ["softmax", "intuition"])
def test_the_shared_matmul_weight_is_rebuilt_for_backward_not_kept(router):
    layer = wide_layer(router)
    x = torch.randn(1, 2, 2048, requires_grad=True)
    out, kept = bytes_left_allocated(lambda: layer(x))
    joined_bytes = 4 * layer.router.input_projection().shape[0] * 2048 + 4 * NUM_EXPERTS * RANK * 2048
    assert kept < joined_bytes / 4  # the old code kept the whole concatenation
    out.square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters() if p.requires_grad]

    # the reference: under other saved-tensor hooks autograd keeps the concatenated weight as usual
    x.grad = None
    layer.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        layer(x).square().sum().backward()
    expected = [x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_weight_changed_between_forward_and_backward_is_an_error():
    layer = wide_layer("softmax")
    out = layer(torch.randn(1, 2, 2048, requires_grad=True))
    with torch.no_grad():
        layer.experts.lora_A.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
