"""Per-forward routing context.

Hugging Face forward signatures know nothing about task ids, prompt masks or our decoding state, so these travel
in a context slot that `MoLoRAModel.forward`/`generate` open and that the MoLoRA layers read. Attention masks are
filled in by a forward pre-hook on the base model (and on its encoder), so they are right at every generation
step, including when the raw Hugging Face model is called directly.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RoutingContext:
    task_ids: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    decoder_attention_mask: torch.Tensor | None = None
    # {mask field: (batch, length)} of the call's token inputs (input_ids or inputs_embeds; decoder_input_ids...),
    # so a layer that sees the tokens flattened to [batch * length, d] can put the sequences back.
    input_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Tokens already in the KV cache when the current call started (read from past_key_values); None if unknown.
    past_len: int | None = None
    # Per-layer running state for cached decoding; None outside a decoding session.
    decode_state: dict[str, dict[str, Any]] | None = None
    # {layer name: times applied in the current model call}: a layer applied twice keeps two decoding states.
    layer_calls: dict[str, int] = field(default_factory=dict)
    # Token masks derived from a mask above, shared by the layers of one forward (one tensor, so the aux losses of
    # all layers can be stacked): {mask field: (source mask, {(batch, length): bool mask})}.
    token_masks: dict[str, tuple[torch.Tensor, dict[tuple[int, int], torch.Tensor]]] = field(default_factory=dict)
    # routing_scope='block': {block name: router output} of this forward, published by each block's first layer.
    block_routes: dict[str, Any] = field(default_factory=dict)
    # routing_scope='input': {group key: SharedInput} of this forward, the input sides its owner computed.
    shared_inputs: dict[str, Any] = field(default_factory=dict)


class ContextSlot:
    """Holds the routing context of the forward in progress.

    A plain attribute rather than a contextvars.ContextVar: torch.compile cannot trace ContextVar.get, which cost a
    graph break in every MoLoRA layer (17 graphs for a 2-layer model instead of 1); a plain read is traced and guarded
    like any Python value. What is given up, concurrent forwards of one model in several threads, was not safe before
    either: each layer keeps the routing of its last forward for the aux losses.
    """

    def __init__(self) -> None:
        self.value: RoutingContext | None = None

    def get(self) -> RoutingContext | None:
        return self.value

    def set(self, ctx: RoutingContext | None) -> SlotToken:
        """Install ctx; returns the token that reset() takes to put the previous context back."""
        token = SlotToken(self.value)
        self.value = ctx
        return token

    def reset(self, token: SlotToken) -> None:
        self.value = token.previous


class SlotToken:
    def __init__(self, previous: RoutingContext | None) -> None:
        self.previous = previous


_CURRENT = ContextSlot()


def current_context() -> RoutingContext | None:
    return _CURRENT.get()


@contextlib.contextmanager
def routing_context(ctx: RoutingContext) -> Iterator[RoutingContext]:
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


def checkpoint_context_fn() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """For torch.utils.checkpoint(context_fn=...): recomputation in backward sees the forward's routing context."""
    ctx = _CURRENT.get()
    return contextlib.nullcontext(), (routing_context(ctx) if ctx is not None else contextlib.nullcontext())


def in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _as_mask(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor) and value.dim() == 2:
        return value
    return None


def _as_tokens(value: Any) -> tuple[int, int] | None:
    """(batch, length) of input ids [B, L] or embeddings [B, L, d]."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2:
        return int(value.shape[0]), int(value.shape[1])
    return None


def _cache_length(cache: Any) -> int | None:
    if hasattr(cache, "get_seq_length"):  # transformers' Cache classes, whatever the kwarg is called
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)) and cache[0]:  # legacy
        first = cache[0][0]
        return int(first.shape[-2]) if isinstance(first, torch.Tensor) else None
    return None


def find_cache_length(args: tuple, kwargs: dict[str, Any]) -> int | None:
    """Tokens already in the KV cache of a model call, or None when the call carries no cache.

    Found by what the value is, not by the argument's name: transformers has called it `past_key_values`,
    `past` and (5.24) `cache`, and generate() omits an all-ones attention mask, so the mask alone cannot tell a
    decoding step from a fresh one-token sequence. Legacy tuple caches are only looked for under names that say
    they are caches.
    """
    for key, value in kwargs.items():
        if value is None:
            continue
        if hasattr(value, "get_seq_length") or ("past" in key or "cache" in key):
            length = _cache_length(value)
            if length is not None:
                return length
    for value in args:
        if hasattr(value, "get_seq_length"):
            return _cache_length(value)
    return None


# The token inputs whose [batch, length] each attention mask field describes.
TOKEN_INPUTS = {
    "attention_mask": ("input_ids", "inputs_embeds"),
    "decoder_attention_mask": ("decoder_input_ids", "decoder_inputs_embeds"),
}


class MaskCapture:
    """Forward hooks that copy attention masks (and the shape of the tokens they describe) from a model call into the
    routing context.

    If no context is open (the raw model is called), the pre-hook opens one for the duration of the call.
    """

    def __init__(self, mask_keys: dict[str, str], read_cache: bool = False):
        # kwarg name in the hooked module's forward -> RoutingContext field
        self.mask_keys = mask_keys
        self.read_cache = read_cache
        self._tokens: list[Any] = []
        self._positions: dict[int, dict[str, int]] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self, module: torch.nn.Module) -> None:
        params = list(inspect.signature(module.forward).parameters)
        inputs = [key for attr in self.mask_keys.values() for key in TOKEN_INPUTS.get(attr, ())]
        positions = {key: params.index(key) for key in [*self.mask_keys, *inputs] if key in params}
        self._positions[id(module)] = positions
        self.handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
        self.handles.append(module.register_forward_hook(self._post, always_call=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ctx = _CURRENT.get()
        if ctx is None:
            ctx = RoutingContext()
            self._tokens.append(_CURRENT.set(ctx))
        else:
            self._tokens.append(None)
        positions = self._positions.get(id(module), {})

        def given(key: str) -> bool:
            return key in kwargs or (key in positions and positions[key] < len(args))

        def argument(key: str) -> Any:
            return kwargs[key] if key in kwargs else args[positions[key]] if given(key) else None

        for key, attr in self.mask_keys.items():
            if given(key):
                setattr(ctx, attr, _as_mask(argument(key)))
            shape = next(filter(None, (_as_tokens(argument(name)) for name in TOKEN_INPUTS.get(attr, ()))), None)
            if shape is not None:  # absent (an encoder-decoder step given encoder_outputs): the shape stays
                ctx.input_shapes[attr] = shape
        if self.read_cache:  # the model's own call (not its encoder's): a new step
            ctx.past_len = find_cache_length(args, kwargs)
            ctx.layer_calls.clear()

    def _post(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self._tokens:
            token = self._tokens.pop()
            if token is not None:
                _CURRENT.reset(token)
