"""What the speed benchmark compares: the frozen base, PEFT LoRA, molora (each router x both expert types), a
blog-style loop over experts, and the task router merged into the weights. Each variant is built on a base model
whose frozen weights are shared with the other variants (one copy in memory)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from molora import MoLoRAConfig, get_molora_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NUM_EXPERTS, RANK, TOP_K, NUM_TASKS = 8, 8, 2, 5
ROUTERS = ("softmax", "topk", "switch", "intuition", "task")


@dataclass
class Variant:
    name: str
    kind: str  # "base" | "peft" | "molora" | "loop" | "merged"
    rank: int = RANK
    router: str = "softmax"
    expert_type: str = "lora"
    options: dict[str, Any] = field(default_factory=dict)  # extra MoLoRAConfig fields

    @property
    def trains(self) -> bool:
        return self.kind != "merged"

    @property
    def needs_task_ids(self) -> bool:
        return self.kind == "molora" and self.router == "task"


def default_variants() -> list[Variant]:
    variants = [
        Variant("base", "base"),
        Variant(f"peft-r{RANK}", "peft", rank=RANK),
        Variant(f"peft-r{NUM_EXPERTS * RANK}", "peft", rank=NUM_EXPERTS * RANK),
    ]
    for expert_type in ("lora", "rank1"):
        variants += [
            Variant(f"{expert_type}-{router}", "molora", router=router, expert_type=expert_type) for router in ROUTERS
        ]
    variants += [  # shared routing: one router per input (q/k/v, gate/up), or per block (attention, FFN)
        Variant(f"lora-{router}-{scope}", "molora", router=router, options={"routing_scope": scope})
        for scope in ("input", "block")
        for router in ("softmax", "topk")
    ]
    variants += [
        Variant("loop-blog", "loop"),
        Variant("loop-accumulate", "loop", options={"stack": False}),
        Variant("lora-task-merged", "merged", router="task"),
    ]
    return variants


def molora_config(variant: Variant) -> MoLoRAConfig:
    options = dict(
        target_modules=TARGETS,
        num_experts=NUM_EXPERTS,
        rank=variant.rank,
        alpha=2 * variant.rank,
        expert_type=variant.expert_type,
        router=variant.router,
        num_tasks=NUM_TASKS if variant.router == "task" else None,
    )
    if variant.router == "topk":
        options["top_k"] = TOP_K
    options.update(variant.options)
    return MoLoRAConfig(**options)


class BlogStyleMoELinear(nn.Module):
    """The mixture as tutorials write it: one A/B pair of nn.Linear per expert, a Python loop over them.

    stack=True (the usual blog form): the E expert outputs are stacked into [..., E, d_out] and summed with the
    gates; stack=False: a more careful loop that accumulates gate * output expert by expert.
    """

    def __init__(self, base_layer: nn.Linear, num_experts: int, rank: int, alpha: float, stack: bool = True):
        super().__init__()
        self.base_layer = base_layer
        d_in, d_out = base_layer.in_features, base_layer.out_features
        self.gate = nn.Linear(d_in, num_experts, bias=False)
        self.experts_A = nn.ModuleList(nn.Linear(d_in, rank, bias=False) for _ in range(num_experts))
        self.experts_B = nn.ModuleList(nn.Linear(rank, d_out, bias=False) for _ in range(num_experts))
        for b in self.experts_B:
            nn.init.zeros_(b.weight)
        self.scaling = alpha / rank
        self.stack = stack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = F.softmax(self.gate(x), dim=-1)
        experts = zip(self.experts_A, self.experts_B, strict=True)
        if self.stack:
            outputs = torch.stack([b(a(x)) for a, b in experts], dim=-2)  # [..., E, d_out]
            return self.base_layer(x) + (weights.unsqueeze(-1) * outputs).sum(dim=-2) * self.scaling
        out = self.base_layer(x)
        for e, (a, b) in enumerate(experts):
            out = out + weights[..., e : e + 1] * b(a(x)) * self.scaling
        return out


def inject_blog_style(model: nn.Module, stack: bool) -> nn.Module:
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in TARGETS and isinstance(module, nn.Linear):
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            layer = BlogStyleMoELinear(module, NUM_EXPERTS, RANK, 2 * RANK, stack=stack)
            setattr(parent, name.rsplit(".", 1)[1], layer)
    return model


def share_frozen_weights(base: nn.Module) -> nn.Module:
    """A copy of `base` whose parameters are the same tensors (no second copy of the weights)."""
    return copy.deepcopy(base, memo={id(p): p for p in base.parameters()})


def build(variant: Variant, base: nn.Module) -> nn.Module:
    """The variant's model, with only its adapter trainable."""
    for param in base.parameters():
        param.requires_grad_(False)
    if variant.kind == "merged":  # merging writes into the weights: this one gets its own copy
        model = get_molora_model(copy.deepcopy(base), molora_config(variant))
        return model.merge_and_unload(task_id=0)
    model = share_frozen_weights(base)
    if variant.kind == "base":
        model.enable_input_require_grads()  # backward through every layer, as an adapter's gradient needs
        return model
    if variant.kind == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=variant.rank, lora_alpha=2 * variant.rank, target_modules=TARGETS, lora_dropout=0.0)
        return get_peft_model(model, config)
    if variant.kind == "loop":
        return inject_blog_style(model, stack=variant.options.get("stack", True))
    if variant.kind == "molora":
        return get_molora_model(model, molora_config(variant))
    raise ValueError(f"unknown variant kind {variant.kind!r}")


def make_step(model: nn.Module, variant: Variant) -> tuple[Callable[[dict], None], Callable[[dict], None]]:
    """(train step, forward-only call) for the variant: loss (+ aux loss) backward and AdamW, or one eval forward.

    Each sets the model's mode first, outside the part that is timed (`.timed`)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable and variant.kind != "base" else None
    aux = getattr(model, "aux_loss", None) if variant.kind == "molora" else None

    def train_step(batch: dict) -> None:
        loss = model(**batch).loss
        if aux is not None:
            loss = loss + aux()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def forward_step(batch: dict) -> None:
        with torch.inference_mode():
            model(**{k: v for k, v in batch.items() if k != "labels"})

    def train(batch: dict) -> None:
        model.train()
        train_step(batch)

    def forward(batch: dict) -> None:
        model.eval()
        forward_step(batch)

    train.prepare, train.timed = model.train, train_step
    forward.prepare, forward.timed = model.eval, forward_step
    return train, forward
