"""The training loop: one function to read top to bottom (nanoGPT-style), plus checkpoint and eval helpers.

Runs unchanged under `torchrun --nproc_per_node=N`: each rank takes its slice of every global batch, gradients
are averaged with all_reduce, and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn

from molora.base_models import load_base
from molora.data import MultiDomainData
from molora.inspect import RoutingRecorder, health_summary, write_report
from molora.model import MoLoRAModel, get_molora_model
from molora.run_config import RunConfig
from molora.utils import atomic_write, atomic_write_text

STATE_NAME = "trainer_state.pt"


def setup_distributed() -> tuple[int, int, torch.device]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to min_ratio of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: MoLoRAModel, config: RunConfig) -> torch.optim.AdamW:
    experts = [p for n, p in model.named_parameters() if p.requires_grad and ".router." not in n]
    routers = [p for n, p in model.named_parameters() if p.requires_grad and ".router." in n]
    router_lr = config.train.router_lr or config.train.lr
    groups = [{"params": experts, "lr": config.train.lr}, {"params": routers, "lr": router_lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=config.train.weight_decay)


def build_model(base: nn.Module, config: RunConfig) -> nn.Module:
    """The model to train: the mixture, a parameter-matched PEFT LoRA baseline, or the bare base model."""
    adapter = config.model.adapter
    if adapter == "none":
        for param in base.parameters():
            param.requires_grad_(False)
        return base
    if adapter == "peft-lora":
        from peft import LoraConfig, get_peft_model

        rank = config.model.peft_rank
        if rank is None:  # match the mixture's trainable parameters
            probe = get_molora_model(base, config.molora)
            mixture_params = probe.get_nb_trainable_parameters()[0]
            widths = sum(r.in_features + r.out_features for r in probe.injection_report.modules)
            probe.unload()
            rank = max(1, round(mixture_params / widths))
        target = config.molora.target_modules
        lora = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=target, layers_to_transform=config.molora.layers_to_transform
        )
        return get_peft_model(base, lora)
    return get_molora_model(base, config.molora)


def aux_loss(model: nn.Module) -> torch.Tensor | float:
    return model.aux_loss() if isinstance(model, MoLoRAModel) else 0.0


def aux_terms(model: nn.Module) -> dict[str, torch.Tensor]:
    return model.aux_loss_terms() if isinstance(model, MoLoRAModel) else {}


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


def save_checkpoint(run_dir: Path, model: MoLoRAModel, optimizer, scheduler, step: int, extra: dict, keep: int) -> None:
    """checkpoints/step-N/ (adapter + optimizer/scheduler/RNG state), built in a temp folder and renamed in."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".step-", dir=root))
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
        **extra,
    }
    model.save_pretrained(staging)
    torch.save(state, staging / STATE_NAME)
    final = root / f"step-{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.rename(staging, final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old)


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / STATE_NAME).is_file())
    return done[-1] if done else None


def _describe(config: RunConfig) -> str:
    if config.model.adapter != "molora":
        return f"adapter `{config.model.adapter}`"
    m = config.molora
    return f"experts {m.expert_type} x{m.num_experts} (rank {m.rank}), router `{m.router}`"


def load_adapter_weights(model: nn.Module, directory: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(directory / "adapter_model.safetensors"))
    if isinstance(model, MoLoRAModel):
        model.load_adapter_state_dict(state)
    else:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)


def peak_memory_mb(device: torch.device) -> float:
    """Peak resident memory of this process (CPU) or peak allocated device memory (CUDA), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _write_summary(
    run_dir: Path, config: RunConfig, before: dict, after: dict, steps: int, seconds: float, trainable: int
) -> None:
    lines = [
        f"# {run_dir.name}",
        "",
        f"model `{config.model.name}`, {_describe(config)}, {steps} steps, "
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


def train(config: RunConfig, run_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Fine-tune config.model on config.data with the adapter in config.model/molora; returns eval before/after."""
    run_dir = Path(run_dir)
    rank, world_size, device = setup_distributed()
    is_main = rank == 0
    tcfg = config.train
    torch.manual_seed(tcfg.seed)
    random.seed(tcfg.seed)

    base, tokenizer = load_base(config.model.name, task=config.model.task)
    data = MultiDomainData(config.data, tokenizer)  # validated before anything is written
    model = build_model(base, config).to(device)
    routed = isinstance(model, MoLoRAModel)
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if world_size > 1:  # identical starting adapters on every rank
        for param in trainable:
            dist.broadcast(param.data, src=0)

    metrics_path = run_dir / "metrics.jsonl"

    def log(record: dict[str, Any]) -> None:
        if is_main:
            with metrics_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    alarm = CollapseAlarm(tcfg.alarm_evals, tcfg.alarm_entropy_ratio)

    def evaluate_and_log(step: int, bar=None) -> tuple[dict[str, Any], RoutingRecorder | None]:
        recorder = model.record_routing(domains=data.names) if routed else None
        results = evaluate(model, data, config, device, recorder)
        log({"step": step, "type": "eval", **{f"eval/{k}": v["loss"] for k, v in results.items()}})
        if recorder is not None:
            for message in alarm.check(recorder.stats()):
                log({"step": step, "type": "alarm", "message": message})
                if is_main:
                    (bar.write if bar is not None else print)(f"ALARM step {step}: {message}")
                    if bar is not None:
                        bar.set_postfix_str("ALARM: routing collapse, see metrics.jsonl")
        return results, recorder

    if config.model.adapter == "none" or not trainable:  # nothing to train: evaluate the model as it is
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
            atomic_write_text(metrics_path, "")
        results, _ = evaluate_and_log(0)
        return _finish(run_dir, config, model, results, results, 0, 0.0, None, device, is_main, world_size, [])

    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tcfg.warmup_steps, tcfg.steps, tcfg.min_lr_ratio)
    )
    start_step, before = 0, None
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
    if checkpoint is not None:
        state = torch.load(checkpoint / STATE_NAME, weights_only=False)
        load_adapter_weights(model, checkpoint)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        start_step, before = state["step"], state["eval_before"]
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        kept = []
        if checkpoint is not None and metrics_path.exists():  # drop lines logged after the checkpoint
            kept = [ln for ln in metrics_path.read_text().splitlines() if json.loads(ln)["step"] <= start_step]
        atomic_write_text(metrics_path, "".join(line + "\n" for line in kept))
        if routed:
            print(model.injection_report)
    if before is None:
        before, _ = evaluate_and_log(0)

    from tqdm.auto import tqdm

    end_step = tcfg.steps if tcfg.stop_after is None else min(tcfg.steps, start_step + tcfg.stop_after)
    bar = tqdm(total=tcfg.steps, initial=start_step, disable=not (is_main and tcfg.progress), dynamic_ncols=True)
    model.train()
    started, window_tokens, window_start = time.perf_counter(), 0, time.perf_counter()
    for step in range(start_step, end_step):
        # One optimizer step: grad_accum micro-batches, gradients averaged over ranks.
        logging_step = (step + 1) % tcfg.log_every == 0 or step + 1 == end_step
        health = model.record_routing() if logging_step and routed else None
        lm_total, aux_total = 0.0, {}
        for micro in range(tcfg.grad_accum):
            index = step * tcfg.grad_accum + micro
            batch = to_device(data.train_batch(index, tcfg.batch_size, rank, world_size), device)
            if not routed:
                batch = {k: v for k, v in batch.items() if k not in ("task_ids", "prompt_mask")}
            recording = health if health is not None and micro == tcfg.grad_accum - 1 else contextlib.nullcontext()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tcfg.bf16), recording:
                out = model(**batch)
            loss = out.loss + aux_loss(model)
            (loss / tcfg.grad_accum).backward()
            lm_total += out.loss.item() / tcfg.grad_accum
            for name, value in aux_terms(model).items():
                aux_total[name] = aux_total.get(name, 0.0) + value.item() / tcfg.grad_accum
            window_tokens += int(batch["attention_mask"].sum()) * world_size
        if world_size > 1:
            for param in trainable:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                dist.all_reduce(param.grad)
                param.grad /= world_size
        clip = tcfg.max_grad_norm if tcfg.max_grad_norm is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, clip))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)

        if logging_step:
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_tokens / max(elapsed, 1e-9)
            weighted_aux = sum(config.molora.aux_losses[k] * v for k, v in aux_total.items())
            record = {
                "step": step + 1,
                "type": "train",
                "loss": lm_total + weighted_aux,
                "lm_loss": lm_total,
                **{f"aux/{k}": v for k, v in aux_total.items()},
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": tokens_per_s,
                "grad_norm": grad_norm,
                **(health_summary(health) if health is not None else {}),
            }
            log(record)
            bar.set_postfix(loss=f"{lm_total:.3f}", tok_s=f"{tokens_per_s:.0f}")
            window_tokens, window_start = 0, time.perf_counter()
        if tcfg.eval_every and (step + 1) % tcfg.eval_every == 0 and step + 1 < tcfg.steps:
            evaluate_and_log(step + 1, bar)
        if is_main and ((tcfg.save_every and (step + 1) % tcfg.save_every == 0) or step + 1 == end_step):
            extra = {"eval_before": before}
            save_checkpoint(run_dir, model, optimizer, scheduler, step + 1, extra, tcfg.keep_checkpoints)
    bar.close()
    seconds = time.perf_counter() - started

    if end_step < tcfg.steps:  # stopped early on request; --resume continues from the checkpoint
        return {"before": before, "stopped_at": end_step}
    after, recorder = evaluate_and_log(tcfg.steps)
    steps_run = end_step - start_step
    return _finish(
        run_dir, config, model, before, after, steps_run, seconds, recorder, device, is_main, world_size, trainable
    )


def _finish(
    run_dir, config, model, before, after, steps_run, seconds, recorder, device, is_main, world_size, trainable
) -> dict[str, Any]:
    """Check ranks agree, then (rank 0) write adapter/, eval.json, summary.md and routing/."""
    result = {
        "before": before,
        "after": after,
        "steps": config.train.steps if trainable else 0,
        "seconds": seconds,
        "seconds_per_step": seconds / steps_run if steps_run else None,
        "world_size": world_size,
        "trainable_params": sum(p.numel() for p in trainable),
        "peak_memory_mb": peak_memory_mb(device),
    }
    if world_size > 1 and trainable:  # every rank must hold the same adapter; a cheap order-sensitive checksum
        flat = torch.cat([p.detach().flatten() for p in trainable]).double()
        ramp = torch.linspace(1, 2, flat.numel(), dtype=torch.float64, device=flat.device)
        checksum = torch.stack([flat.sum(), flat.abs().sum(), (flat * ramp).sum()])
        gathered = [torch.zeros_like(checksum) for _ in range(world_size)]
        dist.all_gather(gathered, checksum)
        if not all(torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError(f"adapters differ across ranks: {[g.tolist() for g in gathered]}")
        result["ranks_identical"] = True
    if is_main:
        if trainable:
            model.save_pretrained(run_dir / "adapter")
        if recorder is not None:
            stats = write_report(recorder, run_dir / "routing", title=f"Routing of {run_dir.name} on the eval sets")
            result["routing"] = {k: v for k, v in stats["aggregate"].items() if k != "layer_expert_load"}
        atomic_write(run_dir / "eval.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
        _write_summary(run_dir, config, before, after, result["steps"], seconds, result["trainable_params"])
    if world_size > 1:
        dist.barrier()
    return result


def inspect_run(config: RunConfig, run_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Reload a finished run's adapter, route its per-domain eval sets, write the routing report."""
    _, _, device = setup_distributed()
    base, tokenizer = load_base(config.model.name, task=config.model.task)
    data = MultiDomainData(config.data, tokenizer)
    model = MoLoRAModel.from_pretrained(base, Path(run_dir) / "adapter").to(device)
    recorder = model.record_routing(domains=data.names)
    evaluate(model, data, config, device, recorder)
    return write_report(recorder, out_dir, title=f"Routing of {Path(run_dir).name} on {', '.join(data.names)}")
