"""Expert banks stored as stacked tensors; the mixture is two matmuls with the gate applied in between.

forward(x [N, d_in], gates [N, E]) -> scaling-free delta [N, d_out] = sum_e w_e * B_e A_e x.

The layer calls the two halves itself: project() (one matmul with every expert's input side stacked, plus any
extra rows, such as a router's gate, that read the same input) and mix() (gate the E*r intermediate, then one
matmul with the output sides stacked, accumulated into the base output by addmm). Both expert types are the same
computation with r rows per expert (rank-1: r = 1).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from molora.core.memory import GatedMix, RebuildSaved, by_expert, gate_hidden, other_saved_tensor_hooks, stack_rows

# Logit of a fresh gate: sigmoid(3) = 0.95, so training starts close to the full rank (the noise still closes some).
INITIAL_LOGIT = 3.0
_GATE_EPSILON = 1e-6


class RankGates(nn.Module):
    """logits [E, r]: one gate per rank component of each expert of a module (fp32 whatever the experts' dtype)."""

    def __init__(self, num_experts: int, rows: int, temperature: float, device: torch.device | None = None):
        super().__init__()
        self.temperature = temperature
        self.logits = nn.Parameter(torch.full((num_experts, rows), INITIAL_LOGIT, device=device))

    def forward(self) -> torch.Tensor:
        """The gates [E, r]: a relaxed Bernoulli sample while training, the hard 0/1 mask in eval."""
        if not self.training:
            return self.kept().float()
        uniform = torch.rand_like(self.logits).clamp_(_GATE_EPSILON, 1 - _GATE_EPSILON)
        noise = uniform.log() - (-uniform).log1p()  # logistic
        return torch.sigmoid((self.logits + noise) / self.temperature)

    def kept(self) -> torch.Tensor:
        """[E, r] bool: the components the hard gate keeps."""
        return self.logits > 0

    def keep_probability(self) -> torch.Tensor:
        """[E, r]: P(sample > 1/2) = sigmoid(logit), the expected L0 norm per component."""
        return torch.sigmoid(self.logits)

    def extra_repr(self) -> str:
        return f"experts={self.logits.shape[0]}, rows={self.logits.shape[1]}, temperature={self.temperature:g}"


class Experts(nn.Module):
    expert_type: ClassVar[str] = ""
    has_rank: ClassVar[bool] = True  # r rows per expert; False: rank-1 experts (the config's rank is unused)
    can_share_input_side: ClassVar[bool] = False  # share_lora_a: one input side for all experts (HydraLoRA)
    # {parameter: the axis of its features} (d_in for input sides, d_out for output sides): INT8 export scales each
    # rank component over it (molora.deploy.quantize). Empty: the factors are saved unquantised.
    feature_axes: ClassVar[dict[str, int]] = {}

    def __init__(self, in_features: int, out_features: int, num_experts: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.num_experts = num_experts
        self.rank_gates: RankGates | None = None  # config.rank_gates: a learned gate per rank component
        self.rank_limit: int | None = None  # the rank schedule: only the first rank_limit components are used

    def component_mask(self, hard: bool = False) -> torch.Tensor | None:
        """[E, r] gates of the rank components (rank gates times the schedule's mask); None when neither is on.
        hard=True: the eval-mode 0/1 gates whatever the mode (what effective ranks and pruning read)."""
        gates = None
        if self.rank_gates is not None:
            gates = self.rank_gates.kept().float() if hard else self.rank_gates()
        if self.rank_limit is not None:
            rows = self.rows_per_expert
            limit = torch.arange(rows, device=self.output_side.device) < self.rank_limit
            limit = limit.float().expand(self.num_experts, rows)
            gates = limit if gates is None else gates * limit
        return gates

    def gated_output_side(self, hard: bool = False) -> torch.Tensor:
        """The output side with each rank component's gate applied ([E, r, d_out] or [E, d_out]): what the mixture
        uses (hard=True: the eval-mode gates whatever the mode). Without rank gates or a schedule, the parameter
        itself (no op)."""
        side = self.output_side
        mask = self.component_mask(hard)
        if mask is None:
            return side
        shape = (*mask.shape, *(1,) * (side.dim() - 2)) if side.dim() == 3 else mask.shape
        return side * mask.view(shape).to(side.dtype)

    def delta_weight(self, expert: int) -> torch.Tensor:
        """The expert's update as a [d_out, d_in] matrix (before scaling), for merging."""
        raise NotImplementedError

    @property
    def adapter_rank(self) -> int:
        """Rank of the whole mixture (the denominator of alpha/r scaling)."""
        raise NotImplementedError

    @property
    def rows_per_expert(self) -> int:
        raise NotImplementedError

    def stacked_in(self) -> torch.Tensor:
        """Every expert's input side as one [E*r, d_in] matrix."""
        raise NotImplementedError

    @property
    def output_side(self) -> torch.Tensor:
        """The parameter holding the experts' output sides as stored: [E, r, d_out] (LoRA B) or [E, d_out]: rows
        of the [E*r, d_out] matrix the mixing matmul reads, so stacking them is a view."""
        raise NotImplementedError

    def stacked_out(self, hard: bool = False) -> torch.Tensor:
        """Every expert's (gated) output side as one [E*r, d_out] matrix; hard as in gated_output_side."""
        return stack_rows(self.gated_output_side(hard))

    def project(
        self, x: torch.Tensor, extras: tuple[torch.Tensor, ...] = ()
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """x [N, d_in] -> (the E*r intermediate [N, E*r], (x @ extra.T for each extra)) from a single matmul.

        The extras are other [k, d_in] weights that read the same x: a router's input projection, the input sides of
        sibling modules (routing_scope='input')."""
        return self.project_with(x, self.stacked_in(), extras)

    @staticmethod
    def project_with(
        x: torch.Tensor, weight: torch.Tensor, extras: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """x @ weight.T and x @ extra.T for each extra, from one matmul (the joint weight rebuilt for backward)."""
        if not extras:
            return F.linear(x, weight), ()
        parts = (weight, *(extra.to(weight.dtype) for extra in extras))
        joined = torch.cat(parts)
        if not torch.is_grad_enabled() or other_saved_tensor_hooks():
            both = F.linear(x, joined)
        else:
            with RebuildSaved(joined, parts):
                both = F.linear(x, joined)
        hidden, *rest = both.split([part.shape[0] for part in parts], dim=1)  # backward: one cat, not several pads
        return hidden, tuple(rest)

    def mix(
        self,
        hidden: torch.Tensor,
        gates: torch.Tensor,
        out: torch.Tensor | None = None,
        inplace: bool = False,
        scaling: float = 1.0,
    ) -> torch.Tensor:
        """scaling * sum_e w_e B_e h_e for hidden [N, E*r] and gates [B, L, E] (N = B*L) or [B, 1, E] (one per
        sequence).

        With `out` [N, d_out] the result is out + mixture from one addmm; with inplace=True it is accumulated into
        `out` itself (no [N, d_out] temporary, which on CPU is a fresh allocation with its page faults). In place is
        only for a tensor nothing else reads and that is not a view (autograd would copy the whole base in backward).
        """
        if torch.is_autocast_enabled(hidden.device.type):
            # Autocast casts in a custom forward but not in its backward: plain ops here, which it handles throughout.
            hidden4, gates4 = by_expert(hidden, gates)
            gated = gate_hidden(hidden4, gates4, hidden.shape)
            rows = self.stacked_out()
            return scaling * (gated @ rows) if out is None else torch.addmm(out, gated, rows, alpha=scaling)
        return GatedMix.apply(hidden, gates, self.gated_output_side(), out, inplace, scaling)

    def mix_grouped(self, x: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The sparse mixture computing only the selected experts, each on its own tokens: x [N, d_in], gates
        [N, E] (zero outside the selection), indices [N, k]. E small matmuls and a host sync for the counts instead
        of two matmuls of width E*r; it wins once E/k is large (see bench/bench_dispatch.py)."""
        num_tokens, top_k = indices.shape
        flat = indices.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // top_k
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        chosen = gates.gather(1, indices).reshape(-1)[order].unsqueeze(-1).to(x.dtype)
        rows = self.rows_per_expert
        stacked_in = self.stacked_in().view(self.num_experts, rows, -1)
        stacked_out = self.stacked_out().view(self.num_experts, rows, -1)
        pieces = [
            (chunk @ stacked_in[e].T) @ stacked_out[e] for e, chunk in enumerate(x[token].split(counts)) if counts[e]
        ]
        return x.new_zeros(num_tokens, self.out_features).index_add_(0, token, torch.cat(pieces) * chosen)

    def forward(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        return self.mix(self.project(x)[0], gates.unsqueeze(0))


class LoRAExperts(Experts):
    """E LoRA experts of rank r: A [E, r, d_in] (kaiming-uniform), B [E, r, d_out] (zero unless random init).

    B is each expert's PEFT lora_B ([d_out, r]) transposed: its r rows are the rows the mixing matmul reads, so the
    forward and backward use the parameter as it is (adapter format 3; files of formats 1-2 stored [E, d_out, r] and
    are converted on load, molora.deploy.adapter_files).
    """

    expert_type = "lora"
    can_share_input_side = True
    feature_axes = {"lora_A": -1, "lora_B": -1}  # A [E, r, d_in] (or [r, d_in] shared), B [E, r, d_out]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int,
        rank: int,
        *,
        init_zero: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ):
        super().__init__(in_features, out_features, num_experts)
        self.rank = rank
        self.lora_A = nn.Parameter(
            torch.empty(*self.input_side_shape(num_experts, rank, in_features), dtype=dtype, device=device)
        )
        self.lora_B = nn.Parameter(torch.empty(num_experts, rank, out_features, dtype=dtype, device=device))
        self.reset_parameters(init_zero)

    @staticmethod
    def input_side_shape(num_experts: int, rank: int, in_features: int) -> tuple[int, ...]:
        return (num_experts, rank, in_features)

    def reset_parameters(self, init_zero: bool = True) -> None:
        # Same bounds as PEFT's kaiming_uniform_(a=sqrt(5)) on each [r, d_in] / [d_out, r] matrix.
        nn.init.uniform_(self.lora_A, -1 / math.sqrt(self.in_features), 1 / math.sqrt(self.in_features))
        if init_zero:
            nn.init.zeros_(self.lora_B)
        else:
            nn.init.uniform_(self.lora_B, -1 / math.sqrt(self.rank), 1 / math.sqrt(self.rank))

    @property
    def adapter_rank(self) -> int:
        return self.rank

    @property
    def rows_per_expert(self) -> int:
        return self.rank

    def stacked_in(self) -> torch.Tensor:
        return self.lora_A.reshape(self.num_experts * self.rank, self.in_features)

    @property
    def output_side(self) -> torch.Tensor:
        return self.lora_B

    def delta_weight(self, expert: int) -> torch.Tensor:
        return self.gated_output_side()[expert].T @ self.lora_A[expert]


class SharedALoRAExperts(LoRAExperts):
    """HydraLoRA: one input side A [r, d_in] shared by the experts, an output side B [E, r, d_out] each.

    The input matmul computes A x once ([N, r], with any router rows) and the E*r intermediate repeats it, so every
    path of LoRAExperts after it (gating, output side, merging) applies unchanged; A's gradient is the sum over the
    repeats. stacked_in() (merging, grouped dispatch, a sibling's joint matmul) is A repeated per expert.
    """

    @staticmethod
    def input_side_shape(num_experts: int, rank: int, in_features: int) -> tuple[int, ...]:
        return (rank, in_features)

    def stacked_in(self) -> torch.Tensor:
        return self.lora_A.repeat(self.num_experts, 1)

    def project(
        self, x: torch.Tensor, extras: tuple[torch.Tensor, ...] = ()
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        narrow, rest = self.project_with(x, self.lora_A, extras)
        return narrow.repeat(1, self.num_experts), rest

    def delta_weight(self, expert: int) -> torch.Tensor:
        return self.gated_output_side()[expert].T @ self.lora_A


class Rank1Experts(Experts):
    """MoR1E: expert e is v_e u_e^T, u [E, d_in] (input side), v [E, d_out] (output side, zero at init)."""

    expert_type = "rank1"
    has_rank = False
    feature_axes = {"u": -1, "v": -1}  # u [E, d_in], v [E, d_out]: one rank component per expert

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int,
        *,
        init_zero: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ):
        super().__init__(in_features, out_features, num_experts)
        self.u = nn.Parameter(torch.empty(num_experts, in_features, dtype=dtype, device=device))
        self.v = nn.Parameter(torch.empty(num_experts, out_features, dtype=dtype, device=device))
        self.reset_parameters(init_zero)

    def reset_parameters(self, init_zero: bool = True) -> None:
        nn.init.uniform_(self.u, -1 / math.sqrt(self.in_features), 1 / math.sqrt(self.in_features))
        if init_zero:
            nn.init.zeros_(self.v)
        else:
            nn.init.uniform_(self.v, -1.0, 1.0)

    @property
    def adapter_rank(self) -> int:
        # The mixture of E rank-1 experts is a rank-E adapter, so it is scaled as one.
        return self.num_experts

    @property
    def rows_per_expert(self) -> int:
        return 1

    def stacked_in(self) -> torch.Tensor:
        return self.u

    @property
    def output_side(self) -> torch.Tensor:
        return self.v

    def delta_weight(self, expert: int) -> torch.Tensor:
        return torch.outer(self.gated_output_side()[expert], self.u[expert])


EXPERTS: dict[str, type[Experts]] = {"lora": LoRAExperts, "rank1": Rank1Experts}


def build_experts(
    expert_type: str,
    in_features: int,
    out_features: int,
    num_experts: int,
    rank: int,
    *,
    init_zero: bool,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    share_a: bool = False,
) -> Experts:
    if expert_type not in EXPERTS:
        raise ValueError(f"expert_type must be one of {sorted(EXPERTS)}, got {expert_type!r}")
    cls = EXPERTS[expert_type]
    if share_a:
        if not cls.can_share_input_side:
            raise ValueError(f"expert_type={expert_type!r} cannot share one input side across experts")
        cls = SharedALoRAExperts
    options = dict(init_zero=init_zero, dtype=dtype, device=device)
    if cls.has_rank:
        return cls(in_features, out_features, num_experts, rank, **options)
    return cls(in_features, out_features, num_experts, **options)
