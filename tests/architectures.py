"""The architecture grid: every model type transformers registers, as a tiny model built from its config.

The families come from transformers' own auto mappings (causal LMs, seq2seq, speech seq2seq, encoders, image
classifiers), so a new release's new types join the grid by themselves. A type whose tiny model cannot be built or
cannot run on its own (a vision tower, a tokenizer-specific config, a kernel, a config that a generic shrink
breaks) is excluded with that reason, found by running the base model alone: molora is never blamed for it.

`python -m tests.architectures` writes the list (docs/architectures.md).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForSpeechSeq2Seq,
)
from transformers.models.auto import modeling_auto

BATCH, PROMPT, NEW_TOKENS = 2, 5, 3
VOCAB = 128
MAX_PARAMETERS = 3_000_000  # a config the shrink leaves large (a vision tower, a fixed-size part) is not tiny
DECODE_TOLERANCE = 1e-4

# Size fields of transformers' configs (each config takes those it has), small enough for CPU tests in milliseconds.
TINY_SIZES = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "n_embed", "embed_dim", "word_embed_proj_dim"), 32),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers"), 2),
    **dict.fromkeys(("encoder_layers", "num_decoder_layers"), 2),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "decoder_attention_heads"), 4),
    **dict.fromkeys(("encoder_attention_heads",), 4),
    **dict.fromkeys(("num_key_value_heads", "multi_query_group_num"), 2),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "n_inner", "decoder_ffn_dim", "encoder_ffn_dim", "d_ff"), 64),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size"), 32),
    **dict.fromkeys(("head_dim", "d_kv", "kv_channels"), 8),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts"), 4),
    **dict.fromkeys(("q_lora_rank", "kv_lora_rank"), 16),
    **dict.fromkeys(("qk_rope_head_dim", "qk_nope_head_dim"), 4),  # multi-head latent attention: 4 + 4 = head_dim
    **dict.fromkeys(("v_head_dim", "rotary_dim"), 8),
    "num_experts_per_tok": 2,
    # state-space layers (Mamba-2 and its hybrids): heads x head size = expand x hidden; short chunks, or the plain
    # torch path pads every call to 256 positions
    **dict.fromkeys(("mamba_n_heads", "mamba_d_head"), 8),
    "mamba_d_ssm": 64,
    **dict.fromkeys(("mamba_d_state", "ssm_state_size", "mamba_chunk_size", "chunk_size"), 16),
    "vocab_size": VOCAB,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 0,
    # vision and speech inputs
    "image_size": 32,
    "patch_size": 8,
    "num_channels": 3,
    "num_mel_bins": 16,
    "max_source_positions": 16,
}


@dataclass(frozen=True)
class Family:
    name: str
    mapping: str  # the transformers.models.auto.modeling_auto mapping that lists its model types
    auto_class: Callable
    generates: bool


FAMILIES = (
    Family("causal", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", AutoModelForCausalLM, True),
    Family("seq2seq", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", AutoModelForSeq2SeqLM, True),
    Family("speech-seq2seq", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", AutoModelForSpeechSeq2Seq, True),
    Family("encoder", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", AutoModelForSequenceClassification, False),
    Family("vision", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", AutoModelForImageClassification, False),
)
FAMILY = {family.name: family for family in FAMILIES}


def model_types(family: Family) -> list[str]:
    return sorted(getattr(modeling_auto, family.mapping))


def grid() -> list[tuple[str, str]]:
    """(family, model type) for every registered type."""
    return [(family.name, model_type) for family in FAMILIES for model_type in model_types(family)]


class Excluded(Exception):
    """The tiny model of this type cannot be built or cannot run by itself; the message says why."""


# Fields that must agree with the layer count and have no generic small value.
TYPE_SIZES = {"gpt_neo": {"attention_types": [[["global", "local"], 1]]}, "mamba2": {"num_heads": 8}}


def tiny_config(model_type: str):
    default = AutoConfig.for_model(model_type)
    present = set(default.to_dict()) | set(getattr(default, "attribute_map", {}))
    sizes = {k: v for k, v in TINY_SIZES.items() if k in present} | TYPE_SIZES.get(model_type, {})
    if "kv_lora_rank" in sizes and "head_dim" in sizes:  # multi-head latent attention: head_dim is the rope part
        sizes["head_dim"] = sizes["qk_rope_head_dim"]
    config = AutoConfig.for_model(model_type, **sizes)
    if getattr(config, "is_encoder_decoder", False) and getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = TINY_SIZES["decoder_start_token_id"]  # T5's config has none of its own
    return config


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160] if text else ''}"


@cache
def _checked_config(family_name: str, model_type: str):
    """The tiny config of a type, or Excluded: too large, or its model fails to build on the meta device."""
    family = FAMILY[family_name]
    try:
        config = tiny_config(model_type)
        if family.name == "encoder" and model_type not in modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
            family = Family("encoder", family.mapping, AutoModelForMaskedLM, False)
        with torch.device("meta"):
            size = sum(p.numel() for p in family.auto_class.from_config(config).parameters())
    except Exception as err:  # any failure of transformers itself to build it
        raise Excluded(f"does not build from a small config ({_first_line(err)})") from None
    if size > MAX_PARAMETERS:
        raise Excluded(f"{size:,} parameters after shrinking its config (a part of fixed size)")
    return config, family.auto_class


def build(family_name: str, model_type: str, seed: int = 0) -> torch.nn.Module:
    """The tiny model, the same weights for the same seed (eval mode); Excluded when it cannot be built."""
    config, auto_class = _checked_config(family_name, model_type)
    torch.manual_seed(seed)
    try:
        return auto_class.from_config(config).eval()
    except Exception as err:
        raise Excluded(f"does not build from a small config ({_first_line(err)})") from None


def model_inputs(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch for the model's main input (token ids, pixels, log-mel features), with an attention mask for text."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    name = model.main_input_name
    if name == "input_ids":
        ids = torch.randint(3, VOCAB, (BATCH, PROMPT), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name == "pixel_values" and hasattr(config, "image_size") and hasattr(config, "num_channels"):
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        return {"pixel_values": torch.randn(BATCH, config.num_channels, size, size, generator=generator)}
    if name == "input_features" and hasattr(config, "num_mel_bins") and hasattr(config, "max_source_positions"):
        frames = 2 * config.max_source_positions  # Whisper's convolutions halve the frames
        return {"input_features": torch.randn(BATCH, config.num_mel_bins, frames, generator=generator)}
    raise Excluded(f"main input {name!r} of a shape this grid does not make")


def forward_inputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inputs of a plain forward (no labels): an encoder-decoder gets decoder ids of its own."""
    if not model.config.is_encoder_decoder:
        return inputs
    generator = torch.Generator().manual_seed(2)
    return inputs | {"decoder_input_ids": torch.randint(3, VOCAB, (BATCH, PROMPT), generator=generator)}


def labels_for(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    if model.config.is_encoder_decoder:
        return {"labels": torch.randint(3, VOCAB, (BATCH, PROMPT), generator=generator)}
    if "input_ids" in inputs and model.get_output_embeddings() is not None:
        return {"labels": inputs["input_ids"]}
    return {"labels": torch.randint(0, model.config.num_labels, (BATCH,), generator=generator)}


def generation_options() -> dict:
    return dict(
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        num_beams=1,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )


def decoding_gap(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], generate_options=(), *, relative: bool = False, **routing
) -> float:
    """Largest difference between generate()'s raw logits (cached decoding) and one full forward of the result;
    `relative` divides it by the largest logit (at least 1): fp32 rounding grows with the logits, and the order of a
    sum differs between a cached step and a full forward by CPU (mt5: 1.3e-4 absolute on an AMD EPYC, under 1e-4 on
    the machine the grid was written on)."""
    with torch.no_grad():
        out = model.generate(**inputs, **routing, **generation_options(), **dict(generate_options))
        steps = torch.stack(out.logits, dim=1).float()  # [B, new, V]
        sequences = out.sequences
        if model.config.is_encoder_decoder:
            full = model(**inputs, decoder_input_ids=sequences, **routing).logits[:, :NEW_TOKENS]
        else:
            mask = torch.ones_like(sequences)
            full = model(input_ids=sequences, attention_mask=mask, **routing).logits[:, PROMPT - 1 : -1]
    gap = (steps - full.float()).abs().max().item()
    return gap / max(1.0, full.float().abs().max().item()) if relative else gap


# Types whose generate() is not a cached continuation of the full forward, whatever the adapter.
DECODING_NOT_COMPARABLE = {
    "xlnet": "generate() predicts at an appended dummy token with a permutation mask (XLNet's own decoding), so a "
    "router that reads the sequence sees one more token than the full forward of the result",
}


@cache
def base_check(family_name: str, model_type: str) -> str | None:
    """Runs the base model alone: Excluded if its forward (or, for a generating family, generate) fails; returns
    why its own cached decoding cannot be compared with full forwards, or None when it can."""
    model = build(family_name, model_type)
    inputs = model_inputs(model)
    try:
        with torch.no_grad():
            model(**forward_inputs(model, inputs))
            model(**inputs, **labels_for(model, inputs))
    except Exception as err:
        raise Excluded(f"the base model alone fails a forward ({_first_line(err)})") from None
    if not FAMILY[family_name].generates:
        return None
    if model_type in DECODING_NOT_COMPARABLE:
        return DECODING_NOT_COMPARABLE[model_type]
    try:
        gap = decoding_gap(model, inputs)
    except Exception as err:
        raise Excluded(f"the base model alone fails generate() ({_first_line(err)})") from None
    if not gap <= DECODE_TOLERANCE:
        return f"the base model's own cached decoding differs from its full forward by {gap:.2g}"
    return None


def survey() -> dict[str, list[tuple[str, str]]]:
    """{family: [(model type, why excluded or '')]} for the whole grid."""
    found: dict[str, list[tuple[str, str]]] = {}
    for family_name, model_type in grid():
        try:
            note = base_check(family_name, model_type) or ""
            note = f"in the grid; decoding not compared: {note}" if note else ""
        except Excluded as err:
            note = f"excluded: {err}"
        found.setdefault(family_name, []).append((model_type, note))
    return found


def write_survey(path: Path) -> None:
    import transformers

    found = survey()
    lines = [
        "# Architectures in the grid",
        "",
        f"transformers {transformers.__version__}; written by `python -m tests.architectures {path}`; tested by "
        "`tests/model/test_architectures.py` (every type listed here, whatever the release: a type excluded here is "
        "one whose tiny model fails to build or to run without molora).",
        "",
    ]
    for family, rows in found.items():
        tested = [t for t, note in rows if not note.startswith("excluded")]
        lines += [
            f"## {family}: {len(tested)} of {len(rows)} types in the grid",
            "",
            f"In the grid: {', '.join(tested)}.",
        ]
        lines += ["", "| type | why not |", "|---|---|"]
        # brackets escaped: an error's `x['a']['b']` would read as a Markdown reference link on the docs site
        lines += [f"| {t} | {note.replace('|', '/').replace('[', chr(92) + '[')} |" for t, note in rows if note]
        lines.append("")
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    write_survey(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/architectures.md"))
