"""Command line: `molora-train` / `python -m train.train`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from molora.run_config import load_run_config


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="molora-train",
        description="Fine-tune a model on several domains with a mixture of LoRA experts.",
        epilog="example: molora-train --config configs/quickstart.yaml train.steps=20 molora.router=switch",
    )
    parser.add_argument("--config", required=True, type=Path, help="YAML with sections model, data, molora, train")
    parser.add_argument("--output-dir", type=Path, help="run folder (default runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run folder")
    parser.add_argument("overrides", nargs="*", help="section.key=value (value parsed as YAML)")
    args = parser.parse_args(argv)
    try:
        config = load_run_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"molora-train: error: {err}", file=sys.stderr)
        return 2
    run_dir = args.output_dir or Path("runs") / args.config.stem
    from molora.training import train

    try:
        result = train(config, run_dir, resume=args.resume)
    except (ValueError, FileNotFoundError) as err:
        print(f"molora-train: error: {err}", file=sys.stderr)
        return 2
    if "after" in result:
        print((run_dir / "summary.md").read_text())
    else:
        print(f"stopped at step {result['stopped_at']}; continue with --resume")
    return 0
