"""Rank analysis against hand-made spectra, full SVDs of the products and the layer's own merged updates."""

from __future__ import annotations

import pytest
import torch

from molora import get_molora_model
from molora.cli import ranks_main
from molora.ranks import analyze_ranks, effective_rank, low_rank_singular_values
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
@pytest.mark.parametrize("shape", [(48, 4, 32), (16, 8, 64), (7, 3, 5), (32, 6, 32)])
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


def random_model(**overrides):
    model = get_molora_model(build_base("llama"), molora_config("llama", "softmax", rank=4, **overrides))
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
                expected = torch.linalg.svdvals(layer.merged_delta(gates).double())[: len(spectrum.singular_values)]
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


def test_the_cli_on_a_tiny_model_and_a_tiny_run(tmp_path, capsys):
    from molora.run_config import RunConfig
    from molora.training import train
    from tests.tiny import save_tiny_model, tiny_run_config, write_toy_domains

    model_dir = save_tiny_model(tmp_path / "model")
    assert ranks_main(["--model", str(model_dir), "--output-dir", str(tmp_path / "base")]) == 0
    assert all((tmp_path / "base" / f).stat().st_size for f in ("ranks.md", "ranks.csv", "ranks.png"))
    spec = tiny_run_config(model_dir, write_toy_domains(tmp_path / "toy.jsonl"), steps=6)
    train(RunConfig.from_dict(spec), tmp_path / "run")
    assert ranks_main(["--run", str(tmp_path / "run")]) == 0
    text = (tmp_path / "run" / "ranks" / "ranks.md").read_text()
    assert "Recommended rank per module" in text and "task upper" in text and "task reverse" in text
    assert "recommended rank" in capsys.readouterr().out


def test_the_cli_names_bad_input(tmp_path, capsys):
    assert ranks_main(["--run", str(tmp_path)]) == 2
    assert "has no adapter/" in capsys.readouterr().err
    assert ranks_main([]) == 2
    assert "give --model" in capsys.readouterr().err
    model_dir = tmp_path / "model"
    from tests.tiny import save_tiny_model

    save_tiny_model(model_dir)
    assert ranks_main(["--model", str(model_dir), "--targets", "nothing_like_this"]) == 2
    assert "nothing_like_this" in capsys.readouterr().err
