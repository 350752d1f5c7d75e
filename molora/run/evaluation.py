"""Held-out evaluation per domain, the collapse alarm, the run summary, and routing inspection of a finished run."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from molora.analysis.routing_report import write_report
from molora.core.allocation import is_preset, preset_quarters
from molora.core.recording import DEAD_LOAD_SHARE, dead_load
from molora.model import MoLoRAModel
from molora.run.base_models import load_run_base
from molora.run.config import RunConfig
from molora.run.data import MultiDomainData
from molora.run.setup import setup_distributed
from molora.utils import atomic_write_text


class CollapseAlarm:
    """Flags dead experts (inspect.dead_load) for `patience` consecutive evaluations, and low routing entropy."""

    def __init__(self, patience: int, entropy_ratio: float):
        self.patience, self.entropy_ratio = patience, entropy_ratio
        self.streak: dict[tuple[str, int], int] = {}

    def check(self, stats: dict[str, Any]) -> list[str]:
        messages = []
        for layer, s in stats["layers"].items():
            num_experts = len(s["load"])
            for expert, load in enumerate(s["load"]):
                key = (layer, expert)
                self.streak[key] = self.streak.get(key, 0) + 1 if load < dead_load(num_experts) else 0
                if self.streak[key] == self.patience:
                    share = f"{DEAD_LOAD_SHARE:g}/E"
                    messages.append(f"expert {expert} of {layer} under {share} of the load for {self.patience} evals")
            floor = self.entropy_ratio * math.log(num_experts)
            if num_experts > 1 and s["entropy"] < floor:
                messages.append(f"routing entropy of {layer} is {s['entropy']:.3f} < {floor:.3f}")
        return messages


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: MultiDomainData,
    config: RunConfig,
    device: torch.device,
    recorder=None,
    split: str = "eval",
) -> dict[str, Any]:
    """Per domain on a held-out split: token-weighted loss, perplexity, next-token accuracy on the scored tokens,
    and, for label domains (data.label_tokens), the accuracy of the predicted label; plus the means over domains.

    The predicted label is the label whose first token scores highest at the first response position: what greedy
    decoding restricted to the labels answers. With a RoutingRecorder, the same forwards also record routing.
    """
    was_training = model.training
    model.eval()
    results: dict[str, Any] = {}
    with recorder if recorder is not None else contextlib.nullcontext():
        _evaluate_domains(model, data, config, device, results, split)
    domains = list(results.values())
    results["mean"] = {
        "loss": sum(r["loss"] for r in domains) / len(domains),
        "token_acc": sum(r["token_acc"] for r in domains) / len(domains),
    }
    model.train(was_training)
    return results


def _evaluate_domains(model, data, config, device, results, split) -> None:
    for domain in data.domains:
        loss_sum, tokens, correct, label_hits, labelled = 0.0, 0, 0, 0, 0
        labels_first = None if domain.label_tokens is None else torch.tensor(domain.label_tokens, device=device)
        for batch in data.eval_batches(domain, config.train.eval_batch_size, split):
            batch = to_device(batch, device)
            labels = batch.pop("labels")
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.train.bf16):
                logits = model(**batch).logits
            logits, targets = logits[:, :-1].float(), labels[:, 1:]
            loss_sum += float(
                F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
            )
            scored = targets != -100
            tokens += int(scored.sum())
            correct += int(((logits.argmax(-1) == targets) & scored).sum())
            if labels_first is not None:
                first = scored.int().argmax(dim=1)  # the position predicting the first response token
                rows = torch.arange(len(first), device=device)
                has = scored.any(dim=1)
                picked = labels_first[logits[rows, first][:, labels_first].argmax(-1)]
                label_hits += int(((picked == targets[rows, first]) & has).sum())
                labelled += int(has.sum())
        loss = loss_sum / max(tokens, 1)
        results[domain.name] = {
            "loss": loss,
            "ppl": math.exp(min(loss, 50)),
            "tokens": tokens,
            "token_acc": correct / max(tokens, 1),
            "examples": len(domain.split(split)),
        }
        if labels_first is not None:
            results[domain.name]["label_acc"] = label_hits / max(labelled, 1)


def describe(config: RunConfig) -> str:
    if config.model.adapter != "molora":
        return f"adapter `{config.model.adapter}`"
    m = config.molora
    ranks = f"rank {m.rank}" + (f" {_patterns(m.rank_pattern)}" if m.rank_pattern else "")
    return f"experts {m.expert_type} x{_patterns(m.num_experts)}, {ranks}, router `{m.router}`"


def _patterns(value: Any) -> str:
    """4 -> "4"; {"q_proj|v_proj": 1, ".*": 4} -> "(q_proj|v_proj: 1, .*: 4)"; a preset -> "(hourglass 8-2-2-8)"."""
    if is_preset(value):
        name = value["preset"] if isinstance(value["preset"], str) else "per quarter"
        return f"({name} {'-'.join(map(str, preset_quarters(value)))})"
    if not isinstance(value, dict):
        return str(value)
    return "(" + ", ".join(f"{key}: {_patterns(item)}" for key, item in value.items()) + ")"


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
        # task_id: the domain's place in data.domains, what model(..., task_ids=...) and generate() take
        "| domain | task_id | eval loss before | eval loss after | ppl before | ppl after |",
        "|---|---|---|---|---|---|",
    ]

    def shown(results: dict, name: str, key: str, form: str) -> str:
        return format(results[name][key], form) if name in results else "-"  # no step-0 eval: train.eval_at_start

    for task_id, name in enumerate(k for k in after if k != "mean"):
        lines.append(
            f"| {name} | {task_id} | {shown(before, name, 'loss', '.3f')} | {after[name]['loss']:.3f} | "
            f"{shown(before, name, 'ppl', '.1f')} | {after[name]['ppl']:.1f} |"
        )
    lines.append(f"| **mean** | | {shown(before, 'mean', 'loss', '.3f')} | {after['mean']['loss']:.3f} | | |")
    atomic_write_text(run_dir / "summary.md", "\n".join(lines) + "\n")


def inspect_run(config: RunConfig, run_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Reload a finished run's adapter, route its per-domain eval sets, write the routing report."""
    _, _, device = setup_distributed()
    base, tokenizer = load_run_base(config, device)
    data = MultiDomainData(config.data, tokenizer)
    model = MoLoRAModel.from_pretrained(base, Path(run_dir) / "adapter").to(device)
    recorder = model.record_routing(domains=data.names)
    evaluate(model, data, config, device, recorder)
    return write_report(recorder, out_dir, title=f"Routing of {Path(run_dir).name} on {', '.join(data.names)}")
