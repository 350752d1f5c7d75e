"""Reading a safetensors file from elsewhere with bounded memory: the header is checked before it is read (its
length against the file and against what the caller expects), then every entry (dtype, shape, offsets), and after
loading every floating value must be finite. Every failure is a ValueError naming the file.

safetensors alone raises its own SafetensorError, loads NaN without complaint and parses any header that fits the
file, so a file listing a million empty tensors costs a GB of memory before anything is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from molora.files.formats import parse_json

HEADER_BYTES_PER_ENTRY = 512  # a name of ~300 characters, its dtype, shape and offsets
HEADER_BYTES_FIXED = 64 << 10  # the metadata and slack
METADATA_KEY = "__metadata__"
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOATING = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class Entry:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Header:
    entries: dict[str, Entry]
    metadata: dict[str, str]


def header_limit(max_entries: int) -> int:
    return HEADER_BYTES_FIXED + HEADER_BYTES_PER_ENTRY * max_entries


def read_header(path: Path, max_entries: int) -> Header:
    """The checked header of a safetensors file that may list at most `max_entries` tensors."""
    size = path.stat().st_size
    if size < 8:
        raise ValueError(f"{path}: {size} bytes, too short for a safetensors file (not one, or cut short)")
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if length > size - 8:
            raise ValueError(f"{path}: its header claims {length} bytes, the file has {size} (cut short, or not one)")
        limit = header_limit(max_entries)
        if length > limit:
            raise ValueError(
                f"{path}: a header of {length} bytes, more than the {limit} that {max_entries} tensors need "
                "(refused unread: it lists far more tensors than expected)"
            )
        raw = parse_json(handle.read(length), f"{path}'s safetensors header")
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object")
    metadata = raw.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: {METADATA_KEY} must map names to strings")
    if len(raw) > max_entries:
        raise ValueError(f"{path}: {len(raw)} tensors, more than the {max_entries} expected")
    entries, spans = {}, []
    for name, entry in raw.items():
        entries[name] = _entry(path, name, entry)
        spans.append((*entry["data_offsets"], name))
    _check_spans(path, sorted(spans), size - 8 - length)
    return Header(entries, metadata)


def _entry(path: Path, name: str, entry: object) -> Entry:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"{path}: tensor {name!r} needs exactly dtype, shape and data_offsets, got {entry!r:.200}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in ITEM_BYTES:
        raise ValueError(f"{path}: tensor {name!r} has dtype {dtype!r}; molora reads {sorted(ITEM_BYTES)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"{path}: tensor {name!r} has shape {shape!r}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise ValueError(f"{path}: tensor {name!r} has data_offsets {offsets!r}, not [begin, end]")
    numel = 1
    for dim in shape:
        numel *= dim
    if offsets[1] - offsets[0] != numel * ITEM_BYTES[dtype]:
        raise ValueError(f"{path}: tensor {name!r} ({dtype} {shape}) spans {offsets}, not its {numel} values")
    return Entry(dtype, tuple(shape))


def _check_spans(path: Path, spans: list[tuple[int, int, str]], data_bytes: int) -> None:
    """The tensors' bytes tile the data section exactly: no gap, no overlap, nothing past the end."""
    position = 0
    for begin, end, name in spans:
        if begin != position:
            raise ValueError(f"{path}: tensor {name!r} starts at byte {begin}, expected {position} (gap or overlap)")
        position = end
    if position != data_bytes:
        raise ValueError(f"{path}: the tensors cover {position} bytes of data, the file holds {data_bytes}")


def load_tensors(path: Path, max_entries: int) -> tuple[Header, dict[str, torch.Tensor]]:
    """The header and every tensor of a checked file; floating values must all be finite."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    header = read_header(path, max_entries)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    check_finite_values(path, tensors)
    return header, tensors


def check_finite_values(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    bad = [name for name, tensor in tensors.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise ValueError(f"{path}: NaN or inf in {len(bad)} tensor(s), e.g. {sorted(bad)[:3]}; not loaded")
