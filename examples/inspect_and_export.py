"""See which expert each domain uses, then deploy one domain's mixture as a plain PEFT LoRA adapter that PEFT
loads by itself (no molora at serving time).

    python examples/inspect_and_export.py                    # a short task-router run on examples/own_domains first
    python examples/inspect_and_export.py --run runs/mine    # a molora-train run folder whose router is `task`
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from peft import PeftModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from route_peft_adapters import expert_shares

from molora import MoLoRAModel, export_peft
from molora.run.base_models import load_run_base
from molora.run.config import RunConfig, load_run_config
from molora.run.data import MultiDomainData
from molora.run.training import train

HERE = Path(__file__).resolve().parent


def short_run(model: str, steps: int, folder: Path) -> Path:
    """A task router over four rank-2 LoRAs (configs/task_ffn.yaml's layout) trained on the example domains."""
    spec = {
        "model": {"name": model},
        "data": {
            "domains": ["shout", "reverse", "add"],
            "files": [str(HERE / "own_domains" / "domains.jsonl")],
            "max_length": 64,
            "max_eval_per_domain": 16,
        },
        "molora": {
            "target_modules": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
            "num_experts": 4,
            "rank": 2,
            "alpha": 4,
            "router": "task",
            "mixture_scaling": "sum",
            "router_init_std": 1.0,
            "aux_losses": {"task_mi": 1.0},
        },
        "train": {
            "steps": steps,
            "batch_size": 4,
            "lr": 2e-3,
            "router_lr_scale": 30.0,
            "warmup_steps": 2,
            "progress": False,
            "eval_at_start": False,
        },
    }
    train(RunConfig.from_dict(spec), folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--run", type=Path, help="a finished molora-train run folder (default: train one here)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/inspect-export"))
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()

    run = args.run or short_run(args.model, args.steps, args.workdir / "run")
    config = load_run_config(run / "config.yaml")
    base, tokenizer = load_run_base(config)
    model = MoLoRAModel.from_pretrained(base, run / "adapter")
    data = MultiDomainData(config.data, tokenizer)

    # 1. Which expert does each domain use? (molora-inspect writes the same as a report with heatmaps.)
    with model.record_routing(domains=data.names) as recorder, torch.no_grad():
        for domain in data.domains:
            for batch in data.eval_batches(domain, 8):
                model(**batch)
    for domain, weights in expert_shares(recorder).items():
        print(f"{domain}: " + ", ".join(f"expert {e} {w:.2f}" for e, w in enumerate(weights)))

    # 2. Domain 0's mixture as a PEFT adapter: its fixed task gate written into one LoRA per module.
    folder = args.workdir / "peft-task0"
    export_peft(model, folder, task_id=0)
    fresh, _ = load_run_base(config)
    peft_model = PeftModel.from_pretrained(fresh, folder).eval()
    batch = next(iter(data.eval_batches(data.domains[0], 8)))
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    print(f"{data.names[0]} as a PEFT adapter in {folder}: max |molora - peft| = {(ours - theirs).abs().max():.2e}")


if __name__ == "__main__":
    main()
