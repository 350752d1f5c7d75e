"""Where an adapted layer's input stands to the tokens of the model call, and the routing inputs that follow.

Most layers read [batch, length, d], the call's tokens. Some do not: OPT's FFN reads them flattened to
[batch * length, d], XLNet and FSMT lay them out [length, batch, d], a pooler reads [batch, d], Doge reads the cached
positions again at every decoding step, CPM-Ant adds a prefix, Funnel pools the sequence. The routing context knows
the call's token shape (MaskCapture records it), so each layer's input is put back into sequences, or routed as rows
of its own, and gets the masks, task ids and decoding state that belong to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from molora.core.context import RoutingContext
from molora.core.routers import RouterInputs

# Where a layer sits decides which attention mask describes its input tokens and how its router may pool:
# "self" (decoder-only or encoder-only model), "encoder", "decoder" (always causal), "cross" (reads encoder states).
ROLES = ("self", "encoder", "decoder", "cross")
CAUSAL_ROLES = ("self", "decoder")


def align_batch(tensor: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """Repeat per-sequence inputs when generation expanded the batch (beams, num_return_sequences)."""
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] > 0 and batch % tensor.shape[0] == 0:
        return tensor.repeat_interleave(batch // tensor.shape[0], dim=0)
    raise ValueError(f"{what} has batch size {tensor.shape[0]}, but the model input has batch size {batch}")


@dataclass(frozen=True)
class Site:
    """What the routing inputs of a layer depend on: its name (its decoding-state slot) and role."""

    name: str
    role: str

    @property
    def mask_field(self) -> str:
        """The RoutingContext field whose mask (and token shape) describes this layer's input tokens."""
        return "decoder_attention_mask" if self.role == "decoder" else "attention_mask"


def sequence_first(x: torch.Tensor, ctx: RoutingContext | None, site: Site) -> bool:
    """Whether x is [length, batch, d] (the layout of XLNet, FSMT, Longformer's attention): its second axis, not its
    first, is the call's batch (generate()'s expanded batch included, as the call's input has it)."""
    tokens = None if ctx is None or x.dim() != 3 else ctx.input_shapes.get(site.mask_field)
    return tokens is not None and x.shape[0] != tokens[0] and x.shape[1] == tokens[0]


def as_sequences(
    x: torch.Tensor, ctx: RoutingContext | None, site: Site, needs_task_ids: bool
) -> tuple[torch.Tensor, RouterInputs]:
    """The input as [batch, length, d] sequences and their routing inputs. A 2-D input [N, d] is either the call's
    tokens flattened (N = batch * length), put back into sequences, or N rows of their own (a pooler's [batch, d]),
    each routed as a one-token sequence (row_inputs)."""
    if x.dim() >= 3:
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        return x3, routing_inputs(ctx, site, x3.shape[0], x3.shape[1])
    rows = x.reshape(-1, x.shape[-1])
    tokens = None if ctx is None else ctx.input_shapes.get(site.mask_field)
    if tokens is not None and tokens[0] * tokens[1] == rows.shape[0]:
        return rows.view(*tokens, rows.shape[-1]), routing_inputs(ctx, site, *tokens)
    return rows.unsqueeze(1), row_inputs(ctx, site, rows.shape[0], needs_task_ids)


def routing_inputs(ctx: RoutingContext | None, site: Site, batch: int, length: int) -> RouterInputs:
    """Masks, task ids, cache position and decoding state of a layer's [batch, length] positions."""
    if ctx is None:
        return RouterInputs()
    mask, past_len, continues = positions(ctx, site, length)
    prompt_mask = None
    if ctx.prompt_mask is not None and site.role != "decoder":
        prompt_mask = align_batch(ctx.prompt_mask, batch, "prompt_mask").bool()
        end = past_len + length
        if prompt_mask.shape[1] < end:  # generation without cache: generated tokens are not prompt
            prompt_mask = nn.functional.pad(prompt_mask, (0, end - prompt_mask.shape[1]), value=False)
        prompt_mask = prompt_mask[:, past_len:end]
    task_ids = None if ctx.task_ids is None else align_batch(ctx.task_ids, batch, "task_ids")
    state = state_slot(ctx, site.name) if ctx.decode_state is not None and continues else None
    token_mask = None if mask is None else token_mask_of(ctx, site, mask, batch, length)
    call = ctx.input_shapes.get(site.mask_field)
    # At the first step of a decoding, fewer positions than the call's (the last ones, behind logits_to_keep)
    unseen = call[1] - length if state is not None and past_len == 0 and call is not None else 0
    return RouterInputs(token_mask, task_ids, prompt_mask, past_len, state, unseen_prefix=max(unseen, 0))


def positions(ctx: RoutingContext, site: Site, length: int) -> tuple[torch.Tensor | None, int, bool]:
    """How a layer's `length` positions stand to the call's tokens: (the attention mask that covers them, or None;
    tokens before them in the KV cache; whether a running decoding state continues across calls).

    Most layers read the call's tokens. Some read the cached positions again with the new ones (Doge's dynamic mask:
    the whole sequence at every step, nothing continues), a prefix the model adds (CPM-Ant), or a sequence of their
    own (Funnel's pooled one, LED's global tokens): no mask can be placed on the latter."""
    mask = getattr(ctx, site.mask_field)
    causal = site.role in CAUSAL_ROLES
    call = ctx.input_shapes.get(site.mask_field)
    call_len = length if call is None else call[1]
    past_len = ctx.past_len if causal and ctx.past_len is not None else None
    if past_len is None:  # no cache found in the call: a mask longer than the call's tokens covers earlier ones
        past_len = max(mask.shape[1] - call_len, 0) if causal and mask is not None else 0
    if length == call_len or (length > call_len and past_len == 0):  # the call's tokens, or a prefix and them
        if mask is not None and mask.shape[1] < length:
            if not bool(mask.all()):
                raise ValueError(
                    f"attention_mask covers {mask.shape[1]} positions, but {site.name} reads {length}: the model "
                    "adds positions of its own (a prefix), so which of them are padding cannot be told"
                )
            mask = None  # no padding anywhere: nothing to mask
        return mask, past_len, True
    if causal and past_len and length == past_len + call_len:  # the cached positions again, and the new ones
        return mask, 0, False
    return None, 0, causal and length < call_len  # a part of the call's tokens (unseen_prefix), or its own


def token_mask_of(ctx: RoutingContext, site: Site, mask: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """The last `length` positions of the attention mask as bools, [batch, length]; derived once per forward and
    shared by the layers (one tensor, so the aux losses of all layers can be stacked)."""
    source, derived = ctx.token_masks.get(site.mask_field, (None, {}))
    if source is not mask:
        derived = {}
        ctx.token_masks[site.mask_field] = (mask, derived)
    token_mask = derived.get((batch, length))
    if token_mask is None:
        token_mask = derived[(batch, length)] = align_batch(mask, batch, "attention_mask")[:, -length:].bool()
    return token_mask


def row_inputs(ctx: RoutingContext | None, site: Site, rows: int, needs_task_ids: bool) -> RouterInputs:
    """Routing inputs for rows that are not tokens of the call's sequences ([batch, d] of a pooler, tokens an MoE
    gathered): each row is a sequence of its own, so no padding or prompt mask and no decoding state."""
    if ctx is None or ctx.task_ids is None:
        return RouterInputs()
    if rows % ctx.task_ids.shape[0] == 0:
        return RouterInputs(task_ids=align_batch(ctx.task_ids, rows, "task_ids"))
    if needs_task_ids:
        raise ValueError(
            f"{site.name} reads {rows} rows, which are neither the call's {ctx.task_ids.shape[0]} sequences nor its "
            "tokens, so its router cannot be given a task id per row; leave the module out of target_modules"
        )
    return RouterInputs()


def state_slot(ctx: RoutingContext, name: str) -> dict[str, Any]:
    """A layer's running decoding state. A layer applied several times in one model call (HRM's recurrent cycles)
    keeps one per application, in the order of the calls."""
    calls = ctx.layer_calls[name] = ctx.layer_calls.get(name, 0) + 1
    return ctx.decode_state.setdefault(name if calls == 1 else f"{name}#{calls}", {})
