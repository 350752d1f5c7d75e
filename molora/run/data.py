"""Multi-domain data: five real built-in domains read offline from PyPI packages, or the user's JSONL/CSV files.

Every example is a prompt and a response. Splits are per domain, seeded, and by prompt (a prompt never appears in
both train and eval). Training batches are a pure function of (seed, batch index), so resuming or sharding across
ranks needs no sampler state: the data position is the batch index.
"""

from __future__ import annotations

import difflib
import random
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from molora.run.data_config import DataConfig
from molora.run.domains import BUILTIN_DOMAINS, DOMAIN_PACKAGES, Record
from molora.run.user_files import read_user_files, read_user_rows

__all__ = ["BUILTIN_DOMAINS", "DOMAIN_PACKAGES", "DataConfig", "MultiDomainData", "Record", "read_user_files"]


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
    user, first_seen = read_user_rows(config)
    records = {}
    for domain in config.domains:
        if domain in user:
            records[domain] = user[domain]
        elif domain in BUILTIN_DOMAINS:
            records[domain] = BUILTIN_DOMAINS[domain]()
        else:
            raise _unknown_domain(domain, first_seen)
        if config.dedupe:
            records[domain] = _first_of_each(records[domain])
    return records


def _first_of_each(records: list[Record]) -> list[Record]:
    """The records in order, each (prompt, response) pair once."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for record in records:
        key = (record["prompt"], record["response"])
        if key not in seen:
            seen.add(key)
            kept.append(record)
    return kept


def split_records(
    records: list[Record], domain: str, config: DataConfig
) -> tuple[list[Record], list[Record], list[Record]]:
    """Seeded (train, eval, validation) split by prompt, so no eval or validation prompt is ever trained on."""
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
    num_val = 0
    if config.val_fraction:
        num_val = max(1, round(len(keys) * config.val_fraction))
        if config.max_val_per_domain is not None:
            num_val = min(num_val, config.max_val_per_domain)
    if len(keys) < 2 + num_val:
        raise ValueError(
            f"domain {domain!r} has {len(keys)} distinct examples; at least {2 + num_val} are needed to split"
        )
    eval_keys, val_keys = keys[:num_eval], keys[num_eval : num_eval + num_val]
    train_keys = keys[num_eval + num_val :]
    return tuple([r for k in part for r in groups[k]] for part in (train_keys, eval_keys, val_keys))


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
    val: Any = None  # the validation split (data.val_fraction > 0), else None
    # The first token of each label when the domain's responses are a few labels that differ in their first token
    # (sentiment: positive / negative): evaluation then reports the predicted label's accuracy.
    label_tokens: list[int] | None = None

    def split(self, name: str) -> Any:
        if name not in ("eval", "val"):
            raise ValueError(f"split must be 'eval' or 'val', got {name!r}")
        found = self.eval if name == "eval" else self.val
        if found is None:
            raise ValueError(f"domain {self.name!r} has no {name} split (set data.val_fraction > 0)")
        return found


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


MAX_LABELS = 16


def label_tokens(dataset: Any) -> list[int] | None:
    """The labels' first tokens when every response is one of at most MAX_LABELS labels that differ there."""
    responses = {tuple(ids[start:]) for ids, start in zip(dataset["input_ids"], dataset["prompt_len"], strict=True)}
    if not 2 <= len(responses) <= MAX_LABELS or any(not r for r in responses):
        return None
    firsts = sorted({r[0] for r in responses})
    return firsts if len(firsts) == len(responses) else None


def build_domains(config: DataConfig, tokenizer: Any) -> list[DomainData]:
    domains = []
    for task_id, (name, records) in enumerate(load_records(config).items()):
        train, evaluation, validation = split_records(records, name, config)
        train_ds = tokenize_split(train, name, task_id, tokenizer, config)
        eval_ds = tokenize_split(evaluation, name, task_id, tokenizer, config)
        val_ds = tokenize_split(validation, name, task_id, tokenizer, config) if config.val_fraction else None
        if len(train_ds) == 0 or len(eval_ds) == 0 or (val_ds is not None and len(val_ds) == 0):
            sizes = f"train {len(train_ds)}, eval {len(eval_ds)}" + (f", val {len(val_ds)}" if val_ds else "")
            raise ValueError(f"domain {name!r} is empty after filtering ({sizes})")
        domains.append(DomainData(name, task_id, train_ds, eval_ds, val_ds, label_tokens(train_ds)))
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

    def __init__(
        self, config: DataConfig, tokenizer: Any, domains: list[DomainData] | None = None, order_seed: int = 0
    ):
        """order_seed (the run's train.seed) changes the order of the training batches, not the splits."""
        self.config = config
        self.order_seed = order_seed
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
        # CPU generators seed from 32 bits: the order seed moves the whole sequence of batch seeds by a large prime
        seed = (self.config.seed * 1_000_003 + index + self.order_seed * 1_000_000_007) % 2**32
        generator = torch.Generator().manual_seed(seed)
        total = batch_size * world_size
        domain_ids = torch.multinomial(torch.tensor(self.weights), total, replacement=True, generator=generator)
        examples = []
        for slot, domain in enumerate(domain_ids.tolist()):
            rows = self._train_rows[domain]
            pick = int(torch.randint(len(rows), (1,), generator=generator))
            if slot % world_size == rank:
                examples.append(rows[pick])
        return collate(examples, self.pad_token_id, self.config.loss_on)

    def eval_batches(self, domain: DomainData, batch_size: int, split: str = "eval"):
        rows = domain.split(split).select_columns(["input_ids", "prompt_len", "task_id"]).to_list()
        for start in range(0, len(rows), batch_size):
            yield collate(rows[start : start + batch_size], self.pad_token_id, self.config.loss_on)
