"""Half-precision base models: finite forward and backward, routing in fp32, and the same top-k choice as fp32.

Near-ties are the one place where a half-precision model may legitimately route differently: if rounding moves every
logit of a token by at most d, the order of two experts whose fp32 logits are more than 2d apart cannot change, but
two experts closer than that may swap, and neither choice is wrong. The selection tests below therefore compare only
tokens whose gap at the top-k boundary exceeds 2d (d measured per token), require most tokens to qualify (so the
check is not vacuous), and show on a crafted input that a near-tie does flip.
"""

from __future__ import annotations

import pytest
import torch

from molora import MoLoRALinear, get_molora_model
from molora.core.routers import ROUTERS as ROUTER_CLASSES
from molora.core.routers import RouterOutput
from tests.conftest import (
    ARCHS,
    ROUTERS,
    build_base,
    make_batch,
    molora_config,
    outputs_of,
    randomize_experts,
    task_ids_for,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _layers(model) -> dict[str, MoLoRALinear]:
    return {n: m for n, m in model.base_model.named_modules() if isinstance(m, MoLoRALinear)}


def _run(model, router: str, batch: dict) -> torch.Tensor:
    return outputs_of(model(**batch, task_ids=task_ids_for(router, batch["input_ids"].shape[0])))


def _assert_fp32_route(route: RouterOutput, name: str) -> None:
    for tensor in (route.logits, route.probs, route.gates):
        assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all(), name
    assert torch.allclose(route.probs.sum(-1), torch.ones(()), atol=1e-5), name


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("router", ROUTERS)
def test_forward_and_backward_are_finite_and_routing_stays_fp32(arch, router, dtype):
    batch = make_batch(pad_last=2)
    model = get_molora_model(build_base(arch, dtype=dtype), molora_config(arch, router))
    with torch.no_grad():  # zero-initialised experts: the base model of the same dtype, bit for bit
        assert torch.equal(_run(model, router, batch), outputs_of(build_base(arch, dtype=dtype)(**batch)))
    randomize_experts(model)
    model.train()
    with model.record_routing() as recorder:
        out = _run(model, router, batch)
    assert out.dtype == dtype and torch.isfinite(out).all()

    # The routers' outputs of this forward, as the aux losses see them (the default config has aux losses).
    layers = _layers(model)
    for name, layer in layers.items():
        _assert_fp32_route(layer.last_route[0], name)
    terms = model.aux_loss_terms()
    assert terms and all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    # The recorder saw every layer, each non-padding token once.
    stats = recorder.stats()
    assert set(stats["layers"]) == set(layers)
    tokens = int(batch["attention_mask"].sum())
    for name in layers:
        weight, _, counted = recorder.matrices(name)
        assert counted.sum() == tokens and torch.isfinite(weight).all(), name

    (out.float().square().mean() + model.aux_loss()).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:  # experts and routers: fp32 whatever the base, as PEFT's autocast_adapter_dtype
            assert param.dtype == torch.float32 and param.grad is not None, name
            assert param.grad.dtype == torch.float32 and torch.isfinite(param.grad).all(), name
        else:
            assert param.dtype == dtype and param.grad is None, name
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".router." in n)


@pytest.mark.parametrize("router", ROUTERS)
def test_routing_stays_fp32_under_autocast(router):
    model = get_molora_model(build_base("llama"), molora_config("llama", router))
    randomize_experts(model)
    batch = make_batch(pad_last=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _run(model, router, batch)
    assert torch.isfinite(out).all()
    for name, layer in _layers(model).items():
        _assert_fp32_route(layer.last_route[0], name)
    with torch.no_grad():
        reference = _run(model, router, batch)  # the same model in fp32
    # bf16 keeps 8 bits of mantissa (a relative step of 2^-8 = 0.004 per rounding); a few roundings deep, the logits
    # stay within 3 % of their scale, while a routing or mixing error would move them by the experts' size (~1)
    scale = reference.abs().max().item()
    assert (out.float() - reference).abs().max() <= 0.03 * max(1.0, scale)


def _separated(reference: RouterOutput, other: RouterOutput, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: whether its fp32 gap at the top-k boundary exceeds twice the largest logit change (so rounding
    cannot reorder across the boundary), and that largest change."""
    change = (other.logits - reference.logits).abs().amax(-1)
    ordered = reference.logits.sort(-1, descending=True).values
    gap = ordered[..., k - 1] - ordered[..., k]
    return gap > 2 * change, change


def _same_selection(a: RouterOutput, b: RouterOutput) -> torch.Tensor:
    return (a.indices.sort(-1).values == b.indices.sort(-1).values).all(-1)


SPARSE = [("topk", 2), ("topk", 3), ("switch", 1), ("intuition", 2)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("name", "k"), SPARSE, ids=[f"{n}-k{k}" for n, k in SPARSE])
def test_topk_selection_on_bf16_inputs_agrees_with_fp32(name, k, seed):
    """The same router on a fixed input and on its bf16 rounding selects the same experts (and weighs them within
    the logit change: softmax moves each probability by at most half the largest logit change, to first order).

    (The task router is left out: its gate does not read the input.)
    """
    generator = torch.Generator().manual_seed(seed)
    router = ROUTER_CLASSES[name](16, 8, top_k=k)
    with torch.no_grad():
        for param in router.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    x = 2 * torch.randn(4, 32, 16, generator=generator)
    reference, rounded = router(x), router(x.bfloat16())
    _assert_fp32_route(rounded, name)
    # computed in fp32 from the bf16 numbers: exactly the router on their fp32 upcast
    assert torch.equal(rounded.logits, router(x.bfloat16().float()).logits)
    separated, change = _separated(reference, rounded, k)
    assert separated.float().mean() >= 0.8  # a well-separated input: most tokens are compared
    assert _same_selection(reference, rounded)[separated].all()
    drift = (rounded.gates - reference.gates).abs().amax(-1)
    assert (drift[separated] <= change[separated] + 1e-6).all()


def test_a_near_tie_does_flip_in_bf16_and_is_excluded():
    """Why ties are excluded: expert 1 wins by 0.125 in fp32, but bf16 rounds 257 down to 256 and 255.875 up to 256,
    so its logit becomes 0 and expert 0 wins. The gap (0.125) is under twice the logit change (1.125)."""
    router = ROUTER_CLASSES["topk"](3, 2, top_k=1)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, -1.0]]))
    x = torch.tensor([[[1.0, 257.0, 255.875]]])
    reference, rounded = router(x), router(x.bfloat16())
    assert reference.indices.item() == 1 and rounded.indices.item() == 0
    separated, change = _separated(reference, rounded, 1)
    assert not separated.item() and change.item() == pytest.approx(1.125)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(("router", "k"), [("topk", 2), ("switch", 1), ("intuition", 2)])
def test_a_half_precision_model_routes_like_fp32_except_near_ties(router, k, dtype):
    """The same weights in fp32 and in half precision: every layer selects the same experts for each token whose
    top-k boundary is clear of the logit change that half precision caused there (measured, per token)."""
    overrides = {"top_k": k} if router == "intuition" else {}
    batch = make_batch(batch=4, length=16)
    routes = {}
    for model_dtype in (torch.float32, dtype):
        model = get_molora_model(build_base("llama", dtype=model_dtype), molora_config("llama", router, **overrides))
        randomize_experts(model)  # same seed: the same adapter in both
        with torch.no_grad():
            _run(model, router, batch)
        routes[model_dtype] = {n: layer.last_route[0] for n, layer in _layers(model).items()}
    for name, reference in routes[torch.float32].items():
        other = routes[dtype][name]
        separated, _ = _separated(reference, other, k)
        assert separated.float().mean() >= 0.75, name
        assert _same_selection(reference, other)[separated].all(), name
