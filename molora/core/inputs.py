"""Checks on the routing inputs of a call (task ids, prompt mask) against its batch, before any computation.

The layers repeat per-sequence inputs when generation expands the batch, so a short or mistyped batch would
otherwise be silently repeated, truncated or relabelled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def _tensor_of(value: Any, what: str) -> torch.Tensor:
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{what} must be a tensor or a list of numbers, got {type(value).__name__} ({err})") from None


def task_id_tensor(value: Any) -> torch.Tensor | None:
    """[batch] int64 task ids; floats and bools are refused, since casting them would silently truncate or relabel."""
    if value is None:
        return None
    tensor = _tensor_of(value, "task_ids")
    if tensor.numel() == 0 and not isinstance(value, torch.Tensor):
        tensor = tensor.long()  # torch.as_tensor([]) is float
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise ValueError(f"task_ids must be integers (one task id per sequence), got dtype {tensor.dtype}")
    if tensor.dim() != 1:
        raise ValueError(f"task_ids must be [batch], got shape {list(tensor.shape)}")
    return tensor.long()


def prompt_mask_tensor(value: Any) -> torch.Tensor | None:
    if value is None:
        return None
    tensor = _tensor_of(value, "prompt_mask")
    if tensor.dim() != 2:
        raise ValueError(f"prompt_mask must be [batch, seq], got shape {list(tensor.shape)}")
    return tensor.bool()


@dataclass(frozen=True)
class CallShape:
    """What a call's main input says about the batch: its name, batch size and the lengths a prompt mask may have
    (None: unknown, e.g. an encoder-decoder call that passes encoder_outputs)."""

    name: str
    batch: int
    lengths: tuple[int, ...] | None


def first_input(
    args: tuple, kwargs: dict[str, Any], names: tuple[str, ...], positional: str | None
) -> tuple[str, torch.Tensor] | None:
    """The first batched tensor among the named keyword arguments, else the first positional one."""
    for name in names:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return name, value
    if positional is not None and args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
        return positional, args[0]
    return None


def check_batch(task_ids: torch.Tensor | None, prompt_mask: torch.Tensor | None, shape: CallShape, generating: bool):
    """Per-sequence inputs must match the input batch: the layers would otherwise repeat a divisor-sized batch."""
    if task_ids is not None and task_ids.shape[0] != shape.batch:
        per = "prompt (generate() repeats them for num_return_sequences and beams)" if generating else "sequence"
        raise ValueError(
            f"task_ids has {task_ids.shape[0]} entries but {shape.name} has batch size {shape.batch}; pass one task "
            f"id per {per}"
        )
    if prompt_mask is None:
        return
    lengths = shape.lengths
    if prompt_mask.shape[0] != shape.batch or (lengths is not None and prompt_mask.shape[1] not in lengths):
        seq = "seq" if lengths is None else " or ".join(str(n) for n in lengths)
        what = "the prompt " if generating else ""
        raise ValueError(
            f"prompt_mask must be [batch, seq] = [{shape.batch}, {seq}] like {what}{shape.name}, "
            f"got {list(prompt_mask.shape)}"
        )
