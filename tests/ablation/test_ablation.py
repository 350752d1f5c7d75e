import csv
import json

import pytest
import yaml

from molora import training
from molora.ablation.harness import load_ablation, run_ablation
from molora.ablation.report import summarise, verdict
from molora.analysis.stats import Interval, mean_interval, paired_interval, t_quantile_975
from molora.cli import ablate_main, inspect_main


def write(spec, path):
    path.write_text(yaml.safe_dump(spec))
    return path


def test_every_row_runs_every_seed_grid_rows_choose_on_validation_and_reruns_skip(
    tiny_spec, tmp_path, monkeypatch, capsys
):
    config = write(tiny_spec, tmp_path / "ablation.yaml")
    results = run_ablation(config, tmp_path / "out", quick=True, inline=True)
    runs = {(r["variant"], r["seed"]): r for r in results}
    assert runs[("diverges", 0)]["status"] == "failed" and "non-finite" in runs[("diverges", 0)]["error"]
    assert {("softmax", 0), ("softmax", 1), ("task", 0), ("task", 1), ("base-model", 0)} <= set(runs)
    assert ("base-model", 1) not in runs  # nothing to train: one run
    grid = {v: r for (v, s), r in runs.items() if v.startswith("peft-lora[") and s == 0}
    assert set(grid) == {"peft-lora[lr=0.01]", "peft-lora[lr=0.02]"}
    best = min(grid.values(), key=lambda r: r["val"]["mean"]["loss"])["variant"]
    assert [v for (v, s) in runs if s == 1 and v.startswith("peft-lora")] == [best]  # only the choice runs on
    for (_, seed), r in runs.items():
        if r["status"] == "ok":
            assert r["spec"]["train"]["seed"] == seed and r["eval"]["mean"]["loss"] > 0
            assert r["val"]["mean"]["loss"] > 0 and 0 <= r["eval"]["mean"]["token_acc"] <= 1

    ablation = load_ablation(config, quick=True)
    counts = {r["variant"]: r.get("trainable_params", 0) for r in results}
    summary = {e["row"]: e for e in summarise(ablation, results, counts)}
    softmax, peft = (by_seed_loss(results, v) for v in ("softmax", best))
    expected = mean_interval([softmax[s] - peft[s] for s in (0, 1)])
    assert summary["softmax"]["d_loss"].mean == pytest.approx(expected.mean)
    assert summary["softmax"]["d_loss"].half_width == pytest.approx(expected.half_width)
    assert summary["peft-lora"]["variant"] == best and summary["peft-lora"]["d_loss"] is None
    task = by_seed_loss(results, "task")
    lever = mean_interval([task[s] - softmax[s] for s in (0, 1)])  # the task lever, paired against its parent
    assert summary["task"]["lever"]["parent"] == "softmax"
    assert summary["task"]["lever"]["d_loss"].mean == pytest.approx(lever.mean)
    assert summary["softmax"].get("lever") is None and summary["softmax"]["verdict"] in ("beats", "tie", "worse")
    table = (tmp_path / "out" / "ablation.md").read_text()
    assert "## Levers" in table and "| task | softmax | " in table
    assert "Grid choices" in table and "diverges seed 0" in table and str(expected) in table
    with (tmp_path / "out" / "ablation.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(results)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(training, "train", no_training)
    capsys.readouterr()
    again = run_ablation(config, tmp_path / "out", quick=True, inline=True)
    finished = sorted((r["variant"], r["seed"]) for r in results if r["status"] == "ok")
    assert sorted((r["variant"], r["seed"]) for r in again if r["status"] == "ok") == finished
    printed = capsys.readouterr().out  # a finished run is counted once, not announced as if it had just run
    assert f"[ablation] {len(finished)} runs already done" in printed and ": ok (" not in printed
    # --report-only: a third seed is pending, nothing trains, the tables hold what is finished
    reported = run_ablation(config, tmp_path / "out", quick=True, inline=True, seeds=3, report_only=True)
    assert sorted((r["variant"], r["seed"]) for r in reported) == finished


def by_seed_loss(results, variant):
    return {r["seed"]: r["eval"]["mean"]["loss"] for r in results if r["variant"] == variant and r["status"] == "ok"}


def test_a_row_off_the_parameter_budget_is_refused_before_anything_runs(tiny_spec, tmp_path):
    spec = json.loads(json.dumps(tiny_spec))
    spec["ablation"]["match"]["tolerance"] = 0.02
    spec["ablation"]["rows"] = [*spec["ablation"]["rows"][:2], {"name": "big", "molora": {"rank": 8}}]
    with pytest.raises(ValueError, match=r"within 2% of 'peft-lora'.*big: [\d,]+ \(\+\d"):
        run_ablation(write(spec, tmp_path / "a.yaml"), tmp_path / "out", quick=True, inline=True)
    assert not (tmp_path / "out").exists()
    spec["ablation"]["rows"][2]["allow_unmatched"] = True
    spec["ablation"]["rows"][1]["allow_unmatched"] = True
    spec["ablation"]["quick_seeds"] = 1
    results = run_ablation(write(spec, tmp_path / "b.yaml"), tmp_path / "out", quick=True, inline=True)
    assert all(r["status"] == "ok" for r in results)


def test_the_verdict_follows_the_readme_rule():
    def interval(mean, half=0.01):
        return Interval(mean, half, 3)

    assert verdict(interval(-0.05), {"a": interval(-0.02), "b": interval(0.005)}) == "beats"  # b within its interval
    assert verdict(interval(-0.05), {"a": interval(-0.08), "b": interval(0.03)}) == "tie"  # b worse beyond it
    assert verdict(interval(-0.005), {}) == "tie" and verdict(interval(0.05), {}) == "worse"
    assert verdict(Interval(-0.05, None, 1), {}) is None and verdict(None, {}) is None


def test_paired_intervals_match_a_hand_computation():
    assert t_quantile_975(1) == 12.706 and t_quantile_975(4) == 2.776 and t_quantile_975(100) == 1.96
    # differences 0.1, 0.3, 0.2: mean 0.2, sd 0.1, half-width 4.303 * 0.1 / sqrt(3)
    interval = paired_interval({0: 1.1, 1: 1.3, 2: 1.2, 3: 9.0}, {0: 1.0, 1: 1.0, 2: 1.0})
    assert interval.mean == pytest.approx(0.2) and interval.n == 3
    assert interval.half_width == pytest.approx(4.303 * 0.1 / 3**0.5)
    assert not interval.excludes_zero() and mean_interval([0.2, 0.21, 0.19]).excludes_zero()
    assert mean_interval([0.5]).half_width is None and paired_interval({0: 1.0}, {1: 1.0}) is None


def test_rows_in_fresh_processes_two_at_a_time_and_the_cli(tiny_spec, tmp_path, capsys):
    spec = json.loads(json.dumps(tiny_spec))
    spec["ablation"].update(rows=spec["ablation"]["rows"][1:3], quick_seeds=1, baseline="softmax", match={})
    path = write(spec, tmp_path / "two.yaml")
    assert ablate_main(["--config", str(path), "--quick", "--jobs", "2", "--output-dir", str(tmp_path / "out")]) == 0
    lines = list(csv.DictReader((tmp_path / "out" / "ablation.csv").open()))
    assert {r["variant"] for r in lines} == {"softmax", "task"} and all(r["status"] == "ok" for r in lines)
    # a process that imported torch and trained holds tens of MB at least: a 0, a byte or a GB unit slip shows
    assert all(50 < float(r["peak_mem_mb"]) < 20_000 and int(r["threads"]) >= 1 for r in lines)
    run = tmp_path / "out" / "rows" / "task" / "seed0" / "run"
    assert inspect_main(["--run", str(run), "--output-dir", str(tmp_path / "inspected")]) == 0
    assert "I(task; expert)" in capsys.readouterr().out
    # bench/deploy_report.py on the same finished run: the INT8 export's report, written where asked
    from bench import deploy_report

    deploy_report.main(["--run", str(run), "--out", str(tmp_path / "deploy.md")])
    report = (tmp_path / "deploy.md").read_text()
    assert report.startswith("# INT8 export of") and "int8" in report
    capsys.readouterr()
    # --data: the routing on the user's own files; a file that is not data is exit 2, naming it
    data = spec["data"]["files"][0]
    assert inspect_main(["--run", str(run), "--data", data, "--output-dir", str(tmp_path / "on-data")]) == 0
    assert "I(task; expert)" in capsys.readouterr().out and (tmp_path / "on-data").is_dir()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    assert inspect_main(["--run", str(run), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "molora-inspect: error" in err and "bad.jsonl" in err


def test_the_ablate_command_exits_1_when_every_run_failed_and_2_on_a_bad_config(tiny_spec, tmp_path, capsys):
    spec = json.loads(json.dumps(tiny_spec))
    spec["ablation"].update(rows=spec["ablation"]["rows"][4:], quick_seeds=2, baseline="diverges", match={})
    path = write(spec, tmp_path / "diverges.yaml")
    out = ["--output-dir", str(tmp_path / "out")]
    assert ablate_main(["--config", str(path), "--quick", "--seeds", "1", *out]) == 1  # its only run diverged
    lines = list(csv.DictReader((tmp_path / "out" / "ablation.csv").open()))
    assert [(r["variant"], r["seed"], r["status"]) for r in lines] == [("diverges", "0", "failed")]  # --seeds 1
    assert ablate_main(["--config", str(path), "--quick", "--seeds", "2", "--report-only", *out]) == 0  # trains none
    assert not (tmp_path / "out" / "rows" / "diverges" / "seed1").exists()
    capsys.readouterr()
    spec["ablation"]["rows"][0]["molora"] = {"routr": "softmax"}
    assert ablate_main(["--config", str(write(spec, tmp_path / "typo.yaml")), "--quick", *out]) == 2
    assert "molora-ablate: error" in capsys.readouterr().err
    assert ablate_main(["--config", str(tmp_path / "missing.yaml"), *out]) == 2
    assert ablate_main(["--config", str(path), "--suite", "heldout", "--reevaluate", "data.seed=1", *out]) == 2
    with pytest.raises(SystemExit) as raised:  # argparse: not a suite
        ablate_main(["--config", str(path), "--suite", "elsewhere", *out])
    assert raised.value.code == 2


def test_a_row_that_cannot_build_its_adapter_is_refused_by_name(tiny_spec, tmp_path):
    spec = json.loads(json.dumps(tiny_spec))
    spec["ablation"]["rows"].append({"name": "broken", "molora": {"target_modules": ["qkv_proj"]}})
    with pytest.raises(ValueError, match="row 'broken' cannot build its adapter: target_modules: 'qkv_proj'"):
        run_ablation(write(spec, tmp_path / "a.yaml"), tmp_path / "out", quick=True, inline=True)


def test_bad_ablation_configs(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"train": {"steps": 2}}))
    with pytest.raises(ValueError, match="ablation"):
        load_ablation(path)
    path.write_text(yaml.safe_dump({"ablation": {"rows": [{"name": "a", "trian": {}}]}}))
    with pytest.raises(ValueError, match="did you mean 'train'"):
        load_ablation(path)
    path.write_text(yaml.safe_dump({"ablation": {"rows": [{"name": "a"}, {"name": "a"}]}}))
    with pytest.raises(ValueError, match="unique"):
        load_ablation(path)
    path.write_text(yaml.safe_dump({"ablation": {"rows": [{"name": "a", "grid": {"lr": [1]}}]}}))
    with pytest.raises(ValueError, match=r"section\.key"):
        load_ablation(path)
    path.write_text(yaml.safe_dump({"ablation": {"baseline": "b", "rows": [{"name": "a"}]}}))
    with pytest.raises(ValueError, match="baseline 'b' is not a row"):
        load_ablation(path)
    path.write_text(yaml.safe_dump({"ablation": {"rows": [{"name": "a", "compare_to": "c"}, {"name": "b"}]}}))
    with pytest.raises(ValueError, match="row 'a': compare_to 'c' is not another row"):
        load_ablation(path)


def test_the_pool_runs_the_lowest_seed_first_whenever_it_was_submitted():
    import threading

    from molora.ablation.harness import SeedMajorPool

    started, release, order = threading.Event(), threading.Event(), []

    def blocker():
        started.set()
        release.wait(5)

    pool = SeedMajorPool(1)
    pool.submit((0, 0, 0), blocker)
    started.wait(5)
    # while the worker is busy: seed 2 of a row, then (as a grid row's later seeds are) seed 1 of an earlier row
    futures = [pool.submit(p, order.append, p) for p in [(2, 1, 0), (2, 0, 0), (1, 5, 0), (1, 0, 0)]]
    release.set()
    pool.shutdown()
    assert order == [(1, 0, 0), (1, 5, 0), (2, 0, 0), (2, 1, 0)] and all(f.done() for f in futures)
    failing = SeedMajorPool(1)
    boom = failing.submit((0,), lambda: 1 / 0)
    failing.shutdown()
    with pytest.raises(ZeroDivisionError):
        boom.result()


def test_reevaluating_finished_runs_reproduces_their_scores_and_applies_new_data_settings(
    tiny_spec, tmp_path, monkeypatch
):
    from molora import reevaluate

    spec = json.loads(json.dumps(tiny_spec))
    spec["ablation"].update(rows=spec["ablation"]["rows"][1:4], quick_seeds=1, baseline="softmax", match={})
    config = write(spec, tmp_path / "a.yaml")
    results = {r["variant"]: r for r in run_ablation(config, tmp_path / "out", quick=True, inline=True)}
    same = {
        r["variant"]: r for r in reevaluate.reevaluate_ablation(config, tmp_path / "out", ["data.dedupe=false"], True)
    }
    assert set(same) == {"softmax", "task", "base-model"}
    for variant, result in results.items():  # nothing changed: the run's own eval, from its saved adapter
        for domain, scores in result["eval"].items():
            assert same[variant]["eval"][domain]["loss"] == pytest.approx(scores["loss"], abs=1e-5)
    table = (tmp_path / "out" / "reeval-dedupe-false" / "ablation.md").read_text()
    assert "--reevaluate data.dedupe=false" in table
    # the command: the same table, printed, exit 0 (everything scored already)
    command = ["--config", str(config), "--quick", "--output-dir", str(tmp_path / "out")]
    assert ablate_main([*command, "--reevaluate", "data.dedupe=false"]) == 0
    fewer = reevaluate.reevaluate_ablation(config, tmp_path / "out", ["data.max_eval_per_domain=2"], True)
    assert all(r["eval"]["upper"]["examples"] <= 2 for r in fewer)

    def no_scoring(*args, **kwargs):
        raise AssertionError("a run was scored again")

    monkeypatch.setattr(reevaluate, "reevaluate_run", no_scoring)
    reevaluate.reevaluate_ablation(config, tmp_path / "out", ["data.dedupe=false"], True)  # all there: skipped
    with pytest.raises(ValueError, match=r"data\.dedup"):
        reevaluate.reevaluate_ablation(config, tmp_path / "out", ["data.dedup=true"], True)


def test_a_suite_puts_every_row_on_its_domains(tmp_path):
    from molora.ablation.spec import load_ablation
    from molora.run.domains import SUITES

    config = tmp_path / "a.yaml"
    config.write_text(
        "data: {domains: [news, code]}\nablation: {seeds: 1, rows: [{name: a}, {name: b, data: {domains: [math]}}]}\n"
    )
    plain = load_ablation(config)
    assert [row.spec["data"]["domains"] for row in plain.rows] == [["news", "code"], ["math"]]
    heldout = load_ablation(config, suite="heldout")
    assert [row.spec["data"]["domains"] for row in heldout.rows] == [list(SUITES["heldout"])] * 2


def test_rows_trains_only_those_and_what_they_are_measured_against(tiny_spec, tmp_path):
    config = write(tiny_spec, tmp_path / "ablation.yaml")
    results = run_ablation(config, tmp_path / "out", quick=True, inline=True, seeds=1, only=["task"])
    status = {r["variant"]: r["status"] for r in results}
    assert status == dict.fromkeys(["peft-lora[lr=0.01]", "peft-lora[lr=0.02]", "task"], "ok")  # nothing else ran
    assert not (tmp_path / "out" / "rows" / "softmax").exists()
    table = (tmp_path / "out" / "ablation.md").read_text()
    assert "| softmax |" in table and "--rows task" in table  # every row in the tables; the command as run


def test_runs_that_evaluated_at_start_put_the_base_models_loss_beside_each_rows(tiny_spec, tmp_path):
    spec = {**tiny_spec, "train": {**tiny_spec["train"], "eval_at_start": True}}
    spec["ablation"] = {**spec["ablation"], "rows": spec["ablation"]["rows"][1:3], "baseline": "softmax"}
    spec["ablation"].pop("match")
    config = write(spec, tmp_path / "ablation.yaml")
    results = run_ablation(config, tmp_path / "out", quick=True, inline=True, seeds=1)
    run = json.loads((tmp_path / "out" / "rows" / "task" / "seed0" / "run" / "eval.json").read_text())
    assert all(r["eval_before"] == run["before"] for r in results)  # the same base model and eval split
    table = (tmp_path / "out" / "ablation.md").read_text()
    domains = [d for d in results[0]["eval"] if d != "mean"]
    before = " | ".join(f"{run['before'][d]['loss']:.3f}" for d in [*domains, "mean"])
    assert f"| before training | {before} |" in table
    after = {r["variant"]: r["eval"]["mean"]["loss"] for r in results}
    lines = table.split("## Eval loss per domain")[1].splitlines()
    assert next(ln for ln in lines if ln.startswith("| task |")).endswith(f" {after['task']:.3f} |")
    no_start = run_ablation(write(tiny_spec, tmp_path / "b.yaml"), tmp_path / "b", quick=True, inline=True, seeds=1)
    assert {r["variant"] for r in no_start if r.get("eval_before")} == {"base-model"}  # it trains nothing


def test_rows_on_different_bases_each_show_their_own_before():
    """A quantized row starts from another base than the fp32 one: one "before" line per base, not their mean."""
    from molora.ablation.report import before_and_after

    def result(variant, before, after):
        return {"variant": variant, "eval_before": {"a": {"loss": before}, "mean": {"loss": before}}, "after": after}

    summary = [{"row": r, "variant": r, "loss_domain": {"a": mean_interval([1.0])}, "loss": None} for r in ("x", "y")]
    different = before_and_after(summary, [result("x", 3.0, 1.0), result("y", 4.0, 1.0)], ["a"])
    assert "| before training (x's base) | 3.000 | 3.000 |" in different
    assert "| before training (y's base) | 4.000 | 4.000 |" in different
    same = before_and_after(summary, [result("x", 3.0, 1.0), result("y", 3.0, 1.0)], ["a"])
    assert [ln for ln in same if ln.startswith("| before")] == ["| before training | 3.000 | 3.000 |"]
    assert before_and_after(summary, [{"variant": "x"}], ["a"]) == []
