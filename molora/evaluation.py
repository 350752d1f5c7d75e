"""Held-out evaluation per domain, the collapse alarm, the run summary, and routing inspection of a finished run."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from molora.base_models import load_base
from molora.data import MultiDomainData
from molora.inspect import write_report
from molora.model import MoLoRAModel
from molora.run_config import RunConfig
from molora.run_setup import setup_distributed
from molora.utils import atomic_write_text


class CollapseAlarm:
    """Flags experts under 1/(10E) of the load for `patience` consecutive evaluations, and low routing entropy."""

    def __init__(self, patience: int, entropy_ratio: float):
        self.patience, self.entropy_ratio = patience, entropy_ratio
        self.streak: dict[tuple[str, int], int] = {}

    def check(self, stats: dict[str, Any]) -> list[str]:
        messages = []
        for layer, s in stats["layers"].items():
            num_experts = len(s["load"])
            for expert, load in enumerate(s["load"]):
                key = (layer, expert)
                self.streak[key] = self.streak.get(key, 0) + 1 if load < 1 / (10 * num_experts) else 0
                if self.streak[key] == self.patience:
                    messages.append(f"expert {expert} of {layer} under 1/(10E) of the load for {self.patience} evals")
            floor = self.entropy_ratio * math.log(num_experts)
            if num_experts > 1 and s["entropy"] < floor:
                messages.append(f"routing entropy of {layer} is {s['entropy']:.3f} < {floor:.3f}")
        return messages


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(
    model: nn.Module, data: MultiDomainData, config: RunConfig, device: torch.device, recorder=None
) -> dict[str, Any]:
    """Per-domain token-weighted loss and perplexity on the held-out split, plus the mean over domains.

    With a RoutingRecorder, the same forwards also record routing per domain.
    """
    was_training = model.training
    model.eval()
    results: dict[str, Any] = {}
    with recorder if recorder is not None else contextlib.nullcontext():
        _evaluate_domains(model, data, config, device, results)
    results["mean"] = {"loss": sum(r["loss"] for r in results.values()) / len(data.domains)}
    model.train(was_training)
    return results


def _evaluate_domains(model, data, config, device, results) -> None:
    for domain in data.domains:
        loss_sum, tokens = 0.0, 0
        for batch in data.eval_batches(domain, config.train.eval_batch_size):
            batch = to_device(batch, device)
            labels = batch.pop("labels")
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.train.bf16):
                logits = model(**batch).logits
            targets = labels[:, 1:]
            loss_sum += float(
                F.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
                )
            )
            tokens += int((targets != -100).sum())
        loss = loss_sum / max(tokens, 1)
        results[domain.name] = {"loss": loss, "ppl": math.exp(min(loss, 50)), "tokens": tokens}


def describe(config: RunConfig) -> str:
    if config.model.adapter != "molora":
        return f"adapter `{config.model.adapter}`"
    m = config.molora
    return f"experts {m.expert_type} x{m.num_experts} (rank {m.rank}), router `{m.router}`"


def peak_memory_mb(device: torch.device) -> float:
    """Peak resident memory of this process (CPU) or peak allocated device memory (CUDA), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_summary(
    run_dir: Path, config: RunConfig, before: dict, after: dict, steps: int, seconds: float, trainable: int
) -> None:
    lines = [
        f"# {run_dir.name}",
        "",
        f"model `{config.model.name}`, {describe(config)}, {steps} steps, "
        f"{trainable:,} trainable parameters, {seconds / 60:.1f} min",
        "",
        "| domain | eval loss before | eval loss after | ppl before | ppl after |",
        "|---|---|---|---|---|",
    ]
    for name in [k for k in after if k != "mean"]:
        b, a = before[name], after[name]
        lines.append(f"| {name} | {b['loss']:.3f} | {a['loss']:.3f} | {b['ppl']:.1f} | {a['ppl']:.1f} |")
    lines.append(f"| **mean** | {before['mean']['loss']:.3f} | {after['mean']['loss']:.3f} | | |")
    atomic_write_text(run_dir / "summary.md", "\n".join(lines) + "\n")


def inspect_run(config: RunConfig, run_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Reload a finished run's adapter, route its per-domain eval sets, write the routing report."""
    _, _, device = setup_distributed()
    base, tokenizer = load_base(config.model.name, task=config.model.task)
    data = MultiDomainData(config.data, tokenizer)
    model = MoLoRAModel.from_pretrained(base, Path(run_dir) / "adapter").to(device)
    recorder = model.record_routing(domains=data.names)
    evaluate(model, data, config, device, recorder)
    return write_report(recorder, out_dir, title=f"Routing of {Path(run_dir).name} on {', '.join(data.names)}")
