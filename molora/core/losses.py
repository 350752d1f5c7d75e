"""Load-balancing losses: functions of (RouterOutput, token_mask) -> scalar, in a registry by name.

Padding (token_mask False) never counts. Every statistic is a masked mean, so no boolean indexing (and no
host sync on GPU). The built-in losses also take router outputs of several layers stacked in front ([G, B, L, E],
one token mask) and return [G]: `layer_aux_terms` computes all layers that share a mask in one go, about 20 small
ops per forward instead of per layer (on CPU at small batches and on GPU, where launches dominate, that matters).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from einops import einsum

from molora.core.routers import RouterOutput

AuxLossFn = Callable[[RouterOutput, "torch.Tensor | None"], torch.Tensor]
AUX_LOSSES: dict[str, AuxLossFn] = {}
STACKABLE: set[str] = set()  # losses that accept stacked layers ([G, B, L, E] -> [G])


def register_aux_loss(name: str, stackable: bool = False):
    """Register fn(route, token_mask) -> scalar; stackable=True if it also maps stacked [G, B, L, E] outputs to [G]."""

    def decorator(fn: AuxLossFn) -> AuxLossFn:
        AUX_LOSSES[name] = fn
        if stackable:
            STACKABLE.add(name)
        else:
            STACKABLE.discard(name)
        return fn

    return decorator


# Penalties on the experts' own parameters rather than on the routing: fn(experts) -> scalar, or None for experts it
# does not apply to. They sit in config.aux_losses beside the routing losses, averaged over the layers they apply to.
ExpertLossFn = Callable[[Any], "torch.Tensor | None"]
EXPERT_LOSSES: dict[str, ExpertLossFn] = {}


def register_expert_loss(name: str):
    def decorator(fn: ExpertLossFn) -> ExpertLossFn:
        EXPERT_LOSSES[name] = fn
        return fn

    return decorator


def known_aux_losses() -> list[str]:
    return sorted(set(AUX_LOSSES) | set(EXPERT_LOSSES))


@register_expert_loss("rank_sparsity")
def rank_sparsity_loss(experts: Any) -> torch.Tensor | None:
    """The mean probability that a rank component is kept (config.rank_gates): an L0 penalty on the rank."""
    gates = getattr(experts, "rank_gates", None)
    return None if gates is None else gates.keep_probability().mean()


def expert_term_means(experts: list[Any], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """{expert loss: mean over the layers it applies to}; a loss no layer has is left out."""
    means = {}
    for name in names:
        if name not in EXPERT_LOSSES:
            continue
        values = [value for value in map(EXPERT_LOSSES[name], experts) if value is not None]
        if values:
            means[name] = torch.stack(values).mean()
    return means


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """[..., B, L, E] -> [..., B*L, E]; [N, E] stays."""
    if tensor.dim() < 3:
        return tensor.reshape(-1, tensor.shape[-1])
    return tensor.reshape(*tensor.shape[:-3], -1, tensor.shape[-1])


def _cached(route: RouterOutput, key: tuple, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Several losses read the same token weights and mean probabilities: compute them once per router output."""
    if key not in route.cache:
        route.cache[key] = compute()
    return route.cache[key]


def _token_weights(route: RouterOutput, token_mask: torch.Tensor | None) -> torch.Tensor:
    """[N] fp32 weights that average over the non-padding tokens."""

    def compute() -> torch.Tensor:
        num_tokens = _flat(route.probs).shape[-2]
        if token_mask is None:
            return route.probs.new_full((num_tokens,), 1.0 / max(num_tokens, 1))
        mask = token_mask.reshape(num_tokens).to(route.probs.dtype)
        return mask / mask.sum().clamp_min(1)

    return _cached(route, ("token_weights", id(token_mask)), compute)


def _mean_probs(route: RouterOutput, token_mask: torch.Tensor | None) -> torch.Tensor:
    return _cached(
        route, ("mean_probs", id(token_mask)), lambda: _token_weights(route, token_mask) @ _flat(route.probs)
    )


def routed_fraction(route: RouterOutput, token_mask: torch.Tensor | None) -> torch.Tensor:
    """f_e: the fraction of routing slots (tokens x k) sent to each expert; the mean weight for dense routers."""
    per_token = _token_weights(route, token_mask)
    if route.indices is None:
        if route.gates is route.probs:
            return _mean_probs(route, token_mask)
        return per_token @ _flat(route.gates)
    # Each token's weight / k added to its k experts: a scatter into [..., E], no [..., N, k, E] one-hot.
    indices = _flat(route.indices)
    lead, top_k = indices.shape[:-2], indices.shape[-1]
    slot_weights = (per_token / top_k).unsqueeze(-1).expand(indices.shape).reshape(*lead, -1)
    counts = per_token.new_zeros(*lead, route.probs.shape[-1])
    return counts.scatter_add_(-1, indices.reshape(*lead, -1), slot_weights)


def token_count(route: RouterOutput, token_mask: torch.Tensor | None) -> torch.Tensor:
    """The number of non-padding tokens of the forward, as a 0-dim fp32 tensor."""
    if token_mask is None:
        return route.probs.new_tensor(float(_flat(route.probs).shape[-2]))
    return token_mask.sum().to(route.probs.dtype)


@register_aux_loss("balance", stackable=True)
def balance_loss(route: RouterOutput, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/Mixtral: E * sum_e f_e * P_e; exactly 1.0 for a uniform router.

    With a balance history (config.balance_window > 1: the summed f_e * tokens and the tokens of earlier forwards,
    detached), f_e is the routed fraction over the whole window, the global-batch balance of Qwen's MoE models: the
    window must be balanced, not each micro-batch, so a sequence may keep to a few experts.
    """
    num_experts = route.probs.shape[-1]
    fraction = routed_fraction(route, token_mask)
    history = balance_history(route)
    if history is not None:
        fraction_sum, tokens = history
        current = token_count(route, token_mask)
        fraction = (fraction * current + fraction_sum) / (current + tokens).unsqueeze(-1)
    return num_experts * (fraction * _mean_probs(route, token_mask)).sum(-1)


class BalanceWindow:
    """Global-batch balance: per layer, the detached (f_e * tokens, tokens) of the last size - 1 forwards."""

    def __init__(self, size: int):
        self.size = size
        self.history: dict[str, collections.deque] = {}

    def attach(self, name: str, route: RouterOutput, token_mask: torch.Tensor | None) -> None:
        """Hand the route the window's earlier forwards (for balance_loss), then add its own; once per route."""
        if self.size <= 1 or "balance_window_seen" in route.cache:
            return
        route.cache["balance_window_seen"] = True
        history = self.history.setdefault(name, collections.deque(maxlen=self.size - 1))
        if history:
            route.cache["balance_history"] = tuple(torch.stack(part).sum(0) for part in zip(*history, strict=True))
        with torch.no_grad():
            tokens = token_count(route, token_mask)
            history.append((routed_fraction(route, token_mask) * tokens, tokens))


def balance_history(route) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(sum of f_e * tokens [..., E], tokens [...]) of earlier forwards in the balance window, or None."""
    if isinstance(route, StackedRoutes):
        return route.balance_history
    return route.cache.get("balance_history")


@register_aux_loss("task_mi", stackable=True)
def task_mi_loss(route: RouterOutput, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """-I(task; expert) over the batch's tokens (Mod-Squad's mutual-information loss), in nats.

    Minimising it makes each task's routing distribution peaked (experts specialise by task) while the batch-mean
    distribution stays spread (no collapse onto one expert); needs task_ids in the forward.
    """
    if route.task_ids is None:
        raise ValueError("aux loss 'task_mi' needs task_ids ([batch] ints) passed to MoLoRAModel.forward")
    probs = _flat(route.probs)  # [..., N, E]
    batch = route.task_ids.shape[0]
    tasks = F.one_hot(route.task_ids, int(route.task_ids.max()) + 1).to(probs.dtype)  # [B, T]
    per_token = _token_weights(route, token_mask).view(batch, -1)  # [B, L], sums to 1
    weighted_tasks = einsum(per_token, tasks, "b l, b t -> b l t").reshape(-1, tasks.shape[-1])  # [N, T]
    joint = einsum(weighted_tasks, probs, "n t, ... n e -> ... t e")  # p(task, expert)
    task_marginal = weighted_tasks.sum(0).unsqueeze(-1)  # [T, 1]
    expert_marginal = joint.sum(-2, keepdim=True)  # [..., 1, E]
    ratio = joint.clamp_min(1e-12) / (task_marginal * expert_marginal).clamp_min(1e-12)
    return -(joint * ratio.log()).sum((-2, -1))


@register_aux_loss("z", stackable=True)
def z_loss(route: RouterOutput, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean of logsumexp(logits)^2, keeps logits small."""
    return _logsumexp(_flat(route.logits)).square() @ _token_weights(route, token_mask)


def _logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp over the last dim, with the shift by the max held constant: the value and the gradient
    (softmax) are the same, and it is faster on CPU (torch's backward recomputes the shifted exponentials; this one
    keeps them; timed in bench/micro.py)."""
    finfo = torch.finfo(logits.dtype)
    top = logits.detach().amax(dim=-1, keepdim=True).clamp(finfo.min, finfo.max)  # an all -inf row stays -inf
    return (logits - top).exp().sum(dim=-1).log() + top.squeeze(-1)


@register_aux_loss("cv", stackable=True)
def cv_loss(route: RouterOutput, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Shazeer et al.: squared coefficient of variation of expert importance (summed routing weight)."""
    importance = _token_weights(route, token_mask) @ _flat(route.gates)
    return importance.var(-1, unbiased=False) / importance.mean(-1).square().clamp_min(1e-10)


@register_aux_loss("entropy", stackable=True)
def entropy_loss(route: RouterOutput, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Negative entropy of the batch-mean routing distribution; minimising it spreads the load."""
    mean_probs = _mean_probs(route, token_mask)
    return (mean_probs * mean_probs.clamp_min(1e-12).log()).sum(-1)


class StackedRoutes:
    """The router outputs of several layers stacked in front ([G, B, L, E]); what a stackable loss receives.

    Each field is stacked on first use, so the losses asked for pay only for the tensors they read (balance + z on
    a top-k router never stack the gates)."""

    def __init__(self, routes: list[RouterOutput]):
        self.routes = routes
        self.cache: dict = {}

    @cached_property
    def logits(self) -> torch.Tensor:
        return torch.stack([r.logits for r in self.routes])

    @cached_property
    def probs(self) -> torch.Tensor:
        return torch.stack([r.probs for r in self.routes])

    @cached_property
    def gates(self) -> torch.Tensor:
        if all(r.gates is r.probs for r in self.routes):
            return self.probs
        return torch.stack([r.gates for r in self.routes])

    @cached_property
    def task_ids(self) -> torch.Tensor | None:
        return self.routes[0].task_ids

    @cached_property
    def balance_history(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        histories = [r.cache.get("balance_history") for r in self.routes]
        if histories[0] is None:
            return None
        return torch.stack([h[0] for h in histories]), torch.stack([h[1] for h in histories])

    @cached_property
    def indices(self) -> torch.Tensor | None:
        if self.routes[0].indices is None:
            return None
        return torch.stack([r.indices for r in self.routes])


Entries = list[tuple[RouterOutput, "torch.Tensor | None"]]


def _stack_groups(entries: Entries) -> list[list[int]]:
    """Indices of the entries that can be stacked together: same shapes, dtype, mask and kind of routing."""
    groups: dict[tuple, list[int]] = {}
    for i, (route, mask) in enumerate(entries):
        sparse = None if route.indices is None else tuple(route.indices.shape)
        key = (
            tuple(route.probs.shape),
            route.probs.dtype,
            id(mask),
            sparse,
            route.gates is route.probs,
            id(route.task_ids),
            "balance_history" in route.cache,
        )
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _group_values(entries: Entries, members: list[int], name: str, stacked: StackedRoutes | None) -> torch.Tensor:
    """The loss of each member layer as one [G] tensor: in one go for a stacked group, else layer by layer."""
    mask = entries[members[0]][1]
    if stacked is not None and name in STACKABLE:
        return AUX_LOSSES[name](stacked, mask)
    return torch.stack([AUX_LOSSES[name](entries[i][0], mask) for i in members])


def layer_aux_terms(entries: Entries, names: tuple[str, ...]) -> list[dict[str, torch.Tensor]]:
    """{loss: scalar} for each (router output, token mask) of one forward; layers with the same shapes and mask
    are stacked and go through each stackable loss once."""
    terms: list[dict[str, torch.Tensor]] = [{} for _ in entries]
    for members in _stack_groups(entries):
        stacked = StackedRoutes([entries[i][0] for i in members]) if len(members) > 1 else None
        for name in names:
            for i, value in zip(members, _group_values(entries, members, name, stacked).unbind(0), strict=True):
                terms[i][name] = value
    return terms


def aux_term_means(entries: Entries, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """{loss: mean over layers}, summed straight from the stacked groups: the same numbers as averaging
    layer_aux_terms, without splitting [G] into G scalars and stacking them again (~25 ops per layer, forward and
    backward, which every training step would pay)."""
    sums: dict[str, torch.Tensor] = {}
    for members in _stack_groups(entries):
        stacked = StackedRoutes([entries[i][0] for i in members]) if len(members) > 1 else None
        for name in names:
            total = _group_values(entries, members, name, stacked).sum()
            sums[name] = total if name not in sums else sums[name] + total
    return {name: total / len(entries) for name, total in sums.items()}
