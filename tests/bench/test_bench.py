"""The speed benchmark compares like with like: same parameter budget, same mixture in the loop baseline, and
ratios/targets computed as documented."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench import bench_speed
from bench.variants import NUM_EXPERTS, RANK, BlogStyleMoELinear, Variant, build, default_variants, make_step
from molora import MoLoRAConfig, get_molora_model

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=48,
    vocab_size=64,
    max_position_embeddings=32,
)


def tiny_base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY))


def variant(name: str) -> Variant:
    return next(v for v in default_variants() if v.name == name)


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_peft_peer_has_the_experts_parameter_budget():
    base = tiny_base()
    molora = build(variant("lora-softmax"), base)
    peft = build(variant(f"peft-r{NUM_EXPERTS * RANK}"), base)
    router = sum(layer.router.gate.weight.numel() for _, layer in molora._layers)
    assert trainable(molora) - router == trainable(peft)
    assert trainable(build(variant("base"), base)) == 0
    assert all(not p.requires_grad for p in base.parameters())


def test_variants_share_the_frozen_base_weights():
    base = tiny_base()
    peft = build(variant("peft-r8"), base)
    embed = base.get_input_embeddings().weight
    assert peft.get_input_embeddings().weight is embed


def test_blog_loop_computes_the_same_mixture_as_molora():
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 10)
    molora = get_molora_model(
        torch.nn.Sequential(layer), MoLoRAConfig(target_modules=["0"], num_experts=3, rank=2, alpha=4)
    )
    mo = molora.base_model[0]
    torch.nn.init.normal_(mo.experts.lora_B)
    torch.nn.init.normal_(mo.router.gate.weight)
    blog = BlogStyleMoELinear(torch.nn.Linear(12, 10), num_experts=3, rank=2, alpha=4)
    blog.base_layer.load_state_dict(layer.state_dict())
    with torch.no_grad():
        blog.gate.weight.copy_(mo.router.gate.weight)
        for e in range(3):
            blog.experts_A[e].weight.copy_(mo.experts.lora_A[e])
            blog.experts_B[e].weight.copy_(mo.experts.lora_B[e].T)
    x = torch.randn(2, 5, 12)
    expected = molora(x)
    torch.testing.assert_close(blog(x), expected, atol=1e-5, rtol=1e-5)
    blog.stack = False
    torch.testing.assert_close(blog(x), expected, atol=1e-5, rtol=1e-5)


def test_train_step_updates_only_the_adapter():
    base = tiny_base()
    v = variant("lora-topk")
    model = build(v, base)
    train, _ = make_step(model, v)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = bench_speed.make_batch(base, 2, 8)
    for _ in range(2):  # B starts at zero: the first step moves B, the second also A and the router
        train(batch)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(model.get_parameter(n).requires_grad for n in changed)
    assert any("lora_A" in n for n in changed) and any("router" in n for n in changed)


def test_measure_speed_records_medians_faults_and_paired_rounds(monkeypatch):
    monkeypatch.setattr(bench_speed, "REFERENCE", TINY)
    names = ["base", "peft-r8", "lora-softmax", "lora-task", "loop-blog", "lora-task-merged"]
    results = bench_speed.measure_speed(
        "reference", [variant(n) for n in names], (2, 8), steps=2, warmup=1, device=torch.device("cpu")
    )
    assert list(results) == names
    for name in names:
        r = results[name]
        assert len(r["forward_ms_all"]) == 2  # the median of the paired rounds, not one of them
        assert r["forward_ms"] == pytest.approx(statistics.median(r["forward_ms_all"]), abs=0.01)
        if name == "lora-task-merged":
            assert r["train_ms"] is None and "train_faults" not in r
        else:
            assert len(r["train_ms_all"]) == 2 and isinstance(r["train_faults"], (int, float))  # reported on CPU
    assert results["base"]["params"] == 0 and results["lora-softmax"]["params"] > results["peft-r8"]["params"]


def test_ratio_is_the_median_of_paired_rounds_and_targets_read_both_ways():
    results = {
        "peft-r64": {"train_ms_all": [100, 200, 100, 100], "train_ms": 100},
        "lora-softmax": {"train_ms_all": [90, 220, 110, 95], "train_ms": 102.5},
        "loop-blog": {"train_ms_all": [500, 900, 450, 300], "train_ms": 475},
    }
    # per-round ratios 0.9, 1.1, 1.1, 0.95 -> median 1.025 (the ratio of medians would be 1.025 too, by chance)
    assert bench_speed.ratio(results, "lora-softmax", "peft-r64", "train_ms") == pytest.approx(1.025)
    q1, q3 = bench_speed.ratio_quartiles(results, "lora-softmax", "peft-r64", "train_ms")
    assert q1 == pytest.approx(0.9125) and q3 == pytest.approx(1.1)
    checks = {(c["variant"], c["metric"]): c for c in bench_speed.check_targets(results)}
    assert checks[("lora-softmax", "train_ms")]["met"] is False  # 1.025 > 1.00
    # loop / molora per round: 5.56, 4.09, 4.09, 3.16 -> median 4.09 >= 4
    assert checks[("loop-blog", "train_ms")]["ratio"] == pytest.approx(4.091, abs=1e-3)
    assert checks[("loop-blog", "train_ms")]["met"] is True
    assert ("lora-topk", "train_ms") not in checks  # no figures, no verdict


STEADY_PROBE = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from bench.bench_speed import steady_allocator
if sys.argv[1] == "steady":
    assert steady_allocator()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):  # warm-up: the heap grows to hold the block
    torch.ones(64, 2**18)
before = faults()
for _ in range(20):
    torch.ones(64, 2**18)  # 64 MiB, freed at once
print(faults() - before)
"""


def _allocator_differs() -> str | None:
    """Why the page-fault counts below would not be glibc's defaults on 4-KiB pages, or None."""
    if not sys.platform.startswith("linux"):
        return "glibc mallopt and getrusage page faults"
    if os.environ.get("LD_PRELOAD"):
        return f"LD_PRELOAD={os.environ['LD_PRELOAD']} replaces the allocator"
    if tuned := sorted(k for k in os.environ if k.startswith(("MALLOC_", "GLIBC_TUNABLES"))):
        return f"the allocator is tuned by {tuned}"
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    if "[always]" in thp:
        return "transparent huge pages are always on: a 64 MiB block faults in 2-MiB pages"
    return None


@pytest.mark.skipif(_allocator_differs() is not None, reason=str(_allocator_differs()))
def test_steady_allocator_stops_the_page_faults_of_reallocated_memory(tmp_path):
    # A 64 MiB block is above glibc's mmap threshold: by default each allocation maps (and faults in) fresh pages,
    # 16384 4-KiB pages per block; with the steady allocator freed blocks are reused from the heap (which may still
    # grow a few times while its layout settles).
    script = tmp_path / "probe.py"
    script.write_text(STEADY_PROBE.format(root=str(Path(__file__).resolve().parents[2])))
    counts = {}
    for mode in ("default", "steady"):
        run = subprocess.run(
            [sys.executable, str(script), mode], capture_output=True, text=True, check=True, timeout=120
        )
        counts[mode] = int(run.stdout.strip().splitlines()[-1])
    assert counts["default"] >= 20 * 16384 * 0.9
    assert counts["steady"] <= 4 * 16384


def test_allocated_peak_counts_the_bytes_alive_together():
    def step(_):
        first = torch.ones(2**20)  # 4 MiB
        second = torch.ones(2**21)  # 8 MiB, while the first is alive: peak 12 MiB
        del first, second
        torch.ones(2**19)  # 2 MiB after both are freed

    peaks = [bench_speed.allocated_peak_mib(step, None) for _ in range(2)]
    assert peaks[0] == pytest.approx(12.0, abs=0.05)
    assert peaks[0] == peaks[1]  # the same computation, the same number


def test_router_floor_finds_every_adapted_layer_and_which_inputs_need_a_gradient():
    from collections import Counter

    from bench.router_floor import adapted_layer_shapes

    peft = build(variant(f"peft-r{NUM_EXPERTS * RANK}"), tiny_base())
    ids = torch.randint(0, TINY["vocab_size"], (2, 5))
    shapes, tokens = adapted_layer_shapes(peft, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert tokens == 10
    # the first layer's q, k, v read the frozen embeddings (no input gradient); every other input needs one
    hidden, inner = TINY["hidden_size"], TINY["intermediate_size"]
    expected = {(hidden, hidden, False): 3, (hidden, hidden, True): 5, (hidden, inner, True): 4}
    assert shapes == Counter({**expected, (inner, hidden, True): 2})


# Smoke runs of the bench scripts no other test runs: each finishes on the smallest settings and writes what it says.
def test_bench_dispatch_smoke(tmp_path, capsys):
    from bench import bench_dispatch

    out = tmp_path / "dispatch.json"
    argv = ["--quick", "--tokens", "32", "--d-in", "16", "--d-out", "24", "--experts", "4", "8", "--device", "cpu"]
    assert bench_dispatch.main([*argv, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["experts"] for r in rows] == [4, 8]
    assert all(r["ratio"] == pytest.approx(r["grouped_ms"] / r["dense_ms"]) for r in rows)


def test_bench_micro_smoke(capsys):
    from bench import micro

    assert micro.main(["--rounds", "1"]) == 0
    table = capsys.readouterr().out
    assert table.count("| router softmax") == 1 and "z-loss logsumexp" in table


def test_bench_profile_step_smoke(capsys):
    from bench import profile_step

    assert profile_step.main(["--quick", "--steps", "1", "--rows", "5", "--device", "cpu"]) == 0
    assert "Self CPU" in capsys.readouterr().out
