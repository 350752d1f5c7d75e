import csv

import pytest
import yaml

from molora.ablation import load_ablation, run_ablation
from molora.cli import ablate_main, inspect_main
from tests.tiny import save_tiny_model, tiny_run_config, write_toy_domains


@pytest.fixture(scope="module")
def tiny_ablation(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    spec = tiny_run_config(save_tiny_model(root / "model"), write_toy_domains(root / "toy.jsonl"), steps=4)
    spec["ablation"] = {
        "rows": [
            {"name": "softmax", "molora": {"router": "softmax"}},
            {"name": "topk", "molora": {"router": "topk", "top_k": 2}},
            {"name": "switch", "molora": {"router": "switch"}},
            {"name": "intuition", "molora": {"router": "intuition"}},
            {"name": "task", "molora": {"router": "task"}},
            {"name": "rank1-softmax", "molora": {"expert_type": "rank1", "num_experts": 16, "router": "softmax"}},
            {"name": "rank1-intuition", "molora": {"expert_type": "rank1", "num_experts": 16, "router": "intuition"}},
            {"name": "peft-lora", "model": {"adapter": "peft-lora"}},
            {"name": "base-model", "model": {"adapter": "none"}},
            {"name": "broken", "molora": {"rank": 4, "target_modules": ["qkv_proj"]}},
        ],
        "quick": {"train": {"steps": 2}},
    }
    path = root / "ablation.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_every_row_runs_and_the_table_reports_failures(tiny_ablation, tmp_path):
    rows = run_ablation(tiny_ablation, tmp_path, quick=True, inline=True)
    by_name = {r["row"]: r for r in rows}
    assert [r["row"] for r in rows][:9] == [
        "softmax",
        "topk",
        "switch",
        "intuition",
        "task",
        "rank1-softmax",
        "rank1-intuition",
        "peft-lora",
        "base-model",
    ]
    assert by_name["broken"]["status"] == "failed" and "qkv_proj" in by_name["broken"]["error"]
    for name, row in by_name.items():
        if name != "broken":
            assert row["status"] == "ok", row
            assert row["loss/upper"] > 0 and row["loss/mean"] > 0
    softmax, peft = by_name["softmax"]["trainable_params"], by_name["peft-lora"]["trainable_params"]
    assert abs(peft - softmax) / softmax < 0.15  # the PEFT baseline's rank matches the mixture's budget
    assert by_name["base-model"]["trainable_params"] == 0 and by_name["base-model"]["routing_mi"] is None
    assert by_name["task"]["routing_mi"] is not None and by_name["peft-lora"]["routing_mi"] is None
    assert {p.name for p in tmp_path.iterdir()} >= {"ablation.md", "ablation.csv", "ablation.png", "rows"}
    table = (tmp_path / "ablation.md").read_text()
    assert "| broken | failed:" in table and "| peft-lora |" in table
    with (tmp_path / "ablation.csv").open() as handle:
        assert [r["row"] for r in csv.DictReader(handle)] == [r["row"] for r in rows]


def test_rows_in_fresh_processes_and_the_cli(tiny_ablation, tmp_path, capsys):
    spec = yaml.safe_load(tiny_ablation.read_text())
    spec["ablation"]["rows"] = spec["ablation"]["rows"][:1]
    one_row = tmp_path / "one.yaml"
    one_row.write_text(yaml.safe_dump(spec))
    assert ablate_main(["--config", str(one_row), "--quick", "--output-dir", str(tmp_path / "out")]) == 0
    row = next(csv.DictReader((tmp_path / "out" / "ablation.csv").open()))
    assert row["status"] == "ok" and float(row["peak_mem_mb"]) > 0
    run = tmp_path / "out" / "rows" / "softmax" / "run"
    assert inspect_main(["--run", str(run), "--output-dir", str(tmp_path / "inspected")]) == 0
    assert (tmp_path / "inspected" / "report.md").is_file()
    assert "I(task; expert)" in capsys.readouterr().out


def test_bad_ablation_configs(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"train": {"steps": 2}}))
    with pytest.raises(ValueError, match="ablation"):
        load_ablation(path)
    path.write_text(yaml.safe_dump({"ablation": {"rows": [{"name": "a", "trian": {}}]}}))
    with pytest.raises(ValueError, match="did you mean 'train'"):
        load_ablation(path)
    path.write_text(yaml.safe_dump({"ablation": {"rows": [{"name": "a"}, {"name": "a"}]}}))
    with pytest.raises(ValueError, match="unique"):
        load_ablation(path)
