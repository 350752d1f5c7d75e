"""The training loop, in parts that each read on their own: prepare, resume (molora.run.resume), step (with the NaN
guard), log, finish.

Runs unchanged under `torchrun --nproc_per_node=N`: each rank takes its slice of every global batch, gradients
are averaged with all_reduce, and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from molora.analysis.routing_report import write_report
from molora.core.rank_gates import effective_ranks, scheduled_fraction, set_active_fraction
from molora.core.recording import RoutingRecorder, health_summary
from molora.model import MoLoRAModel
from molora.run.base_models import load_run_base
from molora.run.checkpoint import NonFiniteError, RunLock, check_finite, checkpoint_folders, save_checkpoint
from molora.run.config import RunConfig
from molora.run.data import MultiDomainData
from molora.run.evaluation import CollapseAlarm, evaluate, peak_memory_mb, to_device, write_summary
from molora.run.reporting import check_reporters
from molora.run.resume import Progress, open_run_folder, resume_from_checkpoint
from molora.run.setup import build_model, lr_factor, make_optimizer, setup_distributed
from molora.run.sharding import check_sharding, full, gathered_optimizer_state, shard_model, whole_adapter_state
from molora.run.state import Run
from molora.run.trainer_state import rng_state
from molora.utils import atomic_write


def aux_loss(model: nn.Module) -> torch.Tensor | float:
    return model.aux_loss() if isinstance(model, MoLoRAModel) else 0.0


def aux_terms(model: nn.Module) -> dict[str, torch.Tensor]:
    return model.aux_loss_terms() if isinstance(model, MoLoRAModel) else {}


def prepare_run(config: RunConfig, run_dir: Path) -> Run:
    """Seed, load the base model and data, build the adapter and its optimizer; writes nothing."""
    check_reporters(config.train.report_to)  # a missing package is named before the model loads
    rank, world_size, device = setup_distributed()
    check_sharding(config.train.sharding, world_size, config.model.quantization)
    tcfg = config.train
    torch.manual_seed(tcfg.seed)
    random.seed(tcfg.seed)
    base, tokenizer = load_run_base(config, device)
    data = MultiDomainData(config.data, tokenizer, order_seed=tcfg.seed)
    model = build_model(base, config).to(device)
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if world_size > 1:  # identical starting adapters on every rank
        for param in trainable:
            dist.broadcast(param.data, src=0)
    if config.train.sharding == "fsdp":
        shard_model(model)  # the parameters become shards: the optimizer is built on these
        trainable = [p for p in model.parameters() if p.requires_grad]
    run = Run(config, run_dir, model, data, device, rank, world_size, trainable)
    run.alarm = CollapseAlarm(tcfg.alarm_evals, tcfg.alarm_entropy_ratio)
    if trainable and config.model.adapter != "none":
        run.optimizer = make_optimizer(model, config)
        run.scheduler = torch.optim.lr_scheduler.LambdaLR(
            run.optimizer, lambda s: lr_factor(s, tcfg.warmup_steps, tcfg.steps, tcfg.min_lr_ratio)
        )
    return run


def evaluate_and_log(run: Run, step: int, bar=None) -> tuple[dict[str, Any], RoutingRecorder | None]:
    recorder = run.model.record_routing(domains=run.data.names) if run.routed else None
    results = evaluate(run.model, run.data, run.config, run.device, recorder)
    run.log({"step": step, "type": "eval", **{f"eval/{k}": v["loss"] for k, v in results.items()}})
    if run.routed and (run.config.molora.rank_gates or run.config.train.rank_schedule is not None):
        ranks = effective_ranks(run.model)
        mean = sum(map(sum, ranks.values())) / sum(map(len, ranks.values()))
        run.log({"step": step, "type": "ranks", "mean_rank": mean, "ranks": ranks})
    if recorder is not None:
        stats = recorder.stats()
        if run.is_main:
            run.reporter.log_routing(step, stats)
        for message in run.alarm.check(stats):
            run.log({"step": step, "type": "alarm", "message": message})
            run.say(f"ALARM step {step}: {message}", bar)
            if run.is_main and bar is not None:
                bar.set_postfix_str("ALARM: routing collapse, see metrics.jsonl")
    return results, recorder


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_run_checkpoint(run: Run, progress: Progress) -> None:
    """Every rank calls it: each one's random state is gathered, and, sharded, the adapter and the optimizer state
    are gathered whole (so the checkpoint has the single-process layout); rank 0 writes."""
    rng = rng_state()
    rng_ranks = None
    if run.world_size > 1:  # every rank's own random state: dropout and jitter differ per rank
        rng_ranks = [None] * run.world_size
        dist.all_gather_object(rng_ranks, rng)
    if run.sharded:
        adapter, optimizer = whole_adapter_state(run.model), gathered_optimizer_state(run.optimizer)
        save = functools.partial(run.model.save_pretrained, state_dict=adapter)
    elif run.is_main:
        adapter, optimizer, save = trainable_tensors(run.model), run.optimizer.state_dict(), run.model.save_pretrained
    if not run.is_main:
        return
    state = {
        "optimizer": optimizer,
        "scheduler": run.scheduler.state_dict(),
        "rng": rng,
        "rng_ranks": rng_ranks,
        "eval_before": progress.before,
        "bad_steps": progress.bad_steps,
        "config": run.config.to_dict(),
    }
    save_checkpoint(run.run_dir, adapter, save, state, progress.step, run.config.train.keep_checkpoints)


def train(config: RunConfig, run_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Fine-tune config.model on config.data with the adapter in config.model/molora; returns eval before/after."""
    run = prepare_run(config, Path(run_dir))  # everything validated before the run folder is touched
    lock = RunLock(run.run_dir).acquire() if run.is_main else None
    try:
        if run.optimizer is None:  # nothing to train: evaluate the model as it is
            open_run_folder(run, 0)
            results, _ = evaluate_and_log(run, 0)
            return _finish(run, results, results, 0, 0.0, None, evaluate_validation(run, 0))
        progress = resume_from_checkpoint(run) if resume else Progress()
        open_run_folder(run, progress.step)
        if run.routed and run.is_main:
            print(run.model.injection_report)
        if progress.before is None:
            progress.before = evaluate_and_log(run, 0)[0] if run.config.train.eval_at_start else {}
        return _train_loop(run, progress)
    finally:
        run.reporter.close()
        if lock is not None:
            lock.release()


def _train_loop(run: Run, progress: Progress) -> dict[str, Any]:
    from tqdm.auto import tqdm

    tcfg = run.config.train
    start_step = progress.step
    end_step = tcfg.steps if tcfg.stop_after is None else min(tcfg.steps, start_step + tcfg.stop_after)
    bar = tqdm(total=tcfg.steps, initial=start_step, disable=not (run.is_main and tcfg.progress), dynamic_ncols=True)
    run.model.train()
    started, window = time.perf_counter(), Window()
    for step in range(start_step, end_step):
        if tcfg.rank_schedule is not None:
            set_active_fraction(run.model, scheduled_fraction(tcfg.rank_schedule, step, tcfg.steps))
        logging_step = (step + 1) % tcfg.log_every == 0 or step + 1 == end_step
        result = train_step(run, step, record_health=logging_step)
        window.tokens += result.tokens
        if not result.finite:
            handle_bad_step(run, progress, step + 1, result, bar)
        progress.step = step + 1
        bar.update(1)
        if logging_step:
            log_train_step(run, progress, result, window, bar)
        if tcfg.eval_every and (step + 1) % tcfg.eval_every == 0 and step + 1 < tcfg.steps:
            evaluate_and_log(run, step + 1, bar)
        if (tcfg.save_every and (step + 1) % tcfg.save_every == 0) or step + 1 == end_step:
            save_run_checkpoint(run, progress)
    bar.close()
    seconds = time.perf_counter() - started
    if end_step < tcfg.steps:  # stopped early on request; --resume continues from the checkpoint
        return {"before": progress.before, "stopped_at": end_step}
    set_active_fraction(run.model, None)
    after, recorder = evaluate_and_log(run, tcfg.steps)
    after_val = evaluate_validation(run, tcfg.steps)
    return _finish(run, progress.before, after, end_step - start_step, seconds, recorder, after_val)


def evaluate_validation(run: Run, step: int) -> dict[str, Any] | None:
    """The validation split's results (data.val_fraction > 0), else None."""
    if not run.config.data.val_fraction:
        return None
    results = evaluate(run.model, run.data, run.config, run.device, split="val")
    run.log({"step": step, "type": "val", **{f"val/{k}": v["loss"] for k, v in results.items()}})
    return results


@dataclass
class Window:
    """Tokens and time since the last logged step, for tokens/s."""

    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)


@dataclass
class StepResult:
    lm_loss: float
    aux: dict[str, float]
    grad_norm: float
    tokens: int
    health: RoutingRecorder | None
    finite: bool = True
    bad_router: str | None = None  # first layer whose router output was not finite, when one was


def train_step(run: Run, step: int, record_health: bool) -> StepResult:
    """One optimizer step: grad_accum micro-batches, gradients averaged over ranks, skipped if not finite."""
    tcfg, model = run.config.train, run.model
    health = model.record_routing() if record_health and run.routed else None
    lm_total, aux_total, tokens = 0.0, {}, 0
    for micro in range(tcfg.grad_accum):
        index = step * tcfg.grad_accum + micro
        batch = to_device(run.data.train_batch(index, tcfg.batch_size, run.rank, run.world_size), run.device)
        if not run.routed:
            batch = {k: v for k, v in batch.items() if k not in ("task_ids", "prompt_mask")}
        recording = health if health is not None and micro == tcfg.grad_accum - 1 else contextlib.nullcontext()
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=tcfg.bf16), recording:
            out = model(**batch)
        loss = out.loss + aux_loss(model)
        (loss / tcfg.grad_accum).backward()
        lm_total += out.loss.item() / tcfg.grad_accum
        for name, value in aux_terms(model).items():
            aux_total[name] = aux_total.get(name, 0.0) + value.item() / tcfg.grad_accum
        tokens += int(batch["attention_mask"].sum()) * run.world_size
    if run.world_size > 1 and not run.sharded:  # FSDP reduce-scatters the gradients itself
        for param in run.trainable:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad)
            param.grad /= run.world_size
    clip = tcfg.max_grad_norm if tcfg.max_grad_norm is not None else float("inf")
    grad_norm = float(full(torch.nn.utils.clip_grad_norm_(run.trainable, clip)))
    result = StepResult(lm_total, aux_total, grad_norm, tokens, health)
    # A non-finite gradient anywhere makes the norm non-finite, on every rank alike (it is taken after all_reduce).
    result.finite = all(math.isfinite(v) for v in (lm_total, grad_norm, *aux_total.values()))
    if result.finite:
        run.optimizer.step()
    else:
        result.bad_router = first_nonfinite_router(model)
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return result


def first_nonfinite_router(model: nn.Module) -> str | None:
    """The first adapted layer (in module order) whose last router output holds NaN or inf."""
    if not isinstance(model, MoLoRAModel):
        return None
    for name, layer in model.named_modules():
        route = getattr(layer, "last_route", None)
        if route is not None and not bool(torch.isfinite(route[0].logits).all()):
            return name.removeprefix("base_model.")
    return None


def handle_bad_step(run: Run, progress: Progress, step: int, result: StepResult, bar) -> None:
    """Skip the step while train.max_bad_steps allows, else stop with what went wrong (nothing is saved)."""
    values = {"lm_loss": result.lm_loss, **{f"aux/{k}": v for k, v in result.aux.items()}}
    terms = [k for k, v in values.items() if not math.isfinite(v)]
    if not math.isfinite(result.grad_norm):
        terms.append("grad_norm")
    where = f"; first layer whose router produced non-finite values: {result.bad_router}" if result.bad_router else ""
    what = f"step {step}: non-finite {', '.join(terms)}{where}"
    progress.bad_steps += 1
    if progress.bad_steps > run.config.train.max_bad_steps:
        last = checkpoint_folders(run.run_dir)
        kept = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written"
        raise NonFiniteError(
            f"{what}; stopping ({kept}; train.max_bad_steps={run.config.train.max_bad_steps} allows skipping such "
            "steps)"
        )
    run.log(
        {"step": step, "type": "bad_step", "terms": terms, "router": result.bad_router, "bad_steps": progress.bad_steps}
    )
    run.say(f"skipped {what} ({progress.bad_steps} of train.max_bad_steps={run.config.train.max_bad_steps})", bar)


def log_train_step(run: Run, progress: Progress, result: StepResult, window: Window, bar) -> None:
    elapsed = time.perf_counter() - window.start
    tokens_per_s = window.tokens / max(elapsed, 1e-9)
    weighted_aux = sum(run.config.molora.aux_losses[k] * v for k, v in result.aux.items())
    run.log(
        {
            "step": progress.step,
            "type": "train",
            "loss": result.lm_loss + weighted_aux,
            "lm_loss": result.lm_loss,
            **{f"aux/{k}": v for k, v in result.aux.items()},
            "lr": run.scheduler.get_last_lr()[0],
            "tokens_per_s": tokens_per_s,
            "grad_norm": result.grad_norm,
            "bad_steps": progress.bad_steps,
            **(health_summary(result.health) if result.health is not None else {}),
        }
    )
    bar.set_postfix(loss=f"{result.lm_loss:.3f}", tok_s=f"{tokens_per_s:.0f}")
    window.tokens, window.start = 0, time.perf_counter()


def _finish(
    run: Run, before: dict, after: dict, steps_run: int, seconds: float, recorder, after_val: dict | None = None
) -> dict[str, Any]:
    """Check ranks agree, then (rank 0) write adapter/, eval.json, summary.md and routing/ (sharded: the adapter
    gathered whole on every rank first)."""
    config, trainable = run.config, run.trainable if run.optimizer is not None else []
    whole = whole_adapter_state(run.model) if run.sharded and trainable else None
    result = {
        "before": before,
        "after": after,
        "after_val": after_val,  # the validation split (data.val_fraction > 0), else None
        "steps": config.train.steps if trainable else 0,
        "seconds": seconds,
        "seconds_per_step": seconds / steps_run if steps_run else None,
        "world_size": run.world_size,
        "trainable_params": sum(p.numel() for p in trainable),
        "peak_memory_mb": peak_memory_mb(run.device),
    }
    if run.world_size > 1 and trainable:  # every rank must hold the same adapter; a cheap order-sensitive checksum
        tensors = list(whole.values()) if whole is not None else trainable
        flat = torch.cat([p.detach().flatten() for p in tensors]).double()
        ramp = torch.linspace(1, 2, flat.numel(), dtype=torch.float64, device=flat.device)
        checksum = torch.stack([flat.sum(), flat.abs().sum(), (flat * ramp).sum()])
        gathered = [torch.zeros_like(checksum) for _ in range(run.world_size)]
        dist.all_gather(gathered, checksum)
        if not all(torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError(f"adapters differ across ranks: {[g.tolist() for g in gathered]}")
        result["ranks_identical"] = True
    if run.is_main:
        if trainable:
            check_finite(whole or trainable_tensors(run.model), "final adapter")
            run.model.save_pretrained(run.run_dir / "adapter", **({} if whole is None else {"state_dict": whole}))
        if run.routed and config.molora.rank_gates:  # what the gates kept, in the injection report
            run.model.injection_report.effective_ranks = result["effective_ranks"] = effective_ranks(run.model)
            print(run.model.injection_report)
        if recorder is not None:
            title = f"Routing of {run.run_dir.name} on the eval sets"
            stats = write_report(recorder, run.run_dir / "routing", title=title)
            result["routing"] = {k: v for k, v in stats["aggregate"].items() if k != "layer_expert_load"}
        atomic_write(run.run_dir / "eval.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
        write_summary(run.run_dir, config, before, after, result["steps"], seconds, result["trainable_params"])
    if run.world_size > 1:
        dist.barrier()
    return result
