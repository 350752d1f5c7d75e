"""What an adapter load could use and what it could not, reported the way torch's load_state_dict does."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AdapterLoadResult:
    """What an adapter load could not use (as torch's load_state_dict result), plus shape mismatches."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[tuple[str, list[int], list[int]]] = field(default_factory=list)  # key, checkpoint, model
    loaded_keys: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing_keys or self.unexpected_keys or self.mismatched_keys)

    def __str__(self) -> str:
        if self.ok:
            return f"adapter checkpoint fits: {len(self.loaded_keys)} tensors loaded"
        lines = [
            f"adapter checkpoint does not fit this model ({len(self.loaded_keys)} tensors fit, "
            f"{len(self.missing_keys)} missing, {len(self.unexpected_keys)} unexpected, "
            f"{len(self.mismatched_keys)} of another shape):"
        ]
        for title, keys in (
            ("missing (in the model, not in the checkpoint)", self.missing_keys),
            ("unexpected (in the checkpoint, not in the model)", self.unexpected_keys),
        ):
            if keys:
                lines.append(f"  {title}:")
                lines += _limited([f"    {m}: {', '.join(t)}" for m, t in _by_module(keys).items()], "modules")
        if self.mismatched_keys:
            lines.append("  shape mismatches (another base model, num_experts, rank or num_tasks):")
            lines += _limited([f"    {k}: checkpoint {c} vs model {m}" for k, c, m in self.mismatched_keys], "tensors")
        return "\n".join(lines)


_REPORT_LINES = 20


def _limited(lines: list[str], what: str) -> list[str]:
    if len(lines) <= _REPORT_LINES:
        return lines
    return [*lines[:_REPORT_LINES], f"    ... and {len(lines) - _REPORT_LINES} more {what}"]


def _by_module(keys: list[str]) -> dict[str, list[str]]:
    """{module: [tensor, ...]}, split at the last '.experts.' or '.router.' (module names may hold either word)."""
    grouped: dict[str, list[str]] = {}
    for key in keys:
        cut = max(key.rfind(".experts."), key.rfind(".router."))
        module, tensor = (key[:cut], key[cut + 1 :]) if cut >= 0 else key.rpartition(".")[::2]
        grouped.setdefault(module, []).append(tensor)
    return grouped
