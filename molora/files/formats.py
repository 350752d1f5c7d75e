"""Files molora reads that someone else may have written: every format says its integer version, a newer one is
refused naming the upgrade, an older one is converted by an explicit step; JSON is size-capped, strict and checked
key by key, so a file from elsewhere is read as data and never as instructions.

Format history (the version is separate from the package version; bump it whenever what a file holds changes):
- adapter (molora_config.json + adapter_model.safetensors):
  1. no `format_version` field (molora 0.1.0 up to ce47ab3);
  2. `format_version` and `sha256` (of the weights file and the config's other fields);
  3. LoRA B stored `[E, r, d_out]` (the rows the mixing matmul reads) instead of PEFT's `[E, d_out, r]`.
- checkpoint (checkpoints/step-N/, its manifest.json):
  1. no `format_version`; the trainer state a pickle, trainer_state.pt (read with weights_only=True only);
  2. `format_version`; the trainer state as trainer_state.safetensors + trainer_state.json.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from molora.version import __version__

ADAPTER_FORMAT = 3
CHECKPOINT_FORMAT = 3  # 3: every rank's random state (rng_ranks), not rank 0's alone
FORMAT_KEY = "format_version"
JSON_LIMIT_BYTES = 4 << 20  # a config for thousands of modules is well under 1 MiB
UPGRADE = "pip install -U molora"


class FormatVersionError(ValueError):
    """A file written in a format newer than this molora reads."""


def sha256_file(path: Path, digest: Any = None) -> str:
    """The sha256 of a file, read in 1 MiB chunks (memory stays flat whatever its size); `digest` continues one."""
    digest = hashlib.sha256() if digest is None else digest
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def canonical_json(data: Any) -> bytes:
    """One byte string per JSON value (sorted keys, no whitespace): what a checksum over JSON is taken of."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"key {twice!r} appears twice")
    return data


def parse_json(text: bytes, where: str) -> Any:
    """Strict JSON: duplicate keys, NaN/Infinity and nesting deep enough to exhaust the stack are a ValueError."""
    try:
        return json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{where} is not valid JSON: {err}") from None


def read_json(path: Path, what: str, limit: int = JSON_LIMIT_BYTES) -> dict[str, Any]:
    """A JSON object from `path`, refused unread past `limit` bytes; errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {path.parent} ({what})")
    size = path.stat().st_size
    if size > limit:
        raise ValueError(f"{path}: {size} bytes, more than the {limit} a {what} may have; not read")
    data = parse_json(path.read_bytes(), str(path))
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object ({what}), got {type(data).__name__}")
    return data


def format_version(data: dict[str, Any], path: Path, current: int, what: str) -> int:
    """The file's format version (1 when it has none: the first formats had no field); newer than `current` refused."""
    version = data.get(FORMAT_KEY, 1)
    if type(version) is not int or version < 1:
        raise ValueError(f"{path}: {FORMAT_KEY} must be a positive integer, got {version!r}")
    if version > current:
        raise FormatVersionError(
            f"{path} is a {what} in format {version}, written by a newer molora; this molora ({__version__}) reads "
            f"formats 1 to {current}. Upgrade with `{UPGRADE}`"
        )
    return version


def check_keys(data: dict[str, Any], known: Iterable[str], where: str) -> None:
    """A ValueError naming the first key `where` does not define, and the closest one it does."""
    known = sorted(known)
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {known}"
            raise ValueError(f"{where}: unknown key {key!r}{hint}")
