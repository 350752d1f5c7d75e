"""The op-count benchmark counts what it says, and the counts it pins guard against regressions (upper bounds; a
test shows the guard fails on a variant known to dispatch more)."""

from __future__ import annotations

import pytest
import torch

from bench import bench_speed, op_count
from bench.variants import default_variants

from .test_bench import TINY

# Kernel operators per adapted module over PEFT LoRA r=64 in one train step on the TINY config (2 layers x 7
# modules). Upper bounds at today's counts: lower them as ops are removed, never raise them to let one back in.
EXTRA_TRAIN_KERNELS_PER_MODULE = {
    "lora-softmax": 12.0,
    "lora-topk": 24.3,
    "lora-switch": 18.2,
    "lora-intuition": 33.0,
    "lora-task": 15.6,
    "rank1-softmax": 12.0,
    "lora-softmax-input": 8.2,
    "lora-topk-input": 15.3,
}


@pytest.fixture(scope="module")
def tiny_counts():
    original = bench_speed.REFERENCE
    bench_speed.REFERENCE = TINY
    try:
        return op_count.measure("reference", default_variants())
    finally:
        bench_speed.REFERENCE = original


def extra_per_module(counts: dict, name: str, key: str = "train_kernels") -> float:
    variants = counts["variants"]
    return (variants[name][key] - variants[op_count.PEER][key]) / counts["adapted_modules"]


def test_counter_separates_kernels_from_views_by_hand():
    x, w = torch.randn(3, 4, requires_grad=True), torch.randn(5, 4)
    with op_count.OpCounter() as counter:
        y = x @ w.t()  # t (view), mm
        y.sum().backward()  # sum; backward: ones_like/expand, t, mm
    assert counter.kernels["mm"] == 2 and counter.views["t"] >= 2
    assert "t" not in counter.kernels and "mm" not in counter.views


def test_counts_do_not_depend_on_the_batch_shape():
    original = bench_speed.REFERENCE
    bench_speed.REFERENCE = TINY
    try:
        base = bench_speed.load_base("reference")
    finally:
        bench_speed.REFERENCE = original
    variant = next(v for v in default_variants() if v.name == "lora-topk")
    model = op_count.build(variant, base)
    counts = [
        op_count.count_ops(model, variant, bench_speed.make_batch(base, batch, seq))[0]
        for batch, seq in [(2, 8), (3, 16)]
    ]
    assert counts[0] == counts[1]


def test_every_adapted_module_is_counted(tiny_counts):
    assert tiny_counts["adapted_modules"] == TINY["num_hidden_layers"] * len(op_count.TARGETS)
    peft = tiny_counts["variants"][op_count.PEER]
    assert peft["train_kernels"] > tiny_counts["variants"]["base"]["train_kernels"]
    assert (
        "lora-task-merged" in tiny_counts["variants"]
        and "train_kernels" not in tiny_counts["variants"]["lora-task-merged"]
    )


@pytest.mark.parametrize("name", sorted(EXTRA_TRAIN_KERNELS_PER_MODULE))
def test_kernel_ops_per_module_stay_under_their_bound(tiny_counts, name):
    assert extra_per_module(tiny_counts, name) <= EXTRA_TRAIN_KERNELS_PER_MODULE[name]


def test_the_bound_fails_on_a_variant_that_dispatches_more(tiny_counts):
    # the blog-style loop (one A/B pair per expert) runs the same mixture as lora-softmax with a Python loop
    assert extra_per_module(tiny_counts, "loop-blog") > EXTRA_TRAIN_KERNELS_PER_MODULE["lora-softmax"]


@pytest.mark.parametrize("router", ["softmax", "topk"])
def test_routing_per_input_dispatches_fewer_ops_than_per_module(tiny_counts, router):
    assert extra_per_module(tiny_counts, f"lora-{router}-input") < extra_per_module(tiny_counts, f"lora-{router}")


def test_lora_experts_dispatch_what_rank1_experts_do(tiny_counts):
    """LoRA B stored as the rows the mixing matmul reads ([E, r, d_out]): no copy into that layout and back, the
    three kernels per module and step that [E, d_out, r] cost (adapter format 3)."""
    assert extra_per_module(tiny_counts, "lora-softmax") == extra_per_module(tiny_counts, "rank1-softmax")
