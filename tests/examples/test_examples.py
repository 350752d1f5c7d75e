"""Every example in examples/ runs, on a tiny model in seconds (each runs on the bundled model by its command)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import yaml

from molora.cli import ablate_main
from tests.tiny import save_tiny_model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("examples") / "model", hidden_size=64, intermediate_size=128)


def run_example(name: str, *args: str) -> dict:
    """Run examples/NAME as a script with these arguments; its module globals."""
    argv = sys.argv
    sys.argv = [str(EXAMPLES / name), *args]
    try:
        return runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    finally:
        sys.argv = argv


def test_own_domains_compares_the_mixture_with_plain_lora(tiny_model, tmp_path, capsys):
    spec = yaml.safe_load((EXAMPLES / "own_domains" / "compare.yaml").read_text())
    spec["model"]["name"] = str(tiny_model)
    spec["data"]["files"] = [str(EXAMPLES / "own_domains" / "domains.jsonl")]
    for row in spec["ablation"]["rows"]:  # one grid point each: the harness's path, at a test's cost
        row["grid"] = {"train.lr": [2.0e-3]}
    config = tmp_path / "compare.yaml"
    config.write_text(yaml.safe_dump(spec))
    assert ablate_main(["--config", str(config), "--quick", "--output-dir", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out" / "ablation.md").read_text()
    assert "| mixture |" in table and "| peft-lora |" in table


def test_hf_trainer_example_trains_with_the_aux_loss(tiny_model, tmp_path, capsys):
    run_example("hf_trainer.py", "--model", str(tiny_model), "--steps", "4", "--output-dir", str(tmp_path / "hf"))
    out = capsys.readouterr().out
    assert "aux/" in out and "eval loss" in out


def test_route_peft_adapters_example_routes_between_two_saved_adapters(tiny_model, tmp_path, capsys):
    run_example("route_peft_adapters.py", "--model", str(tiny_model), "--workdir", str(tmp_path), "--steps", "3")
    out = capsys.readouterr().out
    assert "2 experts" in out and "router" in out


def test_inspect_and_export_example_writes_a_per_task_peft_adapter_that_peft_loads(tiny_model, tmp_path, capsys):
    run_example("inspect_and_export.py", "--model", str(tiny_model), "--workdir", str(tmp_path), "--steps", "6")
    out = capsys.readouterr().out
    assert "max |molora - peft|" in out
    assert (tmp_path / "peft-task0" / "adapter_config.json").is_file()


def test_the_readme_quick_start_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README's first Python block, executed as a new user pastes it (in an empty folder)."""
    import re

    readme = (EXAMPLES.parent / "README.md").read_text()
    start = readme.index("## Quick start")
    block = re.search(r"```python\n(.*?)```", readme[start:], re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md (Quick start)", "exec"), {"__name__": "__readme__"})
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert "trainable params" in capsys.readouterr().out
