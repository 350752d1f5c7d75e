"""Hugging Face Trainer integration: the aux loss in the objective, aux terms and router health in the logs.

trainer = MoLoRATrainer(model=molora_model, args=TrainingArguments(...), train_dataset=ds,
                        data_collator=MoLoRADataCollator(tokenizer.pad_token_id))
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from transformers import Trainer

from molora.core.recording import health_summary
from molora.model import MoLoRAModel
from molora.run.data import collate


class MoLoRADataCollator:
    """Pads examples with input_ids, prompt_len and task_id (as built by molora.run.data) into model inputs."""

    def __init__(self, pad_token_id: int, loss_on: str = "response"):
        self.pad_token_id = pad_token_id
        self.loss_on = loss_on

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate(examples, self.pad_token_id, self.loss_on)


def _unwrap(model: torch.nn.Module) -> MoLoRAModel:
    while not isinstance(model, MoLoRAModel) and hasattr(model, "module"):
        model = model.module
    if not isinstance(model, MoLoRAModel):
        raise TypeError(f"MoLoRATrainer needs a MoLoRAModel, got {type(model).__name__}")
    return model


def _check_distributed(distributed_type: Any) -> None:
    """Several processes that accelerate did not set up to train together would each train a copy of their own, and
    nothing would say so: what accelerate 1.16 does with an FSDP (or DeepSpeed) config on a machine without a GPU."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1 and str(getattr(distributed_type, "value", distributed_type)) == "NO":
        raise ValueError(
            f"{processes} processes were launched, but accelerate set up no distributed training "
            "(DistributedType.NO): each process would train its own copy of the adapter and nothing would be "
            "synchronised. accelerate does this with an FSDP or DeepSpeed config on a machine without a GPU; there, "
            "launch with torchrun (the Trainer then uses DDP), or use molora-train with train.sharding=fsdp"
        )


class MoLoRATrainer(Trainer):
    """A Trainer whose loss is the model loss plus model.aux_loss(), logging aux terms and router health."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        _check_distributed(self.accelerator.distributed_type)
        self._aux_sums: dict[str, float] = {}
        self._aux_count = 0
        self._health: dict[str, float] = {}

    def _set_signature_columns_if_needed(self) -> None:
        # MoLoRAModel.forward takes **kwargs; keep the columns the wrapped model's forward accepts.
        if self._signature_columns is None:
            molora = _unwrap(self.model)
            names = list(inspect.signature(molora.base_model.forward).parameters)
            # MoLoRADataCollator reads task_id and prompt_len
            extra = ["task_ids", "prompt_mask", "task_id", "prompt_len", "label", "label_ids"]
            self._signature_columns = [*names, *extra, *self.label_names]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        molora = _unwrap(model)
        log_now = self.state.global_step % max(1, self.args.logging_steps) == 0
        if log_now:
            with molora.record_routing() as recorder:
                outputs = model(**inputs)
            self._health = health_summary(recorder)
        else:
            outputs = model(**inputs)
        aux = molora.aux_loss()
        for name, value in molora.aux_loss_terms().items():  # summed on the device: no host sync per step
            self._aux_sums[name] = self._aux_sums.get(name, 0.0) + value.detach()
        self._aux_count += 1
        loss = outputs.loss + aux
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._aux_count and "loss" in logs:
            logs.update({f"aux/{k}": float(v) / self._aux_count for k, v in self._aux_sums.items()})
            logs.update(self._health)
            self._aux_sums, self._aux_count = {}, 0
        super().log(logs, *args, **kwargs)
