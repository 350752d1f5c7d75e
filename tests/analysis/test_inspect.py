import json

import pytest
import torch

from molora import MoLoRALinear, get_molora_model
from molora.analysis.routing_report import write_report
from molora.core.recording import mutual_information
from tests.conftest import build_base, make_batch, molora_config, outputs_of, randomize_experts, task_ids_for


def _layers(model):
    return [m for m in model.base_model.modules() if isinstance(m, MoLoRALinear)]


@pytest.mark.parametrize(("router", "k"), [("softmax", 1), ("topk", 2), ("switch", 1), ("task", 1)])
def test_selection_counts_add_up_to_tokens_times_k(router, k):
    model = get_molora_model(build_base("llama"), molora_config("llama", router))
    randomize_experts(model)
    batch = make_batch(pad_last=3)
    with model.record_routing() as rec, torch.no_grad():
        model(**batch, task_ids=task_ids_for(router))
        model(**batch, task_ids=task_ids_for(router))
    real_tokens = 2 * int(batch["attention_mask"].sum())
    stats = rec.stats()
    assert len(stats["layers"]) == len(_layers(model))
    for layer in stats["layers"].values():
        assert layer["tokens"] == real_tokens
        assert sum(layer["selections"]) == pytest.approx(real_tokens * k)
        assert sum(layer["load"]) == pytest.approx(1.0)


def test_a_router_that_sends_task_i_to_expert_i_has_mi_equal_to_task_entropy():
    model = get_molora_model(build_base("llama"), molora_config("llama", "task", num_experts=3))
    with torch.no_grad():
        for layer in _layers(model):
            layer.router.task_embedding.weight.copy_(torch.eye(3) * 100)
    batch = make_batch(batch=3)
    with model.record_routing(domains=["news", "math", "code"]) as rec, torch.no_grad():
        model(**batch, task_ids=[0, 1, 2])
    stats = rec.stats()
    assert stats["tasks"] == ["news", "math", "code"]
    for layer in stats["layers"].values():
        assert torch.allclose(torch.tensor(layer["task_expert"]), torch.eye(3), atol=1e-6)
        assert layer["mi_bits"] == pytest.approx(torch.log2(torch.tensor(3.0)).item(), abs=1e-5)
        assert layer["mi_normalized"] == pytest.approx(1.0, abs=1e-5)


def test_a_uniform_router_has_zero_mi():
    model = get_molora_model(build_base("llama"), molora_config("llama", "softmax"))
    with torch.no_grad():
        for layer in _layers(model):
            layer.router.gate.weight.zero_()
    with model.record_routing(task_ids=[0, 1, 0, 1]) as rec, torch.no_grad():
        model(**make_batch(batch=4))
    for layer in rec.stats()["layers"].values():
        assert layer["mi_bits"] == pytest.approx(0.0, abs=1e-9)
        assert layer["entropy"] == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=1e-5)
        assert layer["dead_experts"] == 0 and layer["load_cv"] == pytest.approx(0.0, abs=1e-6)
    # the counter-case: routers that depend on the input route the two tasks' different tokens differently
    randomize_experts(model)
    with model.record_routing(task_ids=[0, 1, 0, 1]) as rec, torch.no_grad():
        model(**make_batch(batch=4))
    assert max(layer["mi_bits"] for layer in rec.stats()["layers"].values()) > 1e-3


def test_mutual_information_by_hand():
    # p(t,e) = [[.4,.1],[.1,.4]] -> I = sum p log2(p / (.5 * .5))
    mi, h_task = mutual_information(torch.tensor([[4.0, 1.0], [1.0, 4.0]]))
    expected = 2 * 0.4 * torch.log2(torch.tensor(1.6)) + 2 * 0.1 * torch.log2(torch.tensor(0.4))
    assert mi == pytest.approx(expected.item(), abs=1e-6) and h_task == pytest.approx(1.0)


def test_recording_leaves_no_hooks_and_changes_no_output_or_gradient():
    model = get_molora_model(build_base("llama"), molora_config("llama", "intuition"))
    randomize_experts(model)
    batch = make_batch(pad_last=2)

    def run():
        model.zero_grad()
        out = outputs_of(model(**batch))
        (out.sum() + model.aux_loss()).backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain_out, plain_grads = run()
    with model.record_routing():
        recorded_out, recorded_grads = run()
    assert torch.equal(plain_out, recorded_out)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, recorded_grads, strict=True))
    assert all(not layer.router._forward_hooks for layer in _layers(model))


def test_report_files(tmp_path):
    model = get_molora_model(build_base("llama"), molora_config("llama", "topk"))
    randomize_experts(model)
    with model.record_routing(domains=["a", "b"]) as rec, torch.no_grad():
        model(**make_batch(), task_ids=[0, 1])
    stats = write_report(rec, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        "report.md",
        "stats.json",
        "routing.csv",
        "task_expert.png",
        "layer_expert.png",
    }
    assert json.loads((tmp_path / "stats.json").read_text())["aggregate"]["mi_bits"] == stats["aggregate"]["mi_bits"]
    rows = (tmp_path / "routing.csv").read_text().splitlines()
    assert rows[0] == "layer,task,expert,weight,selections,tokens"
    assert len(rows) == 1 + len(_layers(model)) * 2 * 4
    assert "![task_expert.png](task_expert.png)" in (tmp_path / "report.md").read_text()
