"""Train step under torch.compile for a few variants, one after another in one process (GPU).

    python bench/compile_probe.py --mode reduce-overhead peft-r64 lora-softmax base

mode "reduce-overhead" replays the compiled step as CUDA graphs, which removes the per-op launch cost that makes
eager steps of small models host-bound on a GPU. The aux loss is added outside the compiled graph, as in
bench_speed.py. Prints compile + warm-up seconds and the median step time of each variant.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_speed import SHAPES, call_batch, load_base, make_batch, synchronize
from bench.variants import build, default_variants, make_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", choices=[v.name for v in default_variants()])
    parser.add_argument("--mode", default="reduce-overhead", help="torch.compile mode (default, reduce-overhead, ...)")
    parser.add_argument("--model", default="reference", choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    known = {v.name: v for v in default_variants()}
    base = load_base(args.model).to(device)
    batch = make_batch(base, *SHAPES[args.model][0])
    for name in args.variants:
        variant = known[name]
        model = build(variant, base).to(device)
        train, _ = make_step(torch.compile(model, mode=args.mode), variant)
        call = call_batch(variant, batch, device)
        started = time.perf_counter()
        for _ in range(4):
            train(call)
        synchronize(device)
        warm = time.perf_counter() - started
        times = []
        for _ in range(args.steps):
            synchronize(device)
            started = time.perf_counter()
            train(call)
            synchronize(device)
            times.append((time.perf_counter() - started) * 1000)
        print(f"{name:16s} compile+warm-up {warm:6.1f} s   train {statistics.median(times):8.2f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
