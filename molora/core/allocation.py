"""Per-layer expert allocation: which decoder layer a module sits in, and the MoLA-style presets that give each layer
of the adapted stack its number of experts.

MoLA (Gao et al. 2024, "Higher Layers Need More LoRA Experts") names an allocation by its counts per quarter of the
layers: 8-2-2-8, 2-4-6-8, 8-6-4-2, 5-5-5-5. `num_experts: {preset: NAME, min: 2, max: 8}` gives exactly these four;
`num_experts: {preset: [8, 2, 2, 8]}` states the quarters directly. The config validates the form (config.py); this
module only computes counts, from names and layer indices.
"""

from __future__ import annotations

import re
from typing import Any

PRESETS = ("uniform", "increasing", "decreasing", "hourglass")
PRESET_KEYS = ("preset", "min", "max")
NUM_QUARTERS = 4
# The quarters that take the num_layers % 4 leftover layers, in this order: the first and last layers of the stack
# always get the first and last quarter's count, and an hourglass stays symmetric when num_layers % 4 is 0 or 2.
_REMAINDER_ORDER = (0, 3, 1)
_LAYER_INDEX = re.compile(r"\.(?:layers|layer|h|block|blocks)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The decoder-layer index in a module name (`model.layers.3.self_attn.q_proj` -> 3), as layers_to_transform
    and the presets read it: the last `.layers.N.` (or `.layer.`, `.h.`, `.block.`, `.blocks.`) part; None without."""
    found = _LAYER_INDEX.findall("." + name + ".")
    return int(found[-1]) if found else None


def is_preset(num_experts: Any) -> bool:
    """`num_experts` in the preset form ({preset: ...}), as opposed to an int or a {regex: int} dict."""
    return isinstance(num_experts, dict) and "preset" in num_experts


def quarter_counts(
    preset: str | list[int], min_experts: int | None = None, max_experts: int | None = None
) -> list[int]:
    """The four per-quarter counts of a preset (a list is taken as they are). With d = max - min, rounding half up:
    uniform (min+max)/2 each; increasing min + d*q/3 for quarter q = 0..3; decreasing its reverse; hourglass
    max-min-min-max. Increasing, decreasing and hourglass always sum to 2*(min+max); uniform too when min+max is even
    (min 2, max 8: 5-5-5-5, 2-4-6-8, 8-6-4-2, 8-2-2-8, MoLA's four, 20 each)."""
    if not isinstance(preset, str):
        return list(preset)
    if preset not in PRESETS or min_experts is None or max_experts is None:
        raise ValueError(f"preset must be one of {sorted(PRESETS)} with min and max, got {preset!r}")
    spread = max_experts - min_experts
    # round half up in integers: floor(spread * q / 3 + 1/2) = (2 * spread * q + 3) // 6
    increasing = [min_experts + (2 * spread * q + 3) // 6 for q in range(NUM_QUARTERS)]
    return {
        "uniform": [(min_experts + max_experts + 1) // 2] * NUM_QUARTERS,
        "increasing": increasing,
        "decreasing": increasing[::-1],
        "hourglass": [max_experts, min_experts, min_experts, max_experts],
    }[preset]


def preset_quarters(num_experts: dict[str, Any]) -> list[int]:
    """The per-quarter counts of a validated `num_experts` preset dict."""
    return quarter_counts(num_experts["preset"], num_experts.get("min"), num_experts.get("max"))


def quarter_sizes(num_layers: int) -> list[int]:
    """Layers per quarter: num_layers // 4 each, the remainder one each to quarters 0, 3, 1 in that order
    (30 layers: 8-7-7-8; 6: 2-1-1-2; 3: 1-1-0-1; 1: 1-0-0-0)."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    sizes = [num_layers // NUM_QUARTERS] * NUM_QUARTERS
    for quarter in _REMAINDER_ORDER[: num_layers % NUM_QUARTERS]:
        sizes[quarter] += 1
    return sizes


def allocate_experts(
    preset: str | list[int], num_layers: int, *, min_experts: int | None = None, max_experts: int | None = None
) -> list[int]:
    """Experts for each of `num_layers` consecutive layers: the layers are split into four contiguous quarters in
    order (sizes from quarter_sizes: num_layers // 4 each, the remainder to quarters 0, 3, 1) and every layer of a
    quarter gets that quarter's count (quarter_counts). E.g. hourglass, min 2, max 8, 8 layers: 8 8 2 2 2 2 8 8."""
    counts = quarter_counts(preset, min_experts, max_experts)
    return [count for count, size in zip(counts, quarter_sizes(num_layers), strict=True) for _ in range(size)]


def layer_allocation(num_experts: dict[str, Any], names: list[str]) -> dict[int, int]:
    """{layer index: experts} over the layers that the targeted `names` sit in. The preset runs over these adapted
    layers in index order (not the model's depth: layers_to_transform [0..7] of 30 spreads it over those 8), and
    modules of different stacks with one index (a T5 encoder's and decoder's block 3) share a position."""
    missing = [name for name in names if layer_index(name) is None]
    if missing:
        raise ValueError(
            f"num_experts preset {num_experts['preset']!r} allocates by layer index, and {missing[0]!r} has none "
            f"(no '.layers.N.', '.layer.N.', '.h.N.', '.block.N.' or '.blocks.N.' in its name; "
            f"{len(missing)} such module(s)); leave it out (exclude_modules) or use an int or {{regex: int}}"
        )
    layers = sorted({layer_index(name) for name in names})
    counts = allocate_experts(preset_quarters(num_experts), len(layers))
    return dict(zip(layers, counts, strict=True))


def describe_preset(num_experts: dict[str, Any]) -> str:
    """`hourglass, quarters 8-2-2-8` (or `quarters 8-2-2-8` for explicit counts): the preset as the report names it."""
    preset = num_experts["preset"]
    quarters = "-".join(map(str, preset_quarters(num_experts)))
    return f"{preset}, quarters {quarters}" if isinstance(preset, str) else f"quarters {quarters}"
