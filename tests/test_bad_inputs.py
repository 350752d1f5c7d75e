"""Bad input gets a clear error, raised before anything runs or is written, and nothing else.

Adapters that do not fit the model name every module and both shapes; malformed batches are refused before the
base model is called; bad rows of the user's data files name the file and the (1-based) line.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaForCausalLM

from molora import get_molora_model
from molora.cli import train_main
from molora.core.context import RoutingContext, routing_context
from molora.core.layer import MoLoRALinear
from molora.model import MoLoRAModel
from molora.run.data import DataConfig, load_records, read_user_files, tokenize_split
from tests.adapter_files import resign
from tests.conftest import TARGETS, build_base, cache_kwarg, make_batch, molora_config, outputs_of, randomize_experts
from tests.tiny import save_tiny_model, tiny_run_config, write_toy_domains

# Adapters that do not fit ---------------------------------------------------------------------------------------


def saved_adapter(path: Path, arch: str = "llama", **overrides) -> MoLoRAModel:
    model = get_molora_model(build_base(arch), molora_config(arch, **overrides))
    randomize_experts(model)
    model.save_pretrained(path)
    return model


def adapter_snapshot(model: MoLoRAModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "molora_config.json").read_text())
    config.update(changes)
    config.pop("sha256", None)  # edited on purpose: the checksum would refuse it before anything else is checked
    (path / "molora_config.json").write_text(json.dumps(config))


def wide_llama(hidden: int = 48) -> LlamaForCausalLM:
    """The conftest llama with another hidden size (same module names, other shapes)."""
    return build_base("llama", hidden_size=hidden)


def adapted_linears(model: torch.nn.Module, targets: list[str]) -> dict[str, torch.nn.Linear]:
    """The base model's own target modules, found without molora (the reference for the expected shapes)."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in targets)
    }


def test_adapter_of_another_hidden_size_names_every_module_and_both_shapes(tmp_path):
    saved_adapter(tmp_path)
    old = adapted_linears(build_base("llama"), TARGETS["llama"])
    base = wide_llama()
    new = adapted_linears(base, TARGETS["llama"])
    with pytest.raises(ValueError, match="does not fit") as err:
        MoLoRAModel.from_pretrained(base, tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message
    assert len(old) == 6 and set(old) == set(new)
    for name in old:
        a, b = old[name], new[name]
        shapes = {
            "experts.lora_A": ([4, 4, a.in_features], [4, 4, b.in_features]),
            "experts.lora_B": ([4, 4, a.out_features], [4, 4, b.out_features]),
            "router.gate.weight": ([4, a.in_features], [4, b.in_features]),
        }
        for tensor, (checkpoint, mine) in shapes.items():
            line = f"{name}.{tensor}: checkpoint {checkpoint} vs model {mine}"
            assert (line in message) == (checkpoint != mine), line
    assert "model.layers.0.self_attn.q_proj.router.gate.weight: checkpoint [4, 32] vs model [4, 48]" in message


@pytest.mark.parametrize(
    ("change", "lines"),
    [
        (
            {"num_experts": 2},
            [
                "model.layers.1.mlp.down_proj.experts.lora_A: checkpoint [4, 4, 48] vs model [2, 4, 48]",
                "model.layers.1.mlp.down_proj.router.gate.weight: checkpoint [4, 48] vs model [2, 48]",
            ],
        ),
        (
            {"rank": 2},
            [
                "model.layers.0.self_attn.q_proj.experts.lora_A: checkpoint [4, 4, 32] vs model [4, 2, 32]",
                "model.layers.0.self_attn.v_proj.experts.lora_B: checkpoint [4, 4, 16] vs model [4, 2, 16]",
            ],
        ),
        (
            {"target_modules": ["q_proj", "k_proj"]},
            [
                "missing (in the model, not in the checkpoint):\n"
                "    model.layers.0.self_attn.k_proj: experts.lora_A, experts.lora_B, router.gate.weight\n"
                "    model.layers.1.self_attn.k_proj: experts.lora_A, experts.lora_B, router.gate.weight\n",
                "unexpected (in the checkpoint, not in the model):\n"
                "    model.layers.0.mlp.down_proj: experts.lora_A, experts.lora_B, router.gate.weight\n"
                "    model.layers.0.self_attn.v_proj: experts.lora_A, experts.lora_B, router.gate.weight\n",
            ],
        ),
    ],
    ids=["num_experts", "rank", "target_modules"],
)
def test_a_config_that_disagrees_with_its_weights_is_caught(tmp_path, change, lines):
    saved_adapter(tmp_path)
    edit_config(tmp_path, **change)
    with pytest.raises(ValueError, match="does not fit") as err:
        MoLoRAModel.from_pretrained(build_base("llama"), tmp_path)
    for line in lines:
        assert line in str(err.value)


def test_adapter_of_another_architecture(tmp_path):
    llama = saved_adapter(tmp_path)
    gpt2 = get_molora_model(build_base("gpt2"), molora_config("gpt2"))
    with pytest.raises(ValueError) as err:
        gpt2.load_adapter_state_dict(llama.adapter_state_dict())
    message = str(err.value)
    assert "transformer.h.0.attn.c_attn: experts.lora_A, experts.lora_B, router.gate.weight" in message
    assert "model.layers.1.mlp.down_proj: experts.lora_A, experts.lora_B, router.gate.weight" in message
    # from_pretrained cannot even inject the llama config into gpt2; the model is left as it was
    base = build_base("gpt2")
    with pytest.raises(ValueError, match="target_modules: 'q_proj' matches no module in GPT2LMHeadModel"):
        MoLoRAModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, MoLoRALinear) for m in base.modules())


def misfit_state(model: MoLoRAModel) -> dict[str, torch.Tensor]:
    """Another adapter's values for every tensor, one of them of the wrong shape."""
    other = get_molora_model(build_base("llama", seed=5), molora_config("llama"))
    torch.manual_seed(7)
    state = {k: torch.randn_like(v) for k, v in other.adapter_state_dict().items()}
    state["model.layers.0.self_attn.q_proj.experts.lora_A"] = torch.randn(4, 2, 32)
    assert state.keys() == model.adapter_state_dict().keys()
    return state


def test_a_strict_load_that_fails_changes_nothing():
    model = get_molora_model(build_base("llama"), molora_config("llama"))
    randomize_experts(model)
    before = adapter_snapshot(model)
    with pytest.raises(ValueError, match=r"q_proj\.experts\.lora_A: checkpoint \[4, 2, 32\] vs model \[4, 4, 32\]"):
        model.load_adapter_state_dict(misfit_state(model))
    after = adapter_snapshot(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_non_strict_load_copies_what_fits_and_reports_the_rest_so_the_no_change_test_can_fail():
    model = get_molora_model(build_base("llama"), molora_config("llama"))
    randomize_experts(model)
    before = adapter_snapshot(model)
    state = misfit_state(model)
    state["model.layers.0.mlp.up_proj.experts.lora_A"] = torch.zeros(4, 4, 32)
    bad = "model.layers.0.self_attn.q_proj.experts.lora_A"
    with pytest.warns(UserWarning, match=r"1 unexpected, 1 of another shape") as record:
        result = model.load_adapter_state_dict(state, strict=False)
    assert "model.layers.0.mlp.up_proj: experts.lora_A" in str(record[0].message)
    assert result.missing_keys == [] and result.unexpected_keys == ["model.layers.0.mlp.up_proj.experts.lora_A"]
    assert result.mismatched_keys == [(bad, [4, 2, 32], [4, 4, 32])]
    after = adapter_snapshot(model)
    assert torch.equal(after[bad], before[bad])
    assert sorted(result.loaded_keys) == sorted(set(before) - {bad})
    for key in result.loaded_keys:
        assert torch.equal(after[key], state[key]) and not torch.equal(after[key], before[key])


def test_from_pretrained_that_fails_gives_the_base_model_back_and_non_strict_loads_what_fits(tmp_path):
    saved = saved_adapter(tmp_path)
    edit_config(tmp_path, target_modules=["q_proj", "k_proj"])
    base = build_base("llama")
    reference = outputs_of(base(**make_batch())).detach()
    hooks = len(base._forward_pre_hooks), len(base._forward_hooks)
    with pytest.raises(ValueError, match="k_proj"):
        MoLoRAModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, MoLoRALinear) for m in base.modules())
    assert (len(base._forward_pre_hooks), len(base._forward_hooks)) == hooks
    assert all(p.requires_grad for p in base.parameters())
    assert torch.equal(outputs_of(base(**make_batch())).detach(), reference)

    with pytest.warns(UserWarning, match="does not fit"):
        loaded = MoLoRAModel.from_pretrained(base, tmp_path, strict=False)
    result = loaded.load_result
    modules = {k.split(".experts.")[0].split(".router.")[0] for k in result.missing_keys}
    assert modules == {f"model.layers.{i}.self_attn.k_proj" for i in range(2)}
    q_key = "model.layers.0.self_attn.q_proj.experts.lora_A"
    assert q_key in result.loaded_keys
    assert torch.equal(loaded.adapter_state_dict()[q_key], saved.adapter_state_dict()[q_key])


def test_a_clean_load_reports_nothing(tmp_path):
    saved_adapter(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = MoLoRAModel.from_pretrained(build_base("llama"), tmp_path, strict=False)
    assert loaded.load_result.ok and len(loaded.load_result.loaded_keys) == 18


def test_a_weights_file_that_is_not_safetensors_is_a_value_error(tmp_path):
    saved_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="their sha256 differs"):
        MoLoRAModel.from_pretrained(build_base("llama"), tmp_path)
    resign(tmp_path)  # the checksum recomputed: the header check behind it refuses the file
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: its header claims \d+ bytes, the file has 22"):
        MoLoRAModel.from_pretrained(build_base("llama"), tmp_path)


@pytest.mark.parametrize(("content", "message"), [("{not json", "is not valid JSON"), ("[1, 2]", "JSON object")])
def test_a_malformed_config_file_is_a_value_error_naming_it(tmp_path, content, message):
    saved_adapter(tmp_path)
    (tmp_path / "molora_config.json").write_text(content)
    with pytest.raises(ValueError, match=message) as raised:
        MoLoRAModel.from_pretrained(build_base("llama"), tmp_path)
    assert "molora_config.json" in str(raised.value)


# Malformed batches ----------------------------------------------------------------------------------------------


def counted_model(router: str, **overrides) -> tuple[MoLoRAModel, list[int]]:
    """A model and a list whose length is the number of times its base model ran."""
    model = get_molora_model(build_base("llama"), molora_config("llama", router, **overrides))
    calls: list[int] = []
    model.base_model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return model, calls


PROMPT = dict(intuition_pooling="prompt")
BAD_FORWARD = [
    pytest.param(
        "task", {}, {"task_ids": [0.0, 1.0]}, r"task_ids must be integers .* got dtype torch\.float32", id="float-list"
    ),
    pytest.param("task", {}, {"task_ids": torch.tensor([0.7, 1.2])}, "task_ids must be integers", id="float-tensor"),
    pytest.param("task", {}, {"task_ids": [True, False]}, r"task_ids must be integers .* torch\.bool", id="bool"),
    pytest.param(
        "task", {}, {"task_ids": "01"}, "task_ids must be a tensor or a list of numbers, got str", id="string"
    ),
    pytest.param("task", {}, {"task_ids": [[0, 1]]}, r"task_ids must be \[batch\], got shape \[1, 2\]", id="2-d"),
    pytest.param(
        "task", {}, {"task_ids": [0, 1, 2]}, "task_ids has 3 entries but input_ids has batch size 2", id="too-many"
    ),
    pytest.param("task", {}, {"task_ids": [1]}, "task_ids has 1 entries but input_ids has batch size 2", id="too-few"),
    pytest.param(
        "task", {}, {"task_ids": [0, 3]}, r"task_ids must be in \[0, num_tasks=3\), got \[0, 3\]", id="too-large"
    ),
    pytest.param("task", {}, {"task_ids": [-1, 0]}, r"task_ids must be in \[0, num_tasks=3\)", id="negative"),
    pytest.param("task", {}, {}, "router='task' needs task_ids", id="missing"),
    pytest.param(
        "topk",
        {"num_tasks": 3},
        {"task_ids": [0, 5]},
        r"task_ids must be in \[0, num_tasks=3\)",
        id="range-without-task-router",
    ),
    pytest.param("topk", {}, {"task_ids": [0, -2]}, "task_ids must be >= 0", id="negative-without-num-tasks"),
    pytest.param(
        "intuition",
        PROMPT,
        {"prompt_mask": torch.ones(2, 8)},
        r"prompt_mask must be \[batch, seq\] = \[2, 9\]",
        id="mask-short",
    ),
    pytest.param(
        "intuition",
        PROMPT,
        {"prompt_mask": torch.ones(1, 9)},
        r"= \[2, 9\] like input_ids, got \[1, 9\]",
        id="mask-batch",
    ),
    pytest.param(
        "intuition",
        PROMPT,
        {"prompt_mask": torch.ones(2, 10)},
        r"= \[2, 9\] like input_ids, got \[2, 10\]",
        id="mask-long",
    ),
    pytest.param(
        "intuition",
        PROMPT,
        {"prompt_mask": torch.ones(9)},
        r"prompt_mask must be \[batch, seq\], got shape \[9\]",
        id="mask-1-d",
    ),
]


@pytest.mark.parametrize(("router", "overrides", "extra", "message"), BAD_FORWARD)
def test_a_malformed_batch_is_refused_before_the_base_model_runs(router, overrides, extra, message):
    model, calls = counted_model(router, **overrides)
    with pytest.raises(ValueError, match=message):
        model(**make_batch(), **extra)
    assert calls == []
    good = {"task": {"task_ids": [0, 2]}, "intuition": {"prompt_mask": torch.ones(2, 9)}}.get(router, {})
    model(**make_batch(), **good)  # the counter does count
    assert calls == [1]


def test_inputs_embeds_give_the_batch_too():
    model, calls = counted_model("task")
    embeds = model.get_input_embeddings()(make_batch()["input_ids"])
    with pytest.raises(ValueError, match="task_ids has 1 entries but inputs_embeds has batch size 2"):
        model(inputs_embeds=embeds, task_ids=[1])
    assert calls == []


def test_a_prompt_mask_may_cover_the_cached_tokens_in_a_decoding_step():
    model, _ = counted_model("intuition", **PROMPT)
    batch = make_batch()
    with torch.no_grad(), model.decoding_session():
        out = model(**batch, prompt_mask=torch.ones(2, 9), use_cache=True)
        step = {"input_ids": batch["input_ids"][:, :1], "attention_mask": torch.ones(2, 10, dtype=torch.long)}
        with pytest.raises(ValueError, match=r"= \[2, 1 or 10\] like input_ids, got \[2, 9\]"):
            model(**step, **cache_kwarg(model, out.past_key_values), prompt_mask=torch.ones(2, 9))
        model(**step, **cache_kwarg(model, out.past_key_values), prompt_mask=torch.ones(2, 10))  # (extends the cache)


def test_the_layers_alone_accept_a_short_batch_so_the_batch_tests_can_fail():
    """Without the checks in forward() a one-row task_ids is repeated over the batch and a short prompt mask is
    padded: both silently."""
    batch = make_batch()
    task_model, _ = counted_model("task")
    with torch.no_grad(), routing_context(RoutingContext(task_ids=torch.tensor([1]))):
        assert outputs_of(task_model.base_model(**batch)).shape[0] == 2
    prompt_model, _ = counted_model("intuition", **PROMPT)
    with torch.no_grad(), routing_context(RoutingContext(prompt_mask=torch.ones(2, 8, dtype=torch.bool))):
        assert outputs_of(prompt_model.base_model(**batch)).shape[0] == 2


def generate_kwargs(ids: torch.Tensor, **extra) -> dict:
    return (
        dict(attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0, eos_token_id=None)
        | extra
    )


def test_generate_checks_task_ids_and_prompt_mask_against_the_prompt_batch():
    ids = make_batch(length=5)["input_ids"]
    model, calls = counted_model("task")
    with pytest.raises(ValueError, match="task_ids has 4 entries but input_ids has batch size 2; pass one task id"):
        model.generate(
            input_ids=ids, task_ids=[0, 1, 0, 1], **generate_kwargs(ids, num_return_sequences=2, do_sample=True)
        )
    with pytest.raises(ValueError, match="task_ids has 3 entries but inputs has batch size 2"):
        model.generate(ids, task_ids=[0, 1, 2], **generate_kwargs(ids))
    with pytest.raises(ValueError, match="task_ids must be integers"):
        model.generate(input_ids=ids, task_ids=[0.0, 1.0], **generate_kwargs(ids))
    with pytest.raises(ValueError, match="router='task' needs task_ids"):
        model.generate(input_ids=ids, **generate_kwargs(ids))
    assert calls == []
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, task_ids=[0, 1], **generate_kwargs(ids, num_return_sequences=2, do_sample=True)
        )
    assert out.shape == (4, 7) and calls

    prompt_model, calls = counted_model("intuition", **PROMPT)
    with pytest.raises(ValueError, match=r"prompt_mask must be \[batch, seq\] = \[2, 5\] like the prompt input_ids"):
        prompt_model.generate(input_ids=ids, prompt_mask=torch.ones(2, 7), **generate_kwargs(ids))
    assert calls == []


def test_decoding_session_checks_and_forward_inside_it_uses_its_task_ids():
    model, _ = counted_model("task")
    randomize_experts(model)
    with pytest.raises(ValueError, match="task_ids must be integers"), model.decoding_session(task_ids=[0.5, 1.0]):
        pass
    batch = make_batch()
    with torch.no_grad():
        expected = outputs_of(model(**batch, task_ids=[2, 1]))
        with model.decoding_session(task_ids=[2, 1]):
            assert torch.equal(outputs_of(model(**batch)), expected)


def test_a_compiled_model_still_refuses_a_malformed_batch():
    torch._dynamo.reset()
    try:
        model, calls = counted_model("task")
        compiled = torch.compile(model, backend="aot_eager", dynamic=False)
        with pytest.raises(ValueError, match="task_ids has 3 entries"):
            compiled(**make_batch(), task_ids=torch.tensor([0, 1, 2]))
        with pytest.raises(ValueError, match="task_ids must be integers"):
            compiled(**make_batch(), task_ids=torch.tensor([0.0, 1.0]))
        assert calls == []
    finally:
        torch._dynamo.reset()


# Bad rows in the user's data files ----------------------------------------------------------------------------

GOOD = json.dumps({"domain": "x", "prompt": "p", "response": "r"})
BAD_FILES = [
    ("fields.jsonl", f'{GOOD}\n\n{{"domain": "x", "body": "hi"}}\n', {}, 3, "needs 'text' (data.text_field) or both"),
    ("domain.jsonl", f'{GOOD}\n{{"text": "hi"}}\n', {}, 2, "missing field 'domain' (data.domain_field)"),
    ("response.jsonl", f'{GOOD}\n{{"domain": "x", "prompt": "p", "response": ""}}\n', {}, 2, "'response'"),
    ("blank.jsonl", f'{GOOD}\n{{"domain": "x", "prompt": "p", "response": " \\n "}}\n', {}, 2, "'response'"),
    ("prompt.jsonl", f'{{"domain": "x", "prompt": "", "response": "r"}}\n{GOOD}\n', {}, 1, "'prompt'"),
    ("text.jsonl", f'{GOOD}\n{GOOD}\n{{"domain": "x", "text": ""}}\n', {}, 3, "'text' (data.text_field) is empty"),
    ("nodomain.jsonl", '{"domain": "", "text": "t"}\n', {}, 1, "'domain' (data.domain_field) is empty"),
    ("null.jsonl", f'{GOOD}\n{{"domain": "x", "prompt": "p", "response": null}}\n', {}, 2, "must be text, got null"),
    ("invalid.jsonl", f'{GOOD}\n{{"domain": "x", "text": "a"\n', {}, 2, "invalid JSON"),
    ("array.jsonl", '["x", "a"]\n', {}, 1, "expected a JSON object"),
    ("latin1.jsonl", f'{GOOD}\n{GOOD}\n{GOOD[:-2]}\xe9"}}\n'.encode("latin-1"), {}, 3, "not UTF-8 (bytes b'\\xe9')"),
    ("renamed.csv", "domain,text\nx,hello\n", {"text_field": "body"}, 2, "needs 'body' (data.text_field)"),
    ("multiline.csv", 'domain,prompt,response\nx,p,r\nx,"two\nlines",r\n\nx,p,\n', {}, 6, "'response'"),
    ("short.csv", "domain,prompt,response\nx,p,r\nx,hello\n", {}, 3, "2 fields, but the header (line 1) has 3"),
    ("latin1.csv", "domain,text\nx,fine\nx,caf\xe9\n".encode("latin-1"), {}, 3, "not UTF-8"),
    ("bom.csv", b"\xef\xbb\xbfdomain,text\nx,fine\nx,caf\xe9\n", {}, 3, "not UTF-8 (bytes b'\\xe9')"),
    ("empty.csv", "domain,text\n", {}, None, "no examples in the file"),
]


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


@pytest.mark.parametrize(("name", "content", "fields", "line", "message"), BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_a_bad_row_names_the_file_and_line(tmp_path, name, content, fields, line, message):
    path = write(tmp_path / name, content)
    where = re.escape(f"{path}, line {line}: " if line else f"{path}: ")
    with pytest.raises(ValueError, match=where + ".*" + re.escape(message)):
        load_records(DataConfig(domains=["x"], files=[str(path)], **fields))


def test_an_unknown_domain_names_where_the_known_ones_are(tmp_path):
    toy = write_toy_domains(tmp_path / "toy.jsonl")
    with pytest.raises(ValueError) as err:
        load_records(DataConfig(domains=["Upper"], files=[str(toy)]))
    message = str(err.value)
    assert f"unknown domain 'Upper'; did you mean 'upper' ({toy}, line 1)" in message
    assert f"'reverse' ({toy}, line 2)" in message and "built-in: ['arpabet', 'code'" in message


def test_good_files_read_exactly(tmp_path):
    """A BOM, quoted cells over several lines, CRLF, blank lines, U+2028 inside a JSON string: all as written."""
    csv_path = write(tmp_path / "ok.csv", '\ufeffdomain,prompt,response\r\nx,"a\r\nb",1\r\n\r\ny,q,"say ""hi"""\r\n')
    line_sep = json.dumps({"domain": "x", "text": "one\u2028two"}, ensure_ascii=False)
    jsonl_path = write(tmp_path / "ok.jsonl", f'\n{line_sep}\r\n{{"domain": "y", "prompt": "n", "response": 7}}\n')
    config = DataConfig(domains=["x", "y"], files=[str(csv_path), str(jsonl_path)])
    assert read_user_files(config) == {
        "x": [{"prompt": "a\r\nb", "response": "1"}, {"prompt": "", "response": "one\u2028two"}],
        "y": [{"prompt": "q", "response": 'say "hi"'}, {"prompt": "n", "response": "7"}],
    }


def test_what_the_data_checks_close_was_silent_so_their_tests_can_fail(tmp_path):
    """Below the record checks, an empty response is dropped in tokenisation without an error."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(save_tiny_model(tmp_path / "tiny"))
    records = [{"prompt": "p", "response": "r"}, {"prompt": "q", "response": ""}]
    assert len(tokenize_split(records, "x", 0, tokenizer, DataConfig(domains=["news"]))) == 1


# The command line: exit 2, nothing written ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-cli")
    return save_tiny_model(root / "model"), write_toy_domains(root / "toy.jsonl")


@pytest.mark.parametrize(
    ("content", "overrides", "expected"),
    [
        (f"{GOOD}\n{{broken\n", [], "line 2: invalid JSON"),
        (b'{"domain": "upper", "text": "\xff"}\n', [], "line 1: not UTF-8"),
        (f'{GOOD}\n{GOOD}\n{{"domain": "upper", "prompt": "p", "response": ""}}\n', [], "line 3: field 'response'"),
        ("", ["data.domains=[Upper, reverse]"], "unknown domain 'Upper'; did you mean 'upper' ("),
    ],
    ids=["invalid-json", "not-utf8", "empty-response", "unknown-domain"],
)
def test_molora_train_exits_2_and_creates_no_run_folder(tiny_parts, tmp_path, capsys, content, overrides, expected):
    model_dir, toy = tiny_parts
    files = [str(toy)]
    if content:
        files.append(str(write(tmp_path / "extra.jsonl", content)))
    spec = tiny_run_config(model_dir, toy, steps=3)
    spec["data"]["files"] = files
    config = write(tmp_path / "bad.yaml", yaml.safe_dump(spec))
    run = tmp_path / "run"
    assert train_main(["--config", str(config), "--output-dir", str(run), *overrides]) == 2
    err = capsys.readouterr().err  # (after the progress bar of loading the base model)
    assert "molora-train: error: " in err and expected in err.split("molora-train: error: ", 1)[1]
    if content:
        assert f"{tmp_path / 'extra.jsonl'}, line" in err
    assert not run.exists()
