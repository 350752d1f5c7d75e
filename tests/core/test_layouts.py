"""Modules whose input is not [batch, length, features] of the call's tokens, and PEFT's target spellings.

Each case failed before the layer learnt the call's token shape (issue 31): OPT's FFN sees the tokens flattened to
[batch * length, d]; a pooler sees [batch, d]; XLNet lays its states out [length, batch, d]; Llama 4's MoE router is
an nn.Linear whose forward returns a tuple."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    OPTConfig,
    OPTForCausalLM,
    XLNetConfig,
    XLNetLMHeadModel,
)

from molora import MoLoRAConfig, get_molora_model
from molora.core.context import RoutingContext, routing_context
from molora.core.routers import ROUTERS
from tests.architectures import build
from tests.conftest import build_base

TASK_IDS = torch.tensor([0, 1, 1])


def randomise(model, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def config(router: str, targets, **overrides) -> MoLoRAConfig:
    options = dict(target_modules=targets, num_experts=4, rank=2, alpha=4, router=router, aux_losses={"balance": 0.01})
    # (aux losses on: each layer keeps its last routing and token mask, which some tests read)
    if ROUTERS[router].needs_task_ids:
        options["num_tasks"] = 2
    return MoLoRAConfig(**{**options, **overrides})


def routing(router: str) -> dict:
    return {"task_ids": TASK_IDS} if ROUTERS[router].needs_task_ids else {}


def tiny_opt(seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    cfg = OPTConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0,
    )  # fmt: skip
    return OPTForCausalLM(cfg).eval()


@pytest.mark.parametrize("seed", range(5))
def test_opt_ffn_sees_flattened_tokens_and_intuition_decoding_equals_full_forwards(seed):
    model = get_molora_model(tiny_opt(), config("intuition", ["q_proj", "v_proj", "fc1", "fc2"]))
    randomise(model, seed)
    model.eval()
    ids = torch.randint(3, 64, (3, 6), generator=torch.Generator().manual_seed(seed))
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=1,
    )  # fmt: skip
    with torch.no_grad():
        full = model(input_ids=out.sequences, attention_mask=torch.ones_like(out.sequences)).logits
    torch.testing.assert_close(torch.stack(out.logits, 1), full[:, 5:-1], rtol=0, atol=1e-4)


def test_flattened_tokens_are_routed_as_the_sequences_they_are():
    """fc1 of OPT reads [batch * length, d]: its causal pooling must run along each sequence, so a token's gate does
    not depend on the other sequences of the batch."""
    ids = torch.randint(3, 64, (3, 7), generator=torch.Generator().manual_seed(0))
    model = get_molora_model(tiny_opt(), config("intuition", ["fc1"]))
    randomise(model)
    with torch.no_grad():
        batched = model(input_ids=ids).logits
        alone = torch.cat([model(input_ids=ids[i : i + 1]).logits for i in range(3)])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_flattened_tokens_pool_along_their_sequence():
    """fc1's causal pooling reads the earlier tokens of its own sequence: changing token 1 moves the gates of the
    tokens after it, not of token 0 (as rows of their own, no gate would move at all)."""
    model = get_molora_model(tiny_opt(), config("intuition", ["fc1"]))
    randomise(model)
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    changed = ids.clone()
    changed[:, 1] = (ids[:, 1] + 7) % 61 + 3
    fc1 = model.base_model.model.decoder.layers[1].fc1
    gates = []
    with torch.no_grad():
        for batch in (ids, changed):
            model(input_ids=batch, attention_mask=torch.ones_like(batch))
            gates.append(fc1.last_route[0].gates.clone())
    assert gates[0].shape == (2, 6, 4)
    torch.testing.assert_close(gates[0][:, 0], gates[1][:, 0])  # causal: token 0 does not see token 1
    assert (gates[0][:, 2:] - gates[1][:, 2:]).abs().amax() > 1e-4


def test_a_module_that_reads_the_cache_again_keeps_the_padding_mask_while_decoding():
    """Doge reads the cached values again at every step: its pooled routing must exclude left padding then too."""
    model = get_molora_model(build("causal", "doge"), config("intuition", "all-linear"))
    randomise(model)
    model.eval()
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    full_mask = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], 1)
    # the last step's dt_proj read all 8 positions so far; its balance loss counts the real ones only
    route_mask = model.base_model.model.layers[0].self_attn.dt_proj.last_route[1]
    assert route_mask is not None and torch.equal(route_mask, full_mask[:, :-1].bool())
    positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        full = model(input_ids=out.sequences, attention_mask=full_mask, position_ids=positions).logits[:, 5:-1]
    torch.testing.assert_close(torch.stack(out.logits, 1), full, rtol=0, atol=1e-4)


def tiny_bert_classifier(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )  # fmt: skip
    return BertForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_a_pooler_that_sees_batch_by_features_trains_under_every_router(router):
    model = get_molora_model(tiny_bert_classifier(), config(router, ["query", "value", "dense"]))
    assert "bert.pooler.dense" in {m.name for m in model.injection_report.modules}
    randomise(model)
    model.train()
    ids = torch.randint(3, 64, (3, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 2]), **routing(router))
    (out.loss + model.aux_loss()).backward()
    pooler = model.base_model.bert.pooler.dense
    assert all(torch.isfinite(p.grad).all() for p in pooler.experts.parameters())
    # each row is a sequence of its own: its gates are the router's on that row alone, whatever the batch
    route = pooler.last_route[0]
    assert route.gates.shape == (3, 1, 4) and pooler.last_route[1] is None  # no padding mask on rows
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **routing(router))
        batched = pooler.last_route[0].gates
        for row in range(3):
            task = {"task_ids": TASK_IDS[row : row + 1]} if routing(router) else {}
            model(input_ids=ids[row : row + 1, : int(mask[row].sum())], **task)
            torch.testing.assert_close(pooler.last_route[0].gates, batched[row : row + 1], rtol=1e-5, atol=1e-6)


def test_a_real_mask_mismatch_still_names_the_mismatch():
    model = get_molora_model(tiny_bert_classifier(), config("softmax", ["query", "value", "dense"]))
    ids = torch.randint(3, 64, (3, 8))
    with pytest.raises(ValueError, match="attention_mask has batch size 2, but the model input has batch size 3"):
        model(input_ids=ids, attention_mask=torch.ones(2, 8, dtype=torch.long))


def test_rows_that_match_neither_sequences_nor_tokens_refuse_the_task_router_naming_the_module():
    layer = get_molora_model(build_base("llama"), config("task", ["q_proj"])).base_model.model.layers[0].self_attn
    context = routing_context(RoutingContext(task_ids=torch.tensor([0, 1])))
    with context, pytest.raises(ValueError, match="q_proj reads 3 rows"):
        layer.q_proj(torch.randn(3, 32))


@pytest.mark.parametrize("router", ["task", "intuition", "softmax"])
def test_sequence_first_states_are_routed_per_sequence(router):
    """XLNet's FFN reads [length, batch, d]: each sequence gets its own task and pooling, as when run alone."""
    torch.manual_seed(0)
    cfg = XLNetConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, d_inner=64, dropout=0.0, pad_token_id=0)
    model = get_molora_model(XLNetLMHeadModel(cfg).eval(), config(router, ["layer_1", "layer_2"]))
    randomise(model)
    ids = torch.randint(3, 64, (3, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        batched = model(input_ids=ids, **routing(router)).logits
        for row in range(3):
            task = {"task_ids": TASK_IDS[row : row + 1]} if routing(router) else {}
            alone = model(input_ids=ids[row : row + 1], **task).logits
            torch.testing.assert_close(alone, batched[row : row + 1], rtol=1e-5, atol=1e-5)


# PEFT's target spellings -----------------------------------------------------------------------------------------


def peft_targets(model) -> set[str]:
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, BaseTunerLayer)}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert-classifier", "t5"])
def test_all_linear_adapts_what_peft_adapts(arch):
    """Llama's untied head, GPT-2's Conv1D and tied head, a classifier (no output embeddings: its head is adapted, as
    in PEFT without task_type), T5's tied encoder-decoder head."""

    def make():
        if arch == "bert-classifier":
            return tiny_bert_classifier()
        if arch == "t5":
            return build("seq2seq", "t5")
        return build_base(arch)

    spelled = "ALL-LINEAR" if arch == "gpt2" else "all-linear"  # PEFT compares it case-insensitively
    report = get_molora_model(make(), MoLoRAConfig(target_modules=spelled, rank=2)).injection_report
    assert {m.name for m in report.modules} == peft_targets(make())
    assert report.left_out == []


def test_all_linear_leaves_out_a_linear_whose_forward_is_not_its_map_and_says_so():
    """Llama 4's MoE router subclasses nn.Linear and returns (scores, logits): PEFT adapts it and the forward fails."""
    model = build("causal", "llama4_text")
    molora = get_molora_model(model, MoLoRAConfig(target_modules="all-linear", rank=2))
    routers = [n for n, _ in model.named_modules() if n.endswith("feed_forward.router")]
    assert routers and molora.injection_report.left_out == routers
    assert "left out of all-linear" in str(molora.injection_report)
    ids = torch.randint(3, 100, (2, 5))
    molora(input_ids=ids, labels=ids).loss.backward()


def test_an_explicit_target_whose_forward_is_not_its_linear_map_fails_naming_it():
    molora = get_molora_model(build("causal", "llama4_text"), MoLoRAConfig(target_modules=["router"], rank=2))
    with pytest.raises(TypeError, match=r"feed_forward.router \(Llama4Router\) returns a tuple"):
        molora(input_ids=torch.randint(3, 100, (2, 5)))


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (["all-linear"], "a shorthand on its own"),
        (["q_proj", "all-linear"], "a shorthand on its own"),
        (None, "PEFT's per-architecture default"),
    ],
)
def test_peft_spellings_molora_does_not_take_are_refused_saying_so(targets, message):
    with pytest.raises(ValueError, match=message):
        MoLoRAConfig(target_modules=targets)


def test_a_set_of_names_as_peft_allows_becomes_a_sorted_list():
    assert MoLoRAConfig(target_modules={"v_proj", "q_proj"}).target_modules == ["q_proj", "v_proj"]
