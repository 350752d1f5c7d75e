"""What a training run is built from: the process group, the adapter (or a baseline), its optimizer and schedule."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from molora.core.config import WEIGHTS_NAME
from molora.deploy.adapter_files import read_adapter_config, read_adapter_tensors
from molora.files.tensors import load_tensors
from molora.model import MoLoRAModel, get_molora_model
from molora.run.config import RunConfig


def setup_distributed() -> tuple[int, int, torch.device]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to min_ratio of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: MoLoRAModel, config: RunConfig) -> torch.optim.AdamW:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    gates = [p for n, p in trainable if ".rank_gates." in n]
    routers = [p for n, p in trainable if ".router." in n]
    experts = [p for n, p in trainable if ".router." not in n and ".rank_gates." not in n]
    router_lr = config.train.router_lr or config.train.lr * config.train.router_lr_scale
    groups = [
        {"params": experts, "lr": config.train.lr},
        {"params": routers, "lr": router_lr},
        # gate logits live on a scale of a few units (they start at 3): a far larger step, and no decay towards 0,
        # the threshold itself
        {"params": gates, "lr": config.train.rank_gate_lr, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=config.train.weight_decay)


def build_model(base: nn.Module, config: RunConfig) -> nn.Module:
    """The model to train: the mixture, a parameter-matched PEFT LoRA baseline, or the bare base model."""
    adapter = config.model.adapter
    if adapter == "none":
        for param in base.parameters():
            param.requires_grad_(False)
        return base
    if adapter == "peft-lora":
        from peft import LoraConfig, get_peft_model

        rank = config.model.peft_rank
        if rank is None:  # match the mixture's trainable parameters
            probe = get_molora_model(base, config.molora)
            mixture_params = probe.get_nb_trainable_parameters()[0]
            widths = sum(r.in_features + r.out_features for r in probe.injection_report.modules)
            probe.unload()
            rank = max(1, round(mixture_params / widths))
        target = config.molora.target_modules
        lora = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=target, layers_to_transform=config.molora.layers_to_transform
        )
        return get_peft_model(base, lora)
    return get_molora_model(base, config.molora)


def load_adapter_weights(model: nn.Module, directory: Path) -> int | None:
    """A checkpoint's adapter into the run's model, through the same checks as any adapter from elsewhere; its
    format version (None for a PEFT baseline's adapter)."""
    if isinstance(model, MoLoRAModel):
        version = read_adapter_config(directory)[1]  # its format and checksum checked
        model.load_adapter_state_dict(read_adapter_tensors(directory, model.adapter_state_dict(), True, version))
        return version
    else:
        from peft import set_peft_model_state_dict

        trainable = sum(1 for p in model.parameters() if p.requires_grad)
        _, state = load_tensors(directory / WEIGHTS_NAME, max_entries=trainable + 16)
        set_peft_model_state_dict(model, state)
        return None
