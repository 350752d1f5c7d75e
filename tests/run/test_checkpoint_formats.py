"""Checkpoints and adapters from elsewhere: formats that say their version, the first formats converted (on files
the old code wrote, tests/data/format1), newer ones refused naming the upgrade, unknown keys named, and a pickle
that would run code refused without being unpickled."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from molora import MoLoRAModel
from molora.files.formats import ADAPTER_FORMAT, CHECKPOINT_FORMAT, FormatVersionError
from molora.run.checkpoint import MANIFEST_NAME, CheckpointError, checkpoint_folders, sha256_file, verify_checkpoint
from molora.run.config import RunConfig
from molora.run.training import train
from tests.adapter_files import resign
from tests.tiny import save_tiny_model, tiny_run_config, write_toy_domains

FORMAT1 = Path(__file__).parents[1] / "data" / "format1"
FORMAT2 = Path(__file__).parents[1] / "data" / "format2"
STEPS = 4
FORMAT1_ROUNDING = 1e-4  # fp32 rounding of another CPU over the format-1 run's first two steps, with margin


def spec() -> dict:
    """The run config tests/data/format1/run was written with (paths relative to the folder it ran in)."""
    spec = tiny_run_config(Path("model"), Path("toy.jsonl"), steps=STEPS, save_every=2)
    spec["molora"].update(dropout=0.1, router_jitter=0.05)
    spec["train"]["eval_at_start"] = False
    return spec


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A folder laid out as the one the format-1 run was written in: the same tiny model and data."""
    monkeypatch.chdir(tmp_path)
    save_tiny_model(Path("model"))
    write_toy_domains(Path("toy.jsonl"))
    return tmp_path


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _rewrite_manifest(folder: Path, **fields) -> None:
    """As anyone handing over a folder can: a manifest that matches the files as they are now."""
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in folder.iterdir()}
    files.pop(MANIFEST_NAME)
    (folder / MANIFEST_NAME).write_text(json.dumps({**manifest, "files": files, **fields}))


def _one_checkpoint(workdir: Path) -> Path:
    run = workdir / "run"
    train(RunConfig.from_dict({**spec(), "train": {**spec()["train"], "stop_after": 2}}), run)
    return checkpoint_folders(run)[-1]


# Format 1, written by the old code ----------------------------------------------------------------------------------
def _resume_format1_and_run_whole(workdir: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The format-1 run resumed to its end with this code, and the same run uninterrupted: (run, resumed, whole)."""
    run = workdir / "old-run"
    shutil.copytree(FORMAT1 / "run", run)
    assert "format_version" not in json.loads((run / "checkpoints/step-000002" / MANIFEST_NAME).read_text())
    train(RunConfig.from_dict(spec()), run, resume=True)
    train(RunConfig.from_dict(spec()), workdir / "whole")
    return run, _adapter(run), _adapter(workdir / "whole")


def test_a_format1_checkpoint_resumes_as_the_uninterrupted_run(workdir, capsys):
    run, resumed, whole = _resume_format1_and_run_whole(workdir)
    assert "continuing from step-000002" in capsys.readouterr().out
    assert resumed.keys() == whole.keys()
    # Its first two steps ran on the machine that wrote tests/data/format1, whose CPU may round the same sums
    # differently from this one: bitwise on that machine, 7.5e-6 apart on an AMD EPYC. A resume that drops the
    # random state lands 0.022 away (the next test).
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=FORMAT1_ROUNDING, msg=key)
    newest = checkpoint_folders(run)[-1]
    assert newest.name == "step-000004" and verify_checkpoint(newest)["format_version"] == CHECKPOINT_FORMAT
    assert not (newest / "trainer_state.pt").exists()


def test_the_format1_resume_test_can_fail_when_the_random_state_is_dropped(workdir, monkeypatch):
    import molora.run.resume

    monkeypatch.setattr(molora.run.resume, "set_rng_state", lambda state: None)
    _, resumed, whole = _resume_format1_and_run_whole(workdir)
    assert max((resumed[k] - whole[k]).abs().max().item() for k in whole) > 10 * FORMAT1_ROUNDING


def test_format1_adapters_load_fp32_and_int8(workdir):
    def loaded(folder: Path) -> MoLoRAModel:
        return MoLoRAModel.from_pretrained(AutoModelForCausalLM.from_pretrained("model"), folder)

    fp32 = loaded(FORMAT1 / "run/checkpoints/step-000002")
    int8 = loaded(FORMAT1 / "adapter-int8")
    assert "format_version" not in json.loads((FORMAT1 / "adapter-int8/molora_config.json").read_text())
    ids = torch.tensor([[5, 17, 40, 3, 9]])
    with torch.no_grad():
        reference = fp32(input_ids=ids).logits
        torch.testing.assert_close(int8(input_ids=ids).logits, reference, rtol=0, atol=1e-2)
        assert not torch.equal(reference, AutoModelForCausalLM.from_pretrained("model")(input_ids=ids).logits)


def test_a_format1_adapter_config_may_not_hold_format2_keys(workdir, tmp_path):
    folder = tmp_path / "a"
    shutil.copytree(FORMAT1 / "adapter-int8", folder)
    config = json.loads((folder / "molora_config.json").read_text())
    (folder / "molora_config.json").write_text(json.dumps({**config, "sha256": "0" * 64}))
    with pytest.raises(ValueError, match=r"molora_config\.json: unknown key 'sha256'"):
        MoLoRAModel.from_pretrained(AutoModelForCausalLM.from_pretrained("model"), folder)


@pytest.mark.parametrize("name", ["adapter", "adapter-int8"])
def test_format2_adapters_convert_lora_b_and_give_the_logits_the_old_code_gave(workdir, name):
    """Format 2 stored LoRA B as [E, d_out, r]; format 3 as [E, r, d_out]. The old code's logits are the reference."""
    reference = load_file(str(FORMAT2 / "logits.safetensors"))
    stored = load_file(str(FORMAT2 / name / "adapter_model.safetensors"))
    key = next(k for k in stored if k.endswith("experts.lora_B") or k.endswith("experts.lora_B.int8"))
    model = MoLoRAModel.from_pretrained(AutoModelForCausalLM.from_pretrained("model"), FORMAT2 / name)
    loaded_b = model.adapter_state_dict()[key.removesuffix(".int8")]
    assert loaded_b.shape == stored[key].transpose(1, 2).shape != stored[key].shape
    with torch.no_grad():
        logits = model(input_ids=reference["input_ids"]).logits
    # the reference was computed on another CPU, whose fp32 sums may round differently (2.1e-6 on an AMD EPYC)
    torch.testing.assert_close(logits, reference[name], rtol=0, atol=1e-5)


def test_the_conversion_test_can_fail_without_the_conversion(workdir, monkeypatch):
    """Without the format 2 -> 3 step, B's stored shape is refused (or, square, computes another function)."""
    import molora.deploy.adapter_files

    monkeypatch.setitem(molora.deploy.adapter_files.ADAPTER_UPGRADES, 2, lambda state: state)
    with pytest.raises(ValueError, match=r"lora_B: checkpoint \[4, \d+, 4\] vs model \[4, 4, \d+\]"):
        MoLoRAModel.from_pretrained(AutoModelForCausalLM.from_pretrained("model"), FORMAT2 / "adapter")


# Newer formats and unknown keys --------------------------------------------------------------------------------------
def test_a_checkpoint_in_a_newer_format_is_refused_naming_both_versions_and_the_upgrade(workdir):
    folder = _one_checkpoint(workdir)
    _rewrite_manifest(folder, format_version=CHECKPOINT_FORMAT + 1)
    message = rf"checkpoint in format {CHECKPOINT_FORMAT + 1}.* reads formats 1 to {CHECKPOINT_FORMAT}.*pip install -U"
    with pytest.raises(FormatVersionError, match=message):  # not skipped as damaged: stepping back would lose steps
        train(RunConfig.from_dict(spec()), workdir / "run", resume=True)


def test_an_adapter_in_a_newer_format_is_refused_naming_both_versions_and_the_upgrade(workdir):
    folder = _one_checkpoint(workdir)
    config = json.loads((folder / "molora_config.json").read_text())
    (folder / "molora_config.json").write_text(json.dumps({**config, "format_version": ADAPTER_FORMAT + 1}))
    resign(folder)
    base = AutoModelForCausalLM.from_pretrained("model")
    message = rf"adapter in format {ADAPTER_FORMAT + 1}.* reads formats 1 to {ADAPTER_FORMAT}.*pip install -U molora"
    with pytest.raises(FormatVersionError, match=message):
        MoLoRAModel.from_pretrained(base, folder)
    assert not any("experts" in name for name, _ in base.named_modules())  # the model was never touched


@pytest.mark.parametrize("file", ["manifest.json", "trainer_state.json", "molora_config.json"])
def test_an_unknown_key_in_a_known_format_is_an_error_naming_it(workdir, file):
    folder = _one_checkpoint(workdir)
    data = json.loads((folder / file).read_text())
    (folder / file).write_text(json.dumps({**data, "stepz": 1}))
    if file == "molora_config.json":
        resign(folder)
    _rewrite_manifest(folder)
    with pytest.raises(ValueError, match=f"{file}: unknown key 'stepz'"):
        train(RunConfig.from_dict(spec()), workdir / "run", resume=True)


def test_a_manifest_may_only_name_files_in_its_own_folder(workdir):
    folder = _one_checkpoint(workdir)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["files"]["../../config.yaml"] = {"sha256": "0" * 64, "bytes": 1}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"'\.\./\.\./config\.yaml' is not a file name in the checkpoint"):
        verify_checkpoint(folder)


# A pickle that would run code ---------------------------------------------------------------------------------------
class _CreatesMarker:
    """Unpickled, this calls open(marker, 'w'): any code could stand in its place."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _plant_pickle(folder: Path, name: str, marker: Path) -> None:
    torch.save({"optimizer": _CreatesMarker(marker), "step": 2}, folder / name)


def test_the_planted_pickle_runs_code_when_unpickled(tmp_path):
    """The counter-test: what the checkpoint loader before format 2 did (torch.load weights_only=False) creates the
    marker, so the tests below would fail on it."""
    marker = tmp_path / "marker"
    _plant_pickle(tmp_path, "state.pt", marker)
    torch.load(tmp_path / "state.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("place", ["format-1 trainer_state.pt", "format-2 trainer_state.safetensors"])
def test_a_checkpoint_whose_state_is_a_code_running_pickle_is_refused_unrun(workdir, place):
    marker = workdir / "marker"
    if place.startswith("format-1"):
        run = workdir / "run"
        shutil.copytree(FORMAT1 / "run", run)
        folder = checkpoint_folders(run)[-1]
        name, fields = "trainer_state.pt", {}
    else:
        folder = _one_checkpoint(workdir)
        name, fields = "trainer_state.safetensors", {"format_version": CHECKPOINT_FORMAT}
    _plant_pickle(folder, name, marker)
    _rewrite_manifest(folder, **fields)
    verify_checkpoint(folder)  # the manifest matches: it is integrity, not trust
    with pytest.raises(CheckpointError, match=rf"no usable checkpoint .*step-000002: .*{name}"):
        train(RunConfig.from_dict(spec()), workdir / "run", resume=True)
    assert not marker.exists()
