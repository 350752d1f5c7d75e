"""Decoding speed: generate() of a prompt and NEW_TOKENS greedy tokens, batch 1 and 8, for the base model, PEFT LoRA
unmerged and merged, every molora router (routing per module, per input, per block) and the task router merged into
the weights. Reported as tokens/s ratios to the base measured in the same process, the variants interleaved in each
round (paired), median and quartiles over rounds; and the kernel operators per decode step (deterministic: the
dispatch counter of bench/op_count.py around generate(), the prompt's forward taken out).

    python bench/bench_decode.py --model smollm2-shape --rounds 5 --out docs/bench_decode_cpu.json

At batch 1 a GPU decode step is bound by kernel launches, so the op count is the figure a user feels there; on a CPU
the time is the matmuls' as much as the launches'.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_speed import load_base, synchronize
from bench.op_count import OpCounter
from bench.variants import NUM_EXPERTS, NUM_TASKS, RANK, TARGETS, Variant, build
from molora.utils import atomic_write_text

NEW_TOKENS = 64
PROMPT = 32
BATCHES = (1, 8)
COUNT_TOKENS = 9  # op count: generate(COUNT_TOKENS) minus generate(1), per step


def decode_variants() -> list[Variant]:
    peft = f"peft-r{NUM_EXPERTS * RANK}"  # the molora rows' trainable parameters, as in bench_speed
    variants = [Variant("base", "base"), Variant(peft, "peft", rank=NUM_EXPERTS * RANK)]
    variants.append(Variant(f"{peft}-merged", "peft", rank=NUM_EXPERTS * RANK, options={"merge": True}))
    variants += [Variant(f"lora-{r}", "molora", router=r) for r in ("softmax", "topk", "switch", "intuition", "task")]
    variants += [
        Variant(f"lora-{router}-{scope}", "molora", router=router, options={"routing_scope": scope})
        for scope in ("input", "block")
        for router in ("softmax", "topk")
    ]
    variants.append(Variant("lora-task-merged", "merged", router="task"))
    return variants


def build_decoder(variant: Variant, base: torch.nn.Module) -> torch.nn.Module:
    """The variant in eval mode with nonzero adapter weights (a zero B would let a kernel skip nothing, but keeps
    the comparison honest about what runs)."""
    if variant.options.get("merge"):
        model = build(replace(variant, options={}), copy.deepcopy(base)).merge_and_unload()
    else:
        model = build(variant, base)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and ("lora_B" in name or name.endswith(".v")):
                param.normal_(0, 0.01)
    return model.eval()


def generate(model, variant: Variant, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    extra = {"task_ids": torch.arange(ids.shape[0]) % NUM_TASKS} if variant.needs_task_ids else {}
    with torch.inference_mode():
        return model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
            eos_token_id=None,
            **extra,
        )


def ops_per_step(model, variant: Variant, ids: torch.Tensor) -> dict[str, float]:
    counts = []
    for tokens in (1, COUNT_TOKENS):
        generate(model, variant, ids, tokens)  # warm-up outside the count
        with OpCounter() as counter:
            generate(model, variant, ids, tokens)
        counts.append((sum(counter.kernels.values()), sum(counter.views.values())))
    steps = COUNT_TOKENS - 1
    return {"kernels": (counts[1][0] - counts[0][0]) / steps, "views": (counts[1][1] - counts[0][1]) / steps}


def measure(model_name: str, variants: list[Variant], rounds: int, device: torch.device) -> dict:
    base = load_base(model_name).to(device)
    generator = torch.Generator().manual_seed(1)
    models = {v.name: build_decoder(v, base).to(device) for v in variants}
    out: dict = {"ops_per_decode_step": {}, "tokens_per_s": {}}
    ids1 = torch.randint(3, base.config.vocab_size, (1, PROMPT), generator=generator)
    for variant in variants:
        out["ops_per_decode_step"][variant.name] = ops_per_step(models[variant.name], variant, ids1.to(device))
    for batch in BATCHES:
        ids = torch.randint(3, base.config.vocab_size, (batch, PROMPT), generator=generator).to(device)
        for variant in variants:
            generate(models[variant.name], variant, ids, 4)  # warm-up
        times: dict[str, list[float]] = {v.name: [] for v in variants}
        for _ in range(rounds):
            for variant in variants:
                synchronize(device)
                start = time.perf_counter()
                generate(models[variant.name], variant, ids, NEW_TOKENS)
                synchronize(device)
                times[variant.name].append(time.perf_counter() - start)
        out["tokens_per_s"][str(batch)] = summarize(times, batch)
    return out


def summarize(times: dict[str, list[float]], batch: int) -> dict[str, dict]:
    """tokens/s (median over rounds) and its ratio to the base's, paired by round (median, quartiles)."""
    result = {}
    for name, seconds in times.items():
        ratios = sorted(b / t for b, t in zip(times["base"], seconds, strict=True))  # > 1: faster than the base
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        result[name] = {
            "tokens_per_s": round(batch * NEW_TOKENS / statistics.median(seconds), 1),
            "speed_vs_base": round(statistics.median(ratios), 3),
            "speed_vs_base_iqr": [round(quartiles[0], 3), round(quartiles[2], 3)],
        }
    return result


def format_table(measured: dict, peer: str) -> str:
    ops, speeds = measured["ops_per_decode_step"], measured["tokens_per_s"]
    head = "| variant | kernels per decode step | ÷ base | ÷ " + peer + " |"
    head += "".join(f" batch {b}: tokens/s | ÷ base (IQR) |" for b in speeds)
    lines = [head, "|" + "---|" * (4 + 2 * len(speeds))]
    for name, count in ops.items():
        cells = [name, f"{count['kernels']:.0f}", f"{count['kernels'] / ops['base']['kernels']:.2f}x"]
        cells.append(f"{count['kernels'] / ops[peer]['kernels']:.2f}x")
        for batch in speeds:
            r = speeds[batch][name]
            low, high = r["speed_vs_base_iqr"]
            cells += [f"{r['tokens_per_s']:.1f}", f"{r['speed_vs_base']:.2f} ({low:.2f}-{high:.2f})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-shape", help="reference, smollm2-shape or a base model name")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", nargs="+", help="default: every variant (the base is always measured)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_decode.json"))
    args = parser.parse_args(argv)
    variants = decode_variants()
    if args.variants:
        unknown = sorted(set(args.variants) - {v.name for v in variants})
        if unknown:
            parser.error(f"unknown variants {unknown}; known: {[v.name for v in variants]}")
        variants = [v for v in variants if v.name in {"base", *args.variants}]
    device = torch.device(args.device)
    measured = measure(args.model, variants, args.rounds, device)
    import transformers

    results = {
        "command": "python bench/bench_decode.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "prompt": PROMPT,
        "new_tokens": NEW_TOKENS,
        "targets": TARGETS,
        **measured,
    }
    peer = next((v.name for v in variants if v.kind == "peft"), "base")
    print(format_table(measured, peer), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
