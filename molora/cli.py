"""Command line: `molora train|inspect|ablate|ranks`, the same as `molora-train`, ... and `python -m train.train`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from molora.run.config import load_run_config
from molora.run.domains import SUITES


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="molora-train",
        description="Fine-tune a model on several domains with a mixture of LoRA experts.",
        epilog="example: molora-train --config configs/quickstart.yaml train.steps=20 molora.router=switch\n"
        "every key, its type and default: docs/config-reference.md (or --print-config)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, type=Path, help="YAML with sections model, data, molora, train")
    parser.add_argument("--output-dir", type=Path, help="run folder (default runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run folder")
    parser.add_argument(
        "--print-config", action="store_true", help="print the merged config (file, overrides, defaults) and exit"
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value (value parsed as YAML)")
    args = parser.parse_args(argv)
    try:
        config = load_run_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"molora-train: error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    run_dir = args.output_dir or Path("runs") / args.config.stem
    from molora.run.checkpoint import NonFiniteError
    from molora.run.training import train

    try:
        result = train(config, run_dir, resume=args.resume)
    except (ValueError, FileNotFoundError) as err:  # bad input, a busy run folder, no usable checkpoint
        print(f"molora-train: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:  # the run stopped; its last good checkpoint stays
        print(f"molora-train: error: {err}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 wrote the run folder and reports it once
        return 0
    if "after" in result:
        print((run_dir / "summary.md").read_text())
    else:
        print(f"stopped at step {result['stopped_at']}; continue with --resume")
    return 0


def inspect_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="molora-inspect",
        description="Route a trained run's per-domain eval sets and write RUN/routing (report.md, stats.json, PNGs).",
    )
    parser.add_argument("--run", required=True, type=Path, help="a run folder written by molora-train")
    parser.add_argument("--data", nargs="+", help="JSONL/CSV files to inspect instead of the run's domains")
    parser.add_argument("--output-dir", type=Path, help="default RUN/routing")
    parser.add_argument("overrides", nargs="*", help="section.key=value applied to the run's config")
    args = parser.parse_args(argv)
    try:
        if not (args.run / "adapter").is_dir():
            raise FileNotFoundError(f"{args.run} has no adapter/ (is it a finished molora-train run?)")
        overrides = list(args.overrides)
        if args.data:
            from molora.run.data import DataConfig, read_user_files

            files = [str(Path(f)) for f in args.data]
            domains = list(read_user_files(DataConfig(domains=["user"], files=files)))
            overrides += [f"data.files={files}", f"data.domains={domains}"]
        config = load_run_config(args.run / "config.yaml", overrides)
        from molora.run.evaluation import inspect_run

        stats = inspect_run(config, args.run, args.output_dir or args.run / "routing")
    except (ValueError, FileNotFoundError) as err:
        print(f"molora-inspect: error: {err}", file=sys.stderr)
        return 2
    agg = stats["aggregate"]
    print(
        f"tasks {agg['tasks']}: I(task; expert) {agg['mi_bits']:.3f} bits ({agg['mi_normalized']:.1%} of H(task)), "
        f"entropy {agg['entropy']:.3f}, load CV {agg['load_cv']:.3f}, dead experts {agg['dead_experts']}"
    )
    print(f"wrote {args.output_dir or args.run / 'routing'}")
    return 0


def ablate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="molora-ablate",
        description="Run every row of an ablation over several seeds on the same data and parameter budget; "
        "report paired differences to the baseline row with 95 % intervals. Reruns skip finished runs.",
    )
    parser.add_argument("--config", required=True, type=Path, help="a run config with an `ablation` section")
    parser.add_argument("--quick", action="store_true", help="merge the config's `quick` overrides into every row")
    parser.add_argument("--output-dir", type=Path, help="default runs/ablation (runs/ablation-quick with --quick)")
    parser.add_argument("--seeds", type=int, help="seeds per row (default: the config's ablation.seeds, else 3)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each with cores/jobs threads")
    parser.add_argument("--report-only", action="store_true", help="train nothing: tables from the finished runs")
    parser.add_argument(
        "--suite",
        choices=sorted(SUITES),
        help="run every row on this suite's domains instead of the config's (default folder runs/ablation-SUITE)",
    )
    parser.add_argument(
        "--rows",
        type=lambda text: [name for name in text.split(",") if name],
        metavar="NAME,NAME",
        help="train only these rows (and the baseline and budget reference they are measured against); the tables "
        "still show every row's finished runs",
    )
    parser.add_argument(
        "--choices-from",
        type=Path,
        metavar="FOLDER",
        help="grid rows (those in --rows, else all) run only the point chosen on validation in FOLDER, another "
        "suite's ablation folder with the whole grid finished, instead of running the grid here",
    )
    parser.add_argument(
        "--cross-suite",
        nargs="+",
        metavar="SUITE=FOLDER",
        help="train nothing: each row's difference to the baseline on every suite's finished runs, and the verdict "
        "across suites (a win only on a suite the rows were not chosen on), in OUTPUT_DIR/cross_suite.md",
    )
    parser.add_argument(
        "--baseline",
        metavar="ROW",
        help="with --cross-suite: measure against this row instead of the file's baseline (a control)",
    )
    parser.add_argument(
        "--reevaluate",
        nargs="+",
        metavar="SECTION.KEY=VALUE",
        help="train nothing: score the finished runs again with these data settings (tables in reeval-<tag>/)",
    )
    args = parser.parse_args(argv)
    from molora.ablation.harness import run_ablation

    default = "ablation" + ("-quick" if args.quick else "") + (f"-{args.suite}" if args.suite else "")
    default = "ablation-cross" if args.cross_suite else default
    out = args.output_dir or Path("runs") / default
    try:
        if args.cross_suite:
            return _cross_suite(args, out)
        if args.reevaluate and args.suite:
            raise ValueError("--suite and --reevaluate: re-evaluate the suite's folder (--output-dir) without --suite")
        if args.reevaluate:
            from molora.ablation.reevaluate import reevaluate_ablation, tag_of

            reevaluate_ablation(args.config, out, args.reevaluate, quick=args.quick)
            print((out / f"reeval-{tag_of(args.reevaluate)}" / "ablation.md").read_text())
            return 0
        rows = run_ablation(
            args.config,
            out,
            quick=args.quick,
            seeds=args.seeds,
            jobs=args.jobs,
            report_only=args.report_only,
            suite=args.suite,
            only=args.rows,
            choices_from=args.choices_from,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"molora-ablate: error: {err}", file=sys.stderr)
        return 2
    print((out / "ablation.md").read_text())
    return 0 if any(r["status"] == "ok" for r in rows) or args.report_only else 1


def _cross_suite(args: argparse.Namespace, out: Path) -> int:
    from molora.ablation.cross_suite import write_cross_suite

    folders = {}
    for item in args.cross_suite:
        suite, sep, folder = item.partition("=")
        if not sep or not folder:
            raise ValueError(f"--cross-suite takes SUITE=FOLDER, got {item!r}")
        folders[suite] = Path(folder)
    command = f"molora-ablate --config {args.config} --cross-suite {' '.join(args.cross_suite)} --output-dir {out}"
    command += f" --baseline {args.baseline}" if args.baseline else ""
    print(write_cross_suite(args.config, folders, out, command, seeds=args.seeds, baseline=args.baseline).read_text())
    return 0


def ranks_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="molora-ranks",
        description="Singular-value spectra and effective ranks of the targeted weights and, for a finished run, of "
        "every expert's and every task's update, with a recommended rank per module (ranks.md, .csv, .png).",
        epilog="examples: molora-ranks --run runs/quickstart; molora-ranks --model smollm2-135m --targets q_proj",
    )
    parser.add_argument("--model", help="a built-in name or local model folder (with --run: instead of the run's)")
    parser.add_argument("--run", type=Path, help="a finished molora-train run: analyse its trained adapter")
    parser.add_argument(
        "--targets", nargs="+", help="module names or suffixes (default q_proj v_proj; with --run: all adapted)"
    )
    parser.add_argument(
        "--output-dir", "--out", dest="output_dir", type=Path, help="default RUN/ranks or runs/ranks-<model>"
    )
    args = parser.parse_args(argv)
    from molora.analysis.rank_report import write_rank_report
    from molora.run.rank_analysis import analyze_base, analyze_run

    try:
        if args.run is not None:
            report, title = analyze_run(args.run, args.model, args.targets)
            out = args.output_dir or args.run / "ranks"
        elif args.model:
            report, title = analyze_base(args.model, args.targets or ["q_proj", "v_proj"])
            out = args.output_dir or Path("runs") / f"ranks-{Path(args.model).name}"
        else:
            raise ValueError("give --model (base weights only) or --run (a trained adapter)")
        write_rank_report(report, out, title)
    except (ValueError, FileNotFoundError) as err:
        print(f"molora-ranks: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # from_pretrained: a name that is neither built in, a folder, nor reachable on the hub
        print(f"molora-ranks: error: cannot load the model: {err}", file=sys.stderr)
        return 2
    for module, rank in report.recommended.items():
        print(f"{module}: needs {report.needed[module]}, recommended rank {rank}")
    if not report.recommended:
        print("base weights only: no rank recommended (see ranks.md)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(train_main())


COMMANDS = {"train": train_main, "inspect": inspect_main, "ablate": ablate_main, "ranks": ranks_main}


def main(argv: list[str] | None = None) -> int:
    """`molora COMMAND [args]`: one entry point for the four commands (each also installed as molora-COMMAND)."""
    argv = sys.argv[1:] if argv is None else argv
    usage = f"usage: molora {{{','.join(COMMANDS)}}} [args]   (molora COMMAND --help for each)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        import difflib

        close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"molora: error: unknown command {argv[0]!r}{hint}\n{usage}", file=sys.stderr)
        return 2
    return command(argv[1:])
