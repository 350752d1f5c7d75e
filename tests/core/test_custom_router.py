"""A router registered from outside the package takes part in everything a built-in one does, because the rest of
molora asks the router class what it needs (task ids, top_k default, merging, decoding) instead of its name."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from molora import MoLoRAConfig, MoLoRAModel, get_molora_model
from molora.core.routers import ROUTERS, LinearRouter, RouterInputs, register_router
from molora.run.config import RunConfig
from tests.conftest import build_base, make_batch, molora_config

NAME = "token-plus-task"
NUM_TASKS = 3


class TokenPlusTaskRouter(LinearRouter):
    """Token logits plus a learned bias per task: per-token routing (not mergeable) that needs task ids."""

    needs_task_ids = True
    default_top_k = 2

    def __init__(self, in_features: int, num_experts: int, *, num_tasks: int, **kwargs: Any):
        super().__init__(in_features, num_experts, **kwargs)
        self.task_bias = nn.Embedding(num_tasks, num_experts, dtype=torch.float32)

    @classmethod
    def from_config(cls, in_features: int, num_experts: int, config: Any, **overrides: Any):
        overrides.setdefault("num_tasks", config.num_tasks)
        return super().from_config(in_features, num_experts, config, **overrides)

    @classmethod
    def check_config(cls, config: Any) -> None:
        super().check_config(config)
        if config.router_temperature != 1.0:
            raise ValueError(f"router={cls.name!r} takes no router_temperature")

    def compute_logits(self, x: torch.Tensor, inputs: RouterInputs, projected: torch.Tensor | None) -> torch.Tensor:
        if inputs.task_ids is None:
            raise ValueError(f"router={self.name!r} needs task_ids")
        return projected + self.task_bias.weight[inputs.task_ids].unsqueeze(1)


@pytest.fixture
def custom_router():
    register_router(NAME)(TokenPlusTaskRouter)
    try:
        yield TokenPlusTaskRouter
    finally:
        ROUTERS.pop(NAME)


def build(**overrides) -> MoLoRAModel:
    return get_molora_model(build_base("llama"), molora_config("llama", NAME, num_tasks=NUM_TASKS, **overrides))


def test_the_config_asks_the_router_class(custom_router):
    assert MoLoRAConfig(router=NAME, num_tasks=NUM_TASKS).top_k == 2  # its default_top_k
    with pytest.raises(ValueError, match=f"num_tasks is required for router='{NAME}'"):
        MoLoRAConfig(router=NAME)
    with pytest.raises(ValueError, match="takes no router_temperature"):  # its own check
        MoLoRAConfig(router=NAME, num_tasks=NUM_TASKS, router_temperature=2.0)
    # a run config gives a router that needs task ids one task per domain, as for the built-in task router
    run = RunConfig.from_dict({"molora": {"router": NAME}, "data": {"domains": ["news", "math"]}})
    assert run.molora.num_tasks == 2


def test_training_steps_move_the_custom_router(custom_router):
    model = build()
    batch = make_batch(batch=3)
    with pytest.raises(ValueError, match=f"router='{NAME}' needs task_ids"):
        model(**batch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "task_bias" in n}
    losses = []
    for _ in range(4):
        out = model(**batch, labels=batch["input_ids"], task_ids=[0, 1, 2])
        loss = out.loss + model.aux_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert before and all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    assert losses[-1] < losses[0]


def test_save_load_generate_merge_and_inspect(custom_router, tmp_path):
    model = build()
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.3)
    batch = make_batch(batch=3)
    model.eval()
    expected = model(**batch, task_ids=[0, 1, 2]).logits
    model.save_pretrained(tmp_path)
    loaded = MoLoRAModel.from_pretrained(build_base("llama"), tmp_path)
    assert torch.allclose(loaded(**batch, task_ids=[0, 1, 2]).logits, expected, atol=1e-6)

    prompt = {k: v[:, :5] for k, v in batch.items()}
    cached = loaded.generate(**prompt, task_ids=[0, 1, 2], max_new_tokens=4, do_sample=False, pad_token_id=0)
    uncached = loaded.generate(
        **prompt, task_ids=[0, 1, 2], max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=False
    )
    assert torch.equal(cached, uncached) and cached.shape == (3, 9)

    with pytest.raises(
        ValueError, match=f"router '{NAME}' weighs the experts per token.*one gate per task \\(domain, task\\)"
    ):
        loaded.merge_and_unload(task_id=0)

    with loaded.record_routing(domains=["a", "b", "c"]) as recorder, torch.no_grad():
        loaded(**batch, task_ids=[0, 1, 2])
    stats = recorder.stats()
    assert stats["tasks"] == ["a", "b", "c"] and len(stats["layers"]) == len(loaded._layers)
    for layer in stats["layers"].values():
        assert sum(layer["selections"]) == pytest.approx(2 * batch["attention_mask"].sum().item())  # top-2


def test_an_unregistered_router_is_refused_by_name():
    assert NAME not in ROUTERS
    with pytest.raises(ValueError, match=NAME):
        MoLoRAConfig(router=NAME, num_tasks=NUM_TASKS)
