"""Writers for a RankReport (analysis.ranks): ranks.md (recommendations, a summary per module type, every spectrum),
ranks.csv (one line per spectrum) and ranks.png (cumulative spectral energy, coloured by module type)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import torch

from molora.analysis.ranks import ENERGIES, RECOMMEND_AT, RankReport, Spectrum
from molora.utils import atomic_write, atomic_write_text

BASE_ONLY_NOTE = (
    "Base weights only: nothing is recommended. A pretrained weight's spectrum says how many directions the map "
    "spreads over (typically a large share of min(d_out, d_in)), not how many an update needs: that depends on the "
    "data and the task, and shows only in a trained adapter. Train with a generous rank and analyse the run "
    "(`molora-ranks --run RUN`). What the base spectra can show: modules with a steep spectrum (a small rank@90%) "
    "are nearly low-rank maps already."
)


def _label(energy: float) -> str:
    return f"rank@{round(energy * 100)}%"


def module_type(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def kind_class(spectrum: Spectrum) -> str:
    return spectrum.kind.split(" ", 1)[0]  # base, expert, shared, task


def rank_table(report: RankReport) -> list[dict[str, Any]]:
    """One row per spectrum; `needed` and `recommended` repeat the module's on each of its rows."""
    rows = []
    for spectrum in report.spectra:
        row = {"module": spectrum.module, "module_type": module_type(spectrum.module), "kind": spectrum.kind}
        row |= {"trained_rank": spectrum.rank, "directions": len(spectrum.singular_values)}
        row |= {_label(e): spectrum.effective(e) for e in ENERGIES}
        row["top_singular_value"] = max(spectrum.singular_values, default=0.0)
        row["needed"] = report.needed.get(spectrum.module)
        row["recommended"] = report.recommended.get(spectrum.module)
        rows.append(row)
    return rows


def _recommendations(report: RankReport) -> list[str]:
    trained = {s.module: s.rank for s in report.spectra if s.rank is not None}
    from_tasks = {s.module for s in report.spectra if kind_class(s) == "task"}
    percent = round(RECOMMEND_AT * 100)
    lines = [
        "## Recommended rank per module",
        "",
        f"Rule: `needed` is the {percent} % effective rank of each task's routing-weighted mean update (of each "
        "expert's update where no routing was recorded), the largest over tasks; `recommended` rounds it up to a "
        "power of two and clips it to [1, trained rank].",
        "",
        "| module | trained rank | needed | from | recommended |",
        "|---|---|---|---|---|",
    ]
    for module, rank in report.recommended.items():
        source = "tasks" if module in from_tasks else "experts"
        lines.append(f"| {module} | {trained[module]} | {report.needed[module]} | {source} | {rank} |")
    clipped = [m for m in report.recommended if report.needed[m] > trained[m]]
    if clipped:
        lines += [
            "",
            f"In {len(clipped)} of {len(report.recommended)} modules a task's update spans more directions than one "
            "expert's rank: the mixture of experts, not a single expert, carries it there. The rule keeps the trained "
            "rank; only a run with a larger one can tell whether more would help.",
        ]
    return lines


def _summary(report: RankReport) -> list[str]:
    """Mean and range of the recommended-energy rank per (module type, kind): the long table in a few lines."""
    groups: dict[tuple[str, str], list[Spectrum]] = {}
    for spectrum in report.spectra:
        groups.setdefault((module_type(spectrum.module), kind_class(spectrum)), []).append(spectrum)
    label = _label(RECOMMEND_AT)
    lines = ["## By module type", "", f"| module type | kind | spectra | directions | {label} mean | min | max |"]
    lines.append("|---|---|---|---|---|---|---|")
    for (mtype, kind), spectra in groups.items():
        ranks = [s.effective(RECOMMEND_AT) for s in spectra]
        directions = max(len(s.singular_values) for s in spectra)
        mean = sum(ranks) / len(ranks)
        lines.append(f"| {mtype} | {kind} | {len(spectra)} | {directions} | {mean:.1f} | {min(ranks)} | {max(ranks)} |")
    return lines


def rank_markdown(report: RankReport, title: str) -> str:
    energies = "/".join(str(round(e * 100)) for e in ENERGIES)
    lines = [f"# {title}", "", f"Effective rank: the fewest singular directions holding {energies} % of sum(s^2).", ""]
    lines += _recommendations(report) if report.recommended else [BASE_ONLY_NOTE]
    lines += ["", *_summary(report), "", "## Spectra", ""]
    lines.append("| module | kind | directions | " + " | ".join(_label(e) for e in ENERGIES) + " | top s |")
    lines.append("|---|---|---|" + "---|" * (len(ENERGIES) + 1))
    for row in rank_table(report):
        ranks = " | ".join(str(row[_label(e)]) for e in ENERGIES)
        top = f"{row['top_singular_value']:.4g}"
        lines.append(f"| {row['module']} | {row['kind']} | {row['directions']} | {ranks} | {top} |")
    return "\n".join(lines) + "\n"


def _curve(spectrum: Spectrum) -> list[float] | None:
    power = torch.tensor(spectrum.singular_values, dtype=torch.float64).square()
    if not len(power) or power.sum() == 0:
        return None
    return (power.sort(descending=True).values.cumsum(0) / power.sum()).tolist()


def _plot(report: RankReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_tasks = any(kind_class(s) == "task" for s in report.spectra)
    updates = ("task updates", {"task"}) if has_tasks else ("expert updates", {"expert", "shared"})
    panels = [p for p in (("base weights", {"base"}), updates) if any(kind_class(s) in p[1] for s in report.spectra)]
    types = sorted({module_type(s.module) for s in report.spectra})
    colours = {t: plt.get_cmap("tab10")(i % 10) for i, t in enumerate(types)}
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, kinds) in zip(axes[0], panels, strict=True):
        for spectrum in report.spectra:
            curve = _curve(spectrum) if kind_class(spectrum) in kinds else None
            if curve is not None:
                ax.plot(
                    range(1, len(curve) + 1), curve, color=colours[module_type(spectrum.module)], alpha=0.35, lw=0.8
                )
        ax.axhline(RECOMMEND_AT, color="grey", lw=0.6, ls="--")
        ax.set(title=f"cumulative spectral energy: {title}", xlabel="k", ylabel="energy of the top k", ylim=(0, 1.02))
        ax.set_xscale("log")
    handles = [plt.Line2D([], [], color=colours[t], label=t) for t in types]
    axes[0][-1].legend(handles=handles, loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write_rank_report(report: RankReport, directory: Path, title: str = "Rank analysis") -> list[Path]:
    """ranks.md, ranks.csv and ranks.png in `directory` (created); returns their paths."""
    if not report.spectra:
        raise ValueError("the rank report holds no spectra (no targeted module was analysed)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / "ranks.md", rank_markdown(report, title))
    rows = rank_table(report)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(directory / "ranks.csv", buffer.getvalue())
    _plot(report, directory / "ranks.png")
    return [directory / name for name in ("ranks.md", "ranks.csv", "ranks.png")]
