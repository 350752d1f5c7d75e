"""train.sharding: 'fsdp' shards the model over the processes of a torchrun launch with FSDP2 (`fully_shard`).

Each decoder block (the classes transformers lists in `_no_split_modules`) is one unit, then the whole model; the
base stays frozen and the experts and routers train. FSDP2 swaps parameters in place, so the layers, their hooks and
the routing context see what they see on one process.

Mixed precision stays torch.autocast's (`train.bf16`), as on one process: FSDP's own `param_dtype` would cast every
parameter of a unit, the routers' included, and the routers compute in fp32 (molora.core.routers).

Checkpoints hold the full adapter and the full optimizer state in the single-process layout: gathered on save (every
rank takes part, rank 0 writes) and scattered on resume. A checkpoint resumes the same with sharding or without, on
any number of processes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

SHARDINGS = ("none", "fsdp")


def check_sharding(sharding: str, world_size: int, quantization: str | None) -> None:
    """Errors that name the cause and the fix, raised before the model loads."""
    if sharding == "none":
        return
    if world_size < 2:
        raise ValueError(
            "train.sharding=fsdp shards the model over the processes of a launch, and this run has one process (no "
            "process group): launch it with torchrun --nproc_per_node=N (N >= 2), or set train.sharding=none"
        )
    if quantization is not None:
        raise ValueError(
            f"train.sharding=fsdp with model.quantization={quantization!r} is not supported: the quantized linears "
            "keep their own packed storage, which FSDP cannot split; train a quantized base on one process per model"
        )


def _transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside an adapter wrapper (MoLoRAModel's or PEFT's), found by _no_split_modules."""
    for module in model.modules():
        if getattr(module, "_no_split_modules", None):
            return module
    raise ValueError(
        f"train.sharding=fsdp: {type(model).__name__} holds no transformers model that names its decoder blocks "
        "(_no_split_modules), which FSDP shards one by one"
    )


def shard_model(model: nn.Module) -> None:
    """fully_shard every decoder block, then the transformers model itself (what no block holds: embeddings, the
    final norm, the head)."""
    from torch.distributed.fsdp import fully_shard

    hf_model = _transformers_model(model)
    names = set(hf_model._no_split_modules)
    blocks = [m for m in hf_model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"train.sharding=fsdp: {type(hf_model).__name__} has no module of the classes {sorted(names)}")
    for block in blocks:
        fully_shard(block)
    fully_shard(hf_model)


def whole_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors gathered whole, keyed as save_pretrained writes them (a collective: every rank calls
    it). MoLoRAModel's experts and routers, or a PEFT baseline's LoRA tensors."""
    from molora.model import MoLoRAModel

    if isinstance(model, MoLoRAModel):
        state = model.adapter_state_dict()
    else:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model)
    return {key: full(value).detach().clone() for key, value in state.items()}


def full(tensor: Any) -> Any:
    """A DTensor gathered whole (a collective: every rank calls it, in the same order); anything else as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gathered_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """optimizer.state_dict() with every sharded tensor whole: the single-process layout."""
    state = optimizer.state_dict()
    return {
        **state,
        "state": {index: {k: full(v) for k, v in entries.items()} for index, entries in state["state"].items()},
    }


def shard_like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A whole tensor split as `param` is (a DTensor with its mesh and placements); unchanged for a plain one."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor) or isinstance(value, DTensor):
        return value
    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After load_state_dict of a whole (single-process layout) state: each moment split as its parameter is."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.dim() and tuple(value.shape) == tuple(param.shape):
                    optimizer.state[param][key] = shard_like(param, value)
