"""The least a learned per-token router can cost next to PEFT LoRA at the same parameter budget, on this machine.

    python bench/router_floor.py                       # reference config, batch 8 x 512, ~30 s on 2 CPU cores
    python bench/router_floor.py --model smollm2-135m  # at bench_speed.py's shape for it, 4 x 128

A router reading the layer input adds E columns to the input-side matmul of every adapted layer: in the forward,
in the input gradient (where the input needs one) and in its weight gradient. The only work PEFT LoRA does that a
mixture need not repeat is its scaling multiply and out-of-place add on the [N, d_out] output (molora folds the
scaling into the gates and accumulates with addmm), plus the multiply's backward. So, whatever the implementation,

    mixture step >= PEFT step + router matmuls + least gating work - PEFT's scaling and add

The least gating work is the kernels the mixture's maths cannot do without, each timed alone with no autograd or
Python around it: the softmax over E and its backward, the gate multiply on the [N, E*r] intermediate, and in
backward the two multiplies for the gradients of the intermediate and of the gates. For the intuition router add
its pooled MLP (cumsum, divide, bias, GELU, LayerNorm, the hidden -> E linear; forward and backward). Aux losses,
autograd and Python overhead count as free. Every term is measured for every adapted layer of the model with the
shapes of a real step (matmuls as molora issues them: the router's rows ride in the experts' matmul, so the
router's cost is the fused E*r + k matmul minus the E*r one), next to the PEFT train step itself, in one process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_speed import SHAPES, call_batch, load_base, make_batch, steady_allocator, timed
from bench.variants import NUM_EXPERTS, RANK, TARGETS, Variant, build, make_step

# (d_in, d_out, whether the input needs a gradient) -> how many adapted layers of one step have it
LayerShapes = Counter


def adapted_layer_shapes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[LayerShapes, int]:
    """The shape of every targeted nn.Linear in one forward of `model` (a PEFT model), and the tokens per call.

    Layers whose input needs no gradient (the first layer's attention projections, when the embeddings are frozen)
    compute no input gradient, in PEFT as in molora."""
    shapes: LayerShapes = Counter()
    tokens: list[int] = []
    hooks = []

    def record(module: torch.nn.Module, args: tuple) -> None:
        x = args[0]
        shapes[(module.in_features, module.out_features, x.requires_grad)] += 1
        tokens.append(x.numel() // x.shape[-1])

    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS and hasattr(module, "base_layer"):
            hooks.append(module.register_forward_pre_hook(record))
    try:
        with torch.enable_grad():
            model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    if not shapes:
        raise ValueError(f"no adapted layer named one of {TARGETS} ran in the forward")
    if len(set(tokens)) != 1:
        raise ValueError(f"adapted layers saw different token counts: {sorted(set(tokens))}")
    return shapes, tokens[0]


def once_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def median_ms(fn: Callable[[], object], rounds: int) -> float:
    for _ in range(3):
        fn()
    return statistics.median(once_ms(fn) for _ in range(rounds))


def input_side_matmuls(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, input_grad: bool) -> None:
    """The input-side matmuls of one training step: forward, input gradient, weight gradient."""
    F.linear(x, weight)
    if input_grad:
        grad @ weight
    grad.T @ x


def router_ms(d_in: int, input_grad: bool, tokens: int, rank_total: int, router_rows: int, rounds: int) -> float:
    """What the router's rows add to the experts' E*r-row input-side matmuls (fused, as molora computes them)."""
    x = torch.randn(tokens, d_in)
    with_router = (torch.randn(rank_total + router_rows, d_in), torch.randn(tokens, rank_total + router_rows))
    without = (torch.randn(rank_total, d_in), torch.randn(tokens, rank_total))

    def fused() -> None:
        input_side_matmuls(x, *with_router, input_grad)

    def plain() -> None:
        input_side_matmuls(x, *without, input_grad)

    for _ in range(3):
        fused(), plain()
    # interleaved, so that a slow moment of the machine hits both
    times = [(once_ms(fused), once_ms(plain)) for _ in range(3 * rounds)]
    return statistics.median(t for t, _ in times) - statistics.median(t for _, t in times)


def gating_ms(tokens: int, experts: int, rank_total: int, rounds: int) -> float:
    """The least per-token gating: softmax over E forward and backward (the kernels alone, on the layout where CPU
    reduces a handful of experts fastest), the gate multiply, and the two multiplies of its backward."""
    logits, grad_probs = torch.randn(experts, tokens), torch.randn(experts, tokens)
    hidden, row_gates, grad_gated = (torch.randn(tokens, rank_total) for _ in range(3))

    def ops() -> None:
        probs = torch.softmax(logits, dim=0)
        torch.ops.aten._softmax_backward_data(grad_probs, probs, 0, torch.float32)
        hidden * row_gates
        grad_gated * row_gates
        grad_gated * hidden

    return median_ms(ops, rounds)


def intuition_tail_ms(tokens: int, seq: int, experts: int, width: int, rounds: int) -> float:
    """The intuition router's pooled MLP on the projected [B, L, width], forward and backward, kernel by kernel."""
    projected, grad = torch.randn(tokens // seq, seq, width), torch.randn(tokens // seq, seq, width)
    count = torch.arange(1, seq + 1, dtype=torch.float32).view(1, seq, 1)
    bias, norm_weight, last = torch.randn(width), torch.ones(width), torch.randn(experts, width)
    grad_logits = torch.randn(tokens, experts)
    mean, rstd = torch.zeros(tokens // seq, seq, 1), torch.ones(tokens // seq, seq, 1)
    output_mask = [True, True, True]  # gradients of the input, weight and bias

    def ops() -> None:
        pooled = projected.cumsum(dim=1) / count + bias
        normed = F.layer_norm(F.gelu(pooled), (width,), norm_weight, bias)
        F.linear(normed, last)
        grad_normed = grad_logits @ last
        grad_logits.T @ normed.view(tokens, width)
        torch.ops.aten.native_layer_norm_backward(grad, pooled, [width], mean, rstd, norm_weight, bias, output_mask)
        torch.ops.aten.gelu_backward(grad_normed.view_as(grad), pooled)
        (grad / count).cumsum(dim=1)  # the reverse running sum: at least one cumsum pass

    return median_ms(ops, rounds)


def peft_scaling_ms(d_out: int, tokens: int, rounds: int) -> float:
    """PEFT's `result + lora_B(lora_A(x)) * scaling`: the multiply, the out-of-place add, the multiply's backward."""
    result, lora_out, grad = (torch.randn(tokens, d_out) for _ in range(3))

    def ops() -> None:
        result + lora_out * 2.0
        grad * 2.0

    return median_ms(ops, rounds)


def peft_step_ms(model_name: str, shape: tuple[int, int], rank: int, rounds: int) -> tuple[float, LayerShapes, int]:
    base = load_base(model_name)
    batch = make_batch(base, *shape)
    variant = Variant(f"peft-r{rank}", "peft", rank=rank)
    model = build(variant, base)
    cpu = torch.device("cpu")
    call = call_batch(variant, batch, cpu)
    shapes, tokens = adapted_layer_shapes(model, call)
    train, _ = make_step(model, variant)
    for _ in range(2):
        timed(train, call, cpu)
    step = statistics.median(timed(train, call, cpu) for _ in range(rounds))
    return step, shapes, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="reference", choices=list(SHAPES))
    parser.add_argument("--batch", type=int, help="default: bench_speed.py's batch for the model")
    parser.add_argument("--seq", type=int, help="default: bench_speed.py's sequence length for the model")
    parser.add_argument("--rounds", type=int, default=15, help="rounds of each micro-measurement (median)")
    parser.add_argument("--steady-alloc", action="store_true", help="keep freed memory in the process (glibc)")
    args = parser.parse_args()
    if args.steady_alloc:
        steady_allocator()
    torch.manual_seed(0)
    rank_total = NUM_EXPERTS * RANK
    default_batch, default_seq = SHAPES[args.model][0]
    shape = (args.batch or default_batch, args.seq or default_seq)
    step, shapes, tokens = peft_step_ms(args.model, shape, rank_total, args.rounds)
    print(
        f"# {args.model}, {tokens} tokens per layer call, E={NUM_EXPERTS} experts of rank {RANK}, PEFT r={rank_total}"
    )
    width = max(16, 2 * NUM_EXPERTS)  # the intuition router's default hidden width
    print(
        f"{'d_in -> d_out':>14} {'input grad':>10} {'layers':>6} {'router mm':>10} {'intuition mm':>12} "
        f"{'PEFT scale+add':>14}   (ms per layer)"
    )
    totals = dict.fromkeys(("router", "intuition", "scaling"), 0.0)
    for (d_in, d_out, input_grad), count in sorted(shapes.items()):
        row = {
            "router": router_ms(d_in, input_grad, tokens, rank_total, NUM_EXPERTS, args.rounds),
            "intuition": router_ms(d_in, input_grad, tokens, rank_total, width, args.rounds),
            "scaling": peft_scaling_ms(d_out, tokens, args.rounds),
        }
        for key, value in row.items():
            totals[key] += count * value
        print(
            f"{f'{d_in} -> {d_out}':>14} {input_grad!s:>10} {count:>6} {row['router']:>10.3f} "
            f"{row['intuition']:>12.3f} {row['scaling']:>14.3f}"
        )
    layers = sum(shapes.values())
    gating = layers * gating_ms(tokens, NUM_EXPERTS, rank_total, args.rounds)
    tail = layers * intuition_tail_ms(tokens, shape[1], NUM_EXPERTS, width, args.rounds)
    print(
        f"per train step ({layers} layers): router matmuls {totals['router']:.1f} ms (intuition's {width} rows: "
        f"{totals['intuition']:.1f}), least gating {gating:.1f}, intuition MLP {tail:.1f}, PEFT's scaling and add "
        f"{totals['scaling']:.1f}; PEFT r={rank_total} train step {step:.0f} ms"
    )
    softmax_floor = (step + totals["router"] + gating - totals["scaling"]) / step
    intuition_floor = (step + totals["intuition"] + gating + tail - totals["scaling"]) / step
    print(f"floor, per-token linear router (softmax, top-k, switch): {softmax_floor:.3f}x PEFT")
    print(f"floor, intuition router: {intuition_floor:.3f}x PEFT")


if __name__ == "__main__":
    main()
