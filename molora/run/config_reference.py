"""docs/config-reference.md: every run-config key with its type and default, read from the dataclasses, and one line
on what it does. A test fails when a key has no line or a line names no key, so the reference cannot drift.

    python -m molora.run.config_reference > docs/config-reference.md
"""

from __future__ import annotations

import dataclasses

from molora.run.config import SECTIONS

DESCRIPTIONS = {
    "model.name": "A built-in model (smollm2-135m, qwen2.5-coder-0.5b, minilm), a local folder or a Hub id.",
    "model.task": "causal-lm, encoder or classification: which transformers Auto class loads the model.",
    "model.gradient_checkpointing": "Recompute activations in the backward pass (molora's non-reentrant kind).",
    "model.adapter": "molora (the mixture below), peft-lora (a plain PEFT LoRA baseline on the same modules) or none.",
    "model.peft_rank": "The PEFT baseline's rank; null: the rank whose trainable parameters match the mixture's.",
    "model.quantization": "null, or a quantized base (QLoRA): nf4, fp4, int8 (bitsandbytes), torchao-int8.",
    "data.domains": "Built-in domains, a suite (bundled, heldout, conflict, conflict-iso), or your files' domains.",
    "data.files": "Your own JSONL or CSV files, one example per row.",
    "data.text_field": "The column holding a whole example, for files without prompt/response columns.",
    "data.prompt_field": "The column holding the prompt.",
    "data.response_field": "The column holding the response.",
    "data.domain_field": "The column naming each row's domain.",
    "data.max_length": "Tokens per example; longer examples are cut.",
    "data.max_examples_per_domain": "At most this many examples of each domain (null: all).",
    "data.eval_fraction": "The share of each domain's examples held out for evaluation.",
    "data.max_eval_per_domain": "At most this many eval examples per domain (null: the whole fraction).",
    "data.val_fraction": "A validation split for choices (configs, learning rates), apart from eval; 0: none.",
    "data.max_val_per_domain": "At most this many validation examples per domain.",
    "data.mixing": "How training batches draw domains: proportional to their size, or temperature-scaled.",
    "data.temperature": "With mixing: temperature, domain weights proportional to size^(1/temperature).",
    "data.loss_on": "response (the loss on the answer's tokens only) or all (on every token).",
    "data.use_chat_template": "Wrap prompt and response in the tokenizer's chat template where it has one.",
    "data.seed": "The seed of the splits (which examples are train, eval, validation).",
    "data.dedupe": "Drop exact repeats of a (prompt, response) record within a domain, keeping the first.",
    "molora.target_modules": "Modules to adapt: names or dotted suffixes, a regex string, or all-linear.",
    "molora.exclude_modules": "Modules to leave out of the targets (names, suffixes or a regex).",
    "molora.num_experts": "Experts per module: an int, {regex: int}, or a per-layer preset (MoLA).",
    "molora.expert_type": "lora (A and B per expert) or rank1 (MoR1E: each expert one rank-1 update).",
    "molora.rank": "Each expert's rank.",
    "molora.alpha": "LoRA alpha: the mixture is scaled by alpha/rank (alpha/sqrt(rank) with use_rslora).",
    "molora.dropout": "Dropout on the experts' input.",
    "molora.rank_pattern": "{regex: rank} for the modules that differ from rank.",
    "molora.alpha_pattern": "{regex: alpha} for the modules that differ from alpha.",
    "molora.use_rslora": "Scale by alpha/sqrt(rank) (rsLoRA) instead of alpha/rank.",
    "molora.router": "softmax, topk, switch, intuition (MoR1E), task or domain (one expert per task, by rule).",
    "molora.top_k": "Experts each token uses with a sparse router (topk: default 2; switch: 1).",
    "molora.dispatch": "Sparse routers: dense, grouped (each expert on its own tokens) or auto (by the benchmark).",
    "molora.router_temperature": "Divides the router logits before the softmax.",
    "molora.router_jitter": "Multiplicative noise on the router input while training (Switch Transformer).",
    "molora.intuition_pooling": "The intuition router's summary: causal (running mean), prompt, or mean.",
    "molora.intuition_hidden": "The intuition router's MLP width (null: its default).",
    "molora.num_tasks": "Tasks the task router embeds (its gate per task); set from the domains in a run.",
    "molora.aux_losses": "{name: weight} of the aux losses: balance, z, cv, entropy, task_mi, rank_sparsity.",
    "molora.layers_to_transform": "Only these layer indices (an int or a list).",
    "molora.init_lora_weights": "Zero B at init, so the adapted model starts as the base.",
    "molora.mixture_scaling": "mean (gates sum to 1) or sum (gates times the experts each token uses).",
    "molora.shared_experts": "Always-on experts beside the routed ones (DeepSeekMoE).",
    "molora.share_lora_a": "HydraLoRA: one A per module shared by its experts, a routed B each.",
    "molora.router_init_std": "Std of the router's output weights at init (null: each router's default).",
    "molora.balance_window": "The balance loss reads the routed fraction over the last N forwards.",
    "molora.routing_scope": "module (each linear routes itself), input (siblings reading one tensor) or block.",
    "molora.input_groups": "Which sibling names read one input, for routing_scope input (regex alternatives).",
    "molora.rank_gates": "A learned gate on every rank component, pushed closed by rank_sparsity; then prunable.",
    "molora.rank_gate_temperature": "The relaxed-Bernoulli temperature of the rank gates while training.",
    "train.steps": "Optimizer steps.",
    "train.batch_size": "Examples per micro-batch on each process.",
    "train.grad_accum": "Micro-batches per optimizer step.",
    "train.lr": "Peak learning rate of the experts.",
    "train.router_lr": "The routers' learning rate (null: lr times router_lr_scale).",
    "train.router_lr_scale": "The routers' learning rate as a multiple of lr.",
    "train.weight_decay": "AdamW weight decay.",
    "train.warmup_steps": "Linear warmup steps, then cosine decay.",
    "train.min_lr_ratio": "The cosine decay's floor, as a share of the peak.",
    "train.max_grad_norm": "Gradient-norm clipping (null: none).",
    "train.bf16": "bf16 autocast for the forward (and a quantized base's compute dtype).",
    "train.sharding": "none (every process holds the model) or fsdp (FSDP2 under torchrun).",
    "train.seed": "The seed of the adapter's init, dropout and the batch order.",
    "train.log_every": "Log training metrics every N steps.",
    "train.eval_every": "Evaluate every N steps (0: at the start and the end only).",
    "train.eval_at_start": "Evaluate before training (the 'before' column).",
    "train.eval_batch_size": "Examples per evaluation batch.",
    "train.save_every": "Write a checkpoint every N steps (0: at the end only).",
    "train.keep_checkpoints": "Checkpoints kept; older ones are removed.",
    "train.stop_after": "End this invocation after N steps; --resume continues.",
    "train.max_bad_steps": "Steps with non-finite values skipped before the run stops (0: stop at the first).",
    "train.progress": "Show a progress bar.",
    "train.alarm_evals": "Consecutive evaluations with a dead expert before the collapse alarm.",
    "train.alarm_entropy_ratio": "The alarm also fires when routing entropy falls under this share of ln E.",
    "train.rank_schedule": "Shrink the active ranks over training (rank gates).",
    "train.rank_gate_lr": "The learning rate of the rank gates' logits.",
    "train.report_to": "Where metrics go besides metrics.jsonl: tensorboard, wandb.",
}


def _default(field: dataclasses.Field) -> object:
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # every field here has one or the other


def keys() -> list[str]:
    return [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def render() -> str:
    lines = [
        "# Run config reference",
        "",
        "Every key of a run config (`molora-train --config FILE [section.key=value ...]`), generated from the",
        "dataclasses by `python -m molora.run.config_reference > docs/config-reference.md`; a test keeps it current.",
        "`molora-train --config FILE --print-config` prints a config with every default filled in.",
    ]
    for section, cls in SECTIONS.items():
        lines += ["", f"## {section}", "", "| key | type | default | what it does |", "|---|---|---|---|"]
        for field in dataclasses.fields(cls):
            key = f"{section}.{field.name}"
            type_name = str(field.type).replace("|", "\\|")
            default = repr(_default(field)).replace("|", "\\|")
            lines.append(f"| `{key}` | `{type_name}` | `{default}` | {DESCRIPTIONS[key]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
