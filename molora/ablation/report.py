"""The ablation's tables and plot: ablation.csv (one line per run), ablation.md (per row: mean over seeds, paired
differences to the baseline with 95 % intervals, the grid choices), ablation.png (the differences and intervals)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from molora.analysis.stats import Interval, mean_interval, paired_interval
from molora.utils import atomic_write, atomic_write_text

if TYPE_CHECKING:
    from molora.ablation.spec import Ablation, Row


def chosen_variant(row: Row, results: list[dict], first_seed: int) -> str | None:
    """The variant a row reports: its grid point with the lowest first-seed validation loss (None: none yet)."""
    variants = [name for name, _ in row.variants()]
    if len(variants) == 1:
        return variants[0]
    tried = [r for r in results if r["variant"] in variants and r["seed"] == first_seed and r["status"] == "ok"]
    if len(tried) < len(variants) or any(not r.get("val") for r in tried):
        return None
    return min(tried, key=lambda r: r["val"]["mean"]["loss"])["variant"]


def by_seed(results: list[dict], variant: str | None) -> dict[int, dict]:
    return {r["seed"]: r for r in results if r["variant"] == variant and r["status"] == "ok"}


def domains_of(results: list[dict]) -> list[str]:
    for r in results:
        if r["status"] == "ok":
            return [d for d in r["eval"] if d != "mean"]
    return []


def metric(result: dict, domain: str, key: str) -> float | None:
    return result["eval"].get(domain, {}).get(key)


def summarise(ablation: Ablation, results: list[dict], counts: dict[str, int]) -> list[dict[str, Any]]:
    """One dict per row: the chosen variant, means over seeds and the paired differences to the baseline."""
    first = ablation.seeds[0]
    chosen = {row.name: chosen_variant(row, results, first) for row in ablation.rows}
    base_runs = by_seed(results, chosen.get(ablation.baseline)) if ablation.baseline else {}
    reference = None
    if ablation.reference is not None:
        ref_row = next(r for r in ablation.rows if r.name == ablation.reference)
        reference = counts.get(ref_row.variants()[0][0])
    domains = domains_of(results)
    label_domains = [d for d in domains if any(metric(r, d, "label_acc") is not None for r in results if "eval" in r)]
    summary = []
    for row in ablation.rows:
        runs = by_seed(results, chosen[row.name])
        entry: dict[str, Any] = {"row": row.name, "variant": chosen[row.name], "seeds": len(runs)}
        params = counts.get(chosen[row.name] or row.variants()[0][0])
        entry["params"] = params
        entry["params_ratio"] = None if not reference or not row.trains or params is None else params / reference
        if not runs:
            summary.append(entry)
            continue

        compared = bool(base_runs) and row.name != ablation.baseline and row.trains

        def values(key_fn, runs=runs) -> dict[int, float]:
            return {s: v for s, r in runs.items() if (v := key_fn(r)) is not None}

        def paired(key_fn, runs=runs, compared=compared) -> Interval | None:
            return paired_interval(values(key_fn, runs), values(key_fn, base_runs)) if compared else None

        mean_loss = lambda r: r["eval"]["mean"]["loss"]  # noqa: E731
        entry["loss"] = mean_interval(list(values(mean_loss).values()))
        val_loss = lambda r: (r.get("val") or {}).get("mean", {}).get("loss")  # noqa: E731
        entry["val_loss"] = mean_interval(list(values(val_loss).values())) if values(val_loss) else None
        entry["d_loss"] = paired(mean_loss)
        entry["d_domain"] = {d: paired(lambda r, d=d: metric(r, d, "loss")) for d in domains}
        entry["loss_domain"] = {
            d: mean_interval(list(values(lambda r, d=d: metric(r, d, "loss")).values())) for d in domains
        }
        entry["token_acc"] = mean_interval(list(values(lambda r: r["eval"]["mean"].get("token_acc")).values()))
        for d in label_domains:
            entry[f"label_acc/{d}"] = mean_interval(list(values(lambda r, d=d: metric(r, d, "label_acc")).values()))
            entry[f"d_label_acc/{d}"] = paired(lambda r, d=d: metric(r, d, "label_acc"))
        for key in ("routing_mi", "dead_experts", "step_s", "peak_mem_mb"):
            found = [r[key] for r in runs.values() if r.get(key) is not None]
            entry[key] = sum(found) / len(found) if found else None
        entry["verdict"] = verdict(entry["d_loss"], entry["d_domain"]) if compared else None
        if row.compare_to is not None:
            parent = by_seed(results, chosen.get(row.compare_to))
            routing_mi = lambda r: r.get("routing_mi")  # noqa: E731
            entry["lever"] = {
                "parent": row.compare_to,
                **{
                    key: paired_interval(values(fn), values(fn, parent))
                    for key, fn in (("d_val", val_loss), ("d_loss", mean_loss), ("d_mi", routing_mi))
                },
            }
        summary.append(entry)
    return summary


def verdict(d_loss: Interval | None, d_domain: dict[str, Interval | None]) -> str | None:
    """The verdict rule (docs/concepts/verdict-rule.md): "beats" when the paired Δ of the mean loss lies wholly below
    zero and no domain is worse beyond its own interval; "worse" when that Δ lies wholly above zero; "tie" otherwise;
    None without intervals."""
    if d_loss is None or d_loss.half_width is None:
        return None
    if d_loss.high < 0 and not any(d is not None and d.low is not None and d.low > 0 for d in d_domain.values()):
        return "beats"
    return "worse" if d_loss.low > 0 else "tie"


def fmt(value: Any, signed: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, Interval):
        if signed:
            return str(value)
        return f"{value.mean:.3f}" + ("" if value.half_width is None else f" ± {value.half_width:.3f}")
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def csv_text(results: list[dict]) -> str:
    domains = domains_of(results)
    columns = ["variant", "seed", "status", "trainable_params"]
    columns += [f"loss/{d}" for d in domains] + ["loss/mean", "val_loss/mean", "token_acc/mean"]
    columns += [f"label_acc/{d}" for d in domains if any(metric(r, d, "label_acc") is not None for r in results
                                                          if "eval" in r)]  # fmt: skip
    columns += ["routing_mi", "dead_experts", "step_s", "peak_mem_mb", "threads", "wall_s", "error"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for r in sorted(results, key=lambda r: (r["variant"], r["seed"])):
        line = {k: r.get(k) for k in columns}
        if r["status"] == "ok":
            for d in domains:
                line[f"loss/{d}"] = metric(r, d, "loss")
                if f"label_acc/{d}" in columns:
                    line[f"label_acc/{d}"] = metric(r, d, "label_acc")
            line["loss/mean"] = r["eval"]["mean"]["loss"]
            line["token_acc/mean"] = r["eval"]["mean"].get("token_acc")
            line["val_loss/mean"] = (r.get("val") or {}).get("mean", {}).get("loss")
        writer.writerow(line)
    return buffer.getvalue()


def markdown(ablation: Ablation, summary: list[dict], results: list[dict], command: str, wall_s: float) -> str:
    domains = domains_of(results)
    base = ablation.baseline
    label_keys = sorted({k for e in summary for k in e if k.startswith("label_acc/")})
    lines = [
        "# Ablation",
        "",
        f"Command: `{command}` — {wall_s / 60:.1f} min wall time in this invocation (runs already done are "
        f"skipped; the sum of every run's own wall time is {sum(r.get('wall_s') or 0 for r in results) / 60:.1f} "
        f"min). Seeds: {len(ablation.seeds)}; each seed changes adapter initialisation and data order.",
        "",
        f"Loss is the token-weighted eval loss, averaged over domains (mean ± 95 % t interval over seeds). Δ is "
        f"row - `{base}` paired by seed (negative: the row is better), mean ± 95 % interval. Choices (grid points, "
        "which configuration is best) are made on the validation loss; grid rows chose with the first seed. step_s "
        "is the time per step of a run that shared the cores with the others (--jobs), not a speed benchmark. "
        "params: trainable parameters, and their ratio to "
        f"`{ablation.reference}`. routing_mi: I(task; expert) / H(task), averaged over layers.",
        "",
    ]
    if ablation.chosen_elsewhere:
        chosen = "; ".join(f"`{row}` on {source}" for row, source in sorted(ablation.chosen_elsewhere.items()))
        lines += [
            "Grid points chosen on another suite's validation runs (`--choices-from`, recorded in "
            f"grid_choices.json), not on this suite's: {chosen}. Only that point ran here.",
            "",
        ]
    lines += [
        "| row | chosen | params | seeds | val loss | eval loss | Δ loss | token acc | "
        + " | ".join(f"{k.split('/')[1]} acc | Δ {k.split('/')[1]} acc" for k in label_keys)
        + (" | " if label_keys else "")
        + "routing_mi | dead | step_s | verdict |",
        "|" + "---|" * (12 + 2 * len(label_keys)),
    ]
    for e in summary:
        params = fmt(e["params"]) + ("" if e["params_ratio"] is None else f" ({e['params_ratio']:.3f})")
        cells = [e["row"], e["variant"] or "(grid running)", params, str(e["seeds"])]
        cells += [fmt(e.get("val_loss")), fmt(e.get("loss")), fmt(e.get("d_loss"), True), fmt(e.get("token_acc"))]
        for key in label_keys:
            cells += [fmt(e.get(key)), fmt(e.get("d_" + key), True)]
        cells += [fmt(e.get("routing_mi")), fmt(e.get("dead_experts")), fmt(e.get("step_s")), fmt(e.get("verdict"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"## Per domain: Δ eval loss to `{base}` (mean ± 95 % interval)", ""]
    lines += ["| row | " + " | ".join(domains) + " |", "|" + "---|" * (len(domains) + 1)]
    for e in summary:
        if e.get("d_domain"):
            lines.append(f"| {e['row']} | " + " | ".join(fmt(e["d_domain"].get(d), True) for d in domains) + " |")
    lines += before_and_after(summary, results, domains)
    levers = [e for e in summary if e.get("lever")]
    if levers:
        lines += ["", "## Levers: each row against the row it changes (Δ = row - that row, paired by seed)", ""]
        lines += ["| row | against | Δ val loss | Δ eval loss | Δ routing_mi |", "|---|---|---|---|---|"]
        for e in levers:
            lever = e["lever"]
            cells = [e["row"], lever["parent"]] + [fmt(lever[k], True) for k in ("d_val", "d_loss", "d_mi")]
            lines.append("| " + " | ".join(cells) + " |")
    grid_rows = [row for row in ablation.rows if row.grid]
    if grid_rows:
        lines += ["", "## Grid choices (validation loss, first seed)", "", "| variant | val loss | eval loss |"]
        lines.append("|---|---|---|")
        for row in grid_rows:
            for name, _ in row.variants():
                found = [r for r in results if r["variant"] == name and r["seed"] == ablation.seeds[0]]
                if found and found[0]["status"] == "ok":
                    r = found[0]
                    val = (r.get("val") or {}).get("mean", {}).get("loss")
                    lines.append(f"| {name} | {fmt(val)} | {fmt(r['eval']['mean']['loss'])} |")
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- {r['variant']} seed {r['seed']}: {r['error']}" for r in failed]
    lines += ["", "![paired difference of the mean eval loss to the baseline](ablation.png)"]
    return "\n".join(lines) + "\n"


def before_and_after(summary: list[dict], results: list[dict], domains: list[str]) -> list[str]:
    """Where the runs evaluated before training (train.eval_at_start): the base model's eval loss per domain, then
    each row's after training, so the table shows what training bought and not only the differences. Rows on
    different bases (model.quantization, model.name) get a line each for theirs."""
    columns = [*domains, "mean"]
    befores = {}
    for e in summary:
        scores = [r["eval_before"] for r in results if r["variant"] == e["variant"] and r.get("eval_before")]
        if scores:  # one base model per row: the mean only smooths nothing but float noise
            befores[e["row"]] = [sum(b[d]["loss"] for b in scores) / len(scores) for d in columns]
    if not befores:
        return []
    lines = ["", "## Eval loss per domain: the base model before training, each row after (mean ± 95 % interval)", ""]
    lines += ["| | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    distinct = {tuple(round(v, 6) for v in values) for values in befores.values()}
    for row, values in befores.items() if len(distinct) > 1 else [("", next(iter(befores.values())))]:
        label = f"before training ({row}'s base)" if row else "before training"
        lines.append(f"| {label} | " + " | ".join(fmt(v) for v in values) + " |")
    for e in summary:
        if e.get("loss_domain"):
            cells = [fmt(e["loss_domain"].get(d)) for d in domains] + [fmt(e["loss"])]
            lines.append(f"| {e['row']} | " + " | ".join(cells) + " |")
    return lines


def _plot(summary: list[dict], baseline: str | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [e for e in summary if e.get("d_loss") is not None]
    if not shown:
        return
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(shown)), 3.5))
    means = [e["d_loss"].mean for e in shown]
    errors = [e["d_loss"].half_width or 0.0 for e in shown]
    ax.bar([e["row"] for e in shown], means, yerr=errors, capsize=4, color="tab:blue")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel(f"Δ mean eval loss vs {baseline}\n(95 % interval; < 0 is better)")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write_outputs(
    ablation: Ablation, results: list[dict], counts: dict[str, int], out: Path, command: str, wall_s: float
) -> list[dict]:
    summary = summarise(ablation, results, counts)
    atomic_write_text(out / "ablation.csv", csv_text(results))
    atomic_write_text(out / "ablation.md", markdown(ablation, summary, results, command, wall_s))
    _plot(summary, ablation.baseline, out / "ablation.png")
    return summary
