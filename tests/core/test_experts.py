import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd.gradcheck import GradcheckError

from molora.core.experts import LoRAExperts, Rank1Experts, build_experts
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
    assert lora.lora_A.shape == (5, 3, 12) and lora.lora_B.shape == (5, 3, 10) and lora.adapter_rank == 3
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


@pytest.mark.parametrize("output_dims", [3, 2], ids=["lora", "rank1"])
@pytest.mark.parametrize("per_sequence", [False, True])
@pytest.mark.parametrize("with_out", [False, True])
def test_gated_mix_backward_passes_gradcheck_and_gradgradcheck(output_dims, per_sequence, with_out):
    """GatedMix's hand-written backward against finite differences in float64; hidden is a column slice of a wider
    tensor, as it is when the router's rows ride in the experts' matmul."""
    from molora.core.memory import GatedMix

    generator = torch.Generator().manual_seed(7)
    batch, length, experts, rank, d_out = 2, 3, 3, 2 if output_dims == 3 else 1, 4

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    wide = rand(batch * length, experts * rank + experts)
    hidden = wide[:, : experts * rank].requires_grad_()
    gates = rand(batch, 1 if per_sequence else length, experts).softmax(-1).requires_grad_()
    shape = (experts, rank, d_out) if output_dims == 3 else (experts, d_out)
    output_side = rand(*shape).requires_grad_()
    base = rand(batch * length, d_out).requires_grad_()

    def inplace_mix(hidden, gates, output_side, base):
        return GatedMix.apply(hidden, gates, output_side, base.clone(), True, 0.7)

    def plain_mix(hidden, gates, output_side, base):
        return GatedMix.apply(hidden, gates, output_side, base if with_out else None, False, 0.7)

    for mix in (inplace_mix, plain_mix) if with_out else (plain_mix,):
        inputs = (hidden, gates, output_side, base)
        assert torch.autograd.gradcheck(mix, inputs, **GRADCHECK_TOLERANCES)
        assert torch.autograd.gradgradcheck(mix, inputs, **GRADCHECK_TOLERANCES)


GRADCHECK_TOLERANCES = dict(atol=1e-9, rtol=1e-7)  # the mixture is bilinear: float64 differences are near exact


def test_gradcheck_at_these_tolerances_catches_a_gradient_off_by_one_part_in_a_million():
    from molora.core.memory import GatedMix

    class SlightlyWrong(GatedMix):
        @staticmethod
        def backward(ctx, grad):
            grads = GatedMix.backward(ctx, grad)
            return (grads[0] * (1 + 1e-6), *grads[1:])

    generator = torch.Generator().manual_seed(7)
    hidden = torch.randn(6, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    gates = torch.randn(2, 3, 3, generator=generator, dtype=torch.float64).softmax(-1).requires_grad_()
    output_side = torch.randn(3, 2, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    inputs = (hidden, gates, output_side, None, False, 0.7)
    assert torch.autograd.gradcheck(GatedMix.apply, inputs, **GRADCHECK_TOLERANCES)
    with pytest.raises(GradcheckError):
        torch.autograd.gradcheck(SlightlyWrong.apply, inputs, **GRADCHECK_TOLERANCES)
