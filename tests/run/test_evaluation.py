"""Evaluation metrics against a hand computation: one example at a time, no batching or padding."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from molora.run.config import RunConfig
from molora.run.data import DataConfig, MultiDomainData
from molora.run.evaluation import describe, evaluate
from tests.tiny import save_tiny_model, write_toy_domains


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    model_dir = save_tiny_model(root / "model")
    toy = write_toy_domains(root / "toy.jsonl", per_domain=20)
    rng = random.Random(0)
    with toy.open("a") as handle:  # a label domain: its responses are two labels differing in the first token
        for _ in range(40):
            word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6)))
            label = "yes" if word[0] in "abcd" else "no"
            handle.write(json.dumps({"domain": "label", "prompt": f"is {word} early?", "response": label}) + "\n")
    config = RunConfig.from_dict(
        {
            "model": {"name": str(model_dir)},
            "data": {"domains": ["upper", "label"], "files": [str(toy)], "max_length": 32, "val_fraction": 0.2},
            "train": {"eval_batch_size": 3},
        }
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), MultiDomainData(config.data, tokenizer), config


def by_hand(model, rows, label_tokens):
    loss, tokens, correct, hits = 0.0, 0, 0, 0
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        start = row["prompt_len"]
        for position in range(start, len(row["input_ids"])):
            target = row["input_ids"][position]
            loss += F.cross_entropy(logits[position - 1], torch.tensor(target)).item()
            correct += int(logits[position - 1].argmax().item() == target)
            tokens += 1
        if label_tokens is not None:
            scores = {token: logits[start - 1, token].item() for token in label_tokens}
            hits += int(max(scores, key=scores.get) == row["input_ids"][start])
    return loss / tokens, correct / tokens, hits / len(rows)


@pytest.mark.parametrize("split", ["eval", "val"])
def test_loss_token_and_label_accuracy_match_one_example_at_a_time(setup, split):
    model, data, config = setup
    results = evaluate(model, data, config, torch.device("cpu"), split=split)
    upper, label = data.domains
    assert upper.label_tokens is None and label.label_tokens is not None and len(label.label_tokens) == 2
    for domain in data.domains:
        rows = domain.split(split).to_list()
        loss, token_acc, label_acc = by_hand(model, rows, domain.label_tokens)
        found = results[domain.name]
        assert found["loss"] == pytest.approx(loss, rel=1e-4) and found["token_acc"] == pytest.approx(token_acc)
        assert found["examples"] == len(rows)
        if domain.label_tokens is None:
            assert "label_acc" not in found
        else:
            assert found["label_acc"] == pytest.approx(label_acc)
    assert results["mean"]["token_acc"] == pytest.approx(
        (results["upper"]["token_acc"] + results["label"]["token_acc"]) / 2
    )


def test_a_split_that_does_not_exist_is_named(setup):
    model, _, config = setup
    empty = MultiDomainData(
        DataConfig(domains=["upper"], files=config.data.files, max_length=32), data_tokenizer(setup)
    )
    with pytest.raises(ValueError, match=r"no val split.*val_fraction"):
        evaluate(model, empty, config, torch.device("cpu"), split="val")


def data_tokenizer(setup):
    return AutoTokenizer.from_pretrained(setup[2].model.name)


@pytest.mark.parametrize(
    ("num_experts", "rank_pattern", "expected"),
    [
        (4, None, "experts lora x4, rank 2, router `topk`"),
        (
            {"q_proj|v_proj": 1, ".*": 4},
            {"q_proj|v_proj": 6},
            "experts lora x(q_proj|v_proj: 1, .*: 4), rank 2 (q_proj|v_proj: 6), router `topk`",
        ),
        ({"preset": "hourglass", "min": 2, "max": 8}, None, "experts lora x(hourglass 8-2-2-8), rank 2, router `topk`"),
        ({"preset": [1, 2, 3, 4]}, None, "experts lora x(per quarter 1-2-3-4), rank 2, router `topk`"),
    ],
)
def test_summary_describes_patterns_and_presets_in_words(num_experts, rank_pattern, expected):
    config = RunConfig.from_dict(
        {"molora": {"num_experts": num_experts, "rank": 2, "rank_pattern": rank_pattern, "router": "topk"}}
    )
    assert describe(config) == expected
