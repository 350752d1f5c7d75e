"""MoLoRAModel: the injected Hugging Face model plus routing context, aux losses, save/load and adapter toggles."""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from molora.config import CONFIG_NAME, MoLoRAConfig
from molora.context import MaskCapture, RoutingContext, checkpoint_context_fn, current_context, routing_context
from molora.inspect import RoutingRecorder
from molora.layer import MoLoRALinear
from molora.losses import aux_term_means, layer_aux_terms
from molora.patcher import InjectionReport, inject, molora_layers, unload
from molora.utils import atomic_write

WEIGHTS_NAME = "adapter_model.safetensors"


def _as_tensor(value: Any, dtype: torch.dtype, what: str) -> torch.Tensor | None:
    if value is None:
        return None
    tensor = torch.as_tensor(value, dtype=dtype)
    if tensor.dim() != (1 if what == "task_ids" else 2):
        shape = "[batch]" if what == "task_ids" else "[batch, seq]"
        raise ValueError(f"{what} must be {shape}, got shape {list(tensor.shape)}")
    return tensor


class MoLoRAModel(nn.Module):
    """Wraps a Hugging Face model whose target modules now hold experts; unknown attributes reach the base model."""

    def __init__(self, model: nn.Module, config: MoLoRAConfig, verbose: bool = False):
        super().__init__()
        self.molora_config = config
        self._saved_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        self.injection_report: InjectionReport = inject(model, config)
        self.base_model = model
        self._layers: tuple[tuple[str, MoLoRALinear], ...] = tuple(molora_layers(model))  # fixed once injected
        self._aux_means: tuple[list, dict[str, torch.Tensor]] | None = None  # (refs to their routes, means)
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
    def _context(self, task_ids: Any, prompt_mask: Any, device: torch.device) -> RoutingContext:
        task_ids = _as_tensor(task_ids, torch.long, "task_ids")
        prompt_mask = _as_tensor(prompt_mask, torch.bool, "prompt_mask")
        num_tasks = self.molora_config.num_tasks
        if self.molora_config.router == "task":
            if task_ids is None:
                raise ValueError("router='task' needs task_ids ([batch] ints) in forward()/generate()")
            # (not while torch.compile traces: a data-dependent branch would split the graph)
            checked = task_ids.numel() and not torch.compiler.is_compiling()
            if checked and (task_ids.min() < 0 or task_ids.max() >= num_tasks):
                raise ValueError(f"task_ids must be in [0, num_tasks={num_tasks}), got {task_ids.tolist()}")
        return RoutingContext(
            task_ids=None if task_ids is None else task_ids.to(device),
            prompt_mask=None if prompt_mask is None else prompt_mask.to(device),
        )

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    def forward(self, *args: Any, task_ids: Any = None, prompt_mask: Any = None, **kwargs: Any) -> Any:
        ctx = self._context(task_ids, prompt_mask, self.device)
        parent = current_context()
        if parent is not None and parent.decode_state is not None:  # inside decoding_session(): keep its state
            ctx.decode_state = parent.decode_state
            ctx.task_ids = ctx.task_ids if ctx.task_ids is not None else parent.task_ids
            ctx.prompt_mask = ctx.prompt_mask if ctx.prompt_mask is not None else parent.prompt_mask
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
        config = self.molora_config
        if config.router != "intuition":
            return
        encoder_decoder = getattr(getattr(self.base_model, "config", None), "is_encoder_decoder", False)
        if config.intuition_pooling == "mean" and not encoder_decoder:
            warnings.warn(
                "intuition_pooling='mean' lets every token see the whole sequence, so cached generation differs "
                "from uncached; use 'causal' or 'prompt' for decoders",
                stacklevel=3,
            )
        generation_config = kwargs.get("generation_config") or getattr(self.base_model, "generation_config", None)
        beams = kwargs.get("num_beams") or getattr(generation_config, "num_beams", 1) or 1
        running_state = encoder_decoder or config.intuition_pooling != "prompt"
        if beams > 1 and running_state:
            raise NotImplementedError(
                "beam search reorders the KV cache but not the intuition router's running pooled state; use greedy "
                "or sampling, or intuition_pooling='prompt'"
            )

    def generate(self, *args: Any, task_ids: Any = None, prompt_mask: Any = None, **kwargs: Any) -> Any:
        self._check_decoding(kwargs)
        if prompt_mask is None and self.molora_config.intuition_pooling == "prompt":
            prompt_mask = kwargs.get("attention_mask")
            if prompt_mask is None:
                inputs = kwargs.get("input_ids", args[0] if args else None)
                prompt_mask = None if inputs is None else torch.ones_like(inputs, dtype=torch.bool)
        with self.decoding_session(task_ids=task_ids, prompt_mask=prompt_mask):
            return self.base_model.generate(*args, **kwargs)

    # Aux losses -------------------------------------------------------------------------------------------------
    def _layer_aux_terms(self) -> list[tuple[str, dict[str, torch.Tensor]]]:
        """Per layer {loss: value} of the last forward, computed once (stacked across layers) and then reused."""
        layers = [(name, layer) for name, layer in self._layers if layer.last_route is not None]
        entries = [layer.last_route for _, layer in layers]
        terms = [route.cache.get("aux_terms") for route, _ in entries]
        if any(t is None for t in terms):
            terms = layer_aux_terms(entries, tuple(self.molora_config.aux_losses))
            for (route, _), layer_terms in zip(entries, terms, strict=True):
                route.cache["aux_terms"] = layer_terms
        return [(name, layer_terms) for (name, _), layer_terms in zip(layers, terms, strict=True)]

    def aux_loss_terms(self, per_layer: bool = False) -> dict[str, Any]:
        """{loss name: mean over layers} of the last forward; per_layer=True gives {layer: {loss name: value}}."""
        if per_layer:
            return {name: dict(terms) for name, terms in self._layer_aux_terms()}
        entries = [layer.last_route for _, layer in self._layers if layer.last_route is not None]
        if not entries:
            return {}
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
            means = aux_term_means(entries, tuple(self.molora_config.aux_losses))
            cached = self._aux_means = ([weakref.ref(route) for route in routes], means)
        return dict(cached[1])

    def aux_loss(self) -> torch.Tensor:
        """The weighted sum of the aux losses of the last forward (differentiable when that forward was)."""
        terms = self.aux_loss_terms()
        total = torch.zeros((), device=self.device)
        for loss, value in terms.items():
            total = total + self.molora_config.aux_losses[loss] * value
        return total

    def record_routing(self, task_ids: Any = None, domains: list[str] | None = None) -> RoutingRecorder:
        """`with model.record_routing(domains=names) as rec:` records routing per task; see molora.inspect."""
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

    def merge_and_unload(self, task_id: int | None = None) -> nn.Module:
        """The plain base model with the mixture written into its weights, for deployment at base-model speed.

        Only token-independent routing can be merged: router='task' for one task (task_id), or single experts.
        The mixture is checked for every layer before any weight changes.
        """
        layers = [layer for _, layer in self._layers]
        for layer in layers:
            layer.fixed_expert_weights(task_id)
        was_training = self.training
        self.eval()
        for layer in layers:
            layer.merge_into_base(task_id)
        self.train(was_training)
        return self.unload()

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
                for key, value in getattr(layer, part).state_dict().items():
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
    def save_pretrained(self, save_directory: str | Path) -> None:
        from safetensors.torch import save_file

        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"save_pretrained: {directory} exists and is not a directory")
        state = {k: v.detach().contiguous().cpu() for k, v in self.adapter_state_dict().items()}
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
        self.molora_config.to_json_file(directory / CONFIG_NAME)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, path: str | Path, is_trainable: bool = False, verbose: bool = False
    ) -> MoLoRAModel:
        """As PEFT: the adapter in eval mode and frozen unless is_trainable."""
        from safetensors.torch import load_file

        directory = Path(path)
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
        config = MoLoRAConfig.from_json_file(directory / CONFIG_NAME)
        molora = cls(model, config, verbose=verbose)
        molora.load_adapter_state_dict(load_file(str(weights)))
        if not is_trainable:
            molora.eval()
            for param in molora.parameters():
                param.requires_grad_(False)
        return molora

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.adapter_state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"adapter checkpoint does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for key, target in expected.items():
            if state[key].shape != target.shape:
                raise ValueError(f"adapter tensor {key}: checkpoint {list(state[key].shape)} vs {list(target.shape)}")
        with torch.no_grad():
            for key, target in expected.items():
                target.copy_(state[key])


def get_molora_model(model: nn.Module, config: MoLoRAConfig, verbose: bool = False) -> MoLoRAModel:
    """Inject experts into `model` in place and wrap it."""
    if isinstance(model, MoLoRAModel):
        raise ValueError("the model is already a MoLoRAModel")
    return MoLoRAModel(model, config, verbose=verbose)


__all__ = ["MoLoRALinear", "MoLoRAModel", "get_molora_model"]
