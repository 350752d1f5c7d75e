"""The ablation harness: every row over the same seeds, data, steps and parameter budget; paired differences to a
baseline row with 95 % intervals; grid choices made on the validation split, results reported on eval.

An ablation config is a run config (model / data / molora / train) plus an `ablation` section:
    ablation:
      seeds: 3                                  # each seed changes adapter initialisation and data order
      baseline: peft-lora                       # differences are row - baseline, paired by seed
      match: {reference: peft-lora, tolerance: 0.02}   # trainable parameters within 2 % of the reference row
      rows:
        - {name: peft-lora, model: {adapter: peft-lora, peft_rank: 34}, grid: {train.lr: [5.0e-4, 1.0e-3, 2.0e-3]}}
        - {name: topk, molora: {router: topk}, grid: {train.lr: [5.0e-4, 1.0e-3, 2.0e-3]}}
        - {name: base-model, model: {adapter: none}}
      quick: {train: {steps: 30}}               # merged into every row by --quick
      quick_seeds: 1                            # seeds with --quick
A row with a `grid` runs each grid point on the first seed, keeps the one with the lowest mean validation loss, and
runs it on the other seeds. Each run is a fresh process (its peak memory is its own, a crash is reported, not fatal)
that leaves result.json in its folder; a rerun skips every run whose result.json holds the same config (resumable).
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from molora.ablation.report import write_outputs
from molora.ablation.spec import Ablation, Row, deep_merge, load_ablation
from molora.ablation.transfer import choose_elsewhere, narrowed, record
from molora.run.config import RunConfig
from molora.utils import atomic_write_text


def count_trainable(spec: dict[str, Any], base_cache: dict[str, Any]) -> int:
    """Trainable parameters of the adapter a run config builds (the model is built, counted and unloaded)."""
    from molora.run.base_models import load_base
    from molora.run.setup import build_model

    config = RunConfig.from_dict(spec)
    if config.model.adapter == "none":
        return 0
    if config.model.name not in base_cache:
        base_cache[config.model.name] = load_base(config.model.name, task=config.model.task)[0]
    model = build_model(base_cache[config.model.name], config)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.unload()
    return count


def check_matched(ablation: Ablation) -> dict[str, int]:
    """{variant: trainable parameters}; ValueError when a training row is off the reference by > tolerance."""
    cache: dict[str, Any] = {}
    counts = {}
    for row in ablation.rows:
        for name, spec in row.variants():
            try:
                counts[name] = count_trainable(spec, cache)
            except (ValueError, KeyError, FileNotFoundError) as err:
                raise ValueError(f"row {row.name!r} cannot build its adapter: {err}") from None
    if ablation.reference is None:
        return counts
    reference_row = next(r for r in ablation.rows if r.name == ablation.reference)
    reference = counts[reference_row.variants()[0][0]]
    off = [
        f"{name}: {counts[name]:,} ({counts[name] / reference - 1:+.1%})"
        for row in ablation.rows
        if row.trains and not row.allow_unmatched
        for name, _ in row.variants()
        if abs(counts[name] / reference - 1) > ablation.tolerance
    ]
    if off:
        raise ValueError(
            f"trainable parameters must be within {ablation.tolerance:.0%} of {ablation.reference!r} "
            f"({reference:,}); off: {'; '.join(off)} (resize the row, or mark it allow_unmatched: true)"
        )
    return counts


def run_one(
    variant: str, spec: dict[str, Any], seed: int, folder: Path, inline: bool, threads: int | None, train: bool = True
) -> dict | None:
    """One training run of one variant and seed; skipped when folder/result.json holds the same config.
    train=False only reads what is done: None when there is no such result."""
    spec = deep_merge(spec, {"train": {"seed": seed, "progress": False}})
    done = folder / "result.json"
    if done.is_file():
        previous = json.loads(done.read_text())
        if previous.get("spec") == spec and previous.get("status") == "ok":
            return previous
    if not train:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "row.yaml"
    atomic_write_text(config_path, yaml.safe_dump(spec, sort_keys=False))
    started = time.perf_counter()
    result: dict[str, Any] = {"variant": variant, "seed": seed, "spec": spec}
    if inline:  # for tests: no fresh process
        from molora.run.training import train

        try:
            train(RunConfig.from_dict(spec), folder / "run")
        except Exception as err:  # a failed run is reported, not fatal
            return {**result, "status": "failed", "error": f"{type(err).__name__}: {err}"}
    else:
        resume = ["--resume"] if any((folder / "run" / "checkpoints").glob("step-*")) else []
        command = [sys.executable, "-m", "molora.cli", "--config", str(config_path), "--output-dir"]
        command += [str(folder / "run"), *resume]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if threads:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        with (folder / "log.txt").open("a") as log:
            finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        if finished.returncode != 0:
            lines = (folder / "log.txt").read_text().strip().splitlines()
            error = next((ln for ln in reversed(lines) if "rror" in ln), lines[-1] if lines else "")
            return {**result, "status": "failed", "error": error.strip()[:300]}
    run = json.loads((folder / "run" / "eval.json").read_text())
    routing = run.get("routing") or {}
    result.update(
        status="ok",
        trainable_params=run["trainable_params"],
        eval=run["after"],
        val=run.get("after_val"),
        eval_before=run.get("before"),  # the base model's scores, where the run evaluated at start
        step_s=run["seconds_per_step"],
        peak_mem_mb=run["peak_memory_mb"],
        routing_mi=routing.get("mi_normalized"),
        dead_experts=routing.get("dead_experts"),
        wall_s=time.perf_counter() - started,
        threads=threads,
    )
    atomic_write_text(done, json.dumps(result, indent=1) + "\n")
    return result


def finished(ablation: Ablation, folder: Path) -> list[dict]:
    """The results already in `folder` whose config is the row's on this suite (nothing is trained)."""
    found = []
    for row in ablation.rows:
        for variant, spec in row.variants():
            for seed in ablation.seeds:
                result = run_one(variant, spec, seed, folder / "rows" / variant / f"seed{seed}", False, None, False)
                if result is not None:
                    found.append(result)
    return found


class SeedMajorPool:
    """`jobs` worker threads that take the waiting run with the lowest priority (seed, row position, ...) first.

    A plain executor runs in submission order, so a grid row's later seeds, submitted once its grid is decided, would
    wait behind every other row's last seed, and an interrupted ablation would lack the baseline's later seeds. Here
    they run before the next seed of the other rows: an interruption leaves whole seeds (paired samples)."""

    def __init__(self, jobs: int):
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()  # ties keep submission order (and never compare the callables)
        self._workers = [threading.Thread(target=self._work, daemon=True) for _ in range(jobs)]
        for worker in self._workers:
            worker.start()

    def submit(self, priority: tuple, fn, *args) -> Future:
        future: Future = Future()
        self._queue.put((priority, next(self._order), future, fn, args))
        return future

    def _work(self) -> None:
        while True:
            _, _, future, fn, args = self._queue.get()
            if future is None:  # shutdown
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as err:  # handed to whoever waits on the future
                    future.set_exception(err)

    def shutdown(self) -> None:
        """Let every queued run finish, then stop the workers."""
        for _ in self._workers:
            self._queue.put(((float("inf"),), next(self._order), None, None, None))
        for worker in self._workers:
            worker.join()


def val_loss(result: dict[str, Any]) -> float:
    if result.get("status") != "ok":
        return float("inf")
    if not result.get("val"):
        raise ValueError(f"{result['variant']}: a grid choice needs a validation split (data.val_fraction > 0)")
    return result["val"]["mean"]["loss"]


def run_ablation(
    config: str | Path,
    out: str | Path,
    quick: bool = False,
    inline: bool = False,
    seeds: int | None = None,
    jobs: int = 1,
    report_only: bool = False,
    suite: str | None = None,
    only: list[str] | None = None,
    choices_from: str | Path | None = None,
) -> list[dict]:
    """Every row over every seed (grid rows: choose on validation with the first seed); writes the tables as runs
    finish. jobs > 1 runs that many processes at once with cores/jobs threads each. report_only: train nothing,
    write the tables from the runs already done. suite: the rows on that suite's domains; only: train just these
    rows and the ones they are measured against, report every row's finished runs (load_ablation). choices_from:
    another suite's ablation folder; each grid row (those in `only`, else all) runs the point chosen there
    (molora.ablation.transfer)."""
    ablation = load_ablation(config, quick, seeds, suite, only)
    out = Path(out)
    if choices_from is not None:
        names = only if only is not None else [row.name for row in ablation.rows]
        chosen = choose_elsewhere(ablation, names, Path(choices_from))  # all checked before the folder is touched
        out.mkdir(parents=True, exist_ok=True)
        record(out, chosen, Path(choices_from))
    ablation = narrowed(ablation, out)
    counts = check_matched(ablation)
    out.mkdir(parents=True, exist_ok=True)
    jobs = 1 if inline else max(1, jobs)
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    command = f"python -m train.ablate --config {config}" + (" --quick" if quick else "")
    command += (f" --seeds {seeds}" if seeds is not None else "") + (f" --jobs {jobs}" if jobs > 1 else "")
    command += f" --suite {suite}" if suite is not None else ""
    command += f" --rows {','.join(only)}" if only is not None else ""
    command += f" --choices-from {choices_from}" if choices_from is not None else ""
    started = time.perf_counter()
    # the runs already done, in the tables from the start (the pool reaches them only when a worker is free)
    results: list[dict] = finished(ablation, out)
    done_before = {(r["variant"], r["seed"]) for r in results}
    if done_before:
        print(f"[ablation] {len(done_before)} runs already done in {out}: skipped", flush=True)
    lock = threading.Lock()  # jobs > 1: runs finish on several threads; one writes the tables at a time

    def launch(variant: str, spec: dict[str, Any], seed: int, row: str) -> dict:
        folder = out / "rows" / variant / f"seed{seed}"
        trains = not report_only and (ablation.trained is None or row in ablation.trained)
        result = run_one(variant, spec, seed, folder, inline, threads, train=trains)
        if result is None:  # report_only, not run yet
            return {"variant": variant, "seed": seed, "status": "pending"}
        if (variant, seed) in done_before:  # in the tables already, and announced as skipped
            return result
        with lock:
            results.append(result)  # each (variant, seed) launches once; finished ones returned above
            shown = f"eval {result['eval']['mean']['loss']:.3f}" if result["status"] == "ok" else result["error"]
            print(f"[ablation] {variant} seed {seed}: {result['status']} ({shown})", flush=True)
            write_outputs(ablation, results, counts, out, command, time.perf_counter() - started)
        return result

    first = ablation.seeds[0]
    position = {row.name: i for i, row in enumerate(ablation.rows)}
    pool = SeedMajorPool(jobs)
    try:
        with ThreadPoolExecutor(max(1, len(ablation.rows))) as coordinators:

            def grid_row(row: Row) -> list:
                """The grid on the first seed, then (as soon as it is done) the chosen point on the other seeds."""
                points = [
                    pool.submit((first, position[row.name], k), launch, name, spec, first, row.name)
                    for k, (name, spec) in enumerate(row.variants())
                ]
                tried = [f.result() for f in points]
                if any(r["status"] == "pending" for r in tried):
                    return []
                best = min(tried, key=val_loss)["variant"]
                spec = dict(row.variants())[best]
                later = ablation.seeds[1:]
                return [pool.submit((s, position[row.name], 0), launch, best, spec, s, row.name) for s in later]

            grids = [coordinators.submit(grid_row, row) for row in ablation.rows if row.grid]
            # seed-major: an interrupted ablation leaves whole seeds (paired samples) rather than whole rows
            plain = [
                pool.submit((seed, position[row.name], 0), launch, row.name, row.spec, seed, row.name)
                for seed in ablation.seeds
                for row in ablation.rows
                if not row.grid and (row.trains or seed == first)  # the base model trains nothing: once
            ]
            for future in plain + [f for grid in grids for f in grid.result()]:
                future.result()
    finally:
        pool.shutdown()
    write_outputs(ablation, results, counts, out, command, time.perf_counter() - started)
    return results
