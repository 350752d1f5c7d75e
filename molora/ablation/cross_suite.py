"""The verdict across suites: each row's paired difference to the baseline on every suite it ran on, and a win only
where it beats the baseline on a suite its configuration was not chosen on.

A row that was tuned on the bundled domains and beats PEFT there has shown that tuning works, not that the mixture
helps: the claim a user buys is the one on domains nobody looked at. The rows' configurations were chosen on the
suite the file declares (`ablation.chosen_on`) or else the one whose domains it names; every other suite is held out,
but for a row that names suites it was also shaped on (a row's own `chosen_on`: a layout made after seeing one
suite's results).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from molora.ablation.harness import finished
from molora.ablation.report import domains_of, fmt, summarise
from molora.ablation.spec import load_ablation
from molora.ablation.transfer import narrowed
from molora.analysis.stats import seeds_to_resolve
from molora.run.domains import SUITES
from molora.utils import atomic_write_text

CROSS_VERDICTS = {
    "win": "beats the baseline on every suite it was not chosen on, and is not worse on the one it was",
    "no win": "does not beat the baseline beyond the interval on a held-out suite",
    "not run": "no seeds on a held-out suite yet",
    "loses": "worse than the baseline beyond the interval on some suite",
}


def chosen_on(config: str | Path) -> str:
    """The suite the rows' configurations were chosen on: `ablation.chosen_on` where the file declares it (a file of
    rows chosen elsewhere, run on another suite's domains), else the suite whose domains the file names."""
    ablation = load_ablation(config)
    if ablation.chosen_on is not None:
        return ablation.chosen_on
    domains = tuple((ablation.rows[0].spec.get("data") or {}).get("domains") or ())
    for name, suite in SUITES.items():
        if tuple(suite) == domains:
            return name
    raise ValueError(
        f"{config}: its data.domains {list(domains)} are no suite ({', '.join(SUITES)}): a cross-suite verdict "
        "needs to know which suite the rows were chosen on"
    )


def cross_verdict(verdicts: dict[str, str | None], homes: set[str]) -> str:
    """verdicts: {suite: "beats" | "tie" | "worse" | None (fewer than 2 seeds)}; homes: the suites of the choice."""
    if any(v == "worse" for v in verdicts.values()):
        return "loses"
    held_out = {s: v for s, v in verdicts.items() if s not in homes}
    if not held_out or any(v is None for v in held_out.values()):
        return "not run"
    if held_out and all(v == "beats" for v in held_out.values()):
        return "win"
    return "no win"


def cross_suite(
    config: str | Path, folders: dict[str, Path], seeds: int | None = None, baseline: str | None = None
) -> list[dict[str, Any]]:
    """One entry per row that has run somewhere: {suite: its summary there} plus the cross-suite verdict; rows that
    train nothing and the baseline itself have no verdict. `baseline`: another row to measure against than the
    file's (a control, such as plain LoRA on the mixture's modules)."""
    unknown = sorted(set(folders) - set(SUITES))
    if unknown:
        raise ValueError(f"unknown suites {unknown}; suites: {', '.join(SUITES)}")
    home = chosen_on(config)
    per_suite = {}
    for suite, folder in folders.items():
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{folder} (the {suite} suite's ablation folder) does not exist")
        ablation = narrowed(load_ablation(config, seeds=seeds, suite=suite), Path(folder))
        if baseline is not None:
            names = [row.name for row in ablation.rows]
            if baseline not in names:
                raise ValueError(f"--baseline {baseline!r} is not a row of {config}; rows: {', '.join(names)}")
            ablation.baseline = baseline
        results = finished(ablation, Path(folder))
        counts = {r["variant"]: r["trainable_params"] for r in results if r["status"] == "ok"}
        per_suite[suite] = (ablation, summarise(ablation, results, counts), domains_of(results))
    entries = []
    any_ablation = next(iter(per_suite.values()))[0]
    for row in any_ablation.rows:
        if not row.trains or row.name == any_ablation.baseline:
            continue
        entry: dict[str, Any] = {"row": row.name, "suites": {}}
        for suite, (ablation, summary, domains) in per_suite.items():
            found = next(e for e in summary if e["row"] == row.name)
            elsewhere = ablation.chosen_elsewhere.get(row.name)  # its grid point taken from another suite's folder
            entry["suites"][suite] = {**found, "domains": domains, "chosen_elsewhere": elsewhere}
        if not any(found["seeds"] for found in entry["suites"].values()):
            continue  # a row of the file that has run nowhere yet
        verdicts = {s: e.get("verdict") for s, e in entry["suites"].items()}
        entry["homes"] = [home, *(s for s in row.chosen_on if s != home)]
        entry["verdict"] = cross_verdict(verdicts, set(entry["homes"]))
        entries.append(entry)
    return entries


def delta_cell(d_loss: Any, seeds: int) -> str:
    """Δ with the seeds it pairs (a single pair prints as "(n=1)"); "- (seeds)" when nothing pairs yet."""
    if d_loss is None:
        return f"- ({seeds})"
    return str(d_loss) if d_loss.half_width is None else f"{d_loss} ({d_loss.n})"


def verdict_cell(d_loss: Any, verdict: str | None) -> str:
    if verdict is None:
        return "-"
    if verdict != "tie":
        return verdict
    needed = seeds_to_resolve(d_loss)
    return f"tie ({needed if needed is not None else '>30'})"


def cross_markdown(entries: list[dict], baseline: str | None, home: str, command: str) -> str:
    suites = list(entries[0]["suites"]) if entries else []
    lines = [
        "# Ablation across suites",
        "",
        f"Command: `{command}`. The rows' configurations were chosen on `{home}`; "
        + ", ".join(f"`{s}`" for s in suites if s != home)
        + " held out"
        + (
            " (a row may name suites it was also chosen on: none of them is held out for it). "
            if any(len(e["homes"]) > 1 for e in entries)
            else ". "
        )
        + f"Δ: row - `{baseline}` mean eval loss, paired by seed, mean ± 95 % t interval (n seeds); "
        "per suite, `beats` when the interval lies below zero and no domain is worse beyond its own interval. "
        "(to resolve): the seeds whose interval would exclude zero if the mean and spread stayed as measured (>30: "
        "a difference this small against this spread needs more than 30); with 3 seeds the interval is wide "
        "because t(2) = 4.30.",
        "",
        "Cross-suite verdict: " + "; ".join(f"**{k}**: {v}" for k, v in CROSS_VERDICTS.items()) + ".",
        "",
        "| row | params | " + " | ".join(f"Δ {s} (n) | {s} (to resolve)" for s in suites) + " | across suites |",
        "|" + "---|" * (3 + 2 * len(suites)),
    ]
    for e in entries:
        shaped = [f"`{s}`" for s in e["homes"][1:]]
        name = e["row"] + (f" (also chosen on {', '.join(shaped)})" if shaped else "")
        cells = [name, fmt(next((s["params"] for s in e["suites"].values() if s.get("params")), None))]
        for suite in suites:
            s = e["suites"][suite]
            cells += [delta_cell(s.get("d_loss"), s["seeds"]), verdict_cell(s.get("d_loss"), s.get("verdict"))]
        lines.append("| " + " | ".join([*cells, f"**{e['verdict']}**"]) + " |")
    transferred = [
        f"`{e['row']}` on `{suite}` (from {e['suites'][suite]['chosen_elsewhere']})"
        for e in entries
        for suite in suites
        if e["suites"][suite].get("chosen_elsewhere")
    ]
    if transferred:
        lines += ["", "Grid points chosen on another suite's validation (`--choices-from`): " + "; ".join(transferred)]
    lines += lever_lines(entries, suites)
    for suite in suites:
        domains = next((e["suites"][suite]["domains"] for e in entries if e["suites"][suite]["domains"]), [])
        if not domains:
            continue
        lines += ["", f"## `{suite}`: Δ eval loss per domain", "", "| row | " + " | ".join(domains) + " |"]
        lines.append("|" + "---|" * (len(domains) + 1))
        for e in entries:
            d_domain = e["suites"][suite].get("d_domain") or {}
            if d_domain:
                lines.append(f"| {e['row']} | " + " | ".join(fmt(d_domain.get(d), True) for d in domains) + " |")
    return "\n".join(lines) + "\n"


def lever_cell(lever: dict | None) -> str:
    """A lever's Δ eval loss on one suite, and which way its interval points ("better": below zero)."""
    d_loss = (lever or {}).get("d_loss")
    if d_loss is None:
        return "-"
    if d_loss.half_width is None:
        return str(d_loss)
    way = "better" if d_loss.high < 0 else "worse" if d_loss.low > 0 else "tie"
    return f"{d_loss} ({d_loss.n}) {way}"


def lever_lines(entries: list[dict], suites: list[str]) -> list[str]:
    """Each row against the row it changes one lever of (`compare_to`), on every suite: whether the lever carries over
    from the suite it was chosen on, apart from how the row stands against the baseline."""
    levers = [e for e in entries if any(s.get("lever") for s in e["suites"].values())]
    if not levers:
        return []
    lines = [
        "",
        "## Levers: each row against the row it changes (Δ eval loss = row - that row, paired by seed)",
        "",
        "| row | against | " + " | ".join(f"Δ {s} (n)" for s in suites) + " |",
        "|" + "---|" * (2 + len(suites)),
    ]
    for e in levers:
        parent = next(s["lever"]["parent"] for s in e["suites"].values() if s.get("lever"))
        lines.append(
            f"| {e['row']} | {parent} | " + " | ".join(lever_cell(e["suites"][s].get("lever")) for s in suites) + " |"
        )
    return lines


def write_cross_suite(
    config: str | Path,
    folders: dict[str, Path],
    out: Path,
    command: str,
    seeds: int | None = None,
    baseline: str | None = None,
) -> Path:
    """cross_suite.md in `out` (cross_suite-<baseline>.md against another baseline than the file's); its path."""
    entries = cross_suite(config, folders, seeds, baseline)
    path = out / ("cross_suite.md" if baseline is None else f"cross_suite-{baseline}.md")
    shown = baseline or load_ablation(config).baseline
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, cross_markdown(entries, shown, chosen_on(config), command))
    return path
