"""What molora's fix for bitsandbytes' packed CPU 4-bit kernel costs (docs/quantized-bases.md): one frozen NF4
`Linear4bit` (double quantization) timed with its weight packed for the AVX512-BF16 inference kernel, the way
bitsandbytes computes after an eval forward, and unpacked, the way molora keeps a model it trains. Paired: both
layouts of the same weight, alternated in each round; the median over rounds of unpacked time / packed time.

    python bench/bnb_cpu_packing.py --out docs/bench_bnb_cpu_packing.md

Needs a CPU with AVX512-BF16 (bitsandbytes packs nothing elsewhere, and then there is nothing to pay).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from molora.utils import atomic_write_text

SHAPES = {"SmolLM2-135M gate_proj": (576, 1536), "Qwen2.5-0.5B gate_proj": (896, 4864)}
INPUTS = {"decode step, batch 1": (1, 1), "forward, 8 x 96 tokens": (8, 96)}


def layer(d_in: int, d_out: int, dtype: torch.dtype):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    weight = torch.randn(d_out, d_in) * 0.02
    quantized = bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=dtype, quant_type="nf4")
    quantized.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
    return quantized.to("cpu").eval()


def seconds(module, x: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        module(x)
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="at least 2")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (quartiles)")
    rows = []
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for shape_name, (d_in, d_out) in SHAPES.items():
            for dtype in (torch.float32, torch.bfloat16):
                packed, unpacked = layer(d_in, d_out, dtype), layer(d_in, d_out, dtype)
                unpacked.support_avx512bf16_for_cpu = False  # what molora.core.base_layers sets
                for input_name, (batch, tokens) in INPUTS.items():
                    x = torch.randn(batch, tokens, d_in, dtype=dtype)
                    calls = 200 if tokens == 1 else 10
                    packed(x), unpacked(x)  # warm up; the first eval forward packs `packed`
                    if not getattr(packed.weight.quant_state, "packing_format_for_cpu", False):
                        raise SystemExit("bitsandbytes did not pack the weight: this CPU has no AVX512-BF16 kernel")
                    ratios = [seconds(unpacked, x, calls) / seconds(packed, x, calls) for _ in range(args.rounds)]
                    quartiles = statistics.quantiles(ratios, n=4)
                    rows.append((shape_name, str(dtype).removeprefix("torch."), input_name, quartiles))
    lines = [
        "# bitsandbytes NF4 on CPU: unpacked (molora, while training is possible) / packed (bitsandbytes' eval kernel)",
        "",
        f"Command: `python bench/bnb_cpu_packing.py --rounds {args.rounds}`; torch {torch.__version__}, "
        f"bitsandbytes {sys.modules['bitsandbytes'].__version__}, {torch.get_num_threads()} threads. Time ratio, "
        "median over rounds [quartiles]; above 1 the unpacked layer is slower.",
        "",
        "| layer | compute dtype | input | unpacked / packed time |",
        "|---|---|---|---|",
    ]
    lines += [f"| {s} | {d} | {i} | {q[1]:.2f} [{q[0]:.2f}, {q[2]:.2f}] |" for s, d, i, q in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
