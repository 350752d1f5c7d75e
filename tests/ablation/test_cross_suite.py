"""The verdict across suites (a win only on a suite the rows were not chosen on) and running a subset of rows."""

import json

import pytest

from molora.ablation.cross_suite import chosen_on, cross_suite, cross_verdict
from molora.ablation.spec import deep_merge, load_ablation
from molora.cli import ablate_main
from molora.run.domains import SUITES

CONFIG = """
data: {domains: [news, sentiment, math, code, qa], val_fraction: 0.2}
ablation:
  seeds: 3
  baseline: peft-lora
  rows:
    - {name: peft-lora, model: {adapter: peft-lora, peft_rank: 4}}
    - {name: home-only, molora: {router: softmax}}
    - {name: both, molora: {router: topk}, compare_to: home-only}
    - {name: worse-away, molora: {router: switch}}
    - {name: base-model, model: {adapter: none}}
"""

# Δ mean loss to PEFT per seed on each suite (the seeds vary by ±0.002 around the mean: intervals of ±0.005)
DELTAS = {
    "home-only": {"bundled": -0.05, "heldout": 0.0},
    "both": {"bundled": -0.05, "heldout": -0.04},
    "worse-away": {"bundled": -0.05, "heldout": +0.06},
}
NOISE = (-0.002, 0.0, 0.002)


def plant(config, folders):
    """result.json files, as the harness writes them, for every row and seed on each suite."""
    for suite, folder in folders.items():
        ablation = load_ablation(config, suite=suite)
        for row in ablation.rows:
            for seed in ablation.seeds:
                base = 1.0 + 0.1 * seed  # seeds differ more than rows: only pairing resolves the rows
                loss = base + (DELTAS.get(row.name, {}).get(suite, 0.0) + NOISE[seed] if row.name in DELTAS else 0)
                domains = {d: {"loss": loss} for d in SUITES[suite]}
                spec = deep_merge(row.spec, {"train": {"seed": seed, "progress": False}})
                result = {"variant": row.name, "seed": seed, "spec": spec, "status": "ok", "trainable_params": 100}
                result["eval"] = {**domains, "mean": {"loss": loss, "token_acc": 0.5}}
                run = folder / "rows" / row.name / f"seed{seed}"
                run.mkdir(parents=True)
                (run / "result.json").write_text(json.dumps(result))


@pytest.fixture
def planted(tmp_path):
    config = tmp_path / "ablation.yaml"
    config.write_text(CONFIG)
    folders = {"bundled": tmp_path / "bundled", "heldout": tmp_path / "heldout"}
    plant(config, folders)
    return config, folders


def test_a_row_wins_only_where_it_beats_the_baseline_on_the_suite_it_was_not_chosen_on(planted):
    config, folders = planted
    assert chosen_on(config) == "bundled"
    entries = {e["row"]: e for e in cross_suite(config, folders)}
    assert set(entries) == set(DELTAS)  # neither the baseline nor the untrained base model has a verdict
    for row, deltas in DELTAS.items():
        for suite, delta in deltas.items():
            found = entries[row]["suites"][suite]
            assert found["seeds"] == 3 and found["d_loss"].mean == pytest.approx(delta)
    assert {r: e["suites"]["bundled"]["verdict"] for r, e in entries.items()} == dict.fromkeys(DELTAS, "beats")
    verdicts = {r: e["verdict"] for r, e in entries.items()}
    assert verdicts == {"home-only": "no win", "both": "win", "worse-away": "loses"}


def test_the_verdict_follows_the_held_out_suite_not_the_home_one(planted, tmp_path):
    """The counter-test: with the choice declared on the other suite, the row that only beat at home now wins."""
    _, folders = planted
    swapped = tmp_path / "swapped.yaml"
    swapped.write_text(CONFIG.replace("[news, sentiment, math, code, qa]", "[phonetics, spanish, regions]"))
    assert chosen_on(swapped) == "heldout"
    entries = {e["row"]: e for e in cross_suite(swapped, folders)}
    assert entries["home-only"]["verdict"] == "win"  # beats on bundled, which is now the held-out suite
    declared = tmp_path / "declared.yaml"  # the held-out suite's domains, the choice declared on bundled again
    declared.write_text(swapped.read_text().replace("  baseline:", "  chosen_on: bundled\n  baseline:", 1))
    assert chosen_on(declared) == "bundled"
    assert {e["row"]: e for e in cross_suite(declared, folders)}["home-only"]["verdict"] == "no win"
    declared.write_text(swapped.read_text().replace("  baseline:", "  chosen_on: elsewhere\n  baseline:", 1))
    with pytest.raises(ValueError, match="chosen_on 'elsewhere' is no suite; suites: bundled"):
        chosen_on(declared)


def test_cross_verdict_by_hand():
    assert cross_verdict({"bundled": "beats", "heldout": "beats"}, {"bundled"}) == "win"
    assert cross_verdict({"bundled": "tie", "heldout": "beats"}, {"bundled"}) == "win"
    assert cross_verdict({"bundled": "beats", "heldout": "tie"}, {"bundled"}) == "no win"
    assert cross_verdict({"bundled": "beats", "heldout": None}, {"bundled"}) == "not run"
    assert cross_verdict({"bundled": "beats"}, {"bundled"}) == "not run"
    assert cross_verdict({"bundled": "worse", "heldout": "beats"}, {"bundled"}) == "loses"
    assert cross_verdict({"bundled": "beats", "heldout": "beats"}, {"bundled", "heldout"}) == "not run"  # none held out


def test_a_row_shaped_on_a_suite_cannot_win_there(planted, tmp_path):
    """`both` wins (the first test); named as also chosen on heldout, nothing is held out for it any more."""
    _, folders = planted
    shaped = tmp_path / "shaped.yaml"
    shaped.write_text(CONFIG.replace("compare_to: home-only}", "compare_to: home-only, chosen_on: [heldout]}"))
    assert load_ablation(shaped).rows[2].chosen_on == ("heldout",)
    entries = {e["row"]: e for e in cross_suite(shaped, folders)}
    assert entries["both"]["verdict"] == "not run" and entries["home-only"]["verdict"] == "no win"
    args = ["--config", str(shaped), "--cross-suite", *(f"{s}={f}" for s, f in folders.items())]
    assert ablate_main([*args, "--output-dir", str(tmp_path / "x")]) == 0
    assert "| both (also chosen on `heldout`) | 100 |" in (tmp_path / "x" / "cross_suite.md").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.replace("compare_to: home-only}", "compare_to: home-only, chosen_on: moon}"))
    with pytest.raises(ValueError, match="row 'both': chosen_on 'moon' is no suite or list of suites; suites: bundled"):
        load_ablation(bad)


def test_the_cross_suite_command_writes_its_table_and_names_bad_arguments(planted, tmp_path, capsys):
    config, folders = planted
    out = tmp_path / "cross"
    args = ["--config", str(config), "--cross-suite", *(f"{s}={f}" for s, f in folders.items()), "--output-dir"]
    assert ablate_main([*args, str(out)]) == 0
    table = (out / "cross_suite.md").read_text()
    assert "| both | 100 | -0.050 ± 0.005 (3) | beats | -0.040 ± 0.005 (3) | beats | **win** |" in table
    # the lever (topk in place of softmax) by hand: bundled -0.05 - -0.05 = 0 on every seed; heldout -0.04 - 0.0
    assert "| both | home-only | +0.000 ± 0.000 (3) tie | -0.040 ± 0.000 (3) better |" in table
    assert ablate_main(["--config", str(config), "--cross-suite", "bundled", "--output-dir", str(out)]) == 2
    assert "SUITE=FOLDER" in capsys.readouterr().err
    assert ablate_main(["--config", str(config), "--cross-suite", f"moon={tmp_path}", "--output-dir", str(out)]) == 2
    assert "unknown suites ['moon']" in capsys.readouterr().err


def test_rows_names_what_trains_with_what_it_is_measured_against(planted):
    config, _ = planted
    assert load_ablation(config).trained is None
    assert load_ablation(config, only=["both"]).trained == {"peft-lora", "both"}  # the baseline comes along
    with pytest.raises(ValueError, match="no row named 'bth'; did you mean 'both'"):
        load_ablation(config, only=["bth"])


def test_seeds_to_resolve_by_hand():
    from molora.analysis.stats import mean_interval, seeds_to_resolve

    # mean -0.00833, sd 0.01258: 11 seeds give 2.228 * 0.01258 / sqrt(11) = 0.00845 (not yet), 12 give 0.00799
    assert seeds_to_resolve(mean_interval([-0.01, -0.02, 0.005])) == 12
    assert seeds_to_resolve(mean_interval([-0.001, 0.02, -0.02])) is None  # more than 30
    assert seeds_to_resolve(mean_interval([-0.01])) is None  # one seed: no spread to go by


def test_another_row_can_be_the_baseline_of_the_cross_suite_table(planted, tmp_path, capsys):
    config, folders = planted
    entries = {e["row"]: e for e in cross_suite(config, folders, baseline="home-only")}
    assert "home-only" not in entries and entries["peft-lora"]["suites"]["heldout"]["d_loss"].mean == pytest.approx(0)
    assert entries["both"]["suites"]["heldout"]["d_loss"].mean == pytest.approx(-0.04)  # paired: -0.04 - 0.0
    args = ["--config", str(config), "--cross-suite", *(f"{s}={f}" for s, f in folders.items())]
    assert ablate_main([*args, "--output-dir", str(tmp_path / "x"), "--baseline", "home-only"]) == 0
    assert "`home-only` mean eval loss" in (tmp_path / "x" / "cross_suite-home-only.md").read_text()
    assert ablate_main([*args, "--output-dir", str(tmp_path / "x"), "--baseline", "nope"]) == 2
    assert "--baseline 'nope' is not a row" in capsys.readouterr().err


# CONFIG's baseline and one grid row
GRID_CONFIG = (
    CONFIG.split("    - {name: home-only")[0]
    + "    - {name: tuned, molora: {router: softmax}, grid: {train.lr: [0.001, 0.002]}}\n"
)


def test_a_grid_point_chosen_on_another_suite_counts_on_the_suite_it_ran_on(tmp_path):
    """heldout ran tuned's whole grid; bundled ran only heldout's choice (--choices-from). Read with the recorded
    choice, bundled has three paired seeds; read as a plain grid (the record removed), none: an unfinished grid."""
    from molora.ablation.transfer import CHOICES_FILE, record

    config = tmp_path / "ablation.yaml"
    config.write_text(GRID_CONFIG)
    folders = {"bundled": tmp_path / "bundled", "heldout": tmp_path / "heldout"}
    for suite, folder in folders.items():
        for row in load_ablation(config, suite=suite).rows:
            for variant, spec in row.variants():
                chosen = variant in ("peft-lora", "tuned[lr=0.002]")
                if suite == "bundled" and not chosen:
                    continue  # not run there: the point came from heldout
                for seed in (0, 1, 2) if chosen else (0,):
                    loss = 1.0 + 0.1 * seed + (-0.05 + 0.002 * (seed - 1) if variant.startswith("tuned") else 0.0)
                    result = {"variant": variant, "seed": seed, "status": "ok", "trainable_params": 100}
                    result["spec"] = deep_merge(spec, {"train": {"seed": seed, "progress": False}})
                    per_domain = {d: {"loss": loss} for d in SUITES[suite]}
                    result["eval"] = {**per_domain, "mean": {"loss": loss, "token_acc": 0.5}}
                    result["val"] = {"mean": {"loss": loss if chosen else 9.0}}
                    run = folder / "rows" / variant / f"seed{seed}"
                    run.mkdir(parents=True)
                    (run / "result.json").write_text(json.dumps(result))
    record(folders["bundled"], {"tuned": "tuned[lr=0.002]"}, folders["heldout"])
    entry = cross_suite(config, folders)[0]
    assert entry["suites"]["bundled"]["seeds"] == 3 and entry["suites"]["bundled"]["verdict"] == "beats"
    assert entry["suites"]["bundled"]["chosen_elsewhere"] == str(folders["heldout"])
    assert ablate_main(["--config", str(config), "--cross-suite", *(f"{s}={f}" for s, f in folders.items()),
                        "--output-dir", str(tmp_path / "cross")]) == 0  # fmt: skip
    table = (tmp_path / "cross" / "cross_suite.md").read_text()
    assert f"`tuned` on `bundled` (from {folders['heldout']})" in table
    (folders["bundled"] / CHOICES_FILE).unlink()
    assert cross_suite(config, folders)[0]["suites"]["bundled"]["seeds"] == 0
