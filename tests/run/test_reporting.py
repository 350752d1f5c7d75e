"""train.report_to: TensorBoard (and W&B, faked) receive exactly metrics.jsonl's scalars and each evaluation's
heatmap; a missing package or an unknown name stops the run before anything is written; the writer is closed."""

import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

import molora.run.training
from molora.cli import train_main
from molora.run.checkpoint import config_differences
from molora.run.config import RunConfig
from molora.run.reporting import HEATMAP_TAG, TensorBoardReporter, scalar_tags
from molora.run.training import train
from tests.tiny import save_tiny_model, tiny_run_config, write_toy_domains

Series = dict[str, list[tuple[int, float]]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_model(root / "model"), write_toy_domains(root / "toy.jsonl")


def _config(tiny, **train_options) -> RunConfig:
    return RunConfig.from_dict(tiny_run_config(*tiny, **train_options))


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def expected_series(records: list[dict]) -> Series:
    series: Series = {}
    for record in records:
        for tag, value in scalar_tags(record).items():
            series.setdefault(tag, []).append((record["step"], value))
    return series


def read_tensorboard(folder: Path, purge: bool = True) -> tuple[Series, dict[str, list[int]]]:
    events = EventAccumulator(str(folder), size_guidance={SCALARS: 0, IMAGES: 0}, purge_orphaned_data=purge)
    events.Reload()
    tags = events.Tags()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags["scalars"]}
    return scalars, {tag: [e.step for e in events.Images(tag)] for tag in tags["images"]}


def mismatches(got: Series, expected: Series) -> list[str]:
    """What differs between logged and expected series: tags, steps (a step logged twice included) and values, each
    compared as the float32 TensorBoard stores."""
    problems = [f"missing tag {t}" for t in sorted(expected.keys() - got.keys())]
    problems += [f"unexpected tag {t}" for t in sorted(got.keys() - expected.keys())]
    for tag in sorted(expected.keys() & got.keys()):
        steps, want = [s for s, _ in got[tag]], [s for s, _ in expected[tag]]
        if steps != want:
            problems.append(f"{tag}: steps {steps} != {want}")
            continue
        for (step, value), (_, target) in zip(got[tag], expected[tag], strict=True):
            if np.float32(value) != np.float32(target):
                problems.append(f"{tag} at step {step}: {value} != {target}")
    return problems


@pytest.fixture(scope="module")
def tensorboard_run(tiny, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tb") / "run"
    train(_config(tiny, steps=8, log_every=2, eval_every=4, report_to=["tensorboard"]), run_dir)
    return run_dir


def test_tensorboard_holds_the_scalars_of_metrics_jsonl_and_a_heatmap_per_evaluation(tensorboard_run):
    records = _records(tensorboard_run)
    scalars, images = read_tensorboard(tensorboard_run / "tensorboard")
    expected = expected_series(records)
    assert {"train/loss", "train/aux/balance", "train/lr", "eval/upper", "eval/mean"} <= expected.keys()
    assert mismatches(scalars, expected) == []
    eval_steps = [r["step"] for r in records if r["type"] == "eval"]
    assert eval_steps == [0, 4, 8]
    assert images == {HEATMAP_TAG: eval_steps}


def test_the_comparison_flags_a_changed_value_a_repeated_step_and_a_missing_tag(tensorboard_run):
    scalars, _ = read_tensorboard(tensorboard_run / "tensorboard")
    records = _records(tensorboard_run)
    changed = [dict(r) for r in records]
    last_train = next(r for r in reversed(changed) if r["type"] == "train")
    last_train["loss"] += 1e-3
    assert mismatches(scalars, expected_series(changed)) == [
        f"train/loss at step 8: {scalars['train/loss'][-1][1]} != {last_train['loss']}"
    ]
    assert mismatches(scalars, expected_series([*records, last_train])) != []  # step 8 twice
    assert mismatches(scalars, expected_series([r for r in records if r["type"] != "eval"])) != []


def test_resume_appends_and_hides_the_steps_after_the_checkpoint(tiny, tmp_path):
    config = _config(tiny, steps=4, log_every=1, eval_every=2, save_every=2, report_to=["tensorboard"])
    run_dir = tmp_path / "run"
    train(config, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-000004")  # as if killed before its last checkpoint
    train(config, run_dir, resume=True)  # steps 3 and 4 again
    expected = expected_series(_records(run_dir))
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    scalars, images = read_tensorboard(run_dir / "tensorboard")
    assert mismatches(scalars, expected) == []
    assert images == {HEATMAP_TAG: [0, 2, 4]}
    unpurged, _ = read_tensorboard(run_dir / "tensorboard", purge=False)  # what purge_step hides
    assert "train/loss: steps [1, 2, 3, 4, 3, 4] != [1, 2, 3, 4]" in mismatches(unpurged, expected)


def test_the_writer_is_closed_when_the_run_fails(tiny, tmp_path, monkeypatch):
    closed = []
    real_close = TensorBoardReporter.close
    monkeypatch.setattr(TensorBoardReporter, "close", lambda self: closed.append(real_close(self)))

    def fail(run, progress):
        raise OSError("disk full")

    monkeypatch.setattr(molora.run.training, "save_run_checkpoint", fail)
    run_dir = tmp_path / "run"
    with pytest.raises(OSError, match="disk full"):
        train(_config(tiny, steps=4, log_every=1, save_every=2, report_to=["tensorboard"]), run_dir)
    assert len(closed) == 1
    scalars, _ = read_tensorboard(run_dir / "tensorboard")
    assert mismatches(scalars, expected_series(_records(run_dir))) == []
    assert [s for s, _ in scalars["train/loss"]] == [1, 2]


def test_a_missing_package_is_named_with_its_install_command_before_anything_is_written(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if tensorboard were absent
    with pytest.raises(ValueError, match=r"'tensorboard' needs the package tensorboard.*pip install tensorboard"):
        train(_config(tiny, report_to=["tensorboard"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    monkeypatch.setitem(sys.modules, "wandb", None)
    config = tmp_path / "wandb.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(*tiny, report_to=["wandb"])))
    assert train_main(["--config", str(config), "--output-dir", str(tmp_path / "w")]) == 2
    assert not (tmp_path / "w").exists()


def test_report_to_names_are_checked_against_the_registry(tiny):
    with pytest.raises(ValueError, match=r"unknown reporter 'tensorbord'; did you mean 'tensorboard'\? choices are"):
        _config(tiny, report_to=["tensorbord"])
    with pytest.raises(ValueError, match=r"unknown reporter 'mlflow'; choices are \['tensorboard', 'wandb'\]"):
        _config(tiny, report_to=["mlflow"])
    with pytest.raises(ValueError, match="must be a list of names"):
        _config(tiny, report_to=[1])
    with pytest.raises(ValueError, match="twice"):
        _config(tiny, report_to=["tensorboard", "tensorboard"])
    assert _config(tiny, report_to="tensorboard").train.report_to == ["tensorboard"]
    assert _config(tiny).train.report_to == []


def test_scalar_tags_flatten_nested_values_and_drop_what_is_not_a_number():
    assert scalar_tags({"step": 3, "type": "train", "loss": 1.5, "aux/z": 2, "ok": True, "x": {"a": 1, "b": "s"}}) == {
        "train/loss": 1.5,
        "train/aux/z": 2.0,
        "train/x/a": 1.0,
    }
    assert scalar_tags({"step": 4, "type": "eval", "eval/news": 0.5}) == {"eval/news": 0.5}
    assert scalar_tags({"step": 4, "type": "alarm", "message": "expert 0 is dead"}) == {}


class FakeWandb(types.ModuleType):
    """The part of wandb's API the reporter uses, recording what it is given."""

    def __init__(self):
        super().__init__("wandb")
        self.util = types.SimpleNamespace(generate_id=lambda: "run1234")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished += 1

    def Image(self, figure):
        return ("image", figure)


def test_wandb_receives_the_same_scalars_and_heatmaps(tiny, tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run_dir = tmp_path / "run"
    train(_config(tiny, steps=4, log_every=2, eval_every=2, report_to=["wandb"]), run_dir)
    scalars: Series = {}
    for step, data in fake.logged:
        for tag, value in data.items():
            if tag != HEATMAP_TAG:
                scalars.setdefault(tag, []).append((step, value))
    assert mismatches(scalars, expected_series(_records(run_dir))) == []
    assert [step for step, data in fake.logged if HEATMAP_TAG in data] == [0, 2, 4]
    assert fake.finished == 1 and (run_dir / "wandb-run-id").read_text() == "run1234\n"
    assert fake.inits[0]["id"] == "run1234" and fake.inits[0]["resume"] == "allow"


def test_report_to_may_change_on_resume():
    without = RunConfig().to_dict()
    with_tensorboard = RunConfig.from_dict({"train": {"report_to": ["tensorboard"]}}).to_dict()
    assert config_differences(without, with_tensorboard) == []
    other_lr = RunConfig.from_dict({"train": {"report_to": ["tensorboard"], "lr": 1.0}}).to_dict()
    assert [key for key, _, _ in config_differences(without, other_lr)] == ["train.lr"]
