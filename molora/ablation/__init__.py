"""The ablation harness: rows x seeds, parameter matching, paired intervals, re-evaluation."""

from molora.ablation.harness import SeedMajorPool, check_matched, run_ablation, run_one
from molora.ablation.spec import load_ablation

__all__ = ["SeedMajorPool", "check_matched", "load_ablation", "run_ablation", "run_one"]
