"""Fine-tune with Hugging Face's Trainer: MoLoRATrainer adds the mixture's aux loss to the objective and logs the
aux terms and router health beside the loss.

    python examples/hf_trainer.py                  # SmolLM2-135M (bundled), the domains in examples/own_domains
    python examples/hf_trainer.py --model path/to/model --steps 200
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from datasets import concatenate_datasets
from transformers import TrainingArguments

from molora import MoLoRAConfig, get_molora_model
from molora.run.base_models import load_base
from molora.run.data import DataConfig, MultiDomainData
from molora.run.integrations import MoLoRADataCollator, MoLoRATrainer

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a built-in model, a folder or a Hub id")
    parser.add_argument("--data", type=Path, default=HERE / "own_domains" / "domains.jsonl")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/hf-trainer"))
    args = parser.parse_args()

    base, tokenizer = load_base(args.model)
    data = MultiDomainData(
        DataConfig(domains=["shout", "reverse", "add"], files=[str(args.data)], max_length=64), tokenizer
    )
    config = MoLoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=4, rank=4, router="topk", top_k=2)
    model = get_molora_model(base, config)  # PEFT users: get_peft_model(base, LoraConfig(r=...)) -> this line
    model.print_trainable_parameters()

    training = TrainingArguments(
        output_dir=str(args.output_dir),
        max_steps=args.steps,
        per_device_train_batch_size=4,
        learning_rate=2e-3,
        logging_steps=max(1, args.steps // 4),
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = MoLoRATrainer(
        model=model,
        args=training,
        train_dataset=concatenate_datasets([d.train for d in data.domains]),
        data_collator=MoLoRADataCollator(tokenizer.pad_token_id),
    )
    trainer.train()
    for entry in trainer.state.log_history:
        if "loss" in entry:
            aux = ", ".join(f"{k} {v:.3f}" for k, v in entry.items() if k.startswith("aux/"))
            entropy = entry["router_entropy"]
            print(f"step {entry['step']}: loss {entry['loss']:.3f}, {aux}, router entropy {entropy:.3f}")
    model.eval()
    with torch.no_grad():  # the language-model loss per domain, on its held-out examples
        for domain in data.domains:
            losses = [model(**batch).loss.item() for batch in data.eval_batches(domain, 8)]
            print(f"{domain.name}: eval loss {sum(losses) / len(losses):.3f}")


if __name__ == "__main__":
    main()
