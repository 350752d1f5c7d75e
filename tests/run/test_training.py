import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from molora.run.config import RunConfig
from molora.run.setup import lr_factor
from molora.run.training import train
from tests.tiny import replay_two_ranks, save_tiny_model, tiny_run_config, write_toy_domains

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_model(root / "model"), write_toy_domains(root / "toy.jsonl")


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_training_lowers_eval_loss_and_writes_the_run_folder(tiny, tmp_path):
    model_dir, data_file = tiny
    config = RunConfig.from_dict(tiny_run_config(model_dir, data_file, steps=40, eval_every=20, save_every=20))
    result = train(config, tmp_path / "run")
    for domain in ("upper", "reverse"):
        assert result["after"][domain]["loss"] < result["before"][domain]["loss"] - 0.3, domain
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} == {
        ".molora-train.lock",
        "config.yaml",
        "metrics.jsonl",
        "eval.json",
        "adapter",
        "checkpoints",
        "summary.md",
        "routing",
    }
    assert {p.name for p in (run / "routing").iterdir()} == {
        "report.md",
        "stats.json",
        "routing.csv",
        "task_expert.png",
        "layer_expert.png",
    }
    assert set(json.loads((run / "routing" / "stats.json").read_text())["tasks"]) == {"upper", "reverse"}
    assert 0 <= result["routing"]["mi_normalized"] <= 1 and result["trainable_params"] > 0
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 40
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if r["type"] == "train"]
    assert [r["step"] for r in train_lines] == [5, 10, 15, 20, 25, 30, 35, 40]
    for key in (
        "loss",
        "lm_loss",
        "aux/balance",
        "aux/z",
        "lr",
        "tokens_per_s",
        "grad_norm",
        "router_entropy",
        "load_cv",
        "dead_experts",
    ):
        assert key in train_lines[-1], key
    assert [r["step"] for r in lines if r["type"] == "eval"] == [0, 20, 40]
    assert train_lines[0]["aux/balance"] >= 0.99  # the balance loss is never below 1 for top-k routing
    assert json.loads((run / "eval.json").read_text())["after"]["upper"]["loss"] == result["after"]["upper"]["loss"]
    summary = (run / "summary.md").read_text()
    assert "| upper | 0 |" in summary and "| reverse | 1 |" in summary  # the task_id a task router needs
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000020", "step-000040"]


def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(tiny, tmp_path):
    model_dir, data_file = tiny
    spec = tiny_run_config(model_dir, data_file, steps=12, save_every=4, grad_accum=2)
    spec["molora"].update(dropout=0.1, router_jitter=0.05)  # RNG in the loop must be restored too
    train(RunConfig.from_dict(spec), tmp_path / "whole")
    stopped = RunConfig.from_dict({**spec, "train": {**spec["train"], "stop_after": 6}})
    assert train(stopped, tmp_path / "split")["stopped_at"] == 6
    assert not (tmp_path / "split" / "adapter").exists()
    train(RunConfig.from_dict(spec), tmp_path / "split", resume=True)
    whole, split = _adapter(tmp_path / "whole"), _adapter(tmp_path / "split")
    assert whole.keys() == split.keys()
    for key in whole:
        assert torch.equal(whole[key], split[key]), key
    logged = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["step"], r["type"]) for r in logged]
    assert len(keys) == len(set(keys))  # nothing logged twice across the restart
    assert [r["step"] for r in logged] == sorted(r["step"] for r in logged)


def test_resume_without_a_checkpoint_is_an_error(tiny, tmp_path):
    model_dir, data_file = tiny
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(RunConfig.from_dict(tiny_run_config(model_dir, data_file)), tmp_path / "none", resume=True)


def test_two_process_torchrun_ends_with_identical_adapters(tiny, tmp_path, monkeypatch):
    model_dir, data_file = tiny
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(model_dir, data_file, steps=6)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",  # a free port of its own: two runs at once do not collide
        "-m",
        "train.train",
        "--config",
        str(config),
        "--output-dir",
        str(tmp_path / "ddp"),
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "ddp" / "eval.json").read_text())
    assert result["world_size"] == 2 and result["ranks_identical"] is True

    replay_two_ranks(monkeypatch)  # the reference: one process, the same global batches
    train(RunConfig.from_dict(tiny_run_config(model_dir, data_file, steps=6, grad_accum=2)), tmp_path / "one")
    sharded = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    single = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    assert sharded.keys() == single.keys()
    for key, value in single.items():  # the sums of the all-reduce run in another order: float tolerance
        torch.testing.assert_close(sharded[key], value, rtol=1e-4, atol=1e-6)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in single.items())  # trained, not two zero-init B's


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    values = [lr_factor(s, warmup=4, total=20, min_ratio=0.1) for s in range(20)]
    assert values[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(values[3:], values[4:], strict=False))  # noqa: RUF007
    # cosine by hand: 0.1 + 0.9 * (1 + cos(pi * progress)) / 2, progress = (step - 4) / 16
    assert values[8] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))  # 0.8682
    assert values[12] == pytest.approx(0.55)  # halfway: the midpoint between peak and floor
    assert lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)


def test_router_learning_rate_and_bf16_autocast(tiny, tmp_path):
    from molora import get_molora_model
    from molora.run.base_models import load_base
    from molora.run.setup import make_optimizer

    model_dir, data_file = tiny
    config = RunConfig.from_dict(tiny_run_config(model_dir, data_file, router_lr=0.5, steps=3, bf16=True))
    model = get_molora_model(load_base(str(model_dir))[0], config.molora)
    groups = make_optimizer(model, config).param_groups
    router_ids = {id(p) for n, p in model.named_parameters() if ".router." in n}
    assert [g["lr"] for g in groups] == [0.01, 0.5]
    assert {id(p) for p in groups[1]["params"]} == router_ids
    result = train(config, tmp_path / "bf16")
    assert all(math.isfinite(v["loss"]) for v in result["after"].values())


def test_collapse_alarm_counts_consecutive_evaluations_and_low_entropy():
    from molora.run.evaluation import CollapseAlarm

    alarm = CollapseAlarm(patience=2, entropy_ratio=0.1)
    healthy = {"layers": {"l0": {"load": [0.25, 0.25, 0.25, 0.25], "entropy": 1.3}}}
    dying = {"layers": {"l0": {"load": [0.49, 0.49, 0.01, 0.01], "entropy": 1.0}}}
    assert alarm.check(dying) == []
    assert len(alarm.check(dying)) == 2  # experts 2 and 3, second consecutive evaluation
    assert alarm.check(dying) == []  # reported once per streak
    assert alarm.check(healthy) == []
    collapsed = {"layers": {"l0": {"load": [0.3, 0.3, 0.2, 0.2], "entropy": 0.05}}}
    assert "routing entropy" in alarm.check(collapsed)[0]


def test_alarms_reach_the_metrics_log(tiny, tmp_path, capsys):
    model_dir, data_file = tiny
    spec = tiny_run_config(model_dir, data_file, steps=4, eval_every=2, alarm_entropy_ratio=1.0)
    train(RunConfig.from_dict(spec), tmp_path / "run")
    alarms = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    alarms = [r for r in alarms if r["type"] == "alarm"]
    assert alarms and {r["step"] for r in alarms} == {0, 2, 4}
    assert "routing entropy" in alarms[0]["message"] and "ALARM" in capsys.readouterr().out
