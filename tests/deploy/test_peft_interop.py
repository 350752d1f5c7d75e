"""PEFT both ways: an exported weighting loads in peft with molora's logits; adapters made by peft become experts
with their own logits, and export gives them back unchanged."""

from __future__ import annotations

import json

import peft  # a dev dependency: lost, the PEFT comparisons fail rather than skip
import pytest
import torch

from molora import MoLoRALinear, MoLoRAModel, export_peft, from_peft_adapters
from tests.conftest import build_base, make_batch, molora_config, outputs_of, randomize_experts
from tests.deploy.test_merging import CASES, build, forced_gates, one_hot

TOLERANCE = 1e-5


def peft_logits(arch: str, path, batch) -> torch.Tensor:
    model = peft.PeftModel.from_pretrained(build_base(arch), str(path)).eval()
    with torch.no_grad():
        return outputs_of(model(**batch))


def molora_logits(model, gates_for, batch) -> torch.Tensor:
    with torch.no_grad(), forced_gates(model, gates_for):
        return outputs_of(model(**batch))


@pytest.mark.parametrize("case", list(CASES))
def test_exported_weightings_load_in_peft_with_molora_logits(case, tmp_path):
    arch = CASES[case][0]
    batch = make_batch(batch=3)
    model = build(case)
    weights = torch.tensor([0.2, 0.5, 0.0, 0.3])
    fixed = {
        "expert": ({"expert": 1}, one_hot(1)),
        "weights": ({"weights": weights}, lambda n: weights if n == 4 else torch.ones(1)),
    }
    for label, (choice, gates_for) in fixed.items():
        written = export_peft(model, tmp_path / label, **choice)
        expected = molora_logits(model, gates_for, batch)
        assert (peft_logits(arch, tmp_path / label, batch) - expected).abs().max() < TOLERANCE, label
        if label == "weights" and CASES[case][2] == "lora" and "shared_experts" not in CASES[case][3]:
            assert written["r"] == 3 * 4  # the expert with gate 0 is left out of the rank


def test_a_task_router_exports_each_task(tmp_path):
    batch = make_batch(batch=2)
    model = MoLoRAModel(build_base("llama"), molora_config("llama", "task", use_rslora=True))
    randomize_experts(model)
    model.eval()
    for task in range(2):
        export_peft(model, tmp_path / f"task{task}", task_id=task)
        with torch.no_grad():
            expected = outputs_of(model(**batch, task_ids=torch.full((2,), task)))
        assert (peft_logits("llama", tmp_path / f"task{task}", batch) - expected).abs().max() < TOLERANCE


def test_the_logit_check_can_fail(tmp_path):
    """A wrong expert or a wrong alpha is caught at this tolerance."""
    batch = make_batch(batch=2)
    model = build("softmax-lora")
    export_peft(model, tmp_path / "e1", expert=1)
    assert (peft_logits("llama", tmp_path / "e1", batch) - molora_logits(model, one_hot(0), batch)).abs().max() > 1e-3
    config_path = tmp_path / "e1" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["lora_alpha"] *= 1.01
    config_path.write_text(json.dumps(config))
    difference = peft_logits("llama", tmp_path / "e1", batch) - molora_logits(model, one_hot(1), batch)
    assert difference.abs().max() > TOLERANCE


def make_peft_adapters(tmp_path, specs, arch="llama", seed=0):
    """One PEFT adapter per spec (LoraConfig options), random A and B, saved; returns the folders."""
    folders = []
    for index, options in enumerate(specs):
        torch.manual_seed(seed + index)
        config = peft.LoraConfig(
            **{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False} | options
        )
        model = peft.get_peft_model(build_base(arch), config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.3)
        folder = tmp_path / f"adapter{index}"
        model.save_pretrained(str(folder))
        folders.append(folder)
    return folders


SPECS = {
    "same": [{}, {}, {}],
    "alphas": [{}, {"lora_alpha": 4}, {"lora_alpha": 16}],
    "patterns": [{"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 3}}] * 2,
    "fold-patterns": [{"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 3}}, {"rank_pattern": {"v_proj": 2}}],
    "rslora": [{"use_rslora": True}, {"use_rslora": True, "lora_alpha": 5}],
}


@pytest.mark.parametrize("spec", list(SPECS))
def test_imported_adapters_keep_their_logits_and_export_gives_them_back(spec, tmp_path):
    batch = make_batch(batch=3)
    folders = make_peft_adapters(tmp_path, SPECS[spec])
    model = from_peft_adapters(build_base("llama"), folders).eval()
    assert model.molora_config.num_experts == len(folders)
    for index, folder in enumerate(folders):
        expected = peft_logits("llama", folder, batch)
        assert (molora_logits(model, one_hot(index), batch) - expected).abs().max() < TOLERANCE
        export_peft(model, tmp_path / f"back{index}", expert=index)
        assert (peft_logits("llama", tmp_path / f"back{index}", batch) - expected).abs().max() < TOLERANCE
        if spec in ("same", "patterns"):  # nothing folded: the very same tensors and config come back
            from safetensors.torch import load_file

            original = load_file(str(folder / "adapter_model.safetensors"))
            back = load_file(str(tmp_path / f"back{index}" / "adapter_model.safetensors"))
            assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
            before = json.loads((folder / "adapter_config.json").read_text())
            after = json.loads((tmp_path / f"back{index}" / "adapter_config.json").read_text())
            for key in ("r", "lora_alpha", "use_rslora"):
                assert before[key] == after[key], key
            resolved = peft.PeftModel.from_pretrained(build_base("llama"), str(folder)).peft_config["default"]
            reloaded = peft.PeftModel.from_pretrained(build_base("llama"), str(tmp_path / f"back{index}"))
            for name in original:
                module = name.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
                left = resolved.rank_pattern.get(module.rsplit(".", 1)[1], resolved.r)
                assert left == reloaded.get_submodule(f"base_model.model.{module}").r["default"]


def test_different_ranks_are_refused_or_padded(tmp_path):
    batch = make_batch(batch=2)
    folders = make_peft_adapters(tmp_path, [{"r": 4}, {"r": 2}])
    with pytest.raises(ValueError, match=r"ranks \[4, 2\].*pad_ranks=True"):
        from_peft_adapters(build_base("llama"), folders)
    model = from_peft_adapters(build_base("llama"), folders, pad_ranks=True).eval()
    for index, folder in enumerate(folders):
        expected = peft_logits("llama", folder, batch)
        assert (molora_logits(model, one_hot(index), batch) - expected).abs().max() < TOLERANCE


def test_trainable_choices(tmp_path):
    folders = make_peft_adapters(tmp_path, [{}, {}])
    for trainable, experts, routers in (("router", False, True), ("all", True, True), ("none", False, False)):
        model = from_peft_adapters(build_base("llama"), folders, trainable=trainable, router="topk", top_k=1)
        for _, layer in model._layers:
            assert all(p.requires_grad == experts for p in layer.experts.parameters())
            assert all(p.requires_grad == routers for p in layer.router.parameters())
    assert not model.training


def test_bad_adapters_are_refused_before_the_base_changes(tmp_path):
    base = build_base("llama")
    folders = make_peft_adapters(tmp_path, [{}, {"target_modules": ["q_proj", "k_proj"]}])
    with pytest.raises(ValueError, match="every adapter must adapt the same modules"):
        from_peft_adapters(base, folders)
    dora = make_peft_adapters(tmp_path / "dora", [{"use_dora": True}])
    with pytest.raises(ValueError, match="use_dora=True adds more than B @ A"):
        from_peft_adapters(base, dora)
    wide = make_peft_adapters(tmp_path / "wide", [{}], arch="llama")
    config = json.loads((wide[0] / "adapter_config.json").read_text())
    config["peft_type"] = "IA3"
    (wide[0] / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="only LoRA adapters become experts"):
        from_peft_adapters(base, wide)
    with pytest.raises(ValueError, match=r"\['rank'\] are read from the adapters"):
        from_peft_adapters(base, folders[:1], rank=8)
    with pytest.raises(FileNotFoundError, match=r"no adapter_config\.json"):
        from_peft_adapters(base, [tmp_path])
    assert not any(isinstance(m, MoLoRALinear) for m in base.modules())


def test_adapters_of_another_base_give_the_base_back(tmp_path):
    folders = make_peft_adapters(tmp_path, [{}])
    other = build_base("llama", hidden_size=48)
    with pytest.raises(ValueError, match="do not fit this base model"):
        from_peft_adapters(other, folders)
    assert not any(isinstance(m, MoLoRALinear) for m in other.modules())
