"""Operators dispatched per train step (forward + loss + aux losses + backward) and per eval forward, for every
variant of bench_speed.py, PEFT included.

    python bench/op_count.py                       # reference config and SmolLM2-135M's shape, under a minute
    python bench/op_count.py --models reference    # one model

At these sizes a GPU step pays per launched kernel, so the count is what a GPU step costs before any FLOP (see the
H100 profile in docs/). Counts are deterministic for given torch and transformers versions: tests pin upper bounds
on them, times are never pinned. "kernel" counts every aten operator that is neither a view nor an allocation;
"view" counts the aliasing ones (view, t, transpose, expand, detach, ... and _unsafe_view, a view whose schema does
not say so), which launch nothing; allocations without a fill (empty, new_empty_strided, ...) launch nothing either
and are left out. Per adapted module: (variant - base) divided by
the number of adapted linear layers. The optimizer step is left out: it is the same foreach update for every adapter.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_speed import call_batch, load_base, make_batch
from bench.variants import TARGETS, Variant, build, default_variants
from molora.utils import atomic_write_text

SHAPE = (2, 64)  # batch, sequence: the count does not depend on either
MODELS = ("reference", "smollm2-shape")
PEER = "peft-r64"


UNMARKED_VIEWS = {"_unsafe_view"}
ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}


class OpCounter(TorchDispatchMode):
    """Counts the aten operators that reach the dispatcher, views and kernels apart (allocations left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: Counter[str] = Counter()
        self.views: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__)
        if func.is_view or name in UNMARKED_VIEWS:
            self.views[name] += 1
        elif name not in ALLOCATIONS:
            self.kernels[name] += 1
        return func(*args, **(kwargs or {}))


def adapted_modules(model: torch.nn.Module) -> int:
    """Linear layers an adapter wraps (the bench adapts all 7 projections of every decoder layer)."""
    return sum(1 for name, module in model.named_modules() if name.endswith(tuple(f".{t}" for t in TARGETS)))


def count_ops(model: torch.nn.Module, variant: Variant, batch: dict) -> tuple[dict[str, int], dict[str, int]]:
    """Kernel and view operators of one train step (after a warm-up step) and of one eval forward; and the train
    step's kernels by operator (which ops an adapter adds)."""
    aux = getattr(model, "aux_loss", None) if variant.kind == "molora" else None

    def train_step() -> None:
        loss = model(**batch).loss
        if aux is not None:
            loss = loss + aux()
        loss.backward()

    out = {}
    if variant.trains:
        model.train()
        train_step()  # warm-up: lazy state (caches, buffers) is built outside the count
        model.zero_grad(set_to_none=True)
        with OpCounter() as counter:
            train_step()
        model.zero_grad(set_to_none=True)
        out.update(train_kernels=sum(counter.kernels.values()), train_views=sum(counter.views.values()))
        ops = dict(sorted(counter.kernels.items()))
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.inference_mode():
        model(**inputs)
    with torch.inference_mode(), OpCounter() as counter:
        model(**inputs)
    out.update(forward_kernels=sum(counter.kernels.values()), forward_views=sum(counter.views.values()))
    return out, (ops if variant.trains else {})


def measure(model_name: str, variants: list[Variant]) -> dict[str, dict]:
    base = load_base(model_name)
    batch = make_batch(base, *SHAPE)
    modules = adapted_modules(base)
    results, train_ops = {}, {}
    for variant in variants:
        model = build(variant, base)
        results[variant.name], train_ops[variant.name] = count_ops(
            model, variant, call_batch(variant, batch, torch.device("cpu"))
        )
        del model
    for result in results.values():
        for key in list(result):
            result[f"{key}_per_module"] = round((result[key] - results["base"][key]) / modules, 2)
    return {"adapted_modules": modules, "variants": results, "train_kernel_ops": train_ops}


def format_table(model_name: str, measured: dict) -> str:
    rows, peer = measured["variants"], measured["variants"].get(PEER)
    lines = [
        f"### {model_name}: {measured['adapted_modules']} adapted modules, batch {SHAPE[0]} x {SHAPE[1]}",
        "",
        f"| variant | train kernels | per module | ÷ {PEER} | train views | eval kernels | per module | ÷ {PEER} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        train = r.get("train_kernels")
        cells = [
            name,
            f"{train:,}" if train is not None else "-",
            f"{r['train_kernels_per_module']:+.1f}" if train is not None else "-",
            f"{train / peer['train_kernels']:.2f}x" if train is not None and peer else "-",
            f"{r['train_views']:,}" if train is not None else "-",
            f"{r['forward_kernels']:,}",
            f"{r['forward_kernels_per_module']:+.1f}",
            f"{r['forward_kernels'] / peer['forward_kernels']:.2f}x" if peer else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--variants", nargs="+", help="default: every variant of bench_speed.py")
    parser.add_argument("--out", type=Path, default=Path("runs/op_count.json"))
    args = parser.parse_args(argv)
    variants = default_variants()
    if args.variants:
        known = {v.name for v in variants}
        unknown = sorted(set(args.variants) - known)
        if unknown:
            parser.error(f"unknown variants {unknown}; known: {sorted(known)}")
        variants = [v for v in variants if v.name in {"base", *args.variants}]
    results = {"torch": torch.__version__, "shape": list(SHAPE), "models": {}}
    try:
        import transformers

        results["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    for model_name in args.models:
        results["models"][model_name] = measure(model_name, variants)
        print(format_table(model_name, results["models"][model_name]) + "\n", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
