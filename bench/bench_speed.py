"""Speed and memory of molora next to PEFT LoRA and the frozen base, measured side by side in one process.

    python bench/bench_speed.py            # reference Llama config + SmolLM2-135M, about 20 min on 2 CPU cores
    python bench/bench_speed.py --quick    # reference config at batch 4 x 256, the variants the targets name: ~2 min

Every variant is built once, warmed up, then the variants take turns (the order rotates every round), so a slow
moment of the machine hits all of them alike; the table shows medians and ratios to the frozen base and to PEFT
LoRA at the same number of trainable parameters (r = E * r). Peak memory is measured in a fresh process per
variant: the peak of what torch allocates during a train step once the optimizer's state exists, over what was
allocated before the step (on CUDA the allocator's statistics; on CPU the profiler's allocation events, which give
the same number every run); on CPU also the peak resident memory the first 3 steps add to the loaded model (VmHWM
minus the resident size before them: what the OS sees, which depends on how glibc reuses and returns pages and
varies by +-10% from run to run). On CPU the table also
shows the minor page faults of a train step (fresh memory the allocator took from the kernel): they are part of the
cost and the main source of run-to-run noise here (glibc hands large freed blocks back and faults them in again).
--steady-alloc keeps freed memory in the process (glibc only) so that no variant pays page faults: the timings then
compare the computations alone (the memory measurements keep the default allocator). --compile runs every
variant through torch.compile (the warm-up rounds compile); molora layers trace into one graph with the model.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.variants import NUM_TASKS, Variant, build, default_variants, make_step
from molora.utils import atomic_write_text

# The reference config: random-init Llama, hidden 256 x 4 layers, batch 8 x 512.
REFERENCE = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=688,
    vocab_size=1024,
    max_position_embeddings=512,
)
# SmolLM2-135M's architecture with random weights: a model size where a GPU computes more than it launches (timing
# needs no trained weights, so this one needs no model files either).
SMOLLM2_SHAPE = dict(
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    vocab_size=49152,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
SHAPES = {  # model -> (batch, seq) full, (batch, seq) quick
    "reference": ((8, 512), (4, 256)),
    "smollm2-135m": ((4, 128), (2, 64)),
    "smollm2-shape": ((8, 512), (2, 128)),
}
QUICK_VARIANTS = [
    "base", "peft-r8", "peft-r64", "lora-softmax", "lora-topk", "lora-intuition", "lora-task", "rank1-softmax",
    "loop-blog", "loop-accumulate", "lora-task-merged", "lora-softmax-input", "lora-topk-input",
]  # fmt: skip
QUICK_MEMORY = ["base", "peft-r64", "lora-softmax"]
# (variant, peer, metric, limit): variant's metric <= limit * peer's; "loop" is the other way round (a speed-up).
TARGETS = [
    ("lora-softmax", "peft-r64", "train_ms", 1.00),
    ("lora-softmax", "peft-r64", "memory_mb", 1.05),
    ("lora-topk", "peft-r64", "train_ms", 1.00),
    ("rank1-softmax", "peft-r8", "train_ms", 1.05),
    ("lora-intuition", "peft-r64", "train_ms", 1.05),
    ("lora-task", "peft-r64", "train_ms", 1.05),
    ("lora-task-merged", "base", "forward_ms", 1.02),
    ("loop-blog", "lora-softmax", "train_ms", -4.0),  # negative: the loop must be >= 4x slower than molora
    ("lora-softmax-input", "peft-r64", "train_ms", 0.97),  # one router and one input matmul per q/k/v and gate/up
    ("lora-topk-input", "peft-r64", "train_ms", 0.97),
]


def random_init_config(model_name: str) -> dict | None:
    """The LlamaConfig fields of a model built with random weights; None for a model loaded from files."""
    return {"reference": REFERENCE, "smollm2-shape": SMOLLM2_SHAPE}.get(model_name)  # read late: tests swap REFERENCE


def load_base(model_name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = random_init_config(model_name)
    if config is not None:
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**config))
    from molora.run.base_models import load_base as load_named

    return load_named(model_name)[0]


def make_batch(model: torch.nn.Module, batch: int, seq: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def call_batch(variant: Variant, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    out = {k: v.to(device) for k, v in batch.items()}
    if variant.needs_task_ids:
        out["task_ids"] = torch.arange(batch["input_ids"].shape[0]) % NUM_TASKS
    return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, batch, device) -> float:
    """Milliseconds of one call; a step's mode switch (model.train()/eval()) happens before the clock starts."""
    if hasattr(fn, "prepare"):
        fn.prepare()
        fn = fn.timed
    synchronize(device)
    start = time.perf_counter()
    fn(batch)
    synchronize(device)
    return (time.perf_counter() - start) * 1000


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where getrusage is missing)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def steady_allocator() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the kernel (no mmap for large blocks, no
    trimming), as MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=... would; False where that is not available."""
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def measure_speed(model_name, variants, shape, steps, warmup, device, compiled=False) -> dict[str, dict]:
    base = load_base(model_name).to(device)
    batch = make_batch(base, *shape)
    built, params = {}, {}
    for variant in variants:
        model = build(variant, base).to(device)
        train, forward = make_step(torch.compile(model) if compiled else model, variant)
        built[variant.name] = (variant, train, forward, call_batch(variant, batch, device))
        params[variant.name] = trainable_parameters(model) if variant.kind != "base" else 0
    names = list(built)
    times = {name: {"train_ms": [], "forward_ms": []} for name in names}
    faults = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        for round_ in range(warmup + steps):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                variant, train, forward, call = built[name]
                if variant.trains:
                    before = minor_faults()
                    t = timed(train, call, device)
                    if round_ >= warmup:
                        times[name]["train_ms"].append(t)
                        faults[name].append(minor_faults() - before)
                t = timed(forward, call, device)
                if round_ >= warmup:
                    times[name]["forward_ms"].append(t)
            gc.collect()
            print(f"  round {round_ + 1}/{warmup + steps}", file=sys.stderr, flush=True)
    finally:
        gc.enable()
    out = {}
    for name in names:
        result = {"params": params[name]}
        for metric, values in times[name].items():
            result[metric] = statistics.median(values) if values else None
            result[f"{metric}_all"] = [round(v, 2) for v in values]
        if device.type == "cpu" and faults[name]:
            result["train_faults"] = statistics.median(faults[name])
        out[name] = result
    return out


def _proc_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def allocated_peak_mib(step, call) -> float:
    """Peak of the bytes torch allocates over `step(call)`, from the profiler's allocation events: the CPU analogue
    of CUDA's max_memory_allocated (less the memory allocated before), independent of how the C allocator maps and
    returns pages, so the same computation gives the same number every run."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(call)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    if not events:
        raise RuntimeError("the profiler recorded no allocations: cannot measure allocated memory on this build")
    live = peak = 0
    for _, nbytes in events:  # frees of blocks allocated before the profiler started are not reported
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def memory_child(
    model_name: str, variant_name: str, shape: tuple[int, int], device: torch.device, compiled: bool = False
) -> dict:
    """Peak memory of a train step of one variant, in this (fresh) process: what torch allocates in a step once the
    optimizer's state exists, over what was allocated before it; on CPU also the resident memory the first 3 steps
    add to the loaded model."""
    variant = next(v for v in default_variants() if v.name == variant_name)
    base = load_base(model_name).to(device)
    model = build(variant, base).to(device)
    train, forward = make_step(torch.compile(model) if compiled else model, variant)
    call = call_batch(variant, make_batch(base, *shape), device)
    step = train if variant.trains else forward
    if compiled:
        step(call)  # compile outside the measurement
    gc.collect()
    if device.type == "cuda":
        step(call)
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        for _ in range(2):
            step(call)
        synchronize(device)
        return {"memory_mb": (torch.cuda.max_memory_allocated(device) - before) / 2**20, "loaded_mb": before / 2**20}
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident size (VmHWM) to the current size
    loaded = _proc_kib("VmRSS")
    for _ in range(3):
        step(call)
    rss = (_proc_kib("VmHWM") - loaded) / 1024
    allocated = allocated_peak_mib(lambda batch: [step(batch) for _ in range(2)], call)
    return {"memory_mb": allocated, "rss_mb": rss, "loaded_mb": loaded / 1024}


def measure_memory(model_name, variants, shape, device, compiled=False) -> dict[str, dict]:
    out = {}
    for variant in variants:
        command = [sys.executable, __file__, "--memory-child", variant.name, "--models", model_name]
        command += ["--shape", str(shape[0]), str(shape[1]), "--device", str(device)]
        command += ["--compile"] if compiled else []
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory measurement of {variant.name} failed:\n{proc.stderr[-2000:]}")
        out[variant.name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  memory {variant.name}: {out[variant.name]['memory_mb']:.0f} MB", file=sys.stderr, flush=True)
    return out


def ratio(results: dict[str, dict], name: str, peer: str, metric: str) -> float | None:
    """name's metric over peer's: the median of the per-round ratios for timings (both ran in the same round, so
    a slow moment of the machine cancels out), the plain ratio for memory."""
    if name not in results or peer not in results:
        return None
    mine, theirs = results[name].get(f"{metric}_all"), results[peer].get(f"{metric}_all")
    if mine and theirs:
        return statistics.median(a / b for a, b in zip(mine, theirs, strict=True))
    value, reference = results[name].get(metric), results[peer].get(metric)
    return value / reference if value is not None and reference else None


def ratio_quartiles(results: dict[str, dict], name: str, peer: str, metric: str) -> tuple[float, float] | None:
    """The 25% and 75% points of the per-round ratios: how far one run's median could move."""
    mine, theirs = results.get(name, {}).get(f"{metric}_all"), results.get(peer, {}).get(f"{metric}_all")
    if not mine or not theirs or len(mine) < 4:
        return None
    q1, _, q3 = statistics.quantiles([a / b for a, b in zip(mine, theirs, strict=True)], n=4)
    return q1, q3


def check_targets(results: dict[str, dict]) -> list[dict]:
    checks = []
    for name, peer, metric, limit in TARGETS:
        value = ratio(results, name, peer, metric)
        if value is None:
            continue
        ok = value >= -limit if limit < 0 else value <= limit
        bound = f">= {-limit:.2f}x" if limit < 0 else f"<= {limit:.2f}x"
        check = dict(variant=name, peer=peer, metric=metric, ratio=round(value, 3), target=bound, met=ok)
        quartiles = ratio_quartiles(results, name, peer, metric)
        if quartiles:
            check["quartiles"] = [round(q, 3) for q in quartiles]
        checks.append(check)
    return checks


def format_table(results: dict[str, dict], peer: str) -> str:
    header = f"{'variant':<18}{'params':>11}{'train ms':>10}{'x base':>8}{'x ' + peer:>11}"
    header += f"{'fwd ms':>9}{'x base':>8}{'mem MB':>9}{'x ' + peer:>11}{'rss MB':>9}{'faults':>9}"
    lines = [header, "-" * len(header)]

    def show(name: str, other: str, metric: str) -> str:
        value = ratio(results, name, other, metric)
        return "-" if value is None else f"{value:.2f}"

    for name, r in results.items():
        train, fwd, mem = r.get("train_ms"), r.get("forward_ms"), r.get("memory_mb")
        line = f"{name:<18}{r.get('params', 0):>11,}"
        line += f"{train:>10.0f}" if train else f"{'-':>10}"
        line += f"{show(name, 'base', 'train_ms'):>8}{show(name, peer, 'train_ms'):>11}"
        line += f"{fwd:>9.0f}" if fwd else f"{'-':>9}"
        line += f"{show(name, 'base', 'forward_ms'):>8}"
        line += f"{mem:>9.0f}" if mem is not None else f"{'-':>9}"
        line += f"{show(name, peer, 'memory_mb'):>11}"
        line += f"{r['rss_mb']:>9.0f}" if r.get("rss_mb") is not None else f"{'-':>9}"
        line += f"{r['train_faults']:>9.0f}" if r.get("train_faults") is not None else f"{'-':>9}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models", nargs="+", choices=list(SHAPES), help="default: reference smollm2-135m (quick: reference)"
    )
    parser.add_argument("--quick", action="store_true", help="reference model, smaller batch, fewer variants")
    parser.add_argument("--steps", type=int, help="timed rounds (default 10, quick 10)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", nargs="+", help="only these variants (default: all)")
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory measurements")
    parser.add_argument(
        "--steady-alloc", action="store_true", help="glibc: keep freed memory, no page faults in timings"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile every variant's model (all alike)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_speed.json"))
    parser.add_argument("--shape", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    if args.memory_child:
        print(json.dumps(memory_child(args.models[0], args.memory_child, tuple(args.shape), device, args.compile)))
        return 0

    models = args.models or (["reference"] if args.quick else ["reference", "smollm2-135m"])
    variants = default_variants()
    if args.quick and not args.variants:
        variants = [v for v in variants if v.name in QUICK_VARIANTS]
    if args.variants:
        unknown = sorted(set(args.variants) - {v.name for v in variants})
        if unknown:
            parser.error(f"unknown variants {unknown}; known: {[v.name for v in variants]}")
        variants = [v for v in variants if v.name in args.variants]
    steps = args.steps or 10
    if args.steady_alloc and (device.type != "cpu" or not steady_allocator()):
        parser.error("--steady-alloc needs the CPU device and glibc (mallopt)")
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "device": str(device),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__,
        },
        "compiled": args.compile,
        "allocator": "steady (no mmap, no trim)" if args.steady_alloc else "default",
        "steps": steps,
        "warmup": args.warmup,
        "models": {},
    }
    for model_name in models:
        shape = SHAPES[model_name][1 if args.quick else 0]
        print(
            f"{model_name}: batch {shape[0]} x {shape[1]}, {steps} rounds after {args.warmup} warm-up", file=sys.stderr
        )
        started = time.perf_counter()
        # The fresh processes first: the timing rounds then hold every variant, and with --steady-alloc this process
        # keeps all it freed (12.9 GB on SmolLM2-135M), which next to a loop variant's child exceeded 24 GiB.
        memory = {}
        if not args.no_memory:
            measured = [v for v in variants if v.name in QUICK_MEMORY] if args.quick else variants
            memory = measure_memory(model_name, measured, shape, device, args.compile)
        results = measure_speed(model_name, variants, shape, steps, args.warmup, device, args.compile)
        for name, measurement in memory.items():
            results[name].update(measurement)
        checks = check_targets(results)
        report["models"][model_name] = {
            "shape": list(shape),
            "config": random_init_config(model_name) or model_name,
            "seconds": round(time.perf_counter() - started, 1),
            "variants": results,
            "targets": checks,
        }
        print(f"\n## {model_name} (batch {shape[0]} x {shape[1]}, {device}, median of {steps})")
        print(format_table(results, "peft-r64"))
        for check in checks:
            mark = "ok  " if check["met"] else "MISS"
            pair = f"{check['variant']} / {check['peer']} {check['metric']}"
            spread = " rounds 25-75%: {:.3f}-{:.3f}".format(*check["quartiles"]) if "quartiles" in check else ""
            print(f"{mark} {pair}: {check['ratio']:.3f} ({check['target']}){spread}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
