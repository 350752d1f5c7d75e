"""Two processes under torchrun on CPU (gloo), replicated (DDP) and sharded (train.sharding=fsdp, FSDP2): the sharded
adapter equals the single-process run's on the same global batches, a stopped run resumes to the same adapter bit
for bit with dropout and router jitter on (every rank's random state comes back), and a sharded launch that cannot
work is refused by name."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from molora.run.checkpoint import MANIFEST_NAME, sha256_file
from molora.run.config import RunConfig
from molora.run.sharding import check_sharding
from molora.run.training import train
from tests.tiny import replay_two_ranks, save_tiny_model, tiny_run_config, write_toy_domains

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-fsdp")
    return save_tiny_model(root / "model"), write_toy_domains(root / "toy.jsonl")


def torchrun(spec: dict, out: Path, *extra: str) -> subprocess.CompletedProcess:
    config = out.with_suffix(".yaml")
    config.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "train.train"]
    command += ["--config", str(config), "--output-dir", str(out), *extra]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def resumed_runs(tiny, tmp_path_factory):
    """A 6-step two-process FSDP run, and the same run stopped at step 3 and resumed: with dropout and router jitter,
    so every rank's random state must come back, not rank 0's alone. (The replicated path saves and restores the
    random states through the same code: one launch set is enough for both.)"""
    root = tmp_path_factory.mktemp("resume")
    spec = tiny_run_config(*tiny, steps=6, save_every=3, sharding="fsdp")
    spec["molora"].update(dropout=0.1, router_jitter=0.05)
    torchrun(spec, root / "whole")
    torchrun({**spec, "train": {**spec["train"], "stop_after": 3}}, root / "split")
    torchrun(spec, root / "split", "--resume")
    return root


def test_the_sharded_adapter_equals_the_single_process_one(tiny, tmp_path, monkeypatch):
    spec = tiny_run_config(*tiny, steps=6, sharding="fsdp")
    printed = torchrun(spec, tmp_path / "sharded").stdout
    assert printed.count("trainable parameters") == 1, printed  # the summary once (rank 0), not once per rank
    result = json.loads((tmp_path / "sharded" / "eval.json").read_text())
    assert result["world_size"] == 2 and result["ranks_identical"] is True
    replay_two_ranks(monkeypatch)  # one process, the same global batches
    train(RunConfig.from_dict(tiny_run_config(*tiny, steps=6, grad_accum=2)), tmp_path / "one")
    sharded, single = adapter(tmp_path / "sharded"), adapter(tmp_path / "one")
    assert sharded.keys() == single.keys()
    for key, value in single.items():  # the reductions run in another order: float tolerance
        torch.testing.assert_close(sharded[key], value, rtol=1e-4, atol=1e-6)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in single.items())


def test_a_stopped_two_process_run_resumes_to_the_same_adapter_bit_for_bit(resumed_runs):
    root = resumed_runs
    whole, split = adapter(root / "whole"), adapter(root / "split")
    assert whole.keys() == split.keys()
    for key in whole:
        assert torch.equal(whole[key], split[key]), key


def test_the_checkpoint_holds_the_whole_adapter_in_the_single_process_layout(resumed_runs):
    root = resumed_runs
    step = root / "whole" / "checkpoints" / "step-000006"
    saved = load_file(step / "adapter_model.safetensors")
    assert saved.keys() == adapter(root / "whole").keys()
    assert all(torch.equal(saved[k], v) for k, v in adapter(root / "whole").items())


def test_sharding_on_one_process_is_refused_naming_torchrun(tiny, tmp_path):
    spec = tiny_run_config(*tiny, steps=2, sharding="fsdp")
    with pytest.raises(ValueError, match=r"one process \(no process group\): launch it with torchrun"):
        train(RunConfig.from_dict(spec), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_sharding_a_quantized_base_is_refused_by_name():
    with pytest.raises(ValueError, match=r"model.quantization='nf4' is not supported"):
        check_sharding("fsdp", 2, "nf4")


def test_an_unknown_sharding_is_named(tiny):
    with pytest.raises(ValueError, match=r"train.sharding must be one of \('none', 'fsdp'\), got 'zero3'"):
        RunConfig.from_dict(tiny_run_config(*tiny, sharding="zero3"))


def test_the_resume_test_can_fail_a_checkpoint_without_the_other_ranks_random_state_does_not_repeat(
    resumed_runs, tmp_path
):
    """The counter-test: the stopped run's checkpoint with rng_ranks taken out (as format 2 wrote it: rank 0's state
    for every rank) resumes to another adapter."""
    root = resumed_runs
    run = tmp_path / "counter"
    shutil.copytree(root / "split", run)
    shutil.rmtree(run / "adapter")
    shutil.rmtree(run / "checkpoints" / "step-000006")
    step = run / "checkpoints" / "step-000003"
    state = json.loads((step / "trainer_state.json").read_text())
    assert len(state["rng_ranks"]) == 2
    state["rng_ranks"] = None
    (step / "trainer_state.json").write_text(json.dumps(state))
    tensors = load_file(step / "trainer_state.safetensors")
    kept = {k: v for k, v in tensors.items() if not k.startswith("rng_ranks.")}
    assert len(kept) == len(tensors) - 2
    save_file(kept, step / "trainer_state.safetensors", metadata={"format": "pt"})
    manifest = json.loads((step / MANIFEST_NAME).read_text())
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in step.iterdir()}
    files.pop(MANIFEST_NAME)
    (step / MANIFEST_NAME).write_text(json.dumps({**manifest, "files": files}))
    spec = yaml.safe_load((root / "whole.yaml").read_text())
    torchrun(spec, run, "--resume")
    whole, counter = adapter(root / "whole"), adapter(run)
    assert any(not torch.equal(whole[k], counter[k]) for k in whole)
