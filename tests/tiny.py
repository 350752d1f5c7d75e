"""A tiny Llama with a byte-level tokenizer, saved to a folder, and toy domains as JSONL: trainer tests in seconds."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def save_tiny_model(path: Path, hidden_size: int = 32, intermediate_size: int = 64) -> Path:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<eos>": 1} | {ch: i + 2 for i, ch in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        initializer_range=0.2,  # a frozen lm_head at the default 0.02 cannot make peaked logits
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_toy_domains(path: Path, per_domain: int = 60, seed: int = 0) -> Path:
    """Two learnable domains: upper-case a word, reverse a word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(per_domain):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6)))
        rows.append({"domain": "upper", "prompt": f"up {word}", "response": word.upper()})
        rows.append({"domain": "reverse", "prompt": f"rev {word}", "response": word[::-1]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def replay_two_ranks(monkeypatch) -> None:
    """One process sees a two-process run's global batches (run it with grad_accum=2): micro-batch m of step s is
    rank m's slice of global batch s, so the mean of the two gradients is what the ranks' reduction makes."""
    from molora.run.data import MultiDomainData

    original = MultiDomainData.train_batch

    def as_rank(self, index, batch_size, rank=0, world_size=1):
        return original(self, index // 2, batch_size, rank=index % 2, world_size=2)

    monkeypatch.setattr(MultiDomainData, "train_batch", as_rank)


def tiny_run_config(model_dir: Path, data_file: Path, **train) -> dict:
    return {
        "model": {"name": str(model_dir)},
        "data": {
            "domains": ["upper", "reverse"],
            "files": [str(data_file)],
            "max_length": 32,
            "max_eval_per_domain": 8,
        },
        "molora": {
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "num_experts": 4,
            "rank": 4,
            "alpha": 8,
            "router": "topk",
            "aux_losses": {"balance": 0.01, "z": 0.001},
        },
        "train": {
            "steps": 30,
            "batch_size": 8,
            "lr": 0.01,
            "warmup_steps": 2,
            "log_every": 5,
            "progress": False,
            **train,
        },
    }
