"""Where a train step's time goes: torch.profiler over a few steps of one variant, top operators by self CPU time.

python bench/profile_step.py --variant lora-softmax [--model reference] [--quick]
python bench/profile_step.py --variant lora-softmax --compare peft-r64 --steady-alloc   # per-operator differences
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_speed import SHAPES, call_batch, load_base, make_batch, steady_allocator
from bench.variants import build, default_variants, make_step


def profile_variant(name: str, args: argparse.Namespace, device: torch.device):
    variant = next(v for v in default_variants() if v.name == name)
    base = load_base(args.model).to(device)
    model = build(variant, base).to(device)
    train, forward = make_step(model, variant)
    step = forward if args.forward or not variant.trains else train
    batch = call_batch(variant, make_batch(base, *SHAPES[args.model][1 if args.quick else 0]), device)
    step(batch)
    step(batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step(batch)
    return prof


def compare_table(a: str, b: str, profiles: dict, steps: int, rows: int) -> str:
    """Self CPU ms per step of each operator in both variants, largest differences first."""
    per_step = {
        name: {e.key: (e.self_cpu_time_total / steps / 1000, e.count // steps) for e in prof.key_averages()}
        for name, prof in profiles.items()
    }
    keys = sorted(
        set(per_step[a]) | set(per_step[b]),
        key=lambda k: -abs(per_step[a].get(k, (0, 0))[0] - per_step[b].get(k, (0, 0))[0]),
    )
    lines = [f"{'operator':<52}{a + ' ms':>16}{'calls':>7}{b + ' ms':>16}{'calls':>7}"]
    lines.append(
        f"{'total':<52}{sum(v[0] for v in per_step[a].values()):>16.1f}{'':>7}"
        f"{sum(v[0] for v in per_step[b].values()):>16.1f}"
    )
    for key in keys[:rows]:
        (ta, ca), (tb, cb) = per_step[a].get(key, (0.0, 0)), per_step[b].get(key, (0.0, 0))
        lines.append(f"{key[:51]:<52}{ta:>16.1f}{ca:>7}{tb:>16.1f}{cb:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    names = [v.name for v in default_variants()]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="lora-softmax", choices=names)
    parser.add_argument("--compare", choices=names, help="a second variant: print per-operator differences")
    parser.add_argument("--model", default="reference", choices=list(SHAPES))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--forward", action="store_true", help="profile the forward-only call instead")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--sort", help="key_averages column (default: self CUDA time on CUDA, self CPU time on CPU)")
    parser.add_argument("--steady-alloc", action="store_true", help="glibc: keep freed memory (no page faults)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.steady_alloc and (device.type != "cpu" or not steady_allocator()):
        parser.error("--steady-alloc needs the CPU device and glibc (mallopt)")
    if args.compare:
        profiles = {name: profile_variant(name, args, device) for name in (args.variant, args.compare)}
        print(compare_table(args.variant, args.compare, profiles, args.steps, args.rows))
        return 0
    prof = profile_variant(args.variant, args, device)
    sort = args.sort or ("self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total")
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
