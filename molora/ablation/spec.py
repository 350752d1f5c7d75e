"""An ablation as written: rows (a run config each, with an optional grid), seeds, the baseline and the parameter
budget, read from YAML and validated before anything runs."""

from __future__ import annotations

import copy
import difflib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from molora.run.config import RunConfig, check_keys
from molora.run.domains import SUITES

SECTION_KEYS = ("rows", "quick", "seeds", "quick_seeds", "baseline", "match", "chosen_on")
ROW_KEYS = ("name", "grid", "allow_unmatched", "compare_to", "chosen_on", "model", "data", "molora", "train")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def dotted(key: str, value: Any) -> dict[str, Any]:
    """ "train.lr", 1e-3 -> {"train": {"lr": 1e-3}}."""
    parts = key.split(".")
    if len(parts) < 2:
        raise ValueError(f"grid keys are section.key (such as train.lr), got {key!r}")
    nested: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


@dataclass
class Row:
    name: str
    spec: dict[str, Any]  # the full run config of the row (grid point not applied)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    allow_unmatched: bool = False
    compare_to: str | None = None  # the row this one changes one lever of: its effect is reported paired by seed
    # suites this row was shaped on besides the file's (a layout made after seeing one suite's results): none of
    # them counts towards its cross-suite win
    chosen_on: tuple[str, ...] = ()

    @property
    def trains(self) -> bool:
        return (self.spec.get("model") or {}).get("adapter", "molora") != "none"

    def variants(self) -> list[tuple[str, dict[str, Any]]]:
        """(variant name, run config) for every grid point; the row itself when it has no grid."""
        if not self.grid:
            return [(self.name, self.spec)]
        out = []
        for values in itertools.product(*self.grid.values()):
            spec, label = self.spec, []
            for key, value in zip(self.grid, values, strict=True):
                spec = deep_merge(spec, dotted(key, value))
                label.append(f"{key.split('.')[-1]}={value:g}" if isinstance(value, float) else f"{key}={value}")
            out.append((f"{self.name}[{','.join(label)}]", spec))
        return out


@dataclass
class Ablation:
    rows: list[Row]
    seeds: list[int]
    baseline: str | None
    reference: str | None
    tolerance: float
    trained: set[str] | None = None  # rows that may train (None: all); the others only report finished runs
    chosen_on: str | None = None  # the suite the rows' configurations were chosen on, where the file says so
    # rows whose grid point was chosen on another suite's runs (molora.ablation.transfer): {row: that folder}
    chosen_elsewhere: dict[str, str] = field(default_factory=dict)


def load_ablation(
    path: str | Path,
    quick: bool = False,
    seeds: int | None = None,
    suite: str | None = None,
    only: list[str] | None = None,
) -> Ablation:
    """The rows and settings, validated (keys, grid values, row configs) before anything runs. `suite` (a name of
    molora.run.domains.SUITES) sets every row's data.domains: the same rows on other domains. `only` trains just
    these rows and the ones they are measured against (the baseline, the budget's reference); the tables still show
    every row's finished runs, so a subset run into a full ablation's folder adds to its tables."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ablation config {path} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    section = spec.pop("ablation", None)
    if not section or not section.get("rows"):
        raise ValueError(f"{path}: needs an `ablation: {{rows: [...]}}` section")
    unknown = set(section) - set(SECTION_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown keys in ablation: {sorted(unknown)} (known: {', '.join(SECTION_KEYS)})")
    rows = []
    for raw in section["rows"]:
        raw = dict(raw)
        name = raw.pop("name", None)
        if not name or not isinstance(name, str) or any(c in name for c in "/[],"):
            raise ValueError(f"{path}: every ablation row needs a name without / [ ] or commas, got {name!r}")
        for key in set(raw) - set(ROW_KEYS):
            close = difflib.get_close_matches(key, ROW_KEYS, 1)
            hint = f"; did you mean {close[0]!r}" if close else ""
            raise ValueError(f"{path}: row {name!r} has an unknown key {key!r}{hint} (known: {', '.join(ROW_KEYS)})")
        grid = raw.pop("grid", None) or {}
        if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
            raise ValueError(f"{path}: row {name!r}: grid must map section.key to a non-empty list, got {grid!r}")
        allow = bool(raw.pop("allow_unmatched", False))
        compare_to = raw.pop("compare_to", None)
        row_chosen_on = _suites(raw.pop("chosen_on", None) or (), f"{path}: row {name!r}: chosen_on")
        merged = deep_merge(spec, raw)
        if quick:
            merged = deep_merge(merged, section.get("quick") or {})
        if suite is not None:
            merged = deep_merge(merged, {"data": {"domains": list(SUITES[suite])}})
        row = Row(name, merged, grid, allow, compare_to, row_chosen_on)
        for _, variant in row.variants():
            check_keys(variant)
            RunConfig.from_dict(variant)  # every value valid before the first run starts
        rows.append(row)
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: row names must be unique, got {names}")
    count = seeds if seeds is not None else section.get("quick_seeds", 1) if quick else section.get("seeds", 3)
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"{path}: seeds must be an int >= 1, got {count!r}")
    match = section.get("match") or {}
    baseline, reference = section.get("baseline"), match.get("reference")
    for what, value in (("baseline", baseline), ("match.reference", reference)):
        if value is not None and value not in names:
            raise ValueError(f"{path}: {what} {value!r} is not a row; rows: {names}")
    for row in rows:
        if row.compare_to is not None and (row.compare_to not in names or row.compare_to == row.name):
            raise ValueError(
                f"{path}: row {row.name!r}: compare_to {row.compare_to!r} is not another row; rows: {names}"
            )
    chosen = section.get("chosen_on")
    if chosen is not None and chosen not in SUITES:
        raise ValueError(f"{path}: ablation.chosen_on {chosen!r} is no suite; suites: {', '.join(SUITES)}")
    trained = None if only is None else rows_to_train(names, only, keep={baseline, reference}, path=path)
    tolerance = float(match.get("tolerance", 0.02))
    return Ablation(rows, list(range(count)), baseline, reference, tolerance, trained, chosen)


def _suites(value: Any, what: str) -> tuple[str, ...]:
    """A suite name or a list of them, each checked against molora.run.domains.SUITES."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n in SUITES for n in names):
        raise ValueError(f"{what} {value!r} is no suite or list of suites; suites: {', '.join(SUITES)}")
    return tuple(names)


def rows_to_train(names: list[str], only: list[str], keep: set[str | None], path: Path) -> set[str]:
    """The named rows plus `keep` (the baseline and the budget's reference: what they are measured against)."""
    for name in only:
        if name not in names:
            close = difflib.get_close_matches(name, names, 1)
            hint = f"; did you mean {close[0]!r}" if close else ""
            raise ValueError(f"{path}: no row named {name!r}{hint} (rows: {', '.join(names)})")
    return {n for n in names if n in only or n in keep}
