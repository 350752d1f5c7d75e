import pytest
import torch

from molora.core.routers import (
    ROUTERS,
    IntuitionRouter,
    RouterInputs,
    SoftmaxRouter,
    SwitchRouter,
    TaskRouter,
    TopKRouter,
)


def test_softmax_router_matches_hand_computation():
    router = SoftmaxRouter(6, 4, temperature=2.0)
    x = torch.randn(2, 3, 6)
    out = router(x)
    expected = (x @ router.gate.weight.T / 2.0).softmax(-1)
    assert torch.allclose(out.gates, expected, atol=1e-6) and torch.allclose(out.probs, expected, atol=1e-6)
    assert out.indices is None


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_has_exactly_k_weights_summing_to_one(k):
    router = TopKRouter(6, 5, top_k=k)
    out = router(torch.randn(3, 7, 6))
    assert ((out.gates > 0).sum(-1) == k).all()
    assert torch.allclose(out.gates.sum(-1), torch.ones(3, 7))
    # the selected experts are the k most probable, in the same proportions as their probabilities
    top = out.probs.topk(k, dim=-1)
    assert torch.equal(out.indices, top.indices)
    chosen = out.gates.gather(-1, out.indices)
    assert torch.allclose(chosen, top.values / top.values.sum(-1, keepdim=True), atol=1e-6)


def test_switch_routes_to_one_expert_with_its_probability():
    router = SwitchRouter(6, 5)
    out = router(torch.randn(3, 7, 6))
    assert ((out.gates > 0).sum(-1) == 1).all()
    assert torch.allclose(out.gates.sum(-1), out.probs.max(-1).values)


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_router_outputs_are_fp32_for_bf16_inputs_and_under_autocast(name):
    router = ROUTERS[name](6, 4, num_tasks=2) if ROUTERS[name].needs_task_ids else ROUTERS[name](6, 4)
    x = torch.randn(2, 5, 6, dtype=torch.bfloat16)
    inputs = RouterInputs(task_ids=torch.tensor([0, 1]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = router(x, inputs)
    for tensor in (out.logits, out.probs, out.gates):
        assert tensor.dtype == torch.float32 and tensor.shape == (2, 5, 4)


def test_jitter_only_in_training():
    router = TopKRouter(6, 4, top_k=2, jitter=0.5)
    x = torch.randn(2, 5, 6)
    router.eval()
    assert torch.equal(router(x).logits, router(x).logits)
    router.train()
    assert not torch.equal(router(x).logits, router(x).logits)


def test_intuition_causal_pooling_never_sees_the_future_nor_padding():
    router = IntuitionRouter(8, 4, pooling="causal")
    x = torch.randn(2, 6, 8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 2] = False
    base = router(x, RouterInputs(token_mask=mask)).logits
    changed = x.clone()
    changed[:, 4:] += 5.0
    changed[1, 2] += 5.0  # a padded position
    out = router(changed, RouterInputs(token_mask=mask)).logits
    assert torch.allclose(out[:, :4], base[:, :4])
    assert not torch.allclose(out[:, 4:], base[:, 4:])
    # hand computation: position t gates on the mean of non-padding inputs at positions <= t
    expected_pool = torch.stack([x[1, [0, 1, 3]].mean(0), x[0, :4].mean(0)])
    assert torch.allclose(router.mlp(expected_pool), base[[1, 0], [3, 3]], atol=1e-5)


def test_intuition_prompt_and_mean_pooling_match_hand_means():
    x = torch.randn(2, 5, 8)
    prompt = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    router = IntuitionRouter(8, 4, pooling="prompt")
    out = router(x, RouterInputs(prompt_mask=prompt)).logits
    assert torch.allclose(out[0, 4], router.mlp(x[0, :2].mean(0)), atol=1e-5)
    assert torch.allclose(out[1, 0], router.mlp(x[1, :3].mean(0)), atol=1e-5)
    with pytest.raises(ValueError, match="prompt_mask"):
        router(x)
    mean_router = IntuitionRouter(8, 4, pooling="mean")
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = mean_router(x, RouterInputs(token_mask=mask)).logits
    assert torch.allclose(out[0, 0], mean_router.mlp(x[0, :4].mean(0)), atol=1e-5)


@pytest.mark.parametrize("pooling", ["causal", "prompt"])
def test_intuition_running_state_continues_across_decoding_steps(pooling):
    router = IntuitionRouter(8, 4, pooling=pooling)
    x = torch.randn(2, 7, 8)
    prompt = torch.zeros(2, 7, dtype=torch.bool)
    prompt[:, :4] = True
    full = router(x, RouterInputs(prompt_mask=prompt)).logits
    state: dict = {}
    pieces = [router(x[:, :4], RouterInputs(prompt_mask=prompt[:, :4], state=state)).logits]
    for t in range(4, 7):
        pieces.append(router(x[:, t : t + 1], RouterInputs(past_len=t, state=state)).logits)
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)
    with pytest.raises(RuntimeError, match="decoding_session"):
        router(x[:, :1], RouterInputs(past_len=3, state=None))


def test_task_router_uses_the_task_embedding_and_requires_task_ids():
    router = TaskRouter(6, 4, num_tasks=3)
    out = router(torch.randn(2, 5, 6), RouterInputs(task_ids=torch.tensor([2, 0])))
    expected = router.task_embedding.weight[[2, 0]].softmax(-1)
    assert torch.allclose(out.gates, expected.unsqueeze(1).expand(2, 5, 4))
    with pytest.raises(ValueError, match="task_ids"):
        router(torch.randn(2, 5, 6))
    topk = TaskRouter(6, 4, num_tasks=3, top_k=2)(torch.randn(2, 5, 6), RouterInputs(task_ids=torch.tensor([1, 1])))
    assert ((topk.gates > 0).sum(-1) == 2).all()


def test_the_former_name_of_the_gates_still_reads_with_a_warning():
    out = SoftmaxRouter(8, 4)(torch.randn(1, 2, 8))
    with pytest.warns(DeprecationWarning, match="now RouterOutput.gates"):
        assert out.weights is out.gates


def plain_top_k_gates(probs: torch.Tensor, top_k: int, renormalize: bool) -> torch.Tensor:
    """The selection through plain autograd ops: the reference for TopKGates' hand-written backward."""
    top, indices = probs.topk(top_k, dim=-1)
    if renormalize:
        top = top / top.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, indices, top)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("top_k", [1, 2, 3, 5])
def test_top_k_gates_backward_matches_autograd_and_finite_differences(top_k, renormalize):
    from molora.core.gating import TopKGates

    for seed in range(5):
        generator = torch.Generator().manual_seed(seed)
        probs = torch.randn(2, 4, 5, generator=generator, dtype=torch.float64).softmax(-1).requires_grad_()
        upstream = torch.randn(2, 4, 5, generator=generator, dtype=torch.float64)
        gates, indices = TopKGates.apply(probs, top_k, renormalize)
        (got,) = torch.autograd.grad(gates, probs, upstream)
        expected_gates = plain_top_k_gates(probs, top_k, renormalize)
        (expected,) = torch.autograd.grad(expected_gates, probs, upstream)
        torch.testing.assert_close(gates, expected_gates, rtol=0, atol=0)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        assert torch.equal(indices, probs.topk(top_k, dim=-1).indices) and not indices.requires_grad

    def gates_only(probs):
        return TopKGates.apply(probs, top_k, renormalize)[0]

    assert torch.autograd.gradcheck(gates_only, (probs,), atol=1e-9, rtol=1e-7)
    (grad,) = torch.autograd.grad(gates_only(probs), probs, upstream.requires_grad_(), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):  # no silently wrong second derivative
        grad.sum().backward()
