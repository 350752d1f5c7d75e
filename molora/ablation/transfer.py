"""Grid choices carried over from another suite: a grid row runs only the point its validation split chose there.

`molora-ablate --choices-from FOLDER` takes each named grid row's point (the lowest first-seed validation loss among
the grid's runs in FOLDER, the same rule as a grid run here) instead of running the grid again. The choice is then
made on domains whose results it is not reported on, which is the point of a held-out suite, and a bundled run of a
row costs its seeds rather than grid + seeds. The choice is recorded in the output folder (`grid_choices.json`), so
every later report, re-evaluation and cross-suite table of that folder reads the row the same way.
"""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from molora.ablation.spec import Ablation, Row
from molora.utils import atomic_write_text

CHOICES_FILE = "grid_choices.json"


def comparable(spec: dict[str, Any]) -> dict[str, Any]:
    """A run config without what differs between the same row on two suites and two seeds."""
    spec = copy.deepcopy(spec)
    spec.get("data", {}).pop("domains", None)
    spec.get("train", {}).pop("seed", None)
    spec.get("train", {}).pop("progress", None)
    return spec


def choose_elsewhere(ablation: Ablation, rows: list[str], source: Path) -> dict[str, str]:
    """{row: variant} for each named grid row: its grid point chosen on `source`'s first-seed validation losses.
    Every grid point must have finished there with this row's config (but its domains): a partial grid or another
    config would be a different choice than the one a grid run here makes."""
    named = {row.name: row for row in ablation.rows}
    first = ablation.seeds[0]
    chosen = {}
    for name in rows:
        row = named[name]
        if not row.grid:
            continue
        tried = []
        for variant, spec in row.variants():
            path = source / "rows" / variant / f"seed{first}" / "result.json"
            if not path.is_file():
                raise FileNotFoundError(
                    f"--choices-from {source}: no finished run of {variant} (seed {first}); the whole grid of row "
                    f"{name!r} must have run there first"
                )
            result = json.loads(path.read_text())
            if result.get("status") != "ok" or not result.get("val"):
                raise ValueError(f"--choices-from {source}: {variant} seed {first} has no validation loss to choose on")
            if comparable(result.get("spec") or {}) != comparable(spec):
                raise ValueError(
                    f"--choices-from {source}: {variant} ran with another config than row {name!r} here (it may "
                    f"differ in data.domains only): {', '.join(differences(result.get('spec') or {}, spec))}"
                )
            tried.append((result["val"]["mean"]["loss"], variant))
        chosen[name] = min(tried)[1]
    return chosen


def differences(there: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """The dotted keys whose values differ between two run configs (domains, seed and progress left out)."""
    return _differences(comparable(there), comparable(here), "")


def _differences(there: dict[str, Any], here: dict[str, Any], prefix: str) -> list[str]:
    out = []
    for key in sorted(set(there) | set(here)):
        left, right = there.get(key), here.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            out += _differences(left, right, f"{prefix}{key}.")
        elif left != right:
            out.append(f"{prefix}{key}: {left!r} there, {right!r} here")
    return out


def record(out: Path, chosen: dict[str, str], source: Path) -> None:
    """Adds the choices to OUT/grid_choices.json; a row already recorded with another point is refused."""
    recorded = recorded_choices(out)
    for row, variant in chosen.items():
        before = recorded.get(row, {}).get("variant")
        if before is not None and before != variant:
            raise ValueError(
                f"{out / CHOICES_FILE}: row {row!r} already ran {before} (chosen on {recorded[row]['source']}); "
                f"{source} chooses {variant}. Use another --output-dir"
            )
        recorded[row] = {"variant": variant, "source": str(source)}
    atomic_write_text(out / CHOICES_FILE, json.dumps(recorded, indent=1, sort_keys=True) + "\n")


def recorded_choices(folder: Path) -> dict[str, dict[str, str]]:
    path = Path(folder) / CHOICES_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def narrowed(ablation: Ablation, folder: Path) -> Ablation:
    """The ablation as `folder` ran it: each row recorded there has the one grid point chosen elsewhere."""
    recorded = recorded_choices(folder)
    if not recorded:
        return ablation
    rows = [_narrow(row, recorded[row.name]["variant"]) if row.name in recorded else row for row in ablation.rows]
    sources = {name: entry["source"] for name, entry in recorded.items()}
    return replace(ablation, rows=rows, chosen_elsewhere=sources)


def _narrow(row: Row, variant: str) -> Row:
    names = [name for name, _ in row.variants()]
    if variant not in names:
        raise ValueError(f"{CHOICES_FILE}: {variant} is not a grid point of row {row.name!r} ({', '.join(names)})")
    values = list(itertools.product(*row.grid.values()))[names.index(variant)]  # the order variants() names them in
    return replace(row, grid={key: [value] for key, value in zip(row.grid, values, strict=True)})
