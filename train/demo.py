"""Demo: inject experts into a tiny Llama, fine-tune it on three synthetic domains, print where tokens route.

    python -m train.demo --config configs/demo.yaml [--router switch]

The base model is random, so only the adapters learn; the domains are token-level patterns (count up, repeat a
motif, count down) whose task id is also given to the router (used by router=task, ignored by the others).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from molora import MoLoRAConfig, MoLoRALinear, get_molora_model

DOMAINS = ("count_up", "repeat", "count_down")


def make_batch(generator: torch.Generator, batch: int, length: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    tasks = torch.randint(0, len(DOMAINS), (batch,), generator=generator)
    start = torch.randint(3, vocab, (batch, 1), generator=generator)
    steps = torch.arange(length)
    motif = torch.randint(3, vocab, (batch, 4), generator=generator)
    rows = {
        0: 3 + (start - 3 + steps) % (vocab - 3),
        1: motif[:, steps % 4],
        2: 3 + (start - 3 - steps) % (vocab - 3),
    }
    ids = torch.stack([rows[int(t)][i] for i, t in enumerate(tasks)])
    return ids, tasks


def expert_load_by_task(model, ids: torch.Tensor, tasks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean routing weight per (task, expert) for each MoLoRA layer, from router forward hooks."""
    loads: dict[str, torch.Tensor] = {}
    handles = []
    for name, layer in model.base_model.named_modules():
        if isinstance(layer, MoLoRALinear):

            def hook(module, inputs, out, name=name):
                per_sequence = out.weights.mean(dim=1)  # [B, E]
                loads[name] = torch.stack([per_sequence[tasks == t].mean(0) for t in range(len(DOMAINS))])

            handles.append(layer.router.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=ids, task_ids=tasks)
    finally:
        for handle in handles:
            handle.remove()
    return loads


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--router", help="override molora.router (softmax, topk, switch, intuition, task)")
    args = parser.parse_args(argv)
    spec = yaml.safe_load(args.config.read_text())
    molora_spec, train = dict(spec["molora"]), spec["train"]
    if args.router:
        molora_spec["router"] = args.router
        if args.router != "topk":
            molora_spec.pop("top_k", None)
    if molora_spec.get("router") == "task":
        molora_spec.setdefault("num_tasks", len(DOMAINS))

    torch.manual_seed(train["seed"])
    base = LlamaForCausalLM(LlamaConfig(**spec["model"]))
    model = get_molora_model(base, MoLoRAConfig(**molora_spec), verbose=True)
    generator = torch.Generator().manual_seed(train["seed"])
    vocab = spec["model"]["vocab_size"]
    eval_ids, eval_tasks = make_batch(torch.Generator().manual_seed(10_000), 96, train["seq_len"], vocab)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = model(input_ids=eval_ids, labels=eval_ids, task_ids=eval_tasks).loss.item()
        model.train()
        return loss

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train["lr"])
    before = eval_loss()
    start = time.perf_counter()
    for step in range(1, train["steps"] + 1):
        ids, tasks = make_batch(generator, train["batch_size"], train["seq_len"], vocab)
        out = model(input_ids=ids, labels=ids, task_ids=tasks)
        loss = out.loss + model.aux_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 20 == 0 or step == 1:
            terms = ", ".join(f"{k}={v.item():.3f}" for k, v in model.aux_loss_terms().items())
            print(f"step {step:4d}  lm loss {out.loss.item():.3f}  aux: {terms}")
    after = eval_loss()
    print(f"\neval loss: base {before:.3f} -> trained {after:.3f}  ({time.perf_counter() - start:.1f}s training)")

    loads = expert_load_by_task(model, eval_ids, eval_tasks)
    print("\nrouting summary (eval set): mean routing weight per domain and expert, averaged over layers")
    mean_load = torch.stack(list(loads.values())).mean(0)
    print(f"  {'':<11} " + " ".join(f"  e{e:<3}" for e in range(mean_load.shape[1])))
    for task, row in zip(DOMAINS, mean_load, strict=True):
        print(f"  {task:<11} " + " ".join(f"{w:6.2f}" for w in row.tolist()))
    print("favourite expert per domain, by layer:")
    for name, load in loads.items():
        favourites = ", ".join(f"{task}->e{int(row.argmax())}" for task, row in zip(DOMAINS, load, strict=True))
        print(f"  {name:<34} {favourites}")


if __name__ == "__main__":
    main()
