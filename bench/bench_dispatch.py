"""Top-k dispatch: dense-masked (every expert computed, gates zero outside the top k) against grouped (tokens
sorted by expert, one small matmul per expert on its tokens only), one MoLoRA layer, forward + backward.

    python bench/bench_dispatch.py [--quick]

Dense does E/k times the expert FLOPs of grouped but in two large matmuls; grouped pays a gather, a scatter-add,
a host sync for the per-expert counts and E small matmuls. The crossover decides molora's dispatch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from molora.core.experts import LoRAExperts
from molora.core.routers import select_experts
from molora.utils import atomic_write_text


def grouped_mix(experts: LoRAExperts, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return experts.mix_grouped(x, weights, indices)


def dense_mix(experts: LoRAExperts, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return experts(x, weights)


def measure(fn, experts, x0, logits, top_k, rounds) -> float:
    times = []
    for _ in range(rounds + 2):
        x = x0.clone().requires_grad_(True)
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        probs = logits.softmax(-1)
        weights, indices = select_experts(probs, top_k)
        out = fn(experts, x, weights, indices)
        out.backward(torch.ones_like(out))
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[2:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--d-out", type=int, default=688)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_dispatch.json"))
    args = parser.parse_args(argv)
    rounds = 5 if args.quick else 15
    torch.manual_seed(0)
    device = torch.device(args.device)
    x0 = torch.randn(args.tokens, args.d_in, device=device)
    rows = []
    print(f"{'E':>5}{'dense ms':>10}{'grouped ms':>12}{'grouped/dense':>15}")
    for num_experts in args.experts:
        experts = LoRAExperts(args.d_in, args.d_out, num_experts, args.rank, init_zero=False, device=device)
        logits = torch.randn(args.tokens, num_experts, device=device)
        dense = measure(dense_mix, experts, x0, logits, args.top_k, rounds)
        grouped = measure(grouped_mix, experts, x0, logits, args.top_k, rounds)
        rows.append(dict(experts=num_experts, dense_ms=dense, grouped_ms=grouped, ratio=grouped / dense))
        print(f"{num_experts:>5}{dense:>10.2f}{grouped:>12.2f}{grouped / dense:>15.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        args.out, json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
