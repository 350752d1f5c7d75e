"""INT8 export of a finished run, measured: file sizes, the output error against fp32, and eval loss of both; for a
run trained with rank gates, also what prune_ranks removes and the eval loss before and after.

    python bench/deploy_report.py --run runs/quickstart --out docs/deploy_quickstart.md

The output error is the relative error (Frobenius, over every scored eval batch) of the adapter's contribution to
the logits, logits(adapter) - logits(base), and the largest logit difference relative to the largest contribution.
Beside the file's format (one scale per rank component), it also reports the update error per module of the
per-output-channel alternative (a scale per row of B), which the file does not use, with the size it would take.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from molora import MoLoRAModel
from molora.core.patcher import molora_layers
from molora.deploy.quantize import dequantize_tensor, quantize_tensor
from molora.run.base_models import load_base
from molora.run.config import RunConfig, load_run_config
from molora.run.data import MultiDomainData
from molora.run.evaluation import evaluate, to_device
from molora.utils import atomic_write_text


@torch.no_grad()
def contribution_error(fp32: MoLoRAModel, int8: MoLoRAModel, data: MultiDomainData, config: RunConfig) -> dict:
    squared_error = squared_norm = 0.0
    largest_error = largest_contribution = 0.0
    for domain in data.domains:
        for batch in data.eval_batches(domain, config.train.eval_batch_size, "eval"):
            batch = to_device(batch, torch.device("cpu"))
            batch.pop("labels")
            full = fp32(**batch).logits.float()
            with fp32.disable_adapters():
                base = fp32(**batch).logits.float()
            quantized = int8(**batch).logits.float()
            mask = batch["attention_mask"].bool()
            contribution, error = (full - base)[mask], (quantized - full)[mask]
            squared_error += float(error.pow(2).sum())
            squared_norm += float(contribution.pow(2).sum())
            largest_error = max(largest_error, float(error.abs().max()))
            largest_contribution = max(largest_contribution, float(contribution.abs().max()))
    return {
        "relative_frobenius": (squared_error / squared_norm) ** 0.5,
        "max_abs_over_max_contribution": largest_error / largest_contribution,
    }


@torch.no_grad()
def update_errors(model: MoLoRAModel) -> dict[str, float]:
    """Mean over modules of |B'A' - BA| / |BA| (Frobenius, each expert) for both scale layouts of B."""
    errors = {"per rank component (the file)": [], "per output channel of B": []}
    for _, layer in model._layers:
        experts = layer.experts
        if experts.expert_type != "lora":
            continue
        a = (
            experts.lora_A.float()
            if experts.lora_A.dim() == 3
            else experts.lora_A.float().expand(experts.num_experts, -1, -1)
        )
        b = experts.lora_B.float().transpose(1, 2)  # [E, d_out, r]: B as PEFT stores it
        qa = dequantize_tensor(*quantize_tensor(a, -1))
        exact = b @ a
        for label, axis in (("per rank component (the file)", -2), ("per output channel of B", -1)):
            product = dequantize_tensor(*quantize_tensor(b, axis)) @ qa
            norms = exact.flatten(1).norm(dim=1)
            errors[label].append(float(((product - exact).flatten(1).norm(dim=1) / norms).mean()))
    return {label: sum(values) / len(values) for label, values in errors.items() if values}


def prune_lines(model: MoLoRAModel, data: MultiDomainData, config: RunConfig, gated_loss: float) -> list[str]:
    """prune_ranks on the run's adapter: parameters and eval loss before (hard gates) and after."""
    from molora.analysis.rank_report import module_type
    from molora.core.rank_gates import effective_ranks, prune_ranks

    ranks = effective_ranks(model)
    trained = {name: layer.experts.rows_per_expert for name, layer in molora_layers(model.base_model)}
    by_type: dict[tuple[str, int], list[int]] = {}
    for name, counts in ranks.items():
        by_type.setdefault((module_type(name), trained[name]), []).extend(counts)
    kept = "; ".join(
        f"{mtype} {sum(c) / len(c):.2f} of {rank} (min {min(c)}, max {max(c)})" for (mtype, rank), c in by_type.items()
    )
    report = prune_ranks(model)
    after = evaluate(model, data, config, torch.device("cpu"))["mean"]["loss"]
    modules = sorted({new for _, new in report["ranks"].values()})
    return [
        "",
        "## prune_ranks",
        "",
        f"- Rank kept per expert by the hard gates, mean over each module type's experts: {kept}; module ranks "
        f"after pruning: {modules}.",
        f"- Expert parameters: {report['params_before']:,} -> {report['params_after']:,} "
        f"({report['params_after'] / report['params_before']:.1%}).",
        f"- Mean eval loss: gated {gated_loss:.4f} -> pruned {after:.4f} ({after - gated_loss:+.2e}).",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a finished run folder (config.yaml, adapter/)")
    parser.add_argument("--out", default=None, help="markdown report (default: print only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run = Path(args.run)
    config = load_run_config(run / "config.yaml")
    base, tokenizer = load_base(config.model.name, task=config.model.task)
    data = MultiDomainData(config.data, tokenizer)
    fp32 = MoLoRAModel.from_pretrained(base, run / "adapter")
    with tempfile.TemporaryDirectory() as folder:
        fp32.save_pretrained(Path(folder) / "fp32")
        fp32.save_pretrained(Path(folder) / "int8", bits=8)
        sizes = {name: (Path(folder) / name / "adapter_model.safetensors").stat().st_size for name in ("fp32", "int8")}
        int8 = MoLoRAModel.from_pretrained(
            load_base(config.model.name, task=config.model.task)[0], Path(folder) / "int8"
        )
    device = torch.device("cpu")
    losses = {"fp32": evaluate(fp32, data, config, device), "int8": evaluate(int8, data, config, device)}
    error = contribution_error(fp32, int8, data, config)
    modules = update_errors(fp32)
    change = losses["int8"]["mean"]["loss"] / losses["fp32"]["mean"]["loss"] - 1
    lines = [
        f"# INT8 export of `{run}`",
        "",
        f"Command: `python bench/deploy_report.py --run {run}{f' --out {args.out}' if args.out else ''}`",
        "",
        "| | fp32 | int8 |",
        "|---|---|---|",
        f"| adapter file (bytes) | {sizes['fp32']:,} | {sizes['int8']:,} "
        f"({sizes['fp32'] / sizes['int8']:.2f}x smaller) |",
        f"| mean eval loss | {losses['fp32']['mean']['loss']:.4f} | {losses['int8']['mean']['loss']:.4f} "
        f"({change:+.3%}) |",
        "",
        f"- Output error of int8 against fp32, over every eval token: relative (Frobenius) error of the adapter's "
        f"contribution to the logits {error['relative_frobenius']:.2%}; largest logit difference "
        f"{error['max_abs_over_max_contribution']:.2%} of the largest contribution.",
        "- Update error per module, |B'A' - BA| / |BA| averaged over modules and experts: "
        + "; ".join(f"{label} {value:.2%}" for label, value in modules.items())
        + ".",
    ]
    for domain, scores in losses["fp32"].items():
        if domain != "mean":
            lines.append(f"- {domain}: {scores['loss']:.4f} -> {losses['int8'][domain]['loss']:.4f}")
    if config.molora.rank_gates:
        lines += prune_lines(fp32, data, config, losses["fp32"]["mean"]["loss"])
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        atomic_write_text(Path(args.out), report)


if __name__ == "__main__":
    main()
