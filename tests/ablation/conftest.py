"""The tiny ablation every harness test runs: a grid row, plain rows, a lever, the base model and a diverging row."""

import pytest

from tests.tiny import save_tiny_model, tiny_run_config, write_toy_domains


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    spec = tiny_run_config(save_tiny_model(root / "model"), write_toy_domains(root / "toy.jsonl"), steps=4)
    spec["data"].update(val_fraction=0.2, max_val_per_domain=6)
    spec["train"]["eval_at_start"] = False
    spec["ablation"] = {
        "seeds": 2,
        "quick_seeds": 2,
        "baseline": "peft-lora",
        "match": {"reference": "peft-lora", "tolerance": 0.5},
        "rows": [
            {
                "name": "peft-lora",
                "model": {"adapter": "peft-lora", "peft_rank": 16},
                "grid": {"train.lr": [0.01, 0.02]},
            },
            {"name": "softmax", "molora": {"router": "softmax"}},
            {"name": "task", "molora": {"router": "task", "mixture_scaling": "sum"}, "compare_to": "softmax"},
            {"name": "base-model", "model": {"adapter": "none"}},
            {"name": "diverges", "train": {"lr": 1.0e30}},
        ],
        "quick": {"train": {"steps": 2}},
    }
    return spec
