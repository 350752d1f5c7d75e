import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from molora.core.losses import AUX_LOSSES, _logsumexp, balance_loss, cv_loss, entropy_loss, register_aux_loss, z_loss
from molora.core.routers import RouterOutput, select_experts


def route_from_logits(logits: torch.Tensor, top_k: int | None, renormalize: bool = True) -> RouterOutput:
    probs = logits.softmax(-1)
    weights, indices = select_experts(probs, top_k, renormalize)
    return RouterOutput(logits, probs, weights, indices)


@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_balance_is_exactly_one_for_a_uniform_router(top_k):
    route = route_from_logits(torch.zeros(2, 5, 4), top_k)
    assert balance_loss(route).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("top_k", [None, 2])
def test_masked_padding_does_not_change_balance_but_unmasked_padding_does(top_k):
    torch.manual_seed(0)
    real = torch.randn(1, 6, 4)
    padding = torch.randn(1, 3, 4) * 3
    route_real = route_from_logits(real, top_k)
    route_padded = route_from_logits(torch.cat([real, padding], dim=1), top_k)
    mask = torch.tensor([[True] * 6 + [False] * 3])
    expected = balance_loss(route_real)
    assert balance_loss(route_padded, mask).item() == pytest.approx(expected.item(), abs=1e-6)
    assert abs(balance_loss(route_padded).item() - expected.item()) > 1e-3
    for name in ("z", "cv", "entropy"):
        loss = AUX_LOSSES[name]
        assert loss(route_padded, mask).item() == pytest.approx(loss(route_real).item(), abs=1e-6)


def test_hand_computed_values_for_a_fixed_input():
    # probabilities [.75, .25], [.25, .75], [.75, .25]; switch routing (top-1, weight = probability)
    logits = torch.tensor([[[math.log(3), 0.0], [0.0, math.log(3)], [math.log(3), 0.0]]])
    route = route_from_logits(logits, top_k=1, renormalize=False)
    # f = [2/3, 1/3], P = [1.75/3, 1.25/3] -> 2 * (2/3 * 1.75/3 + 1/3 * 1.25/3) = 9.5 / 9
    assert balance_loss(route).item() == pytest.approx(9.5 / 9, abs=1e-6)
    assert z_loss(route).item() == pytest.approx(math.log(4) ** 2, abs=1e-5)
    # importance = mean weights = [0.5, 0.25]: population var 0.015625 / mean^2 0.140625
    assert cv_loss(route).item() == pytest.approx(0.015625 / 0.140625, abs=1e-6)
    expected_entropy = 7 / 12 * math.log(7 / 12) + 5 / 12 * math.log(5 / 12)
    assert entropy_loss(route).item() == pytest.approx(expected_entropy, abs=1e-6)


def test_z_loss_logsumexp_matches_torch_in_value_and_gradient():
    torch.manual_seed(0)
    inf = float("inf")
    # large logits (a naive exp overflows), a row at -inf and one with +inf: torch.logsumexp's results
    rows = torch.cat([torch.randn(5, 8) * 60, torch.tensor([[-inf] * 8, [inf] + [0.0] * 7, [1e30] + [0.0] * 7])])
    ours, theirs = rows.clone().requires_grad_(True), rows.clone().requires_grad_(True)
    value, expected = _logsumexp(ours), torch.logsumexp(theirs, dim=-1)
    assert torch.equal(value.isfinite(), expected.isfinite()) and torch.equal(value[5:], expected[5:])
    torch.testing.assert_close(value[:5], expected[:5], rtol=1e-6, atol=1e-5)
    weights = torch.arange(8.0)
    (value[:5] * weights[:5]).sum().backward()
    (expected[:5] * weights[:5]).sum().backward()
    torch.testing.assert_close(ours.grad[:5], theirs.grad[:5], rtol=1e-5, atol=1e-6)


def test_losses_are_differentiable_in_the_logits():
    logits = torch.randn(2, 5, 4, requires_grad=True)
    route = route_from_logits(logits, top_k=2)
    for name in ("balance", "z", "cv", "entropy"):
        (grad,) = torch.autograd.grad(AUX_LOSSES[name](route), logits, retain_graph=True)
        assert grad.abs().sum() > 0, name


def test_registry_accepts_custom_losses():
    @register_aux_loss("max_prob_test")
    def max_prob(route, token_mask=None):
        return route.probs.max()

    try:
        assert AUX_LOSSES["max_prob_test"] is max_prob
    finally:
        del AUX_LOSSES["max_prob_test"]


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(1, 12),
    num_experts=st.integers(2, 8),
    top_k=st.one_of(st.none(), st.integers(1, 8)),
    scale=st.floats(0.0, 5.0),
    seed=st.integers(0, 2**16),
)
def test_balance_properties_for_any_routing(tokens, num_experts, top_k, scale, seed):
    top_k = None if top_k is None else min(top_k, num_experts)
    torch.manual_seed(seed)
    route = route_from_logits(torch.randn(1, tokens, num_experts) * scale, top_k)
    # f and P are distributions over experts, so E * sum f P lies in (0, E]; z and entropy have closed bounds
    value = balance_loss(route).item()
    assert 0 < value <= num_experts + 1e-4
    z_by_hand = torch.logsumexp(route.logits.double(), dim=-1).square().mean()  # ST-MoE: mean of lse(logits)^2
    assert z_loss(route).item() == pytest.approx(z_by_hand.item(), rel=1e-5, abs=1e-6)
    assert -math.log(num_experts) - 1e-5 <= entropy_loss(route).item() <= 1e-6
    if top_k is not None:
        assert ((route.gates > 0).sum(-1) <= top_k).all()
        assert torch.allclose(route.gates.sum(-1), torch.ones(1, tokens), atol=1e-5)


@pytest.mark.parametrize("top_k", [None, 2])
def test_stacked_layers_give_the_same_terms_and_gradients_as_one_layer_at_a_time(top_k):
    from molora.core.losses import layer_aux_terms

    torch.manual_seed(0)
    logits = [torch.randn(2, 5, 4, requires_grad=True) for _ in range(3)]
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    names = ("balance", "z", "cv", "entropy")
    stacked = layer_aux_terms([(route_from_logits(lg, top_k), mask) for lg in logits], names)
    assert len(stacked) == 3
    for lg, terms in zip(logits, stacked, strict=True):
        route = route_from_logits(lg, top_k)
        for name in names:
            expected = AUX_LOSSES[name](route, mask)
            assert terms[name].item() == pytest.approx(expected.item(), abs=1e-6)
            (g_stacked,) = torch.autograd.grad(terms[name], lg, retain_graph=True)
            (g_alone,) = torch.autograd.grad(expected, lg, retain_graph=True)
            assert torch.allclose(g_stacked, g_alone, atol=1e-6)


def test_means_over_layers_equal_averaging_each_layer_alone_across_groups():
    """Stacked groups (two masks, a second shape, a lone layer) summed per group: the means and their gradients must
    be those of the per-layer losses computed one at a time and averaged."""
    from molora.core.losses import aux_term_means

    torch.manual_seed(2)
    mask_a = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    mask_b = torch.tensor([[True] * 4 + [False], [True] * 5])
    mask_c = torch.tensor([[True] * 3, [True, True, False]])
    shapes_masks = [((2, 5, 4), mask_a)] * 3 + [((2, 5, 4), mask_b)] * 2 + [((2, 3, 4), mask_c)]
    logits = [torch.randn(*shape, requires_grad=True) for shape, _ in shapes_masks]
    names = ("balance", "z", "cv", "entropy")
    entries = [(route_from_logits(lg, 2), m) for lg, (_, m) in zip(logits, shapes_masks, strict=True)]
    means = aux_term_means(entries, names)
    for name in names:
        alone = [AUX_LOSSES[name](route_from_logits(lg, 2), m) for lg, (_, m) in zip(logits, shapes_masks, strict=True)]
        expected = sum(alone) / len(alone)
        assert means[name].item() == pytest.approx(expected.item(), abs=1e-6)
        got = torch.autograd.grad(means[name], logits, retain_graph=True)
        want = torch.autograd.grad(expected, logits)
        for g, w in zip(got, want, strict=True):
            assert torch.allclose(g, w, atol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_routed_fraction_counts_each_tokens_slots_by_hand(top_k):
    from molora.core.losses import StackedRoutes, routed_fraction

    torch.manual_seed(1)
    mask = torch.tensor([[True, True, False, True], [True, False, False, True]])
    routes = [route_from_logits(torch.randn(2, 4, 5), top_k) for _ in range(2)]
    expected = []
    for route in routes:
        counts = [0.0] * 5
        for b in range(2):
            for t in range(4):
                if mask[b, t]:
                    for e in route.indices[b, t].tolist():
                        counts[e] += 1
        expected.append(torch.tensor(counts) / (int(mask.sum()) * top_k))
        torch.testing.assert_close(routed_fraction(route, mask), expected[-1])
    torch.testing.assert_close(routed_fraction(StackedRoutes(routes), mask), torch.stack(expected))
