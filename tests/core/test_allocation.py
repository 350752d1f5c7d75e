"""num_experts presets (MoLA's per-quarter allocations): the rule, the injected counts, save/load and the ablation."""

import json

import pytest
import torch
import yaml

from molora import MoLoRAConfig, MoLoRALinear, MoLoRAModel, get_molora_model
from molora.ablation.harness import check_matched, load_ablation, run_ablation
from molora.core.allocation import allocate_experts, layer_index, quarter_sizes
from tests.conftest import build_base, make_batch, molora_config, outputs_of, randomize_experts
from tests.tiny import save_tiny_model, tiny_run_config, write_toy_domains

HOURGLASS = {"preset": "hourglass", "min": 2, "max": 8}


def _counts(model) -> dict[str, int]:
    base = model.base_model if isinstance(model, MoLoRAModel) else model
    return {n: m.experts.num_experts for n, m in base.named_modules() if isinstance(m, MoLoRALinear)}


# Hand-computed from the rule in allocation.allocate_experts: quarters of L // 4 layers, the remainder one each to
# quarters 0, 3, 1; counts per quarter min + (max - min) * q / 3 (rounded half up), reversed, max-min-min-max, mean.
EXPECTED = [
    ("hourglass", 8, [8, 8, 2, 2, 2, 2, 8, 8]),
    ("increasing", 4, [2, 4, 6, 8]),
    ("decreasing", 4, [8, 6, 4, 2]),
    ("uniform", 4, [5, 5, 5, 5]),
    ("increasing", 6, [2, 2, 4, 6, 8, 8]),  # 6 % 4 = 2: quarters of 2-1-1-2
    ("hourglass", 6, [8, 8, 2, 2, 8, 8]),
    ("increasing", 5, [2, 2, 4, 6, 8]),  # 2-1-1-1
    ("decreasing", 7, [8, 8, 6, 6, 4, 2, 2]),  # 2-2-1-2
    ("hourglass", 3, [8, 2, 8]),  # 1-1-0-1: the first and last layers keep the outer quarters' counts
    ("increasing", 2, [2, 8]),
    ("uniform", 1, [5]),
    ("increasing", 1, [2]),
    ("decreasing", 1, [8]),
    ("hourglass", 1, [8]),
    ("hourglass", 30, [8] * 8 + [2] * 14 + [8] * 8),  # SmolLM2-135M: 8-7-7-8
    ([3, 1, 1, 3], 7, [3, 3, 1, 1, 1, 3, 3]),  # explicit per-quarter counts
]


@pytest.mark.parametrize(("preset", "layers", "expected"), EXPECTED, ids=[f"{p}-{n}" for p, n, _ in EXPECTED])
def test_presets_give_the_documented_counts(preset, layers, expected):
    bounds = {} if isinstance(preset, list) else {"min_experts": 2, "max_experts": 8}
    assert allocate_experts(preset, layers, **bounds) == expected


def test_rounding_and_totals_of_the_quarters():
    # max - min = 7: increasing min + 7q/3 = 1, 3.33, 5.67, 8 -> 1 3 6 8; uniform 4.5 rounds up
    assert allocate_experts("increasing", 4, min_experts=1, max_experts=8) == [1, 3, 6, 8]
    assert allocate_experts("uniform", 4, min_experts=1, max_experts=8) == [5, 5, 5, 5]
    for low in range(1, 6):
        for high in range(low, 12):
            presets = ["increasing", "decreasing", "hourglass"] + ["uniform"] * ((low + high) % 2 == 0)
            totals = {sum(allocate_experts(p, 4, min_experts=low, max_experts=high)) for p in presets}
            assert totals == {2 * (low + high)}, (low, high)
    for layers in range(1, 41):
        sizes = quarter_sizes(layers)
        assert sum(sizes) == layers and max(sizes) - min(sizes) <= 1 and sizes[0] == max(sizes)
        assert sizes[3] == sizes[0] or layers % 4 == 1
    with pytest.raises(ValueError, match="num_layers"):
        quarter_sizes(0)


def test_the_injected_model_has_the_preset_counts_per_module_and_the_report_shows_them():
    config = MoLoRAConfig(target_modules=["q_proj", "v_proj", "down_proj"], num_experts=HOURGLASS, router="topk")
    model = get_molora_model(build_base("llama", num_hidden_layers=8), config)
    expected = dict(enumerate([8, 8, 2, 2, 2, 2, 8, 8]))
    counts = _counts(model)
    assert len(counts) == 24
    for name, count in counts.items():
        assert count == expected[layer_index(name)], name
    layers = {n: m for n, m in model.base_model.named_modules() if isinstance(m, MoLoRALinear)}
    assert all(layer.router.num_experts == counts[n] for n, layer in layers.items())
    report = model.injection_report
    assert report.experts_per_layer == expected and report.unused_patterns == {}
    assert "experts per layer 0-7: 8 8 2 2 2 2 8 8 (hourglass, quarters 8-2-2-8)" in str(report)
    assert [m.num_experts for m in report.modules if m.name.endswith("q_proj")] == [8, 8, 2, 2, 2, 2, 8, 8]
    ids = make_batch()
    assert torch.isfinite(outputs_of(model(**ids))).all()
    assert "experts per layer" not in str(get_molora_model(build_base("llama"), MoLoRAConfig()).injection_report)


def test_the_preset_spreads_over_the_adapted_layers_only():
    config = MoLoRAConfig(
        num_experts={"preset": "increasing", "min": 2, "max": 8}, layers_to_transform=[1, 4, 7], router="topk"
    )
    model = get_molora_model(build_base("llama", num_hidden_layers=8), config)
    assert model.injection_report.experts_per_layer == {1: 2, 4: 4, 7: 8}  # three layers: quarters 1-1-0-1
    assert "experts per layer [1, 4, 7]: 2 4 8 (increasing, quarters 2-4-6-8)" in str(model.injection_report)


def test_a_module_without_a_layer_index_is_named_and_the_model_untouched():
    model = build_base("llama")
    with pytest.raises(ValueError, match=r"'lm_head' has none.*exclude_modules"):
        get_molora_model(model, MoLoRAConfig(target_modules=["q_proj", "lm_head"], num_experts=HOURGLASS))
    assert not _counts(model) and all(p.requires_grad for p in model.parameters())


BAD_PRESETS = [
    ({"preset": "hourglas", "min": 2, "max": 8}, r"\['decreasing', 'hourglass', 'increasing', 'uniform'\] or a list"),
    ({"preset": None}, "must be one of"),
    ({"preset": "hourglass"}, "needs 'min' and 'max'"),
    ({"preset": "hourglass", "min": 0, "max": 8}, r"num_experts\['min'\] must be >= 1"),
    ({"preset": "hourglass", "min": 2.5, "max": 8}, r"num_experts\['min'\] must be int"),
    ({"preset": "hourglass", "min": 4, "max": 2}, r"max \(2\) must be >= min \(4\)"),
    ({"preset": [8, 2, 2]}, "list of 4 ints"),
    ({"preset": [8, 2, 2, 8], "min": 2}, "without min/max"),
    ({"preset": [8, 2, 2, 0]}, r"num_experts\['preset'\]\[3\] must be >= 1"),
    ({**HOURGLASS, ".*": 4}, r"got also \['\.\*'\].*cannot be mixed with \{regex: int\}"),
]


@pytest.mark.parametrize(("value", "message"), BAD_PRESETS, ids=[str(i) for i in range(len(BAD_PRESETS))])
def test_bad_presets_raise_naming_the_field(value, message):
    with pytest.raises(ValueError, match=message):
        MoLoRAConfig(num_experts=value)


def test_top_k_is_checked_against_the_largest_quarter_and_per_module_lookup_needs_every_target():
    with pytest.raises(ValueError, match="top_k=9 is larger than num_experts=8"):
        MoLoRAConfig(num_experts=HOURGLASS, router="topk", top_k=9)
    config = MoLoRAConfig(num_experts=HOURGLASS, router="topk", top_k=8)  # the 2-expert layers use both
    assert config.largest_num_experts() == 8
    with pytest.raises(ValueError, match="expert_counts"):
        config.experts_for("model.layers.0.self_attn.q_proj")
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert config.expert_counts(names) == dict(zip(names, [8, 8], strict=True))
    assert MoLoRAConfig(num_experts=4).expert_counts(names) == dict.fromkeys(names, 4)
    assert MoLoRAConfig(num_experts={r"layers\.1\..*": 3, ".*": 5}).expert_counts(names) == dict(
        zip(names, [5, 3], strict=True)
    )
    assert MoLoRAConfig(num_experts={"preset": (1, 2, 3, 4)}).num_experts == {"preset": [1, 2, 3, 4]}


def test_save_and_load_rebuild_the_same_counts_and_a_changed_preset_is_refused(tmp_path):
    config = molora_config("llama", router="task", num_experts={"preset": "decreasing", "min": 2, "max": 5})
    model = get_molora_model(build_base("llama", num_hidden_layers=4), config)
    randomize_experts(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "molora_config.json").read_text())["num_experts"]
    assert saved == {"preset": "decreasing", "min": 2, "max": 5}
    assert MoLoRAConfig.from_json_file(tmp_path / "molora_config.json") == config
    loaded = MoLoRAModel.from_pretrained(build_base("llama", num_hidden_layers=4), tmp_path)
    assert _counts(loaded) == _counts(model)
    assert sorted(set(_counts(loaded).values())) == [2, 3, 4, 5]
    batch = {**make_batch(), "task_ids": torch.tensor([0, 2])}
    model.eval()
    torch.testing.assert_close(outputs_of(loaded(**batch)), outputs_of(model(**batch)))
    merged = loaded.merge_and_unload(task_id=2)  # the task router merges per module, whatever its count
    reference = outputs_of(model(**{**batch, "task_ids": torch.tensor([2, 2])}))
    torch.testing.assert_close(merged(**make_batch()).logits, reference, rtol=1e-4, atol=1e-5)

    edited = json.loads((tmp_path / "molora_config.json").read_text())
    edited["num_experts"]["preset"] = "increasing"
    del edited["sha256"]  # edited on purpose
    (tmp_path / "molora_config.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj\.experts\.lora_A: checkpoint \[5, 4, 32\]"):
        MoLoRAModel.from_pretrained(build_base("llama", num_hidden_layers=4), tmp_path)


def test_block_routing_groups_share_the_count_of_their_layer():
    config = molora_config(
        "llama", router="topk", routing_scope="block", target_modules=["gate_proj", "up_proj", "down_proj"]
    )
    config.num_experts = {"preset": "increasing", "min": 2, "max": 4}
    model = get_molora_model(build_base("llama", num_hidden_layers=4), config)
    assert model.injection_report.experts_per_layer == {0: 2, 1: 3, 2: 3, 3: 4}
    assert all(m.routed_by is not None for m in model.injection_report.modules)
    assert torch.isfinite(outputs_of(model(**make_batch()))).all()


@pytest.fixture(scope="module")
def preset_ablation(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    spec = tiny_run_config(save_tiny_model(root / "model"), write_toy_domains(root / "toy.jsonl"), steps=2)
    spec["train"]["eval_at_start"] = False
    spec["molora"]["num_experts"] = {"preset": "uniform", "min": 2, "max": 6}
    # a row's dict merges into the base's: these change the preset name and keep min and max
    rows = [{"name": "uniform"}]
    rows += [{"name": name, "molora": {"num_experts": {"preset": name}}} for name in ("increasing", "decreasing")]
    rows.append({"name": "hourglass", "molora": {"num_experts": {"preset": "hourglass"}}})
    spec["ablation"] = {"seeds": 1, "match": {"reference": "uniform", "tolerance": 0.02}, "rows": rows}
    return spec


def test_ablation_rows_take_presets_and_the_parameter_match_can_refuse_one(preset_ablation, tmp_path):
    spec = json.loads(json.dumps(preset_ablation))
    path = tmp_path / "presets.yaml"
    path.write_text(yaml.safe_dump(spec))
    ablation = load_ablation(path)
    assert ablation.rows[2].spec["molora"]["num_experts"] == {"preset": "decreasing", "min": 2, "max": 6}
    # the tiny model has 2 layers: uniform 4 4, increasing 2 6, decreasing 6 2 (the same experts), hourglass 6 6
    with pytest.raises(ValueError, match=r"within 2% of 'uniform'.*off: hourglass: [\d,]+ \(\+"):
        check_matched(ablation)
    spec["ablation"]["rows"][3]["allow_unmatched"] = True
    path.write_text(yaml.safe_dump(spec))
    counts = check_matched(load_ablation(path))
    assert counts["uniform"] == counts["increasing"] == counts["decreasing"] < counts["hourglass"]

    spec["ablation"]["rows"] = spec["ablation"]["rows"][1:2]  # one row trains end to end (row.yaml, fresh config)
    spec["ablation"]["match"] = {}
    path.write_text(yaml.safe_dump(spec))
    (result,) = run_ablation(path, tmp_path / "out", inline=True)
    assert result["status"] == "ok" and result["spec"]["molora"]["num_experts"]["preset"] == "increasing"


def test_a_preset_row_over_a_regex_base_is_refused_naming_the_merge(preset_ablation, tmp_path):
    spec = json.loads(json.dumps(preset_ablation))
    spec["molora"]["num_experts"] = {"q_proj": 2, ".*": 4}
    path = tmp_path / "presets.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=r"cannot be mixed with \{regex: int\}"):
        load_ablation(path)
