"""Score an ablation's finished runs again under changed data settings (say `data.dedupe=true`), forward only.

The trained adapters stay as they are; only the splits they are scored on change. It is a robustness check beside
the ablation's own tables, which keep what was run: its tables go to `<output dir>/reeval-<tag>/`, and each run's
numbers to `rows/<variant>/seed<k>/reeval-<tag>.json` (a rerun skips those already there for the same settings).

    python -m train.ablate --config configs/ablation.yaml --output-dir docs/ablation --reevaluate data.dedupe=true
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

from molora.ablation.harness import load_ablation, run_one
from molora.ablation.report import write_outputs
from molora.ablation.transfer import narrowed
from molora.run.config import RunConfig, apply_overrides
from molora.utils import atomic_write_text


def reevaluate_run(spec: dict[str, Any], run_dir: Path, splits: dict | None = None) -> dict[str, Any]:
    """{"eval": ..., "val": ...} of a finished run's adapter on the splits `spec` describes. `splits` caches the
    tokenised data across runs that share the model and data settings (the eval and validation splits do not depend
    on the run's seed)."""
    from molora.run.base_models import load_run_base
    from molora.run.data import MultiDomainData
    from molora.run.evaluation import evaluate
    from molora.run.setup import build_model, load_adapter_weights, setup_distributed

    config = RunConfig.from_dict(spec)
    _, _, device = setup_distributed()
    base, tokenizer = load_run_base(config, device)  # fresh: the adapter is injected into it
    key = json.dumps([config.model.name, spec.get("data")], sort_keys=True)
    splits = {} if splits is None else splits
    if key not in splits:
        splits[key] = MultiDomainData(config.data, tokenizer)
    data = splits[key]
    model = build_model(base, config)
    if config.model.adapter != "none":
        load_adapter_weights(model, run_dir / "adapter")
    model.to(device).eval()
    scores = {"eval": evaluate(model, data, config, device)}
    if config.data.val_fraction:
        scores["val"] = evaluate(model, data, config, device, split="val")
    return scores


def tag_of(overrides: list[str]) -> str:
    """data.dedupe=true -> dedupe-true: a folder name that says what changed."""
    parts = [re.sub(r"[^A-Za-z0-9.-]+", "-", f"{key.rsplit('.', 1)[-1]}-{value}") for key, _, value in
             (item.partition("=") for item in overrides)]  # fmt: skip
    return "_".join(parts)


def reevaluate_ablation(config: str | Path, out: str | Path, overrides: list[str], quick: bool = False) -> list[dict]:
    """Every finished run of the ablation in `out`, scored again with `overrides` applied to its config."""
    if not overrides:
        raise ValueError("--reevaluate needs at least one section.key=value")
    out, tag = Path(out), tag_of(overrides)
    ablation = narrowed(load_ablation(config, quick), out)
    results, splits = [], {}
    for row in ablation.rows:
        for variant, spec in row.variants():
            for seed in ablation.seeds:
                folder = out / "rows" / variant / f"seed{seed}"
                done = run_one(variant, spec, seed, folder, inline=True, threads=None, train=False)
                if done is None or done["status"] != "ok":
                    continue
                changed = apply_overrides(copy.deepcopy(done["spec"]), overrides)
                RunConfig.from_dict(changed)  # a bad override fails here, before any model is loaded
                path = folder / f"reeval-{tag}.json"
                scores = json.loads(path.read_text()) if path.is_file() else None
                if scores is None or scores.get("spec") != changed:
                    scores = {"spec": changed, **reevaluate_run(changed, folder / "run", splits)}
                    atomic_write_text(path, json.dumps(scores, indent=1) + "\n")
                    print(f"[reevaluate {tag}] {variant} seed {seed}: eval {scores['eval']['mean']['loss']:.3f}")
                results.append({**done, "eval": scores["eval"], "val": scores.get("val") or done.get("val")})
    counts = {r["variant"]: r.get("trainable_params", 0) for r in results}
    command = f"python -m train.ablate --config {config} --reevaluate {' '.join(overrides)}"
    write_outputs(ablation, results, counts, out / f"reeval-{tag}", command, 0.0)
    return results
