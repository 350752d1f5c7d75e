"""The decoding benchmark measures what it says: merged adapters decode at the base model's op count, an unmerged
adapter adds ops, and the table and the JSON carry every variant at both batch sizes."""

from __future__ import annotations

import json

import pytest

from bench import bench_decode, bench_speed

from .test_bench import TINY


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory, monkeypatch_module):
    out = tmp_path_factory.mktemp("decode") / "decode.json"
    monkeypatch_module.setattr(bench_speed, "REFERENCE", TINY)
    monkeypatch_module.setattr(bench_decode, "NEW_TOKENS", 4)
    monkeypatch_module.setattr(bench_decode, "PROMPT", 5)
    names = ["peft-r64", "peft-r64-merged", "lora-softmax", "lora-intuition", "lora-task", "lora-task-merged"]
    assert (
        bench_decode.main(
            ["--model", "reference", "--rounds", "2", "--device", "cpu", "--variants", *names, "--out", str(out)]
        )
        == 0
    )
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_merged_adapters_decode_at_the_base_models_op_count_and_unmerged_ones_add_ops(tiny_results):
    ops = {name: count["kernels"] for name, count in tiny_results["ops_per_decode_step"].items()}
    assert ops["peft-r64-merged"] == ops["base"] == ops["lora-task-merged"]
    assert ops["lora-softmax"] > ops["base"] and ops["peft-r64"] > ops["base"]
    assert ops["lora-intuition"] > ops["lora-softmax"]  # its pooled state and MLP run at every step


def test_every_variant_has_a_speed_at_both_batch_sizes(tiny_results):
    for batch in ("1", "8"):
        speeds = tiny_results["tokens_per_s"][batch]
        assert set(speeds) == set(tiny_results["ops_per_decode_step"])
        assert speeds["base"]["speed_vs_base"] == 1.0
        assert all(s["tokens_per_s"] > 0 for s in speeds.values())
