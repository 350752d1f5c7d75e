"""Tiny Hugging Face models built from configs, shared by the tests."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from molora import MoLoRAConfig
from molora.core.routers import ROUTERS as ROUTER_CLASSES

hf_logging.set_verbosity_error()

# Every hypothesis test draws the same examples on every run (no database, derandomized): CI is deterministic, and a
# failure reproduces. A test's own @settings (max_examples, deadline) keeps these.
settings.register_profile("molora", derandomize=True, database=None, deadline=None)
settings.load_profile("molora")

VOCAB = 64
ROUTERS = ["softmax", "topk", "switch", "intuition", "task"]
EXPERT_TYPES = ["lora", "rank1"]
ARCHS = ["llama", "gpt2", "bert"]
NUM_TASKS = 3


# Llama and Qwen2 share these sizes (same module names, so the same targets)
LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def build_base(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **sizes) -> torch.nn.Module:
    """A tiny random model; `sizes` override the Llama/Qwen2 config (e.g. hidden_size)."""
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**{**LLAMA_LIKE, **sizes}))
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        model = GPT2LMHeadModel(config)
    elif arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        model = Qwen2ForCausalLM(Qwen2Config(**{**LLAMA_LIKE, **sizes}))
    elif arch == "bart":
        from transformers import BartConfig, BartForConditionalGeneration

        config = BartConfig(
            vocab_size=VOCAB,
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_position_embeddings=64,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_eos_token_id=None,
            forced_bos_token_id=None,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
        )
        model = BartForConditionalGeneration(config)
    elif arch == "bert":
        config = BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        model = BertModel(config, add_pooling_layer=False)
    else:
        raise ValueError(arch)
    return model.to(dtype).eval()


TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "c_fc"],
    "bert": ["query", "value"],
    "bart": ["q_proj", "k_proj", "v_proj", "fc1"],
}


def molora_config(arch: str, router: str = "softmax", expert_type: str = "lora", **overrides) -> MoLoRAConfig:
    options = dict(
        target_modules=TARGETS[arch],
        num_experts=4,
        expert_type=expert_type,
        rank=4,
        alpha=8,
        router=router,
        num_tasks=NUM_TASKS if ROUTER_CLASSES[router].needs_task_ids else None,
        intuition_pooling="mean" if arch in ("bert", "bart") else "causal",
    )
    options.update(overrides)
    return MoLoRAConfig(**options)


def outputs_of(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def make_batch(batch: int = 2, length: int = 9, seed: int = 1, pad_last: int = 0) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask; the last `pad_last` positions of row 0 are right padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad_last:
        mask[0, length - pad_last :] = 0
        ids[0, length - pad_last :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def task_ids_for(router: str, batch: int = 2) -> torch.Tensor | None:
    return torch.arange(batch) % NUM_TASKS if ROUTER_CLASSES[router].needs_task_ids else None


def cache_kwarg(model, cache) -> dict:
    """The KV cache keyword the base model's forward takes: transformers 5.24 renamed past_key_values to cache."""
    import inspect

    base = getattr(model, "base_model", model)
    return {"cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values": cache}


def randomize_experts(model) -> None:
    """Give every expert and router tensor random values (so the adapter is not a no-op)."""
    torch.manual_seed(123)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.normal_(0, 0.3 if "lora" in name or name.endswith((".u", ".v")) else 0.5)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# `pytest -n 2` (CI): two workers on two cores take one thread each, or they fight over the cores (the suite took
# over 10 min instead of under 4); the processes they start inherit it, so a run in a subprocess sums in the same
# order as one in the worker and the bitwise resume tests compare like with like.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
