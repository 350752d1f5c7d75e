"""Routing reports of a recording (molora.core.recording): CSV, the task x expert heatmaps, a markdown report."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from molora.core.recording import DEAD_LOAD_SHARE, RoutingRecorder
from molora.utils import atomic_write, atomic_write_text


def write_csv(recorder: RoutingRecorder, path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["layer", "task", "expert", "weight", "selections", "tokens"])
    names = recorder.task_names()
    for layer in recorder.layers:
        if not recorder.weight[layer]:
            continue
        weight, selected, tokens = recorder.matrices(layer)
        for t, task in enumerate(names):
            for e in range(weight.shape[1]):
                writer.writerow([layer, task, e, f"{float(weight[t, e]):.6g}", int(selected[t, e]), int(tokens[t])])
    atomic_write_text(path, buffer.getvalue())


def _short(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[-3:]) if len(parts) > 3 else name


def task_expert_figure(stats: dict[str, Any]):
    """The task x expert heatmap (one panel per layer) as an open matplotlib figure, None without layers: the run
    folder's task_expert.png and the reporters (molora.run.reporting) draw the same picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = stats["layers"]
    if not layers:
        return None
    names = list(layers)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols, 0.4 * len(stats["tasks"]) * rows + 1.5 * rows), squeeze=False
    )
    for ax, name in zip(axes.flat, names, strict=False):
        ax.imshow(layers[name]["task_expert"], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"{_short(name)}\nMI {layers[name]['mi_normalized']:.2f}", fontsize=7)
        ax.set_yticks(range(len(stats["tasks"])), stats["tasks"], fontsize=6)
        ax.set_xticks(range(len(layers[name]["load"])))
        ax.tick_params(axis="x", labelsize=6)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle("share of each task's routing weight per expert")
    fig.tight_layout()
    return fig


def write_heatmaps(stats: dict[str, Any], directory: Path) -> list[str]:
    """task_expert.png (one panel per layer) and layer_expert.png; returns the file names."""
    import matplotlib.pyplot as plt

    fig = task_expert_figure(stats)
    if fig is None:
        return []
    layers, names = stats["layers"], list(stats["layers"])
    files = ["task_expert.png"]
    atomic_write(directory / files[0], lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    widths = {len(s["load"]) for s in layers.values()}
    if len(widths) == 1:  # the overview needs one expert count across layers
        fig, ax = plt.subplots(figsize=(5, 0.22 * len(names) + 1.5))
        image = ax.imshow([layers[n]["load"] for n in names], cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(names)), [_short(n) for n in names], fontsize=6)
        ax.set_xlabel("expert")
        ax.set_title("load per layer (share of routing weight)")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        files.append("layer_expert.png")
        atomic_write(directory / files[1], lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)
    return files


def write_report(recorder: RoutingRecorder, directory: str | Path, title: str = "Routing report") -> dict:
    """stats.json, routing.csv, heatmaps and report.md in `directory`; returns the stats."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stats = recorder.stats()
    atomic_write_text(directory / "stats.json", json.dumps(stats, indent=1) + "\n")
    write_csv(recorder, directory / "routing.csv")
    images = write_heatmaps(stats, directory)
    agg = stats["aggregate"]
    lines = [f"# {title}", ""]
    if stats["layers"]:
        lines += [
            f"Tasks: {', '.join(stats['tasks'])}. Averages over {len(stats['layers'])} MoLoRA layers: "
            f"routing entropy {agg['entropy']:.3f} nats, load CV {agg['load_cv']:.3f}, "
            f"I(task; expert) {agg['mi_bits']:.3f} bits ({agg['mi_normalized']:.1%} of H(task)); "
            f"dead experts (< {DEAD_LOAD_SHARE:g}/E of the load): {agg['dead_experts']}.",
            "",
            "| layer | entropy | load CV | dead | MI bits | MI / H(task) |",
            "|---|---|---|---|---|---|",
        ]
        for name, s in stats["layers"].items():
            lines.append(
                f"| {name} | {s['entropy']:.3f} | {s['load_cv']:.3f} | {s['dead_experts']} | "
                f"{s['mi_bits']:.3f} | {s['mi_normalized']:.3f} |"
            )
        lines += [""] + [f"![{image}]({image})" for image in images]
    else:
        lines.append("No routing was recorded.")
    atomic_write_text(directory / "report.md", "\n".join(lines) + "\n")
    return stats
