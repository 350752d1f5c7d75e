"""The kernel-level choices inside molora's layers, each timed against the plain alternative in one process.

    python bench/micro.py [--rounds 50]

- softmax over the expert dim on CPU: the transposed view (reduce a non-last dim) vs softmax(dim=-1);
- the gate on the [N, E*r] intermediate: a [B, L, E, 1] broadcast multiply vs gates @ spread then a plain multiply
  (what GatedMix did before: they tie in time, the broadcast dispatches fewer ops);
- the z-loss's logsumexp with the max shift held constant vs torch.logsumexp.

Each pair runs forward + backward on the same inputs, alternating, and the table gives medians and the ratio of
the medians. The figures and the command that produced them are kept in docs/micro_cpu.txt.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from molora.core.losses import _logsumexp
from molora.core.routers import softmax

NUM_EXPERTS, RANK = 8, 8


def softmax_pair(batch: int, length: int):
    logits = torch.randn(batch, length, NUM_EXPERTS, requires_grad=True)
    return (
        ("softmax on the transposed view (molora)", lambda: softmax(logits).square().sum().backward()),
        ("softmax(dim=-1)", lambda: logits.softmax(-1).square().sum().backward()),
    )


def gate_pair(batch: int, length: int):
    hidden = torch.randn(batch * length, NUM_EXPERTS * RANK, requires_grad=True)
    gates = torch.randn(batch, length, NUM_EXPERTS).softmax(-1).requires_grad_(True)
    spread = torch.eye(NUM_EXPERTS).repeat_interleave(RANK, dim=1)

    def spread_matmul():
        (hidden.view(batch, length, -1) * (gates @ spread)).square().sum().backward()

    def broadcast():
        (hidden.view(batch, length, NUM_EXPERTS, RANK) * gates.unsqueeze(-1)).square().sum().backward()

    return (("[B, L, E, 1] broadcast multiply (molora)", broadcast), ("gates @ spread, then multiply", spread_matmul))


def logsumexp_pair(layers: int, tokens: int):
    logits = torch.randn(layers, tokens, NUM_EXPERTS, requires_grad=True)
    return (
        ("logsumexp, shift held constant (molora)", lambda: _logsumexp(logits).square().sum().backward()),
        ("torch.logsumexp", lambda: torch.logsumexp(logits, -1).square().sum().backward()),
    )


CASES = [
    ("router softmax [8, 512, 8]", softmax_pair, (8, 512)),
    ("gating [8 x 512, 64] by [8, 512, 8]", gate_pair, (8, 512)),
    ("z-loss logsumexp [28, 4096, 8]", logsumexp_pair, (28, 4096)),
]


def call_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fwd+bwd, median of {args.rounds}")
    print("| case | molora ms | alternative ms | alternative / molora |\n|---|---|---|---|")
    for title, make, shape in CASES:
        (_, ours), (_, other) = make(*shape)
        for _ in range(5):  # warm-up
            ours(), other()
        pairs = [(call_ms(ours), call_ms(other)) for _ in range(args.rounds)]  # alternating: a slow moment hits both
        ours_ms, other_ms = (statistics.median(times) for times in zip(*pairs, strict=True))
        print(f"| {title} | {ours_ms:.3f} | {other_ms:.3f} | {other_ms / ours_ms:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
