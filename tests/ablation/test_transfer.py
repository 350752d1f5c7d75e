"""Grid choices carried over from another suite (`--choices-from`): the point is the one that suite's validation
chose, every other config must match, and the folder keeps reading the row that way."""

import copy
import json

import pytest
import yaml

from molora.ablation.harness import run_ablation
from molora.ablation.spec import load_ablation
from molora.ablation.transfer import CHOICES_FILE, choose_elsewhere, narrowed, record
from molora.cli import ablate_main


def grid_only(tiny_spec, tmp_path, name="a.yaml", domains=None):
    spec = copy.deepcopy(tiny_spec)
    spec["ablation"]["rows"] = [spec["ablation"]["rows"][0], {"name": "softmax", "molora": {"router": "softmax"}}]
    if domains is not None:
        spec["data"]["domains"] = domains
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def fake_grid(ablation, folder, val_losses, change=None):
    """A finished first-seed run of each grid point of the first row, with these validation losses."""
    row = ablation.rows[0]
    for (variant, spec), loss in zip(row.variants(), val_losses, strict=True):
        spec = copy.deepcopy(spec)
        spec["train"]["seed"] = 0
        if change:
            spec["train"].update(change)
        run = folder / "rows" / variant / "seed0"
        run.mkdir(parents=True)
        result = {"variant": variant, "seed": 0, "spec": spec, "status": "ok", "val": {"mean": {"loss": loss}}}
        (run / "result.json").write_text(json.dumps(result))


@pytest.mark.parametrize("losses, expected", [((2.0, 1.5), "peft-lora[lr=0.02]"), ((1.5, 2.0), "peft-lora[lr=0.01]")])
def test_the_point_with_the_lowest_validation_loss_there_is_chosen(tiny_spec, tmp_path, losses, expected):
    """Both orders: a rule that took the first or the last point would fail one of them."""
    ablation = load_ablation(grid_only(tiny_spec, tmp_path, domains=["upper"]))
    fake_grid(load_ablation(grid_only(tiny_spec, tmp_path, "b.yaml")), tmp_path / "there", losses)  # other domains
    assert choose_elsewhere(ablation, ["peft-lora", "softmax"], tmp_path / "there") == {"peft-lora": expected}


def test_a_partial_grid_or_another_config_there_is_refused_by_name(tiny_spec, tmp_path):
    ablation = load_ablation(grid_only(tiny_spec, tmp_path))
    fake_grid(ablation, tmp_path / "steps", (2.0, 1.5), change={"steps": 99})
    with pytest.raises(ValueError, match=r"peft-lora\[lr=0.01\] ran with another config.*train.steps: 99 there, 4"):
        choose_elsewhere(ablation, ["peft-lora"], tmp_path / "steps")
    fake_grid(ablation, tmp_path / "partial", (2.0, 1.5))
    (tmp_path / "partial" / "rows" / "peft-lora[lr=0.02]" / "seed0" / "result.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no finished run of peft-lora\[lr=0.02\].*whole grid"):
        choose_elsewhere(ablation, ["peft-lora"], tmp_path / "partial")


def test_a_folder_that_ran_one_point_refuses_another(tmp_path):
    record(tmp_path, {"peft-lora": "peft-lora[lr=0.01]"}, tmp_path / "heldout")
    record(tmp_path, {"peft-lora": "peft-lora[lr=0.01]"}, tmp_path / "heldout")  # the same choice again: fine
    with pytest.raises(ValueError, match=r"already ran peft-lora\[lr=0.01\].*another --output-dir"):
        record(tmp_path, {"peft-lora": "peft-lora[lr=0.02]"}, tmp_path / "other")


def test_only_the_chosen_point_runs_and_later_reports_of_the_folder_keep_it(tiny_spec, tmp_path, capsys):
    there = run_ablation(grid_only(tiny_spec, tmp_path), tmp_path / "there", quick=True, inline=True, seeds=1)
    grid = [r for r in there if r["variant"].startswith("peft-lora[")]
    chosen = min(grid, key=lambda r: r["val"]["mean"]["loss"])["variant"]
    config = grid_only(tiny_spec, tmp_path, "here.yaml", domains=["reverse"])
    here = ["--output-dir", str(tmp_path / "here"), "--rows", "peft-lora", "--choices-from", str(tmp_path / "there")]
    assert ablate_main(["--config", str(config), "--quick", "--seeds", "2", *here]) == 0  # runs in fresh processes
    ran = sorted(p.parent.name + "/" + p.name for p in (tmp_path / "here" / "rows").glob("*/seed*"))
    assert ran == [f"{chosen}/seed0", f"{chosen}/seed1"]  # the grid did not run here; the choice ran on each seed
    table = (tmp_path / "here" / "ablation.md").read_text()
    assert "chosen on another suite's validation" in table and f"`peft-lora` on {tmp_path / 'there'}" in table
    assert f"| peft-lora | {chosen} |" in table
    # a later report of the folder (no --choices-from) reads the row as it ran, not as a grid still running
    ablation = narrowed(load_ablation(config, quick=True, seeds=2), tmp_path / "here")
    assert [name for name, _ in ablation.rows[0].variants()] == [chosen]
    run_ablation(config, tmp_path / "here", quick=True, inline=True, seeds=2, report_only=True)
    assert f"| peft-lora | {chosen} |" in (tmp_path / "here" / "ablation.md").read_text()
    assert json.loads((tmp_path / "here" / CHOICES_FILE).read_text())["peft-lora"]["variant"] == chosen
