"""MoLoRAModel: the injected Hugging Face model plus routing context, aux losses, save/load and adapter toggles."""

from __future__ import annotations

import contextlib
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from molora.core.config import CONFIG_NAME, WEIGHTS_NAME, MoLoRAConfig
from molora.core.context import (
    MaskCapture,
    RoutingContext,
    checkpoint_context_fn,
    current_context,
    find_cache_length,
    routing_context,
)
from molora.core.inputs import CallShape, check_batch, first_input, prompt_mask_tensor, task_id_tensor
from molora.core.layer import MoLoRALinear
from molora.core.losses import AUX_LOSSES, BalanceWindow, aux_term_means, expert_term_means, layer_aux_terms
from molora.core.patcher import InjectionReport, inject, molora_layers, unload
from molora.core.recording import RoutingRecorder
from molora.core.routers import ROUTERS
from molora.deploy.adapter_files import (
    AdapterLoadResult,
    copy_adapter_state,
    read_adapter_config,
    read_adapter_tensors,
    write_adapter_files,
)
from molora.deploy.merging import merge_fixed_gates, resolve_fixed_gates
from molora.deploy.peft_files import load_peft_experts, plan_from_peft
from molora.deploy.quantize import quantize_adapters
from molora.files.hub import adapter_folder, push_adapter

ADAPTER_FILES = (WEIGHTS_NAME, CONFIG_NAME)  # the files of an adapter, and all a Hub id downloads


class MoLoRAModel(nn.Module):
    """Wraps a Hugging Face model whose target modules now hold experts; unknown attributes reach the base model."""

    def __init__(self, model: nn.Module, config: MoLoRAConfig, verbose: bool = False):
        super().__init__()
        self.molora_config = config
        self._saved_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        self.injection_report: InjectionReport = inject(model, config)
        self.base_model = model
        self.load_result: AdapterLoadResult | None = None  # what from_pretrained loaded (strict=False may skip)
        self._layers: tuple[tuple[str, MoLoRALinear], ...] = tuple(molora_layers(model))  # fixed once injected
        self._aux_means: tuple[list, dict[str, torch.Tensor]] | None = None  # (refs to their routes, means)
        self._balance_window = BalanceWindow(config.balance_window)
        self._mask_captures = [
            MaskCapture(
                {"attention_mask": "attention_mask", "decoder_attention_mask": "decoder_attention_mask"},
                read_cache=True,
            )
        ]
        self._mask_captures[0].attach(model)
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            encoder_capture = MaskCapture({"attention_mask": "attention_mask"})
            encoder_capture.attach(model.get_encoder())
            self._mask_captures.append(encoder_capture)
        if verbose:
            print(self.injection_report)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # Forward and generation -------------------------------------------------------------------------------------
    def _context(
        self,
        task_ids: Any,
        prompt_mask: Any,
        device: torch.device,
        shape: CallShape | None = None,
        generating: bool = False,
        needs_task_ids: bool = True,
    ) -> RoutingContext:
        """Check the routing inputs (type, shape, batch, range) before anything runs; a bad batch is a ValueError."""
        task_ids = task_id_tensor(task_ids)
        prompt_mask = prompt_mask_tensor(prompt_mask)
        router = self.molora_config.router
        if ROUTERS[router].needs_task_ids and task_ids is None and needs_task_ids:
            raise ValueError(
                f"router={router!r} needs task_ids ([batch] ints) in forward()/generate(): each example's domain "
                "as its place in the run's data.domains (the task_id column of the run's summary.md)"
            )
        if shape is not None:
            check_batch(task_ids, prompt_mask, shape, generating)
        # (not while torch.compile traces: a data-dependent branch would split the graph)
        if task_ids is not None and task_ids.numel() and not torch.compiler.is_compiling():
            num_tasks = self.molora_config.num_tasks
            bad = task_ids < 0 if num_tasks is None else (task_ids < 0) | (task_ids >= num_tasks)
            if bad.any():  # one check, so one device sync
                bounds = ">= 0" if num_tasks is None else f"in [0, num_tasks={num_tasks})"
                raise ValueError(f"task_ids must be {bounds}, got {task_ids.tolist()}")
        return RoutingContext(
            task_ids=None if task_ids is None else task_ids.to(device),
            prompt_mask=None if prompt_mask is None else prompt_mask.to(device),
        )

    def _forward_shape(self, args: tuple, kwargs: dict[str, Any]) -> CallShape | None:
        """The batch of a forward call; with a KV cache a decoder's prompt mask may also cover the cached tokens."""
        found = first_input(args, kwargs, ("input_ids", "inputs_embeds"), "input_ids")
        if found is None:  # encoder-decoder with encoder_outputs: the decoder inputs still give the batch
            found = first_input(args, kwargs, ("decoder_input_ids", "decoder_inputs_embeds"), None)
            return None if found is None else CallShape(found[0], found[1].shape[0], None)
        name, value = found
        lengths = (value.shape[1],)
        if not getattr(getattr(self.base_model, "config", None), "is_encoder_decoder", False):
            past = find_cache_length(args, kwargs)
            if past:
                lengths += (past + value.shape[1],)
        return CallShape(name, value.shape[0], lengths)

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    def forward(self, *args: Any, task_ids: Any = None, prompt_mask: Any = None, **kwargs: Any) -> Any:
        parent = current_context()
        session = parent if parent is not None and parent.decode_state is not None else None
        inherited = session is not None and session.task_ids is not None
        ctx = self._context(
            task_ids, prompt_mask, self.device, self._forward_shape(args, kwargs), needs_task_ids=not inherited
        )
        if session is not None:  # inside decoding_session(): keep its state
            ctx.decode_state = session.decode_state
            ctx.task_ids = ctx.task_ids if ctx.task_ids is not None else session.task_ids
            ctx.prompt_mask = ctx.prompt_mask if ctx.prompt_mask is not None else session.prompt_mask
        with routing_context(ctx):
            return self.base_model(*args, **kwargs)

    @contextlib.contextmanager
    def decoding_session(self, task_ids: Any = None, prompt_mask: Any = None) -> Iterator[RoutingContext]:
        """Keep the routers' running state (intuition pooling) across cached decoding steps of a manual loop."""
        ctx = self._context(task_ids, prompt_mask, self.device)
        ctx.decode_state = {}
        with routing_context(ctx):
            yield ctx

    def _check_decoding(self, kwargs: dict[str, Any]) -> None:
        encoder_decoder = getattr(getattr(self.base_model, "config", None), "is_encoder_decoder", False)
        generation_config = kwargs.get("generation_config") or getattr(self.base_model, "generation_config", None)
        beams = kwargs.get("num_beams") or getattr(generation_config, "num_beams", 1) or 1
        config = self.molora_config
        ROUTERS[config.router].check_generation(config, encoder_decoder=encoder_decoder, beams=beams)

    def generate(self, *args: Any, task_ids: Any = None, prompt_mask: Any = None, **kwargs: Any) -> Any:
        """As the base model's generate(); task_ids and prompt_mask describe the prompts (one row per prompt)."""
        self._check_decoding(kwargs)
        found = first_input(args, kwargs, ("input_ids", "inputs", "inputs_embeds"), "inputs")
        shape = None if found is None else CallShape(found[0], found[1].shape[0], (found[1].shape[1],))
        if prompt_mask is None and ROUTERS[self.molora_config.router].wants_prompt_mask(self.molora_config):
            prompt_mask = kwargs.get("attention_mask")
            if prompt_mask is None and found is not None:
                prompt_mask = torch.ones(found[1].shape[:2], dtype=torch.bool, device=found[1].device)
        ctx = self._context(task_ids, prompt_mask, self.device, shape, generating=True)
        ctx.decode_state = {}
        with routing_context(ctx):
            return self.base_model.generate(*args, **kwargs)

    # Aux losses -------------------------------------------------------------------------------------------------
    def _layer_aux_terms(self) -> list[tuple[str, dict[str, torch.Tensor]]]:
        """Per layer {loss: value} of the last forward, computed once (stacked across layers) and then reused."""
        layers = [(name, layer) for name, layer in self._layers if layer.last_route is not None]
        self._window_balance(layers)
        entries = [layer.last_route for _, layer in layers]
        terms = [route.cache.get("aux_terms") for route, _ in entries]
        if any(t is None for t in terms):
            terms = layer_aux_terms(entries, self._routing_loss_names())
            for (route, _), layer_terms in zip(entries, terms, strict=True):
                route.cache["aux_terms"] = layer_terms
        return [(name, layer_terms) for (name, _), layer_terms in zip(layers, terms, strict=True)]

    def aux_loss_terms(self, per_layer: bool = False) -> dict[str, Any]:
        """{loss name: mean over layers} of the last forward; per_layer=True gives {layer: {loss name: value}}.

        Penalties on the experts' parameters (core.losses.EXPERT_LOSSES: rank_sparsity) join the routing losses."""
        names = tuple(self.molora_config.aux_losses)
        if per_layer:
            terms = {name: dict(terms) for name, terms in self._layer_aux_terms()}
            for name, layer in self._layers:
                terms.setdefault(name, {}).update(expert_term_means([layer.experts], names))
            return {name: layer_terms for name, layer_terms in terms.items() if layer_terms}
        return self._routing_term_means() | expert_term_means([layer.experts for _, layer in self._layers], names)

    def _routing_loss_names(self) -> tuple[str, ...]:
        return tuple(name for name in self.molora_config.aux_losses if name in AUX_LOSSES)

    def _routing_term_means(self) -> dict[str, torch.Tensor]:
        layers = [(name, layer) for name, layer in self._layers if layer.last_route is not None]
        if not layers:
            return {}
        self._window_balance(layers)
        entries = [layer.last_route for _, layer in layers]
        # Computed once per forward (aux_loss() and a trainer's logging both ask): keyed on the routes themselves,
        # since a later forward may replace only some of them (decoder layers during encoder-decoder generation).
        # Weak references: holding the routes would keep the last step's router tensors (and the projection
        # outputs their logits are views of) alive into the next step's peak.
        routes = [route for route, _ in entries]
        cached = self._aux_means
        if (
            cached is None
            or len(cached[0]) != len(routes)
            or any(ref() is not route for ref, route in zip(cached[0], routes, strict=True))
        ):
            means = aux_term_means(entries, self._routing_loss_names())
            cached = self._aux_means = ([weakref.ref(route) for route in routes], means)
        return dict(cached[1])

    def _window_balance(self, layers: list[tuple[str, MoLoRALinear]]) -> None:
        """Global-batch balance (config.balance_window > 1): only training forwards enter the window."""
        if self.training and "balance" in self.molora_config.aux_losses:
            for name, layer in layers:
                self._balance_window.attach(name, *layer.last_route)

    def aux_loss(self) -> torch.Tensor:
        """The weighted sum of the aux losses of the last forward (differentiable when that forward was)."""
        terms = self.aux_loss_terms()
        total = torch.zeros((), device=self.device)
        for loss, value in terms.items():
            total = total + self.molora_config.aux_losses[loss] * value
        return total

    def record_routing(self, task_ids: Any = None, domains: list[str] | None = None) -> RoutingRecorder:
        """`with model.record_routing(domains=names) as rec:` records routing per task; see molora.core.recording."""
        return RoutingRecorder(self.base_model, task_ids=task_ids, domains=domains)

    # Adapters on/off --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run exactly the base model inside the block; nestable, restored on exception."""
        layers = [m for _, m in self._layers]
        for layer in layers:
            layer.disable_depth += 1
        try:
            yield
        finally:
            for layer in layers:
                layer.disable_depth -= 1

    def unload(self) -> nn.Module:
        """The original modules back, adapters dropped, hooks removed, requires_grad as before injection."""
        for capture in self._mask_captures:
            capture.remove()
        self._layers = ()
        model = unload(self.base_model)
        for name, param in model.named_parameters():
            param.requires_grad_(self._saved_requires_grad.get(name, param.requires_grad))
        return model

    def merge_and_unload(
        self,
        task_id: int | None = None,
        *,
        expert: int | None = None,
        weights: Sequence[float] | torch.Tensor | None = None,
        safe_merge: bool = False,
    ) -> nn.Module:
        """The plain base model with a fixed mixture written into its weights, for deployment at base-model speed.

        Token-level routing has no single matrix, so the gates must be fixed: the task router's for task_id, one
        expert (expert=i) or user weights over the experts (weights=[...]); a module with one expert merges as it
        is. Every module is checked before any weight changes; safe_merge=True also refuses non-finite results.
        """
        layers = list(self._layers)
        gates = resolve_fixed_gates(layers, task_id=task_id, expert=expert, weights=weights)
        merge_fixed_gates(layers, gates, safe_merge=safe_merge)
        return self.unload()

    @classmethod
    def from_peft_adapters(cls, base: nn.Module, adapters: Sequence[str | Path], **options: Any) -> MoLoRAModel:
        """A MoLoRAModel with one expert per PEFT LoRA adapter (in the order given), routed by `router`.

        trainable: "router" (X-LoRA: the adapters stay frozen, the router learns to pick them), "all", or "none"
        (eval mode, nothing trains). An adapter may be a Hub id (`org/name`; revision, cache_dir, token and
        local_files_only apply to every Hub id given). Other MoLoRAConfig options (top_k, num_tasks, aux_losses,
        ...) pass through; the ones the adapters decide (targets, ranks, alphas, expert count) cannot.
        mixture_scaling defaults to "mean", so that gates summing to 1 weigh whole adapters. Everything is read and
        checked before `base` is touched (molora.deploy.peft_files); if the tensors do not fit the base model,
        `base` is given back as it was.
        """
        plan = plan_from_peft(base, adapters, **options)
        model = cls(base, plan.config)
        try:
            load_peft_experts(model, plan)
        except ValueError:
            model.unload()
            raise
        return model

    # Parameters -------------------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Expert and router tensors only, keyed by their names in the base model."""
        state = {}
        for name, layer in self._layers:
            for part in ("experts", "router"):
                module = getattr(layer, part)
                if module is None:  # a block follower: its block's owner holds the router
                    continue
                for key, value in module.state_dict().items():
                    state[f"{name}.{part}.{key}"] = value
        return state

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """Non-reentrant checkpointing whose recomputation sees the forward's routing context.

        Reentrant checkpointing runs the forward under no_grad, which would silently drop the aux-loss gradients.
        """
        options = dict(gradient_checkpointing_kwargs or {})
        if options.get("use_reentrant", False):
            raise ValueError(
                "use_reentrant=True is not supported: aux losses computed inside checkpointed blocks would lose "
                "their gradient; use the default non-reentrant checkpointing"
            )
        if "context_fn" in options:
            raise ValueError("context_fn is set by molora (it carries the routing context into recomputation)")
        options.update(use_reentrant=False, context_fn=checkpoint_context_fn)
        enable = getattr(self.base_model, "_activation_checkpointing_enable", None)
        if enable is not None:  # transformers >= 5
            enable(options, **kwargs)
        else:
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options, **kwargs)

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, **kwargs: Any
    ) -> None:
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    # Save and load ----------------------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | Path,
        bits: int | None = None,
        push_to_hub: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
        **push_options: Any,
    ) -> None:
        """The adapter (experts, routers) and its config; bits=8 stores the expert factors as int8 with scales.
        state_dict: the tensors to write instead of the model's own (as PEFT takes it: a training loop that gathered
        sharded ones whole).

        push_to_hub=True also uploads both files as one commit to `repo_id` (default: the folder's name), with
        push_to_hub()'s other options.
        """
        if state_dict is not None and bits is not None:
            raise ValueError("give state_dict or bits, not both: bits quantizes the model's own tensors")
        if bits is not None:
            state = quantize_adapters(self, bits)
        else:
            state = state_dict if state_dict is not None else self.adapter_state_dict()
        write_adapter_files(Path(save_directory), state, self.molora_config)
        if push_to_hub:
            repo_id = push_options.pop("repo_id", None) or Path(save_directory).resolve().name
            push_adapter(Path(save_directory), ADAPTER_FILES, repo_id, **push_options)

    def push_to_hub(self, repo_id: str, bits: int | None = None, **options: Any) -> Any:
        """The adapter to the Hub repo `repo_id` as one commit of its two files (commit_message, private, token,
        revision, create_pr as huggingface_hub takes them); returns the CommitInfo."""
        with tempfile.TemporaryDirectory(prefix="molora-push-") as folder:
            self.save_pretrained(folder, bits=bits)
            return push_adapter(Path(folder), ADAPTER_FILES, repo_id, **options)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        path: str | Path,
        is_trainable: bool = False,
        verbose: bool = False,
        strict: bool = True,
        **hub: Any,
    ) -> MoLoRAModel:
        """As PEFT: the adapter in eval mode and frozen unless is_trainable. `path` is a folder or a Hub id
        (`org/name`, with revision, cache_dir, token, local_files_only as huggingface_hub takes them).

        strict=False loads the tensors that fit, warns about the rest and keeps the result as `.load_result`. When
        loading fails, `model` is given back as it was (the injected layers are taken out again).
        """
        directory = adapter_folder(path, ADAPTER_FILES, **hub)
        config, version = read_adapter_config(directory)
        molora = cls(model, config, verbose=verbose)
        try:
            state = read_adapter_tensors(directory, molora.adapter_state_dict(), strict, version)
        except ValueError:
            molora.unload()
            raise
        try:
            molora.load_result = molora.load_adapter_state_dict(state, strict=strict)
        except ValueError as err:
            molora.unload()
            raise ValueError(
                f"{directory}: {err}\n(its {CONFIG_NAME} describes the adapter that was built here; the weights "
                "disagree with it or with this base model)"
            ) from None
        if not is_trainable:
            molora.eval()
            for param in molora.parameters():
                param.requires_grad_(False)
        return molora

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> AdapterLoadResult:
        """Copy checkpoint tensors into the experts and routers (molora.deploy.adapter_files.copy_adapter_state)."""
        return copy_adapter_state(self.adapter_state_dict(), state, strict)


def get_molora_model(model: nn.Module, config: MoLoRAConfig, verbose: bool = False) -> MoLoRAModel:
    """Inject experts into `model` in place and wrap it."""
    if isinstance(model, MoLoRAModel):
        raise ValueError("the model is already a MoLoRAModel")
    return MoLoRAModel(model, config, verbose=verbose)


__all__ = ["AdapterLoadResult", "MoLoRALinear", "MoLoRAModel", "get_molora_model"]
