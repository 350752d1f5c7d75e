"""INT8 adapter files: symmetric int8 expert factors with one fp32 scale per rank component, dequantised on load.

Each rank component of an expert is a pair (a_k, b_k) of an input-side row (d_in values) and an output-side column
(d_out values): each gets its own scale, max|.| / 127 over its values. For A that is one scale per output channel;
for B a scale per output channel (per row of [d_out, r]) would store d_out scales next to d_out * r int8 values and
give up a quarter to a half of the saving at r = 4-8, so B is scaled per column. Routers stay in fp32 (they are
small, and the fp32 routing contract reads them). Which axis holds a factor's features is declared by its Experts
class (`feature_axes`).
"""

from __future__ import annotations

import torch

from molora.core.patcher import molora_layers

SUPPORTED_BITS = (8,)
QUANTIZED_SUFFIX = ".int8"
SCALE_SUFFIX = ".scale"
QUANTIZATION_FORMAT = "int8-symmetric-per-rank-component"
_LEVELS = 127  # symmetric: -127..127, so that 0 stays exactly 0 and the range is the same on both sides


def check_bits(bits: object) -> int:
    if bits not in SUPPORTED_BITS or isinstance(bits, bool):
        raise ValueError(f"bits must be one of {list(SUPPORTED_BITS)} (symmetric int8), got {bits!r}")
    return bits


def quantize_tensor(tensor: torch.Tensor, feature_axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, fp32 scales with feature_axis kept as size 1); an all-zero slice gets scale 1 (stays 0)."""
    if not torch.isfinite(tensor).all():
        raise ValueError("cannot quantise a tensor holding NaN or inf")
    values = tensor.detach().float()
    scale = values.abs().amax(dim=feature_axis, keepdim=True) / _LEVELS
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantized = torch.round(values / scale).clamp_(-_LEVELS, _LEVELS).to(torch.int8)
    return quantized, scale


def dequantize_tensor(quantized: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (quantized.float() * scale).to(dtype)


def quantize_adapters(model, bits: int = 8) -> dict[str, torch.Tensor]:
    """The adapter state dict with every expert factor as `<key>.int8` + `<key>.scale` (routers unchanged).

    `model.save_pretrained(path, bits=8)` writes it; `MoLoRAModel.from_pretrained` dequantises it.
    """
    check_bits(bits)
    axes = expert_feature_axes(model)
    state = {}
    for key, tensor in model.adapter_state_dict().items():
        if key in axes:
            quantized, scale = quantize_tensor(tensor, axes[key])
            state[key + QUANTIZED_SUFFIX] = quantized
            state[key + SCALE_SUFFIX] = scale
        else:
            state[key] = tensor
    return state


def expert_feature_axes(model) -> dict[str, int]:
    """{state-dict key: the axis holding that factor's features} for every expert factor of the model."""
    axes = {}
    for name, layer in molora_layers(model.base_model):
        for parameter, axis in layer.experts.feature_axes.items():
            axes[f"{name}.experts.{parameter}"] = axis
    return axes


def is_quantized(state: dict[str, torch.Tensor]) -> bool:
    return any(key.endswith(QUANTIZED_SUFFIX) for key in state)


def dequantize_state_dict(
    state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The plain adapter state dict back from a quantised one; a value without its scale is an error naming it."""
    plain = {}
    for key, tensor in state.items():
        if key.endswith(SCALE_SUFFIX):
            if key.removesuffix(SCALE_SUFFIX) + QUANTIZED_SUFFIX not in state:
                raise ValueError(f"quantised adapter: scale {key} has no {QUANTIZED_SUFFIX} values")
            continue
        if key.endswith(QUANTIZED_SUFFIX):
            base = key.removesuffix(QUANTIZED_SUFFIX)
            scale = state.get(base + SCALE_SUFFIX)
            if scale is None or tensor.dtype != torch.int8:
                raise ValueError(f"quantised adapter: {key} needs int8 values and a {base + SCALE_SUFFIX} tensor")
            fits = scale.dim() == tensor.dim() and all(
                s in (1, t) for s, t in zip(scale.shape, tensor.shape, strict=True)
            )
            if not fits:
                raise ValueError(
                    f"quantised adapter: {base + SCALE_SUFFIX} {list(scale.shape)} cannot scale {key} "
                    f"{list(tensor.shape)}"
                )
            plain[base] = dequantize_tensor(tensor, scale, dtype)
        else:
            plain[key] = tensor
    return plain
