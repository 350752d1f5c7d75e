"""Router ablation: the same data, seed, steps and budget for every row; one table.

An ablation config is a run config (model / data / molora / train) plus an `ablation` section:
    ablation:
      rows:  [{name: softmax, molora: {router: softmax}}, {name: peft-lora, model: {adapter: peft-lora}}, ...]
      quick: {train: {steps: 30}, ...}     # merged into every row by --quick
Each row runs in a fresh process (so its peak memory is its own, and a crash is reported, not fatal).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from molora.run_config import RunConfig, check_keys
from molora.utils import atomic_write, atomic_write_text


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_ablation(path: str | Path, quick: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """[(row name, full run config dict)], validated before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ablation config {path} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    ablation = spec.pop("ablation", None)
    if not ablation or not ablation.get("rows"):
        raise ValueError(f"{path}: needs an `ablation: {{rows: [...]}}` section")
    unknown = set(ablation) - {"rows", "quick"}
    if unknown:
        raise ValueError(f"{path}: unknown keys in ablation: {sorted(unknown)} (known: rows, quick)")
    rows = []
    for row in ablation["rows"]:
        row = dict(row)
        name = row.pop("name", None)
        if not name or not isinstance(name, str):
            raise ValueError(f"{path}: every ablation row needs a name, got {row}")
        merged = deep_merge(spec, row)
        if quick:
            merged = deep_merge(merged, ablation.get("quick") or {})
        check_keys(merged)
        rows.append((name, merged))
    names = [n for n, _ in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: row names must be unique, got {names}")
    return rows


def _run_row(name: str, spec: dict[str, Any], row_dir: Path, inline: bool) -> dict[str, Any]:
    row_dir.mkdir(parents=True, exist_ok=True)
    config_path = row_dir / "row.yaml"
    atomic_write_text(config_path, yaml.safe_dump(spec, sort_keys=False))
    started = time.perf_counter()
    if inline:  # for tests: no fresh process, so peak memory is the harness's own
        from molora.training import train

        try:
            train(RunConfig.from_dict(spec), row_dir / "run")
        except Exception as err:  # a failed row is reported, not fatal
            return {"row": name, "status": "failed", "error": f"{type(err).__name__}: {err}"}
    else:
        command = [
            sys.executable,
            "-m",
            "molora.cli",
            "--config",
            str(config_path),
            "--output-dir",
            str(row_dir / "run"),
            "train.progress=false",
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with (row_dir / "log.txt").open("w") as log:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        if done.returncode != 0:
            lines = (row_dir / "log.txt").read_text().strip().splitlines()
            error = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
            return {"row": name, "status": "failed", "error": error.strip()[:300]}
    result = json.loads((row_dir / "run" / "eval.json").read_text())
    after = result["after"]
    row = {
        "row": name,
        "status": "ok",
        "trainable_params": result["trainable_params"],
        **{f"loss/{d}": v["loss"] for d, v in after.items() if d != "mean"},
        "loss/mean": after["mean"]["loss"],
        "step_s": result["seconds_per_step"],
        "peak_mem_mb": result["peak_memory_mb"],
        "routing_mi": (result.get("routing") or {}).get("mi_normalized"),
        "dead_experts": (result.get("routing") or {}).get("dead_experts"),
        "wall_s": time.perf_counter() - started,
    }
    return row


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_outputs(rows: list[dict[str, Any]], out: Path, command: str, wall_s: float) -> None:
    columns = ["row", "status", "trainable_params"]
    for row in rows:
        columns += [k for k in row if k not in columns and k != "error"]
    columns.append("error")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "ablation.csv", buffer.getvalue())

    shown = [c for c in columns if c not in ("status", "error", "wall_s")]
    lines = [
        "# Router ablation",
        "",
        f"Command: `{command}` — {wall_s / 60:.1f} min wall time. Eval losses are token-weighted held-out losses "
        "after training (the base row: no adapter). routing_mi is I(task; expert) / H(task) averaged over layers.",
        "",
        "| " + " | ".join(shown) + " |",
        "|" + "---|" * len(shown),
    ]
    for row in rows:
        if row["status"] == "ok":
            lines.append("| " + " | ".join(_fmt(row.get(c)) for c in shown) + " |")
        else:
            lines.append(f"| {row['row']} | failed: {row['error']} |" + " |" * (len(shown) - 2))
    lines += ["", "![mean eval loss per row](ablation.png)"]
    atomic_write_text(out / "ablation.md", "\n".join(lines) + "\n")
    _plot(rows, out / "ablation.png")


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(ok)), 3.5))
    ax.bar([r["row"] for r in ok], [r["loss/mean"] for r in ok], color="tab:blue")
    ax.set_ylabel("mean eval loss (lower is better)")
    low = min(r["loss/mean"] for r in ok)
    ax.set_ylim(bottom=max(0.0, low * 0.9))
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def run_ablation(config: str | Path, out: str | Path, quick: bool = False, inline: bool = False) -> list[dict]:
    rows_spec = load_ablation(config, quick)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = []
    for name, spec in rows_spec:
        print(f"[ablation] {name} ...", flush=True)
        rows.append(_run_row(name, spec, out / "rows" / name, inline))
        status = rows[-1]["status"]
        summary = f"mean eval loss {rows[-1]['loss/mean']:.3f}" if status == "ok" else rows[-1]["error"]
        print(f"[ablation] {name}: {status} ({summary})", flush=True)
        command = f"python -m train.ablate --config {config}" + (" --quick" if quick else "")
        write_outputs(rows, out, command, time.perf_counter() - started)  # partial tables survive a crash
    return rows
