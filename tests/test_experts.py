import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from molora.experts import LoRAExperts, Rank1Experts, build_experts
from tests.reference import loop_delta


def _experts(kind: str, init_zero: bool = False):
    if kind == "lora":
        return LoRAExperts(12, 10, 5, 3, init_zero=init_zero)
    return Rank1Experts(12, 10, 5, init_zero=init_zero)


@pytest.mark.parametrize("kind", ["lora", "rank1"])
def test_vectorised_matches_loop_outputs_and_gradients(kind):
    experts = _experts(kind)
    x = torch.randn(7, 12, requires_grad=True)
    weights = torch.rand(7, 5).softmax(-1).requires_grad_(True)
    out = experts(x, weights)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, weights, *experts.parameters()], grad_out)
    ref = loop_delta(experts, x, weights)
    ref_grads = torch.autograd.grad(ref, [x, weights, *experts.parameters()], grad_out)
    assert (out - ref).abs().max() < 1e-5
    for g, r in zip(grads, ref_grads, strict=True):
        assert (g - r).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["lora", "rank1"])
def test_zero_init_gives_zero_delta_and_random_init_does_not(kind):
    x, w = torch.randn(4, 12), torch.rand(4, 5)
    assert torch.count_nonzero(_experts(kind, init_zero=True)(x, w)) == 0
    assert _experts(kind, init_zero=False)(x, w).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["lora", "rank1"])
def test_delta_weight_is_the_expert_as_a_matrix(kind):
    experts = _experts(kind)
    x = torch.randn(4, 12)
    one_hot = torch.zeros(4, 5)
    one_hot[:, 2] = 1
    assert torch.allclose(experts(x, one_hot), x @ experts.delta_weight(2).T, atol=1e-6)


def test_shapes_and_adapter_rank():
    lora = build_experts("lora", 12, 10, 5, 3, init_zero=True)
    assert lora.lora_A.shape == (5, 3, 12) and lora.lora_B.shape == (5, 10, 3) and lora.adapter_rank == 3
    rank1 = build_experts("rank1", 12, 10, 5, 3, init_zero=True)
    assert rank1.u.shape == (5, 12) and rank1.v.shape == (5, 10) and rank1.adapter_rank == 5
    with pytest.raises(ValueError, match="expert_type"):
        build_experts("dora", 12, 10, 5, 3, init_zero=True)


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["lora", "rank1"]),
    tokens=st.integers(1, 9),
    d_in=st.integers(1, 17),
    d_out=st.integers(1, 17),
    num_experts=st.integers(1, 6),
    rank=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_vectorised_matches_loop_for_any_shape(kind, tokens, d_in, d_out, num_experts, rank, seed):
    torch.manual_seed(seed)
    experts = build_experts(kind, d_in, d_out, num_experts, rank, init_zero=False)
    x = torch.randn(tokens, d_in)
    weights = torch.rand(tokens, num_experts)
    assert (experts(x, weights) - loop_delta(experts, x, weights)).abs().max() < 1e-5
