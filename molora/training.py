"""The training loop: one function to read top to bottom (nanoGPT-style), plus checkpoint and eval helpers.

Runs unchanged under `torchrun --nproc_per_node=N`: each rank takes its slice of every global batch, gradients
are averaged with all_reduce, and only rank 0 writes.
"""

from __future__ import annotations

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

from molora.data import MultiDomainData
from molora.health import RouterHealth
from molora.model import MoLoRAModel, get_molora_model
from molora.models import load_base
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


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: MoLoRAModel, data: MultiDomainData, config: RunConfig, device: torch.device) -> dict[str, Any]:
    """Per-domain token-weighted loss and perplexity on the held-out split, plus the mean over domains."""
    was_training = model.training
    model.eval()
    results: dict[str, Any] = {}
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
    results["mean"] = {"loss": sum(r["loss"] for r in results.values()) / len(data.domains)}
    model.train(was_training)
    return results


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


def _write_summary(
    run_dir: Path, config: RunConfig, before: dict, after: dict, steps: int, seconds: float, trainable: int
) -> None:
    lines = [
        f"# {run_dir.name}",
        "",
        f"model `{config.model.name}`, experts {config.molora.expert_type} x{config.molora.num_experts} "
        f"(rank {config.molora.rank}), router `{config.molora.router}`, {steps} steps, "
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
    """Fine-tune config.model on config.data with the mixture in config.molora; returns eval before/after."""
    run_dir = Path(run_dir)
    rank, world_size, device = setup_distributed()
    is_main = rank == 0
    tcfg = config.train
    torch.manual_seed(tcfg.seed)
    random.seed(tcfg.seed)

    base, tokenizer = load_base(config.model.name, task=config.model.task)
    data = MultiDomainData(config.data, tokenizer)  # validated before anything is written
    model = get_molora_model(base, config.molora).to(device)
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if world_size > 1:  # identical starting adapters on every rank
        for param in model.parameters():
            if param.requires_grad:
                dist.broadcast(param.data, src=0)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tcfg.warmup_steps, tcfg.steps, tcfg.min_lr_ratio)
    )

    start_step, before = 0, None
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
    if checkpoint is not None:
        from safetensors.torch import load_file

        state = torch.load(checkpoint / STATE_NAME, weights_only=False)
        model.load_adapter_state_dict(load_file(str(checkpoint / "adapter_model.safetensors")))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        start_step, before = state["step"], state["eval_before"]
    metrics_path = run_dir / "metrics.jsonl"
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        kept = []
        if checkpoint is not None and metrics_path.exists():  # drop lines logged after the checkpoint
            kept = [ln for ln in metrics_path.read_text().splitlines() if json.loads(ln)["step"] <= start_step]
        atomic_write_text(metrics_path, "".join(line + "\n" for line in kept))
        print(model.injection_report)

    def log(record: dict[str, Any]) -> None:
        if is_main:
            with metrics_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    if before is None:
        before = evaluate(model, data, config, device)
        log({"step": 0, "type": "eval", **{f"eval/{k}": v["loss"] for k, v in before.items()}})

    from tqdm.auto import tqdm

    end_step = tcfg.steps if tcfg.stop_after is None else min(tcfg.steps, start_step + tcfg.stop_after)
    bar = tqdm(total=tcfg.steps, initial=start_step, disable=not (is_main and tcfg.progress), dynamic_ncols=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    started, window_tokens, window_start = time.perf_counter(), 0, time.perf_counter()
    for step in range(start_step, end_step):
        # One optimizer step: grad_accum micro-batches, gradients averaged over ranks.
        logging_step = (step + 1) % tcfg.log_every == 0 or step + 1 == end_step
        health = RouterHealth(model.base_model) if logging_step else None
        lm_total, aux_total = 0.0, {}
        for micro in range(tcfg.grad_accum):
            batch = to_device(
                data.train_batch(step * tcfg.grad_accum + micro, tcfg.batch_size, rank, world_size), device
            )
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tcfg.bf16):
                if health is not None and micro == tcfg.grad_accum - 1:
                    with health:
                        out = model(**batch)
                else:
                    out = model(**batch)
            loss = out.loss + model.aux_loss()
            (loss / tcfg.grad_accum).backward()
            lm_total += out.loss.item() / tcfg.grad_accum
            for name, value in model.aux_loss_terms().items():
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
            record = {
                "step": step + 1,
                "type": "train",
                "loss": lm_total + sum(config.molora.aux_losses[k] * v for k, v in aux_total.items()),
                "lm_loss": lm_total,
                **{f"aux/{k}": v for k, v in aux_total.items()},
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": tokens_per_s,
                "grad_norm": grad_norm,
                **health.summary(),
            }
            log(record)
            bar.set_postfix(loss=f"{lm_total:.3f}", tok_s=f"{tokens_per_s:.0f}")
            window_tokens, window_start = 0, time.perf_counter()
        if tcfg.eval_every and (step + 1) % tcfg.eval_every == 0 and step + 1 < tcfg.steps:
            results = evaluate(model, data, config, device)
            log({"step": step + 1, "type": "eval", **{f"eval/{k}": v["loss"] for k, v in results.items()}})
        if is_main and ((tcfg.save_every and (step + 1) % tcfg.save_every == 0) or step + 1 == end_step):
            save_checkpoint(
                run_dir, model, optimizer, scheduler, step + 1, {"eval_before": before}, tcfg.keep_checkpoints
            )
    bar.close()
    seconds = time.perf_counter() - started

    if end_step < tcfg.steps:  # stopped early on request; --resume continues from the checkpoint
        return {"before": before, "stopped_at": end_step}
    after = evaluate(model, data, config, device)
    log({"step": tcfg.steps, "type": "eval", **{f"eval/{k}": v["loss"] for k, v in after.items()}})
    result = {"before": before, "after": after, "steps": tcfg.steps, "seconds": seconds, "world_size": world_size}
    if world_size > 1:  # every rank must hold the same adapter; a cheap order-sensitive checksum proves it
        flat = torch.cat([p.detach().flatten() for p in trainable]).double()
        checksum = torch.stack(
            [
                flat.sum(),
                flat.abs().sum(),
                (flat * torch.linspace(1, 2, flat.numel(), dtype=torch.float64, device=flat.device)).sum(),
            ]
        )
        gathered = [torch.zeros_like(checksum) for _ in range(world_size)]
        dist.all_gather(gathered, checksum)
        if not all(torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError(f"adapters differ across ranks: {[g.tolist() for g in gathered]}")
        result["ranks_identical"] = True
    if is_main:
        model.save_pretrained(run_dir / "adapter")
        atomic_write(run_dir / "eval.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
        _write_summary(run_dir, config, before, after, tcfg.steps, seconds, model.get_nb_trainable_parameters()[0])
    if world_size > 1:
        dist.barrier()
    return result
