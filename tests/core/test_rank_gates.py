"""Learned rank gates, the rank schedule and pruning: checked against the same model with the closed components'
B columns zeroed by hand, over several seeds and layouts."""

from __future__ import annotations

import copy

import pytest
import torch

from molora import MoLoRAConfig, MoLoRAModel, get_molora_model
from molora.core.rank_gates import effective_ranks, prune_ranks, set_active_fraction
from molora.deploy.merging import merged_delta
from tests.conftest import build_base, make_batch, molora_config, outputs_of

LAYOUTS = {
    "lora": {},
    "hydra-shared": {"share_lora_a": True, "shared_experts": 1},
    "input-scope": {"target_modules": ["q_proj", "k_proj", "v_proj"], "routing_scope": "input"},
    "block-rank-pattern": {
        "target_modules": ["gate_proj", "up_proj", "down_proj"],
        "routing_scope": "block",
        "rank_pattern": {"down_proj": 6},
    },
}


def gated_model(layout: str, seed: int, **overrides) -> MoLoRAModel:
    config = molora_config("llama", "softmax", rank=4, rank_gates=True, **LAYOUTS[layout] | overrides)
    model = get_molora_model(build_base("llama"), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                values = torch.randn(param.shape, generator=generator)
                param.copy_(values * 2 if name.endswith("rank_gates.logits") else values * 0.3)
    return model.eval()


def zeroed_reference(model: MoLoRAModel, masks: dict[str, torch.Tensor]) -> MoLoRAModel:
    """The same adapter without gates: each closed component's B column (or v entry) set to zero by hand."""
    config = copy.deepcopy(model.molora_config)
    config.rank_gates = False
    reference = get_molora_model(build_base("llama"), config)
    state = {k: v for k, v in model.adapter_state_dict().items() if "rank_gates" not in k}
    reference.load_adapter_state_dict(state)
    with torch.no_grad():
        for name, layer in reference._layers:
            layer.experts.lora_B.mul_(masks[name].unsqueeze(-1).float())
    return reference.eval()


def hard_masks(model: MoLoRAModel) -> dict[str, torch.Tensor]:
    return {name: layer.experts.rank_gates.kept() for name, layer in model._layers}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("seed", range(3))
def test_eval_gates_are_hard_and_pruning_keeps_the_outputs(layout, seed):
    batch = make_batch(batch=3)
    model = gated_model(layout, seed)
    masks = hard_masks(model)
    assert any(not m.all() for m in masks.values()) and any(m.any() for m in masks.values())
    with torch.no_grad():
        gated = outputs_of(model(**batch))
        expected = outputs_of(zeroed_reference(model, masks)(**batch))
    assert (gated - expected).abs().max() < 1e-5
    ranks = effective_ranks(model)
    assert ranks == {name: mask.sum(1).tolist() for name, mask in masks.items()}
    assert effective_ranks(model.train()) == ranks  # the hard gates, also while training (a run logs mid-training)
    model.eval()
    full = {name: layer.experts.rows_per_expert for name, layer in model._layers}
    report = prune_ranks(model)
    assert report["params_after"] < report["params_before"]
    for name, layer in model._layers:
        before, after = report["ranks"][name]
        kept = max(max(ranks[name]), 1) if layer.experts.lora_A.dim() == 3 else int(masks[name].any(0).sum())
        assert (before, after) == (full[name], kept)
        assert layer.experts.rows_per_expert == after and layer.experts.rank_gates is None
    with torch.no_grad():
        pruned = outputs_of(model(**batch))
    assert (pruned - gated).abs().max() < 1e-5


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("seed", range(3))
def test_merging_reads_the_eval_gates_whatever_the_mode(layout, seed):
    """merge_and_unload and export_peft write what eval computes, also from a model left in training mode (where
    the forward samples relaxed gates): against the same adapter with the closed components zeroed by hand."""
    model = gated_model(layout, seed)
    reference = zeroed_reference(model, hard_masks(model))
    model.train()
    for (name, layer), (_, plain) in zip(model._layers, reference._layers, strict=True):
        gates = torch.rand(layer.routing_router.num_experts, generator=torch.Generator().manual_seed(seed))
        assert (merged_delta(layer, gates) - merged_delta(plain, gates)).abs().max() < 1e-6, name


def test_a_pruned_model_saves_and_loads(tmp_path):
    batch = make_batch(batch=2)
    model = gated_model("block-rank-pattern", seed=0)
    prune_ranks(model)
    with torch.no_grad():
        expected = outputs_of(model(**batch))
    model.save_pretrained(tmp_path)
    loaded = MoLoRAModel.from_pretrained(build_base("llama"), tmp_path)
    assert not loaded.molora_config.rank_gates
    with torch.no_grad():
        assert (outputs_of(loaded(**batch)) - expected).abs().max() < 1e-6


def test_the_reference_detects_a_component_kept_by_mistake():
    """The check can fail: opening one closed gate changes the outputs beyond the tolerance."""
    batch = make_batch(batch=3)
    model = gated_model("lora", seed=1)
    masks = hard_masks(model)
    name, layer = next((n, lay) for n, lay in model._layers if not masks[n].all())
    with torch.no_grad():
        closed = (~masks[name]).nonzero()[0]
        layer.experts.rank_gates.logits[tuple(closed)] = 5.0
        assert (outputs_of(model(**batch)) - outputs_of(zeroed_reference(model, masks)(**batch))).abs().max() > 1e-4


def test_training_gates_are_relaxed_and_the_penalty_is_the_mean_keep_probability():
    model = gated_model("lora", seed=0, aux_losses={"rank_sparsity": 0.5}).train()
    batch = make_batch(batch=2)
    torch.manual_seed(0)
    first = outputs_of(model(**batch))
    second = outputs_of(model(**batch))
    assert not torch.equal(first, second)  # a new relaxed sample per forward
    gates = model._layers[0][1].experts.rank_gates()
    assert ((gates > 0) & (gates < 1)).all()
    by_hand = torch.stack([torch.sigmoid(layer.experts.rank_gates.logits).mean() for _, layer in model._layers]).mean()
    terms = model.aux_loss_terms()
    assert set(terms) == {"rank_sparsity"} and torch.allclose(terms["rank_sparsity"], by_hand)
    (second.square().mean() + model.aux_loss()).backward()
    assert all(layer.experts.rank_gates.logits.grad.abs().sum() > 0 for _, layer in model._layers)
    per_layer = model.aux_loss_terms(per_layer=True)
    assert set(per_layer) == {name for name, _ in model._layers}


def test_the_penalty_closes_gates_in_training():
    model = gated_model("lora", seed=0, aux_losses={"rank_sparsity": 1.0})
    with torch.no_grad():
        for _, layer in model._layers:
            layer.experts.rank_gates.logits.fill_(1.0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=0.05)
    batch = make_batch(batch=2)
    for _ in range(40):
        optimizer.zero_grad()
        output = model(**batch, labels=batch["input_ids"])
        (output.loss * 0 + model.aux_loss()).backward()
        optimizer.step()
    ranks = effective_ranks(model.eval())
    assert all(rank == 0 for counts in ranks.values() for rank in counts)


@pytest.mark.parametrize("fraction, expected", [(0.25, 1), (0.5, 2), (0.6, 3), (1.0, 4)])
def test_the_rank_schedule_masks_the_last_components(fraction, expected):
    batch = make_batch(batch=2)
    config = molora_config("llama", "softmax", rank=4)
    model = get_molora_model(build_base("llama"), config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.eval()
    set_active_fraction(model, fraction)
    assert all(counts == [expected] * 4 for counts in effective_ranks(model).values())
    with torch.no_grad():
        masked = outputs_of(model(**batch))
        set_active_fraction(model, None)
        for _, layer in model._layers:
            layer.experts.lora_B[:, expected:] = 0
        assert (outputs_of(model(**batch)) - masked).abs().max() < 1e-6
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        set_active_fraction(model, 0)


def test_config_refuses_what_rank_gates_cannot_do():
    with pytest.raises(ValueError, match="rank_gates needs experts with a rank"):
        MoLoRAConfig(expert_type="rank1", rank_gates=True)
    with pytest.raises(ValueError, match="set rank_gates=True"):
        MoLoRAConfig(aux_losses={"rank_sparsity": 0.1})
    with pytest.raises(ValueError, match="rank_gate_temperature must be > 0"):
        MoLoRAConfig(rank_gates=True, rank_gate_temperature=0)
    with pytest.raises(ValueError, match="prune_ranks needs a model trained with rank_gates=True"):
        prune_ranks(get_molora_model(build_base("llama"), molora_config("llama")))


def test_a_run_logs_the_ranks_and_reports_what_the_gates_kept(tmp_path, capsys):
    import json
    import math

    from molora.run.config import RunConfig
    from molora.run.training import train
    from tests.tiny import save_tiny_model, tiny_run_config, write_toy_domains

    spec = tiny_run_config(
        save_tiny_model(tmp_path / "model"),
        write_toy_domains(tmp_path / "toy.jsonl"),
        steps=8,
        eval_every=2,
        rank_schedule={"start": 0.25, "full_at": 0.5},
    )
    spec["molora"] |= {"rank_gates": True, "aux_losses": {"balance": 0.01, "rank_sparsity": 0.1}}
    result = train(RunConfig.from_dict(spec), tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ranks = {r["step"]: r for r in records if r["type"] == "ranks"}
    assert sorted(ranks) == [0, 2, 4, 6, 8]
    rank = spec["molora"]["rank"]
    # at step 2 the schedule used ceil((0.25 + 0.75 * 1/4) * r) components (step 1 of a 4-step ramp); gates may
    # close some of those, never open more
    limit = math.ceil((0.25 + 0.75 * 1 / 4) * rank)
    assert all(count <= limit for counts in ranks[2]["ranks"].values() for count in counts)
    assert result["effective_ranks"] == ranks[8]["ranks"]
    assert any("aux/rank_sparsity" in r or "rank_sparsity" in json.dumps(r) for r in records if r["type"] == "train")
    assert "rank kept by the rank gates, per expert:" in capsys.readouterr().out


def test_gate_logits_get_their_own_learning_rate_and_no_decay():
    from molora.run.config import RunConfig
    from molora.run.setup import make_optimizer

    config = RunConfig.from_dict({"train": {"lr": 0.002, "weight_decay": 0.1, "rank_gate_lr": 0.07}})
    model = gated_model("lora", seed=0)
    groups = make_optimizer(model, config).param_groups
    gates = [g for g in groups if g["lr"] == 0.07]
    assert len(gates) == 1 and gates[0]["weight_decay"] == 0.0
    gate_params = {id(layer.experts.rank_gates.logits) for _, layer in model._layers}
    assert {id(p) for p in gates[0]["params"]} == gate_params
    assert all(id(p) not in gate_params for g in groups if g is not gates[0] for p in g["params"])
    with pytest.raises(ValueError, match="rank_gate_lr"):
        RunConfig.from_dict({"train": {"rank_gate_lr": 0}})
