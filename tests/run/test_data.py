import json

import pytest
import torch

from molora.run.data import (
    BUILTIN_DOMAINS,
    DataConfig,
    MultiDomainData,
    collate,
    load_records,
    mixing_weights,
    split_records,
)
from tests.tiny import save_tiny_model, write_toy_domains


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(save_tiny_model(tmp_path_factory.mktemp("tiny")))


@pytest.mark.parametrize("domain", sorted(BUILTIN_DOMAINS))
def test_builtin_domain_loads_and_splits_disjoint_and_deterministic(domain):
    config = DataConfig(domains=[domain])
    records = load_records(config)[domain]
    assert len(records) >= 100
    assert all(set(r) == {"prompt", "response"} and r["response"] for r in records)
    train, evaluation, validation = split_records(records, domain, config)
    again_train, again_eval, _ = split_records(records, domain, config)
    assert train == again_train and evaluation == again_eval and validation == []
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evaluation}
    assert len(train) + len(evaluation) == len(records)
    other_train, _, _ = split_records(records, domain, DataConfig(domains=[domain], seed=1))
    assert other_train != train


@pytest.mark.parametrize("domain", sorted(BUILTIN_DOMAINS))
def test_a_validation_split_is_disjoint_and_leaves_the_eval_split_as_it_was(domain):
    records = load_records(DataConfig(domains=[domain]))[domain]
    _, plain_eval, _ = split_records(records, domain, DataConfig(domains=[domain]))
    config = DataConfig(domains=[domain], val_fraction=0.2, max_val_per_domain=30)
    train, evaluation, validation = split_records(records, domain, config)
    assert evaluation == plain_eval
    assert 1 <= len({r["prompt"] for r in validation}) <= 30
    prompts = [{r["prompt"] for r in part} for part in (train, evaluation, validation)]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    assert len(train) + len(evaluation) + len(validation) == len(records)


def test_dedupe_drops_exact_repeats_and_keeps_every_prompt_in_its_split():
    plain = DataConfig(domains=["qa"], eval_fraction=0.4, max_eval_per_domain=100, val_fraction=0.15)
    deduped = DataConfig(**{**plain.__dict__, "dedupe": True})
    records, distinct = load_records(plain)["qa"], load_records(deduped)["qa"]
    pairs = [(r["prompt"], r["response"]) for r in records]
    assert [(r["prompt"], r["response"]) for r in distinct] == list(dict.fromkeys(pairs))  # first of each, in order
    assert len(distinct) < len(records)  # ChatterBot repeats answers (one of them 121 times)
    for before, after in zip(split_records(records, "qa", plain), split_records(distinct, "qa", deduped), strict=True):
        assert {r["prompt"] for r in before} == {r["prompt"] for r in after}
        assert len({(r["prompt"], r["response"]) for r in after}) == len(after)
    with pytest.raises(ValueError, match=r"data\.dedupe"):
        DataConfig(dedupe="yes")


def test_the_run_seed_changes_the_batch_order_not_the_splits(tokenizer):
    config = DataConfig(domains=["math", "qa"], max_examples_per_domain=30, max_length=64, val_fraction=0.2)
    first, second = MultiDomainData(config, tokenizer), MultiDomainData(config, tokenizer, order_seed=1)
    for a, b in zip(first.domains, second.domains, strict=True):
        assert a.eval["input_ids"] == b.eval["input_ids"] and a.val["input_ids"] == b.val["input_ids"]
    assert not torch.equal(first.train_batch(0, 8)["input_ids"], second.train_batch(0, 8)["input_ids"])
    assert torch.equal(second.train_batch(3, 8)["input_ids"], second.train_batch(3, 8)["input_ids"])


def test_label_domains_are_detected_by_their_responses(tokenizer):
    data = MultiDomainData(DataConfig(domains=["sentiment", "qa"], max_examples_per_domain=60), tokenizer)
    sentiment, qa = data.domains
    assert sentiment.label_tokens is not None and len(sentiment.label_tokens) == 2
    assert qa.label_tokens is None


def test_built_examples_have_text_prompt_len_domain_and_task_id(tokenizer, tmp_path):
    data = MultiDomainData(DataConfig(domains=["math", "qa"], max_examples_per_domain=30, max_length=64), tokenizer)
    assert data.names == ["math", "qa"]
    for task_id, domain in enumerate(data.domains):
        example = domain.train[0]
        assert example["domain"] == domain.name and example["task_id"] == task_id
        assert 0 < example["prompt_len"] < len(example["input_ids"]) <= 64
        assert isinstance(example["text"], str) and example["text"]


def test_collate_masks_prompt_and_padding_in_labels():
    examples = [
        {"input_ids": [5, 6, 7, 8], "prompt_len": 2, "task_id": 1},
        {"input_ids": [9, 10], "prompt_len": 1, "task_id": 0},
    ]
    batch = collate(examples, pad_token_id=0, loss_on="response")
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["prompt_mask"].tolist() == [[True, True, False, False], [True, False, False, False]]
    assert batch["task_ids"].tolist() == [1, 0]
    assert collate(examples, 0, "all")["labels"].tolist() == [[5, 6, 7, 8], [9, 10, -100, -100]]


def test_mixing_weights_by_hand():
    assert mixing_weights([100, 300], "proportional", 2.0) == pytest.approx([0.25, 0.75])
    assert mixing_weights([100, 400], "temperature", 2.0) == pytest.approx([10 / 30, 20 / 30])


def test_training_batches_are_deterministic_and_shard_by_rank(tokenizer, tmp_path):
    config = DataConfig(domains=["upper", "reverse"], files=[str(write_toy_domains(tmp_path / "toy.jsonl"))])
    data = MultiDomainData(config, tokenizer)
    assert torch.equal(data.train_batch(3, 4)["input_ids"], data.train_batch(3, 4)["input_ids"])
    assert not torch.equal(data.train_batch(3, 4)["input_ids"], data.train_batch(4, 4)["input_ids"])
    whole = data.train_batch(5, 2, rank=0, world_size=1)
    rank0 = data.train_batch(5, 1, rank=0, world_size=2)
    rank1 = data.train_batch(5, 1, rank=1, world_size=2)
    assert rank0["task_ids"].tolist() + rank1["task_ids"].tolist() == whole["task_ids"].tolist()
    eval_prompts = {tuple(r) for d in data.domains for r in d.eval["input_ids"]}
    train_prompts = {tuple(r) for d in data.domains for r in d.train["input_ids"]}
    assert not eval_prompts & train_prompts


def test_user_csv_with_a_text_field(tokenizer, tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("domain,text\n" + "".join(f"legal,clause number {i} applies\n" for i in range(20)))
    data = MultiDomainData(DataConfig(domains=["legal"], files=[str(path)]), tokenizer)
    example = data.domains[0].train[0]
    assert example["prompt_len"] == 0 and example["domain"] == "legal"


def test_clear_errors(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"unknown domain.*'news'"):
        DataConfig(domains=["nope"])
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        DataConfig(domains=["x"], files=[str(tmp_path / "missing.jsonl")])
    toy = write_toy_domains(tmp_path / "toy.jsonl")
    with pytest.raises(ValueError, match=r"unknown domain 'legal'.*'reverse'"):
        load_records(DataConfig(domains=["legal"], files=[str(toy)]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"domain": "x", "body": "hello"}) + "\n")
    with pytest.raises(ValueError, match="text_field"):
        load_records(DataConfig(domains=["x"], files=[str(bad)]))
    no_domain = tmp_path / "nodomain.jsonl"
    no_domain.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(ValueError, match="domain_field"):
        load_records(DataConfig(domains=["x"], files=[str(no_domain)]))
    long = tmp_path / "long.jsonl"
    long.write_text(
        "".join(json.dumps({"domain": "d", "prompt": "p" * 50 + str(i), "response": ""}) + "\n" for i in range(5))
    )
    with pytest.raises(ValueError, match=r"long\.jsonl, line 1: field 'response' \(data\.response_field\) is empty"):
        MultiDomainData(DataConfig(domains=["d"], files=[str(long)], max_length=16), tokenizer)


def test_the_suites_partition_the_builtin_domains_and_a_suite_name_expands():
    from molora.run.domains import SUITES

    members = [d for suite in SUITES.values() for d in suite]
    assert sorted(members) == sorted(BUILTIN_DOMAINS) and len(set(members)) == len(members)
    assert DataConfig().domains == list(SUITES["bundled"])  # the default is the suite the choices were made on
    assert DataConfig(domains="heldout").domains == ["phonetics", "spanish", "regions"]
    assert DataConfig(domains="news").domains == ["news"]  # a domain name stays a domain
    suites = r"suites: \['bundled', 'conflict', 'conflict-iso', 'heldout'\]"
    with pytest.raises(ValueError, match=r"unknown domain\(s\) \['held'\].*" + suites):
        DataConfig(domains="held")


def test_heldout_domains_hold_what_their_prompts_ask_for():
    records = load_records(DataConfig(domains="heldout"))
    phones = {p for r in records["phonetics"] for p in r["response"].split()}
    assert phones and all(p.rstrip("012").isalpha() and p.rstrip("012").isupper() for p in phones)  # ARPAbet
    assert all(json.loads(r["response"]).keys() == {"code", "type"} for r in records["regions"])
    assert all(json.loads(r["response"])["code"].split("-")[0].isupper() for r in records["regions"])
    assert all(r["prompt"].startswith("Translate this emoji name into Spanish: ") for r in records["spanish"])
    assert not any("skin tone" in r["prompt"] for r in records["spanish"])  # near-duplicates of their base emoji


def test_conflict_pairs_ask_the_same_prompts_and_answer_them_differently():
    records = load_records(DataConfig(domains="conflict")) | load_records(DataConfig(domains="conflict-iso"))
    pairs = (
        ("arpabet", "syllables"),
        ("emoji-es", "emoji-fr"),
        ("region-code", "region-type"),
        ("language-code", "language-type"),
    )
    for first, second in pairs:
        answers = {r["prompt"]: r["response"] for r in records[second]}
        shared = [r for r in records[first] if r["prompt"] in answers]
        assert len(shared) > 0.9 * len(records[first])  # the same prompts ...
        assert sum(r["response"] != answers[r["prompt"]] for r in shared) > 0.9 * len(shared)  # ... other answers
    syllables = {r["prompt"].removeprefix("Word: "): r["response"] for r in records["syllables"]}
    arpabet = {r["prompt"].removeprefix("Word: ") for r in records["arpabet"]}
    phonetics = {r["prompt"].rsplit(" ", 1)[1] for r in load_records(DataConfig(domains=["phonetics"]))["phonetics"]}
    assert not arpabet & phonetics  # other words than the held-out suite's
    hand = {"agriculturalist": "6", "ekkehard": "2"}  # counted by hand from their ARPAbet vowels
    assert {w: syllables[w] for w in hand} == hand
    hand = {  # from the ISO 3166-2 and 639-3 tables
        "region-code": {"Region: Bayern (Germany)": "DE-BY"},
        "region-type": {"Region: Bayern (Germany)": "Land"},
        "language-code": {"Language: Esperanto": "epo", "Language: Ghotuo": "aaa"},
        "language-type": {"Language: Esperanto": "constructed", "Language: Ghotuo": "living"},
    }
    for domain, expected in hand.items():
        assert {r["prompt"]: r["response"] for r in records[domain] if r["prompt"] in expected} == expected
