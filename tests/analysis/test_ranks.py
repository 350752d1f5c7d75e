"""Rank analysis against hand-made spectra, full SVDs of the products and the layer's own merged updates."""

from __future__ import annotations

import pytest
import torch

from molora import get_molora_model
from molora.analysis.rank_report import rank_table
from molora.analysis.ranks import analyze_ranks, effective_rank, low_rank_singular_values, recommend
from molora.cli import ranks_main
from molora.deploy.merging import merged_delta
from tests.conftest import build_base, make_batch, molora_config


def with_spectrum(values: list[float], shape: tuple[int, int], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(shape[0], len(values), generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], len(values), generator=generator, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("seed", range(5))
def test_effective_rank_of_a_known_spectrum(seed):
    # energies 9, 4, 1, 0.25 of 14.25: the top 1, 2, 3 hold 63 %, 91 %, 98 %
    matrix = with_spectrum([3.0, 2.0, 1.0, 0.5], (12, 9), seed)
    values = torch.linalg.svdvals(matrix)
    assert [effective_rank(values, e) for e in (0.5, 0.8, 0.9, 0.95, 1.0)] == [1, 2, 2, 3, 4]
    assert effective_rank(torch.zeros(4), 0.9) == 0
    # the check can fail: a different threshold gives a different answer on this spectrum
    assert effective_rank(values, 0.95) != effective_rank(values, 0.8)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("shape", [(48, 4, 32), (16, 8, 64), (7, 3, 5), (32, 6, 32), (4, 6, 5)])  # r > d_out too
def test_the_small_problem_gives_the_singular_values_of_the_product(seed, shape):
    d_out, rank, d_in = shape
    generator = torch.Generator().manual_seed(seed)
    output_side = torch.randn(d_out, rank, generator=generator)
    input_side = torch.randn(rank, d_in, generator=generator)
    if seed % 2:
        output_side[:, 0] = 0  # rank-deficient
    expected = torch.linalg.svdvals(output_side.double() @ input_side.double())[:rank]
    assert torch.allclose(low_rank_singular_values(output_side, input_side), expected, atol=1e-9)
    perturbed = low_rank_singular_values(output_side * 1.001, input_side)
    assert not torch.allclose(perturbed, expected, atol=1e-9)


def random_model(router="softmax", **overrides):
    model = get_molora_model(build_base("llama"), molora_config("llama", router, rank=4, **overrides))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.eval()


@pytest.mark.parametrize("overrides", [{}, {"shared_experts": 1, "mixture_scaling": "sum"}, {"share_lora_a": True}])
def test_task_updates_match_the_merged_update_of_the_mean_gates(overrides):
    model = random_model(**overrides)
    with model.record_routing(domains=["a", "b"]) as recorder:
        for task in (0, 1):
            model(**make_batch(batch=2, seed=task), task_ids=torch.full((2,), task))
    stats = recorder.stats()
    report = analyze_ranks(model, stats)
    layers = dict(model._layers)
    for spectrum in report.spectra:
        layer = layers[spectrum.module]
        if spectrum.kind.startswith("task"):
            task = stats["tasks"].index(spectrum.kind.split()[1])
            gates = torch.tensor(stats["layers"][spectrum.module]["task_expert"][task])
            with torch.no_grad():
                expected = torch.linalg.svdvals(merged_delta(layer, gates).double())[: len(spectrum.singular_values)]
            assert torch.allclose(
                torch.tensor(spectrum.singular_values, dtype=torch.float64), expected, atol=1e-6 * float(expected[0])
            )  # fp32 merge
    for name, rank in report.recommended.items():
        assert 1 <= rank <= 4 and rank & (rank - 1) == 0, (name, rank)
    assert {s.kind for s in report.spectra} >= {"base", "expert 0", "task a", "task b"}


def test_untrained_experts_have_no_update_spectrum_and_no_recommendation():
    model = get_molora_model(build_base("llama"), molora_config("llama"))
    report = analyze_ranks(model)
    assert {s.kind for s in report.spectra} == {"base"} and not report.recommended


def router_mean_gates(model, batches):
    """{router layer: {task: mean gate per token [E]}} from the routers' own outputs, by hand (no recorder)."""
    gates = {name: [] for name, layer in model._layers if layer.router is not None}

    def keep(name):
        return lambda module, args, route: gates[name].append(route.gates.detach().flatten(0, 1))

    handles = [layer.router.register_forward_hook(keep(name)) for name, layer in model._layers if name in gates]
    with torch.no_grad():
        for batch, task in batches:
            model(**batch, task_ids=torch.full((batch["input_ids"].shape[0],), task))
    for handle in handles:
        handle.remove()
    tasks = [task for _, task in batches]
    by_task = {}
    for name, per_forward in gates.items():
        pairs = list(zip(per_forward, tasks, strict=True))  # one routing per forward and router
        by_task[name] = {t: torch.cat([g for g, bt in pairs if bt == t]).double().mean(0) for t in set(tasks)}
    return by_task


@pytest.mark.parametrize("router", ["switch", "softmax"])
def test_task_updates_use_the_mean_gate_of_a_token_even_when_gates_do_not_sum_to_one(router):
    model = random_model(router=router, shared_experts=1)
    batches = [(make_batch(batch=2, seed=10 + i), i % 2) for i in range(4)]
    expected_gates = router_mean_gates(model, batches)
    with model.record_routing(domains=["a", "b"]) as recorder:
        for batch, task in batches:
            model(**batch, task_ids=torch.full((2,), task))
    report = analyze_ranks(model, recorder)
    layers = dict(model._layers)
    checked = 0
    for spectrum in report.spectra:
        if spectrum.kind.startswith("task"):
            layer = layers[spectrum.module]
            gates = expected_gates[layer.group_owner.layer_name][["a", "b"].index(spectrum.kind.split()[1])]
            with torch.no_grad():
                expected = torch.linalg.svdvals(merged_delta(layer, gates.float()).double())
            got = torch.tensor(spectrum.singular_values, dtype=torch.float64)
            assert torch.allclose(got, expected[: len(got)], atol=1e-6 * float(expected[0])), spectrum
            checked += 1
    assert checked == 2 * len(layers)
    # the task-share view (stats()) is the mean gate only where gates sum to 1: switch's top-1 probability does not
    from_stats = analyze_ranks(model, recorder.stats())
    same = all(
        torch.allclose(torch.tensor(a.singular_values), torch.tensor(b.singular_values))
        for a, b in zip(report.spectra, from_stats.spectra, strict=True)
    )
    assert same == (router == "softmax")


@pytest.mark.parametrize("overrides", [{}, {"rank_gates": True}, {"expert_type": "rank1"}, {"share_lora_a": True}])
def test_expert_spectra_equal_the_full_svd_of_each_delta_weight(overrides):
    model = random_model(**overrides)
    if overrides.get("rank_gates"):
        model.train()  # sampled gates in training: the analysis must still read the eval-mode (hard) ones
    report = analyze_ranks(model)
    model.eval()
    layers = dict(model._layers)
    experts = [s for s in report.spectra if s.kind.startswith("expert")]
    assert len(experts) == 4 * len(layers)
    for spectrum in experts:
        layer = layers[spectrum.module]
        with torch.no_grad():
            delta = layer.experts.delta_weight(int(spectrum.kind.split()[1])).double() * layer.scaling
        expected = torch.linalg.svdvals(delta)
        got = torch.tensor(spectrum.singular_values, dtype=torch.float64)
        assert torch.allclose(got, expected[: len(got)], atol=1e-6 * float(expected[0]) + 1e-12), spectrum
        assert torch.all(expected[len(got) :] < 1e-5 * float(expected[0]) + 1e-9)  # rank <= r: nothing left out
    if overrides.get("rank_gates"):
        assert any(s.effective(1.0) < 4 for s in experts)  # some closed components really lowered a rank


def single_expert_model(values: list[float], seed: int = 0):
    """One LoRA expert of rank 4 on every q_proj, its update scaling * B A with exactly the singular values given."""
    model = get_molora_model(
        build_base("llama"), molora_config("llama", num_experts=1, rank=4, target_modules=["q_proj"])
    )
    for _, layer in model._layers:
        d_out, d_in = layer.out_features, layer.in_features
        factors = with_spectrum(values, (d_out, d_in), seed)
        u, s, vh = torch.linalg.svd(factors)
        with torch.no_grad():
            layer.experts.lora_A.copy_(vh[:4].unsqueeze(0))
            layer.experts.lora_B.copy_((u[:, :4] * s[:4] / layer.scaling).T.unsqueeze(0))
    return model


@pytest.mark.parametrize("seed", range(3))
def test_the_recommendation_follows_the_rule_on_a_known_spectrum(seed):
    # energies 9, 4, 1, 0.25: the 90 % rank is 2 -> recommended 2; at 95 % it would be 3 -> 4
    report = analyze_ranks(single_expert_model([3.0, 2.0, 1.0, 0.5], seed))
    assert report.needed and set(report.needed.values()) == {2} and set(report.recommended.values()) == {2}
    expert = next(s for s in report.spectra if s.kind == "expert 0")
    assert torch.allclose(torch.tensor(expert.singular_values), torch.tensor([3.0, 2.0, 1.0, 0.5]), atol=1e-5)
    assert recommend(expert.effective(0.95), 4) == 4 != report.recommended[expert.module]  # a wrong threshold differs
    rows = rank_table(report)
    assert {r["recommended"] for r in rows if r["module"] == expert.module} == {2}  # on base and expert rows alike


def test_the_rounding_and_clipping_of_the_rule():
    assert [recommend(n, 8) for n in (0, 1, 2, 3, 5, 8, 11)] == [1, 1, 2, 4, 8, 8, 8]
    assert [recommend(n, 6) for n in (3, 5, 6)] == [4, 6, 6]  # clipped to a trained rank that is no power of two


def test_a_plain_model_gives_base_spectra_only_and_names_a_target_that_matches_nothing():
    plain = build_base("llama")
    report = analyze_ranks(plain, targets=["q_proj", "down_proj"])
    assert not any(True for name, _ in plain.named_modules() if "experts" in name)  # nothing was injected
    weights = dict(plain.named_modules())
    assert {s.kind for s in report.spectra} == {"base"} and not report.recommended
    for spectrum in report.spectra:
        expected = torch.linalg.svdvals(weights[spectrum.module].weight.double())
        assert torch.allclose(torch.tensor(spectrum.singular_values, dtype=torch.float64), expected)
    assert {s.module.rsplit(".", 1)[1] for s in report.spectra} == {"q_proj", "down_proj"}
    with pytest.raises(ValueError, match=r"'nothing_like_this' matches no module.*q_proj"):
        analyze_ranks(plain, targets=["q_proj", "nothing_like_this"])
    with pytest.raises(ValueError, match="give targets"):
        analyze_ranks(plain)
    model = random_model()
    only_q = analyze_ranks(model, targets=["q_proj"])
    assert {s.module.rsplit(".", 1)[1] for s in only_q.spectra} == {"q_proj"}
    other = {"tasks": ["a"], "layers": {"elsewhere.q_proj": {"task_expert": [[0.25] * 4]}}}
    with pytest.raises(ValueError, match="recorded on other routers"):
        analyze_ranks(model, other)
    with pytest.raises(ValueError, match=r"'gate_proj' matches none of the adapted modules; adapted: \[.*'q_proj'"):
        analyze_ranks(model, targets=["gate_proj"])


def test_the_cli_on_a_tiny_model_and_a_tiny_run(tmp_path, capsys):
    from molora.run.config import RunConfig
    from molora.run.training import train
    from tests.tiny import save_tiny_model, tiny_run_config, write_toy_domains

    model_dir = save_tiny_model(tmp_path / "model")
    assert ranks_main(["--model", str(model_dir), "--out", str(tmp_path / "base")]) == 0
    assert all((tmp_path / "base" / f).stat().st_size for f in ("ranks.md", "ranks.csv", "ranks.png"))
    base_text = (tmp_path / "base" / "ranks.md").read_text()
    assert "nothing is recommended" in base_text and "| q_proj | base | 2 |" in base_text  # 2 layers
    assert "base weights only" in capsys.readouterr().out
    spec = tiny_run_config(model_dir, write_toy_domains(tmp_path / "toy.jsonl", per_domain=20), steps=4)
    spec["train"]["eval_at_start"] = False
    train(RunConfig.from_dict(spec), tmp_path / "run")
    assert ranks_main(["--run", str(tmp_path / "run")]) == 0
    text = (tmp_path / "run" / "ranks" / "ranks.md").read_text()
    assert "Recommended rank per module" in text and "task upper" in text and "task reverse" in text
    assert "| model.layers.0.self_attn.q_proj | 4 |" in text  # trained rank 4
    header = (tmp_path / "run" / "ranks" / "ranks.csv").read_text().splitlines()[0]
    assert header == (
        "module,module_type,kind,trained_rank,directions,rank@80%,rank@90%,rank@95%,top_singular_value,needed,"
        "recommended"
    )
    assert "recommended rank" in capsys.readouterr().out
    assert ranks_main(["--run", str(tmp_path / "run"), "--targets", "gate_proj", "--out", str(tmp_path / "x")]) == 2
    assert "'gate_proj' matches none of the adapted modules; adapted: ['down_proj', 'q_proj', 'v_proj']" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "x").exists()  # nothing written on an error


def test_the_cli_names_bad_input(tmp_path, capsys):
    assert ranks_main(["--run", str(tmp_path)]) == 2
    assert "has no adapter/" in capsys.readouterr().err
    (tmp_path / "adapter").mkdir()
    assert ranks_main(["--run", str(tmp_path)]) == 2
    assert "has no config.yaml" in capsys.readouterr().err
    assert ranks_main([]) == 2
    assert "give --model" in capsys.readouterr().err
    assert ranks_main(["--model", str(tmp_path / "no-such-model")]) == 2
    assert f"no model folder at {tmp_path / 'no-such-model'}" in capsys.readouterr().err
    model_dir = tmp_path / "model"
    from tests.tiny import save_tiny_model

    save_tiny_model(model_dir)
    assert ranks_main(["--model", str(model_dir), "--targets", "nothing_like_this"]) == 2
    assert "'nothing_like_this' matches no module" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        ranks_main(["--help"])
    assert exit_info.value.code == 0 and "--out" in capsys.readouterr().out
