"""A checkpoint's trainer state (optimizer, scheduler, RNG states, step, the run's config) as safetensors + JSON.

Tensors go to trainer_state.safetensors under the dotted path where they sat, everything else to trainer_state.json
with {"__tensor__": path} in their place; reading one back never runs code. Checkpoints of format 1 held a pickle,
trainer_state.pt: it is read with torch's weights-only unpickler and nothing else, so a pickle that would run code
is refused, never executed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from molora.files.formats import check_keys, read_json
from molora.files.tensors import check_finite_values, load_tensors
from molora.utils import atomic_write, atomic_write_text

TENSORS_NAME = "trainer_state.safetensors"
JSON_NAME = "trainer_state.json"
LEGACY_NAME = "trainer_state.pt"  # format 1
TENSOR_REF = "__tensor__"
STATE_KEYS = ("bad_steps", "config", "eval_before", "optimizer", "rng", "rng_ranks", "scheduler", "step")
# rng_ranks (format 3): each process's random state, in rank order (None for one process); before it, every rank
# resumed with rank 0's, so dropout and router jitter on the other ranks did not repeat the uninterrupted run
OPTIONAL_KEYS = ("rng_ranks",)
JSON_LIMIT_BYTES = 16 << 20  # the run config and the optimizer's param groups; tensors are in the other file


class TrainerStateError(ValueError):
    """A trainer state file this molora cannot use; the message names the file."""


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore rng_state()'s states; Python's may come back from JSON as lists (random.setstate wants tuples)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Writing -------------------------------------------------------------------------------------------------------------
def write_trainer_state(folder: Path, state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    check_keys(state, STATE_KEYS, "trainer state")
    tree = {**state, "optimizer": _optimizer_tree(state["optimizer"])}
    tensors: dict[str, torch.Tensor] = {}
    data = _split(tree, "", tensors)
    atomic_write(folder / TENSORS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_text(folder / JSON_NAME, json.dumps(data, indent=1, allow_nan=False) + "\n")


def _optimizer_tree(optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """torch's optimizer state keys parameters by int; JSON keys are strings."""
    return {**optimizer_state, "state": {str(index): value for index, value in optimizer_state["state"].items()}}


def _split(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        if path in tensors:
            raise ValueError(f"trainer state: two tensors at {path!r}")
        tensors[path] = value.detach().cpu().contiguous()
        return {TENSOR_REF: path}
    if isinstance(value, dict):
        if TENSOR_REF in value or not all(isinstance(key, str) for key in value):
            raise ValueError(f"trainer state: {path or 'the top'} has keys a checkpoint cannot hold: {list(value)[:5]}")
        return {key: _split(item, f"{path}.{key}" if path else key, tensors) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(item, f"{path}.{index}", tensors) for index, item in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"trainer state: {path} is a {type(value).__name__}, which a checkpoint cannot hold")


# Reading -------------------------------------------------------------------------------------------------------------
def read_trainer_state(folder: Path, max_tensors: int) -> dict[str, Any]:
    """The state write_trainer_state wrote; `max_tensors` bounds what the tensor file may list (its header is refused
    unread beyond it)."""
    data = read_json(folder / JSON_NAME, "trainer state", JSON_LIMIT_BYTES)
    check_keys(data, STATE_KEYS, str(folder / JSON_NAME))
    missing = sorted(set(STATE_KEYS) - set(OPTIONAL_KEYS) - set(data))
    if missing:
        raise TrainerStateError(f"{folder / JSON_NAME}: no {missing}")
    _, tensors = load_tensors(folder / TENSORS_NAME, max_tensors)
    used: set[str] = set()
    state = _join(data, tensors, used, folder / JSON_NAME)
    unused = sorted(set(tensors) - used)
    if unused:
        raise TrainerStateError(f"{folder / TENSORS_NAME}: tensors {unused[:5]} that {JSON_NAME} never refers to")
    return _checked(state, folder / JSON_NAME)


def _join(value: Any, tensors: dict[str, torch.Tensor], used: set[str], where: Path) -> Any:
    if isinstance(value, dict):
        if TENSOR_REF in value:
            name = value[TENSOR_REF]
            if len(value) != 1 or not isinstance(name, str) or name not in tensors or name in used:
                raise TrainerStateError(f"{where}: {value!r:.200} does not name one tensor of {TENSORS_NAME}")
            used.add(name)
            return tensors[name]
        return {key: _join(item, tensors, used, where) for key, item in value.items()}
    if isinstance(value, list):
        return [_join(item, tensors, used, where) for item in value]
    return value


def _checked(state: dict[str, Any], where: Path) -> dict[str, Any]:
    """The few shapes resume relies on before torch's own load_state_dict checks the rest."""
    optimizer, rng = state["optimizer"], state["rng"]
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)):
        raise TrainerStateError(f"{where}: optimizer must hold 'state' and 'param_groups'")
    try:
        optimizer["state"] = {int(key): value for key, value in optimizer["state"].items()}
    except ValueError:
        raise TrainerStateError(f"{where}: optimizer state is keyed by parameter index") from None
    _check_rng(rng, where, "rng")
    ranks = state.setdefault("rng_ranks", None)
    if ranks is not None:
        if not (isinstance(ranks, list) and ranks):
            raise TrainerStateError(f"{where}: rng_ranks must be a list of random states, one per rank")
        for rank, rank_rng in enumerate(ranks):
            _check_rng(rank_rng, where, f"rng_ranks.{rank}")
    for key in ("step", "bad_steps"):
        if type(state[key]) is not int or state[key] < 0:
            raise TrainerStateError(f"{where}: {key} must be a non-negative integer, got {state[key]!r}")
    return state


def _check_rng(rng: Any, where: Path, name: str) -> None:
    if not (isinstance(rng, dict) and set(rng) == {"torch", "python", "cuda"}):
        raise TrainerStateError(f"{where}: {name} must hold exactly torch, python and cuda")
    python = rng["python"]
    if not (isinstance(python, list) and len(python) == 3 and isinstance(python[1], list)):
        raise TrainerStateError(f"{where}: {name}.python is not a state of Python's random module")


def read_legacy_trainer_state(path: Path) -> dict[str, Any]:
    """Format 1's pickle through torch's weights-only unpickler (tensors, containers, numbers, strings: nothing that
    can run code); anything else in it is refused, naming the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # whatever the weights-only unpickler refuses, the file is unusable
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise TrainerStateError(
            f"{path}: refused: not a trainer state that loads without running code ({reason})"
        ) from None
    if not isinstance(state, dict):
        raise TrainerStateError(f"{path}: a {type(state).__name__}, not a trainer state")
    check_keys(state, STATE_KEYS, str(path))
    missing = sorted(set(STATE_KEYS) - set(OPTIONAL_KEYS) - set(state))
    if missing:
        raise TrainerStateError(f"{path}: no {missing}")
    check_finite_values(path, dict(_tensors_in(state, "")))
    rng = state["rng"]
    if isinstance(rng, dict) and isinstance(rng.get("python"), tuple):
        rng["python"] = [rng["python"][0], list(rng["python"][1]), rng["python"][2]]
    return _checked(state, path)


def _tensors_in(value: Any, path: str) -> list[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        return [(path, value)]
    if isinstance(value, dict):
        return [pair for key, item in value.items() for pair in _tensors_in(item, f"{path}.{key}")]
    if isinstance(value, (list, tuple)):
        return [pair for index, item in enumerate(value) for pair in _tensors_in(item, f"{path}.{index}")]
    return []
