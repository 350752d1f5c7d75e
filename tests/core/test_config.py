import dataclasses
import json
import re

import pytest

from molora import MoLoRAConfig, __version__
from molora.core.config import pattern_lookup
from molora.run.config import RunConfig

BAD_CONFIGS = [
    ("target_modules", dict(target_modules=[])),
    ("target_modules", dict(target_modules=5)),
    ("target_modules", dict(target_modules="q_proj(")),
    ("exclude_modules", dict(exclude_modules=3)),
    ("num_experts", dict(num_experts=0)),
    ("num_experts", dict(num_experts={"q_proj": 0})),
    ("num_experts", dict(num_experts={"[": 2})),
    ("num_experts", dict(num_experts=2.5)),
    ("expert_type", dict(expert_type="dora")),
    ("rank", dict(rank=0)),
    ("rank", dict(rank=-3)),
    ("alpha", dict(alpha=0)),
    ("dropout", dict(dropout=1.0)),
    ("dropout", dict(dropout=-0.1)),
    ("rank_pattern", dict(rank_pattern={"q_proj": 0})),
    ("alpha_pattern", dict(alpha_pattern={"(": 4})),
    ("router", dict(router="hash")),
    ("top_k", dict(router="topk", num_experts=4, top_k=5)),
    (
        "top_k",
        dict(router="topk", num_experts={"q": 4, "v": 2}, top_k=5),
    ),  # a module with fewer experts uses all of them; more than any module has is an error
    ("top_k", dict(router="topk", top_k=0)),
    ("top_k", dict(router="switch", top_k=2)),
    ("router_temperature", dict(router_temperature=0.0)),
    ("router_jitter", dict(router_jitter=-0.1)),
    ("intuition_pooling", dict(intuition_pooling="max")),
    ("dispatch", dict(dispatch="scatter")),
    ("intuition_hidden", dict(intuition_hidden=1)),
    ("num_tasks", dict(router="task")),
    ("num_tasks", dict(router="task", num_tasks=0)),
    ("aux_losses", dict(aux_losses={"load": 0.1})),
    ("aux_losses", dict(aux_losses={"balance": -1.0})),
    ("aux_losses", dict(aux_losses=["balance"])),
    ("layers_to_transform", dict(layers_to_transform=[-1])),
    ("layers_to_transform", dict(layers_to_transform=[])),
    ("init_lora_weights", dict(init_lora_weights="gaussian")),
]


@pytest.mark.parametrize(("field", "kwargs"), BAD_CONFIGS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_CONFIGS)])
def test_bad_config_raises_value_error_naming_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        MoLoRAConfig(**kwargs)


def test_defaults_follow_the_router():
    assert MoLoRAConfig(router="topk").top_k == 2
    assert MoLoRAConfig(router="switch").top_k == 1
    assert MoLoRAConfig(router="intuition").top_k is None
    assert MoLoRAConfig(router="task", num_tasks=3).top_k is None
    assert MoLoRAConfig(layers_to_transform=1).layers_to_transform == [1]
    with pytest.warns(UserWarning, match="top_k is ignored"):
        MoLoRAConfig(router="softmax", top_k=2)


def test_round_trip_through_dict_and_json(tmp_path):
    config = MoLoRAConfig(
        target_modules=".*proj",
        num_experts={"q_proj": 8, ".*": 2},
        router="topk",
        rank_pattern={"v_proj": 4},
        aux_losses={"balance": 0.02, "cv": 0.1},
    )
    data = config.to_dict()
    assert data["molora_version"] == __version__
    assert MoLoRAConfig.from_dict(data) == config
    config.to_json_file(tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text())["num_experts"] == {"q_proj": 8, ".*": 2}
    assert MoLoRAConfig.from_json_file(tmp_path / "c.json") == config
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]  # no temp files left behind


def test_saved_patterns_keep_their_order(tmp_path):
    """The first matching pattern wins, so a saved config must keep each pattern dict's order: sorted keys put '.*'
    first and gave q_proj 4 experts and rank 8 after a reload."""
    config = MoLoRAConfig(
        num_experts={"q_proj|v_proj": 1, ".*": 4},
        rank_pattern={"q_proj": 4, ".*": 8},
        alpha_pattern={"q_proj": 8.0, ".*": 32.0},
    )
    config.to_json_file(tmp_path / "c.json")
    loaded = MoLoRAConfig.from_json_file(tmp_path / "c.json")
    name = "model.layers.0.self_attn.q_proj"
    assert (loaded.experts_for(name), loaded.rank_for(name), loaded.alpha_for(name)) == (1, 4, 8.0)
    assert list(loaded.num_experts) == ["q_proj|v_proj", ".*"]
    # the check can fail: the same patterns in sorted order mean something else
    data = {k: v for k, v in config.to_dict().items() if k != "molora_version"}
    resorted = MoLoRAConfig(**data | {"num_experts": dict(sorted(config.num_experts.items()))})
    assert resorted.experts_for(name) == 4


def test_an_unknown_key_is_an_error_naming_it_and_the_closest_field():
    data = MoLoRAConfig().to_dict() | {"num_expert": 4}
    with pytest.raises(ValueError, match="unknown key 'num_expert'; did you mean 'num_experts'"):
        MoLoRAConfig.from_dict(data)


def test_per_module_values_use_the_first_matching_pattern():
    config = MoLoRAConfig(num_experts={r"layers\.0\..*": 8, ".*": 2}, rank_pattern={"v_proj": 4}, alpha_pattern={})
    assert config.experts_for("model.layers.0.self_attn.q_proj") == 8
    assert config.experts_for("model.layers.1.self_attn.q_proj") == 2
    assert config.rank_for("model.layers.1.self_attn.v_proj") == 4
    assert config.rank_for("model.layers.1.self_attn.q_proj") == 8
    assert pattern_lookup({"proj": 1}, "model.q_proj") is None  # suffixes are whole dotted parts
    with pytest.raises(ValueError, match="num_experts"):
        MoLoRAConfig(num_experts={"q_proj": 2}).experts_for("model.v_proj")


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("r", "did you mean 'rank'? ('r' is PEFT's name for it)"),
        ("lora_alpha", "did you mean 'alpha'? ('lora_alpha' is PEFT's name for it)"),
        ("lora_dropout", "did you mean 'dropout'?"),
        ("task_type", "'task_type' is a PEFT LoraConfig field: molora needs no task type"),
        ("bias", "'bias' is a PEFT LoraConfig field: molora trains no biases"),
        ("num_expert", "did you mean 'num_experts'?"),
    ],
)
def test_peft_spellings_and_typos_in_python_name_the_field_meant(key, expected):
    with pytest.raises(TypeError, match=re.escape(f"MoLoRAConfig got an unknown field {key!r}; {expected}")):
        MoLoRAConfig(**{key: 8})


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("r", "did you mean 'molora.rank'? ('r' is PEFT's name for it)"),  # difflib alone suggested 'molora'
        ("task_type", "'task_type' is a PEFT LoraConfig field"),  # difflib alone suggested 'molora.expert_type'
        ("bias", "'bias' is a PEFT LoraConfig field"),  # ... and 'molora.rank'
    ],
)
def test_peft_spellings_as_yaml_keys_name_the_field_meant(key, expected):
    with pytest.raises(ValueError, match=re.escape(f"unknown config key 'molora.{key}'; {expected}")):
        RunConfig.from_dict({"molora": {key: 8}})


def test_the_keyword_check_leaves_construction_as_it_was():
    config = MoLoRAConfig(["q_proj"], rank=4)  # positional and keyword fields, as the dataclass takes them
    assert config.target_modules == ["q_proj"] and config.rank == 4
    assert dataclasses.replace(config, rank=2).rank == 2
