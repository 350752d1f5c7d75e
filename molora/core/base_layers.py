"""The kinds of base layer that can hold experts: plain linears and quantized ones (QLoRA).

The experts only need a base layer whose forward computes its linear map, base(x) of shape [..., d_out]: molora adds
the mixture on top in the adapter dtype, so a quantized base (bitsandbytes 4-/8-bit, torchao) works as it is. What
differs per kind is how to read its shape and whether a fixed mixture can be written into its weight. A registry, as
routers and aux losses have: another quantization library is one `register_base_layer` call.

A kind that names a library matches only once that library is imported (a model cannot hold its layers otherwise),
so nothing here imports bitsandbytes or torchao.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, this only guards odd installs
    Conv1D = None


@dataclass(frozen=True)
class BaseLayerKind:
    """One kind of base layer. `matches` decides membership; kinds are tried in registration order, latest first,
    so a library's linear subclass is found before plain nn.Linear."""

    name: str
    description: str  # for errors: what a user would call it
    matches: Callable[[nn.Module], bool]
    features: Callable[[nn.Module], tuple[int, int]]  # (d_in, d_out)
    weight_layout: str = "out_in"  # "in_out": the weight is stored [d_in, d_out] (GPT-2's Conv1D)
    # Why a fixed mixture is not written into this weight, None where it is (molora.deploy.merging).
    merge_refusal: str | None = None
    quantized: bool = False
    # Called once on each such layer of a model that trains adapters, where the library computes some forwards with
    # a kernel that has no backward (keep_input_gradients); None where every forward is differentiable.
    keep_differentiable: Callable[[nn.Module], None] | None = None


BASE_LAYERS: dict[str, BaseLayerKind] = {}


def register_base_layer(kind: BaseLayerKind) -> BaseLayerKind:
    if kind.weight_layout not in ("out_in", "in_out"):
        raise ValueError(f"weight_layout must be 'out_in' or 'in_out', got {kind.weight_layout!r}")
    BASE_LAYERS[kind.name] = kind
    return kind


def base_kind(module: nn.Module) -> BaseLayerKind | None:
    """The kind of `module`, or None when experts cannot sit on it."""
    for kind in reversed(BASE_LAYERS.values()):
        if kind.matches(module):
            return kind
    return None


def supported_kinds() -> str:
    """Every registered kind in words, for errors."""
    return ", ".join(kind.description for kind in BASE_LAYERS.values())


def _linear_features(module: nn.Module) -> tuple[int, int]:
    return module.in_features, module.out_features


def _has_plain_weight(module: nn.Module) -> bool:
    """A floating-point weight that is an ordinary tensor (no quantized tensor subclass)."""
    weight = getattr(module, "weight", None)
    plain = isinstance(weight, torch.Tensor) and type(weight) in (torch.Tensor, nn.Parameter)
    return plain and weight.is_floating_point()


def is_plain_linear(module: nn.Module) -> bool:
    """Exactly nn.Linear with an ordinary floating-point weight: its 2-D output is a fresh tensor that nothing else
    reads, so the experts may add into it in place (a quantized kind's output comes from the library's own kernels)."""
    return type(module) is nn.Linear and _has_plain_weight(module)


def _library_class(library: str, path: str) -> type | None:
    """library.path (e.g. bitsandbytes, nn.Linear4bit) when the library is already imported, else None."""
    found = sys.modules.get(library)
    for part in path.split("."):
        found = getattr(found, part, None)
    return found if isinstance(found, type) else None


def _is_library_linear(library: str, path: str) -> Callable[[nn.Module], bool]:
    def matches(module: nn.Module) -> bool:
        cls = _library_class(library, path)
        return cls is not None and isinstance(module, cls)

    return matches


def _torchao_weight(module: nn.Module) -> bool:
    """An nn.Linear whose weight torchao's quantize_ replaced by one of its tensor subclasses."""
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and type(weight).__module__.split(".")[0] == "torchao"


_HOOKED = "_molora_keeps_input_gradients"  # set on a layer once keep_input_gradients prepared it


def _refuse_packed_bnb_4bit(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: a forward whose input needs a gradient must not run the packed CPU kernel (no backward)."""
    inputs = args[0] if args else next(iter(kwargs.values()), None)
    needs_grad = torch.is_grad_enabled() and isinstance(inputs, torch.Tensor) and inputs.requires_grad
    if needs_grad and getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False):
        raise RuntimeError(
            f"{type(module).__name__}: bitsandbytes packed this 4-bit weight for its CPU inference kernel (an eval "
            "forward ran before the model was prepared for training), and that kernel has no backward: the gradient "
            "through the layer would be silently lost. Load the base again and call prepare_for_kbit_training or "
            "get_molora_model before any forward"
        )


def _keep_bnb_4bit_differentiable(module: nn.Module) -> None:
    """bitsandbytes packs a frozen 4-bit weight for its AVX512-BF16 CPU kernel on the first forward in eval mode
    without grad, and computes every later forward with that kernel, training ones too. The kernel has no backward:
    autograd drops the gradient through the layer without an error (torch warns once), so every adapter before the
    layer trains on a wrong gradient. Turned off here (bitsandbytes' inverse of the packing is lossy: it keeps the
    scales in bf16, and breaks them without double quantization), so the layer keeps its differentiable
    dequantize-and-matmul path; a layer packed before this is refused by the hook when a gradient must pass it."""
    module.support_avx512bf16_for_cpu = False
    module.register_forward_pre_hook(_refuse_packed_bnb_4bit, with_kwargs=True)


def keep_input_gradients(model: nn.Module) -> nn.Module:
    """Prepare every layer whose kind has a forward without a backward (`keep_differentiable`) to never run it in
    training: the base is frozen, but the gradient must still flow through it to the adapters below. Every such
    layer in the model, also those without experts (an o_proj outside target_modules carries the gradient of the
    q/v adapters before it). Once per layer; it stays when the adapters are unloaded, as it guards the library
    itself."""
    for module in model.modules():
        kind = base_kind(module)
        if kind is not None and kind.keep_differentiable is not None and not hasattr(module, _HOOKED):
            kind.keep_differentiable(module)
            setattr(module, _HOOKED, True)
    return model


_REQUANTIZE = (
    "adding a mixture to a {what} weight re-rounds the whole weight to its quantization grid, which loses most of a "
    "delta smaller than one step; load the base model unquantized, load this adapter onto it "
    "(MoLoRAModel.from_pretrained) and merge there, or serve the adapter unmerged"
)

register_base_layer(
    BaseLayerKind(
        "linear",
        "nn.Linear",
        lambda m: isinstance(m, nn.Linear) and _has_plain_weight(m),
        _linear_features,
    )
)
if Conv1D is not None:
    register_base_layer(
        BaseLayerKind(
            "conv1d",
            "transformers' Conv1D",
            lambda m: isinstance(m, Conv1D) and _has_plain_weight(m),
            lambda m: tuple(m.weight.shape),  # stored [d_in, d_out]
            weight_layout="in_out",
        )
    )
register_base_layer(
    BaseLayerKind(
        "torchao",
        "nn.Linear with a torchao-quantized weight (quantize_, TorchAoConfig)",
        _torchao_weight,
        _linear_features,
        merge_refusal=_REQUANTIZE.format(what="torchao-quantized"),
        quantized=True,
    )
)
register_base_layer(
    BaseLayerKind(
        "bnb-8bit",
        "bitsandbytes Linear8bitLt (load_in_8bit)",
        _is_library_linear("bitsandbytes", "nn.Linear8bitLt"),
        _linear_features,
        merge_refusal=_REQUANTIZE.format(what="bitsandbytes 8-bit"),
        quantized=True,
    )
)
register_base_layer(
    BaseLayerKind(
        "bnb-4bit",
        "bitsandbytes Linear4bit (load_in_4bit: nf4 or fp4, double quantization or not)",
        _is_library_linear("bitsandbytes", "nn.Linear4bit"),
        _linear_features,
        merge_refusal=_REQUANTIZE.format(what="bitsandbytes 4-bit"),
        quantized=True,
        keep_differentiable=_keep_bnb_4bit_differentiable,
    )
)


# The forwards known to compute exactly the linear map (a subclass with its own forward is checked by the patcher).
PLAIN_FORWARDS = frozenset([nn.Linear.forward] + ([Conv1D.forward] if Conv1D is not None else []))


def unsupported_reason(module: nn.Module) -> str:
    """Why experts cannot sit on `module` (base_kind is None), naming its type and the kinds that exist."""
    kind = type(module)
    origin = f"{kind.__module__}.{kind.__qualname__}"
    weight = getattr(module, "weight", None)
    looks_quantized = isinstance(weight, torch.Tensor) and (
        not weight.is_floating_point() or type(weight) not in (torch.Tensor, nn.Parameter)
    )
    what = "a quantized linear molora does not know" if looks_quantized else "not a linear layer molora knows"
    return (
        f"{origin} is {what}; experts sit on: {supported_kinds()}. Quantize the base with bitsandbytes "
        "(BitsAndBytesConfig) or torchao (TorchAoConfig), or leave this module out of target_modules"
    )


def prepare_for_kbit_training(model: nn.Module) -> nn.Module:
    """What PEFT's prepare_model_for_kbit_training does for a quantized base, before get_molora_model: freeze every
    base parameter and keep the ones that are not quantized (norms, embeddings, the head) in fp32, so that the
    statistics and small values they hold are not lost to half precision. Gradient checkpointing needs nothing more
    here: MoLoRAModel.gradient_checkpointing_enable() is non-reentrant, so no input has to require grad. The quantized
    layers are kept differentiable (keep_input_gradients), for a PEFT adapter on this base too."""
    quantized = set()
    for module in model.modules():
        kind = base_kind(module)
        if kind is not None and kind.quantized:
            quantized.update(id(p) for p in module.parameters())
    for param in model.parameters():
        param.requires_grad_(False)
        if id(param) not in quantized and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    return keep_input_gradients(model)
