import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from molora.cli import train_main
from molora.run.config import RunConfig, apply_overrides, load_run_config
from tests.tiny import save_tiny_model, tiny_run_config, write_toy_domains


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    spec = tiny_run_config(save_tiny_model(root / "model"), write_toy_domains(root / "toy.jsonl"), steps=3)
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.stpes=3"], "unknown config key 'train.stpes'; did you mean 'train.steps'"),
        (["molora.rnak=4"], "did you mean 'molora.rank'"),
        (["data.domains=[nope]"], "unknown domain(s) ['nope']"),
        (["molora.router=hash"], "router must be one of"),
        (["train.steps"], "section.key=value"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(tiny_config, tmp_path, capsys, overrides, message):
    if overrides == ["data.domains=[nope]"]:
        overrides = [*overrides, "data.files=[]"]
    code = train_main(["--config", str(tiny_config), "--output-dir", str(tmp_path / "run"), *overrides])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_and_malformed_config_files(tmp_path, capsys):
    assert train_main(["--config", str(tmp_path / "nope.yaml"), "--output-dir", str(tmp_path / "run")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert train_main(["--config", str(bad), "--output-dir", str(tmp_path / "run")]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    section = tmp_path / "section.yaml"
    section.write_text("trian: {steps: 3}\n")
    assert train_main(["--config", str(section), "--output-dir", str(tmp_path / "run")]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_runs_and_overrides_apply(tiny_config, tmp_path, capsys):
    code = train_main(["--config", str(tiny_config), "--output-dir", str(tmp_path / "run"), "molora.router=switch"])
    assert code == 0
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["molora"]["router"] == "switch" and resolved["molora"]["top_k"] == 1
    assert "| upper |" in capsys.readouterr().out


def test_task_router_defaults_to_one_task_per_domain(tiny_config):
    config = load_run_config(tiny_config, ["molora.router=task", "molora.top_k=null"])
    assert config.molora.num_tasks == 2
    assert load_run_config(tiny_config, ["train.lr=1e-3"]).train.lr == 1e-3  # YAML 1.1 reads 1e-3 as a string
    assert apply_overrides({}, ["train.steps=7"]) == {"train": {"steps": 7}}
    assert RunConfig.from_dict({}).model.name == "smollm2-135m"
    for domains, tasks in (("heldout", 3), ("conflict", 4), ("news", 1), (None, 5)):  # a suite counts its domains
        spec = {"molora": {"router": "task"}, "data": {} if domains is None else {"domains": domains}}
        assert RunConfig.from_dict(spec).molora.num_tasks == tasks, domains


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    if path.name.startswith("ablation"):
        from molora.ablation.harness import load_ablation

        for quick in (False, True):
            rows = load_ablation(path, quick).rows
            assert all(RunConfig.from_dict(spec).train.steps > 0 for row in rows for _, spec in row.variants())
        return
    config = load_run_config(path)
    assert config.train.steps > 0


@pytest.mark.parametrize("command", ["molora", "molora-train", "molora-inspect", "molora-ablate", "molora-ranks"])
def test_the_installed_commands_answer_help(command):
    """The console scripts pyproject declares are installed beside this interpreter (pip install -e .) and run."""
    script = Path(sys.executable).parent / command
    assert script.exists(), f"{command} is not installed beside {sys.executable}: pip install -e ."
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize(("config", "row"), [("quickstart.yaml", "mixlora"), ("task_ffn.yaml", "task-ffn[lr=0.001]")])
def test_a_shipped_config_is_the_ablation_row_it_reports(config, row):
    """The README quotes the ablation's figures for these configs: their adapter and optimiser settings are the
    row's (the variant chosen on bundled), so a change to either shows up here instead of in a stale figure."""
    from molora.ablation.harness import load_ablation

    variants = dict(
        v for r in load_ablation(Path(__file__).parents[2] / "configs" / "ablation.yaml").rows for v in r.variants()
    )
    measured = RunConfig.from_dict(variants[row])
    shipped = load_run_config(Path(__file__).parents[2] / "configs" / config)
    assert shipped.molora == measured.molora
    assert (shipped.model, shipped.train.lr, shipped.train.router_lr_scale, shipped.train.steps) == (
        measured.model,
        measured.train.lr,
        measured.train.router_lr_scale,
        measured.train.steps,
    )
    assert shipped.data.domains == measured.data.domains


def test_the_umbrella_command_runs_each_command_and_names_a_typo(capsys):
    from molora.cli import main

    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0 and "usage: molora-train" in capsys.readouterr().out
    assert main(["trian"]) == 2
    assert "unknown command 'trian'; did you mean 'train'?" in capsys.readouterr().err


def test_print_config_prints_the_merged_config_and_trains_nothing(tmp_path, capsys, monkeypatch):
    import yaml

    from molora.cli import train_main

    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
    assert train_main(["--config", str(config), "--print-config", "train.steps=7", "train.lr=0.005"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["steps"] == 7 and printed["train"]["lr"] == 0.005
    assert printed["train"]["sharding"] == "none"  # a default the file does not set
    assert not (tmp_path / "runs").exists()


def test_the_config_reference_lists_every_key_and_is_current():
    """Generated from the dataclasses: a key without a line, a line for no key, or a stale file fails here."""
    from molora.run import config_reference

    assert set(config_reference.DESCRIPTIONS) == set(config_reference.keys())
    committed = (Path(__file__).resolve().parents[2] / "docs" / "config-reference.md").read_text()
    assert committed == config_reference.render(), "python -m molora.run.config_reference > docs/config-reference.md"
