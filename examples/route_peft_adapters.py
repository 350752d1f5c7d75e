"""Route between LoRA adapters you already have (X-LoRA's setting): MoLoRAModel.from_peft_adapters makes each PEFT
adapter one expert of a mixture and trains only the router that weighs them.

    python examples/route_peft_adapters.py                      # SmolLM2-135M: two PEFT adapters trained here first
    python examples/route_peft_adapters.py --adapters a/ b/     # your own PEFT adapter folders
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from molora import MoLoRAModel
from molora.run.base_models import load_base
from molora.run.data import DataConfig, MultiDomainData

HERE = Path(__file__).resolve().parent


def train_peft_adapter(base, tokenizer, files, domain, steps, folder) -> Path:
    """A plain PEFT LoRA trained on one domain: what a user who fine-tuned per domain already has."""
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    only = MultiDomainData(DataConfig(domains=[domain], files=files, max_length=64), tokenizer)
    for step in range(steps):
        batch = {k: v for k, v in only.train_batch(step, 4).items() if k not in ("task_ids", "prompt_mask")}
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapters", nargs="*", type=Path, help="PEFT adapter folders (default: train two here)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/route-peft"))
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    base, tokenizer = load_base(args.model)
    files = [str(HERE / "own_domains" / "domains.jsonl")]
    data = MultiDomainData(DataConfig(domains=["shout", "reverse"], files=files, max_length=64), tokenizer)
    adapters = args.adapters or [
        train_peft_adapter(base, tokenizer, files, domain, args.steps, args.workdir / f"peft-{domain}")
        for domain in ("shout", "reverse")
    ]
    # One expert per adapter, a softmax router over them; only the router trains (trainable="router").
    model = MoLoRAModel.from_peft_adapters(base, adapters, router="softmax", trainable="router")
    print(model.injection_report)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(args.steps):
        batch = data.train_batch(step, 4)
        loss = model(**batch).loss + model.aux_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with model.record_routing(domains=data.names) as recorder:
        model.eval()
        with torch.no_grad():
            for domain in data.domains:
                for batch in data.eval_batches(domain, 8):
                    model(**batch)
    print(f"{len(adapters)} experts ({', '.join(map(str, adapters))}); the router's mean weight per domain:")
    for domain, weights in expert_shares(recorder).items():
        print(f"  {domain}: " + ", ".join(f"expert {e} {w:.2f}" for e, w in enumerate(weights)))


def expert_shares(recorder) -> dict[str, list[float]]:
    """{domain: the mean gate of each expert}, averaged over the routed layers."""
    shares = []
    for name in recorder.layers:
        if recorder.weight[name]:
            weight, _, tokens = recorder.matrices(name)
            shares.append(weight / tokens.clamp_min(1)[:, None])
    mean = torch.stack(shares).mean(0)
    return {domain: mean[t].tolist() for t, domain in enumerate(recorder.task_names())}


if __name__ == "__main__":
    main()
