"""Where a train step's time goes: torch.profiler over a few steps of one variant, top operators by self CPU time.

python bench/profile_step.py --variant lora-softmax [--model reference] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_speed import SHAPES, call_batch, load_base, make_batch
from bench.variants import build, default_variants, make_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="lora-softmax", choices=[v.name for v in default_variants()])
    parser.add_argument("--model", default="reference", choices=list(SHAPES))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--forward", action="store_true", help="profile the forward-only call instead")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--sort", help="key_averages column (default: self CUDA time on CUDA, self CPU time on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    variant = next(v for v in default_variants() if v.name == args.variant)
    base = load_base(args.model).to(device)
    model = build(variant, base).to(device)
    train, forward = make_step(model, variant)
    step = forward if args.forward or not variant.trains else train
    batch = call_batch(variant, make_batch(base, *SHAPES[args.model][1 if args.quick else 0]), device)
    step(batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step(batch)
    sort = args.sort or ("self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total")
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
