"""Behaviour of injected models, parametrised over expert type x router x architecture."""

import gc
import json
import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from molora import MoLoRAConfig, MoLoRALinear, MoLoRAModel, get_molora_model
from molora.core.context import current_context
from tests.conftest import (
    ARCHS,
    EXPERT_TYPES,
    ROUTERS,
    TARGETS,
    build_base,
    cache_kwarg,
    make_batch,
    molora_config,
    outputs_of,
    randomize_experts,
    task_ids_for,
)

GRID = [(a, e, r) for a in ARCHS for e in EXPERT_TYPES for r in ROUTERS]
GRID_IDS = ["-".join(x) for x in GRID]


def _layers(model: MoLoRAModel) -> dict[str, MoLoRALinear]:
    return {n: m for n, m in model.base_model.named_modules() if isinstance(m, MoLoRALinear)}


def _run(model, router: str, batch=None, **kwargs) -> torch.Tensor:
    batch = batch or make_batch()
    return outputs_of(model(**batch, task_ids=task_ids_for(router, batch["input_ids"].shape[0]), **kwargs))


@pytest.mark.parametrize(("arch", "expert_type", "router"), GRID, ids=GRID_IDS)
def test_identity_at_init_and_random_experts_change_outputs(arch, expert_type, router):
    batch = make_batch(pad_last=2)
    with torch.no_grad():
        reference = outputs_of(build_base(arch)(**batch))
        model = get_molora_model(build_base(arch), molora_config(arch, router, expert_type))
        assert torch.equal(_run(model, router, batch), reference)
        randomize_experts(model)
        assert (_run(model, router, batch) - reference).abs().max() > 1e-3


def _copy_into_peft(ours: MoLoRAModel, peft_model) -> None:
    modules = dict(peft_model.named_modules())
    with torch.no_grad():
        for name, layer in _layers(ours).items():
            target = modules[f"base_model.model.{name}"]
            experts = layer.experts
            if experts.expert_type == "lora":
                a, b = experts.lora_A[0], experts.lora_B[0].T
            else:
                a, b = experts.u[0].unsqueeze(0), experts.v[0].unsqueeze(1)
            target.lora_A["default"].weight.copy_(a)
            target.lora_B["default"].weight.copy_(b)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_one_expert_equals_peft_lora(arch, expert_type):
    ours = get_molora_model(
        build_base(arch), molora_config(arch, "softmax", expert_type, num_experts=1, init_lora_weights=False)
    )
    rank = 4 if expert_type == "lora" else 1
    peft_model = get_peft_model(
        build_base(arch),
        LoraConfig(
            r=rank, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights=False, fan_in_fan_out=arch == "gpt2"
        ),
    )
    _copy_into_peft(ours, peft_model)
    batch = make_batch(pad_last=2)
    with torch.no_grad():
        expected = outputs_of(peft_model(**batch))
        got = _run(ours, "softmax", batch)
        base = outputs_of(build_base(arch)(**batch))
    assert (expected - base).abs().max() > 1e-3  # the adapters do something
    assert (got - expected).abs().max() < 1e-5


def _training_loss(model, router: str, arch: str) -> torch.Tensor:
    batch = make_batch(pad_last=2)
    if arch == "bert":
        loss = _run(model, router, batch)[..., :8].mean()  # (LayerNorm makes the plain sum of squares constant)
    else:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels, task_ids=task_ids_for(router)).loss
    return loss + model.aux_loss()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_three_steps_change_every_adapter_tensor_and_no_base_weight(arch, expert_type):
    model = get_molora_model(build_base(arch), molora_config(arch, "softmax", expert_type))
    model.train()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        optimizer.zero_grad()
        _training_loss(model, "softmax", arch).backward()
        optimizer.step()
    for name, param in model.named_parameters():
        if name in base_before:
            assert torch.equal(param, base_before[name]), name
        else:
            assert not torch.equal(param, adapter_before[name]), name
    assert adapter_before and base_before


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("router", ROUTERS)
def test_save_and_load_into_a_fresh_base_gives_identical_outputs(tmp_path, arch, router):
    model = get_molora_model(build_base(arch), molora_config(arch, router))
    randomize_experts(model)
    model.eval()
    with torch.no_grad():
        expected = _run(model, router)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_model.safetensors", "molora_config.json"]
    assert json.loads((tmp_path / "molora_config.json").read_text())["router"] == router
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    adapter_names = {n.removeprefix("base_model.") for n, p in model.named_parameters() if p.requires_grad}
    assert set(tensors) == adapter_names
    torch.manual_seed(1234)  # the fresh adapter would initialise differently
    loaded = MoLoRAModel.from_pretrained(build_base(arch), tmp_path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(_run(loaded, router), expected)
    trainable = MoLoRAModel.from_pretrained(build_base(arch), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {f"base_model.{n}" for n in adapter_names}


def test_loading_into_the_wrong_model_names_the_mismatch(tmp_path):
    model = get_molora_model(build_base("llama"), molora_config("llama"))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "molora_config.json").read_text())
    config["rank"] = 2
    del config["sha256"]  # edited on purpose: the checksum would refuse it before the shapes are compared
    (tmp_path / "molora_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lora_A"):
        MoLoRAModel.from_pretrained(build_base("llama"), tmp_path)
    with pytest.raises(FileNotFoundError):
        MoLoRAModel.from_pretrained(build_base("llama"), tmp_path / "missing")


@pytest.mark.parametrize("arch", ARCHS)
def test_disable_adapters_is_the_base_model_nested_and_restored_after_exceptions(arch):
    reference = outputs_of(build_base(arch)(**make_batch())).detach()
    model = get_molora_model(build_base(arch), molora_config(arch, "topk"))
    randomize_experts(model)
    with torch.no_grad():
        adapted = _run(model, "topk")
        with model.disable_adapters():
            assert torch.equal(_run(model, "topk"), reference)
            with model.disable_adapters():
                assert torch.equal(_run(model, "topk"), reference)
            assert torch.equal(_run(model, "topk"), reference)
        assert torch.equal(_run(model, "topk"), adapted)
        with pytest.raises(RuntimeError, match="boom"), model.disable_adapters():
            raise RuntimeError("boom")
        assert torch.equal(_run(model, "topk"), adapted)


@pytest.mark.parametrize("arch", ARCHS)
def test_unload_restores_module_classes_outputs_and_requires_grad(arch):
    original = build_base(arch)
    classes = {n: type(m) for n, m in original.named_modules()}
    reference = outputs_of(original(**make_batch())).detach()
    model = get_molora_model(original, molora_config(arch, "intuition"))
    randomize_experts(model)
    base = model.unload()
    assert base is original
    assert {n: type(m) for n, m in base.named_modules()} == classes
    assert all(p.requires_grad for p in base.parameters())
    assert torch.equal(outputs_of(base(**make_batch())), reference)
    assert not base._forward_pre_hooks and not base._forward_hooks


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("router", ROUTERS)
def test_no_token_sees_the_future_through_the_router(arch, router):
    model = get_molora_model(build_base(arch), molora_config(arch, router))
    randomize_experts(model)
    batch = make_batch(length=10)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][:, 6:] = (changed["input_ids"][:, 6:] + 7) % 60 + 3
    with torch.no_grad():
        before, after = _run(model, router, batch), _run(model, router, changed)
    assert (before[:, :6] - after[:, :6]).abs().max() < 1e-6
    assert (before[:, 6:] - after[:, 6:]).abs().max() > 1e-4


def test_whole_sequence_pooling_does_leak_so_the_no_leak_test_can_fail():
    model = get_molora_model(build_base("llama"), molora_config("llama", "intuition", intuition_pooling="mean"))
    randomize_experts(model)
    batch = make_batch(length=10)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][:, 6:] = (changed["input_ids"][:, 6:] + 7) % 60 + 3
    with torch.no_grad():
        assert (_run(model, "intuition", batch)[:, :6] - _run(model, "intuition", changed)[:, :6]).abs().max() > 1e-4


def _left_padded_prompt():
    ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


def test_cached_decoding_outside_a_session_is_refused_for_the_intuition_router():
    model = get_molora_model(build_base("llama"), molora_config("llama", "intuition"))
    ids, mask = _left_padded_prompt()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        step = dict(
            input_ids=ids[:, -1:],
            attention_mask=torch.cat([mask, mask[:, -1:]], 1),
            **cache_kwarg(model, out.past_key_values),
        )
        with pytest.raises(RuntimeError, match="decoding_session"):
            model(**step)
        with model.decoding_session():
            first = model(input_ids=ids, attention_mask=mask, use_cache=True)
            model(**step | cache_kwarg(model, first.past_key_values))


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing: bool):
        model = get_molora_model(build_base("llama"), molora_config("llama", "intuition", aux_losses={"balance": 1.0}))
        randomize_experts(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        _training_loss(model, "intuition", "llama").backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert (plain[name] - checkpointed[name]).abs().max() < 1e-6, name
    assert any(g.abs().sum() > 0 for n, g in plain.items() if ".router." in n)


def test_aux_losses_follow_the_attention_mask_and_are_reported_in_eval():
    model = get_molora_model(build_base("llama"), molora_config("llama", "topk", aux_losses={"balance": 0.5, "z": 0.1}))
    randomize_experts(model)
    batch = make_batch(pad_last=3)
    other_padding = {k: v.clone() for k, v in batch.items()}
    other_padding["input_ids"][0, -3:] = 17
    with torch.no_grad():
        model(**batch)
        masked = model.aux_loss_terms()
        model(**other_padding)
        masked_other = model.aux_loss_terms()
        model(input_ids=other_padding["input_ids"])
        unmasked = model.aux_loss_terms()
    assert torch.allclose(masked["balance"], masked_other["balance"], atol=1e-6)
    assert not torch.allclose(unmasked["balance"], masked["balance"], atol=1e-4)
    assert not masked["balance"].requires_grad
    expected = 0.5 * masked_other["balance"] + 0.1 * masked_other["z"]
    model(**other_padding)
    assert torch.allclose(model.aux_loss(), expected, atol=1e-6) and model.aux_loss().requires_grad
    per_layer = model.aux_loss_terms(per_layer=True)
    assert set(per_layer) == set(_layers(model)) and set(next(iter(per_layer.values()))) == {"balance", "z"}


def test_aux_losses_of_a_step_do_not_keep_its_router_outputs_alive_into_the_next():
    # The router outputs hold views of each layer's projection: kept into the next step, they would add to its peak.
    model = get_molora_model(build_base("llama"), molora_config("llama", "softmax"))
    batch = make_batch()
    model.train()
    model(**batch)
    model.aux_loss().backward()
    first_layer = next(layer for _, layer in model._layers)
    previous = weakref.ref(first_layer.last_route[0])
    model(**batch)
    gc.collect()
    assert previous() is None
    assert model.aux_loss_terms()["balance"] is model.aux_loss_terms()["balance"]  # still computed once per forward


def test_raw_model_calls_get_the_attention_mask_too():
    model = get_molora_model(build_base("llama"), molora_config("llama", "intuition"))
    randomize_experts(model)
    batch = make_batch(pad_last=3)
    with torch.no_grad():
        wrapped = _run(model, "intuition", batch)
        raw = model.base_model(**batch).logits
        positional = model.base_model(batch["input_ids"], batch["attention_mask"]).logits
        model(input_ids=batch["input_ids"])  # a call without a mask: padding would count
        unmasked = model.aux_loss_terms()["balance"]
        model.base_model(**batch)
        raw_masked = model.aux_loss_terms()["balance"]
        model(**batch)
        assert torch.allclose(raw_masked, model.aux_loss_terms()["balance"])
    assert torch.equal(wrapped, raw) and torch.equal(wrapped, positional)
    assert not torch.allclose(unmasked, raw_masked)
    assert current_context() is None  # the context a raw call opened is closed again


def test_task_ids_are_validated():
    model = get_molora_model(build_base("llama"), molora_config("llama", "task"))
    batch = make_batch()
    with pytest.raises(ValueError, match="task_ids"):
        model(**batch)
    with pytest.raises(ValueError, match="task_ids"):
        model(**batch, task_ids=[0, 3])
    with pytest.raises(ValueError, match="task_ids"):
        model(**batch, task_ids=[[0, 1]])


def test_print_trainable_parameters(capsys):
    model = get_molora_model(build_base("llama"), MoLoRAConfig(target_modules=["q_proj"], num_experts=2, rank=2))
    model.print_trainable_parameters()
    # 2 layers x (A 2x2x32 + B 2x32x2 + gate 2x32) = 2 x 320
    assert "trainable params: 640 ||" in capsys.readouterr().out


def test_checkpointing_enabled_behind_molora_s_back_fails_loudly():
    model = get_molora_model(build_base("llama"), molora_config("llama", "intuition"))
    model.train()
    enable = getattr(model.base_model, "_activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(RuntimeError, match="gradient_checkpointing_enable"):
        _training_loss(model, "intuition", "llama").backward()
    with pytest.raises(ValueError, match="use_reentrant"):
        model.gradient_checkpointing_enable({"use_reentrant": True})


def test_beam_search_with_a_running_router_state_is_refused():
    model = get_molora_model(build_base("llama"), molora_config("llama", "intuition"))
    ids, mask = _left_padded_prompt()
    with pytest.raises(NotImplementedError, match="beam search"):
        model.generate(input_ids=ids, attention_mask=mask, num_beams=2, max_new_tokens=2)
    prompt_model = get_molora_model(
        build_base("llama"), molora_config("llama", "intuition", intuition_pooling="prompt")
    )
    randomize_experts(prompt_model)
    options = dict(
        input_ids=ids, attention_mask=mask, num_beams=2, max_new_tokens=3, pad_token_id=0, do_sample=False,
        output_scores=True, return_dict_in_generate=True,
    )  # fmt: skip
    cached = prompt_model.generate(**options)
    uncached = prompt_model.generate(**options, use_cache=False)  # every step a full forward of the beams
    assert cached.sequences.shape == (2, 10) and torch.equal(cached.sequences, uncached.sequences)
    for step, (a, b) in enumerate(zip(cached.scores, uncached.scores, strict=True)):
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite)
        assert (a[finite] - b[finite]).abs().max() < 1e-4, step


@pytest.mark.parametrize(("router", "k"), [("topk", 2), ("switch", 1)])
def test_sparse_routers_select_k_experts_for_every_token_inside_the_model(router, k):
    model = get_molora_model(build_base("llama"), molora_config("llama", router))
    randomize_experts(model)
    seen = []
    for layer in _layers(model).values():
        layer.router.register_forward_hook(lambda m, i, out: seen.append(out))
    with torch.no_grad():
        _run(model, router)
    assert len(seen) == len(_layers(model))
    for out in seen:
        assert ((out.gates > 0).sum(-1) == k).all()
        expected_sum = 1.0 if router == "topk" else out.probs.max(-1).values
        assert torch.allclose(out.gates.sum(-1), torch.as_tensor(expected_sum).expand_as(out.gates[..., 0]))


def test_dropout_touches_only_the_expert_path_and_only_in_training():
    model = get_molora_model(build_base("llama"), molora_config("llama", dropout=0.5))
    randomize_experts(model)
    batch = make_batch()
    reference = outputs_of(build_base("llama")(**batch)).detach()
    with torch.no_grad():
        model.eval()
        assert torch.equal(_run(model, "softmax", batch), _run(model, "softmax", batch))
        model.train()
        first, second = _run(model, "softmax", batch), _run(model, "softmax", batch)
        assert not torch.equal(first, second)
        with model.disable_adapters():
            assert torch.equal(_run(model, "softmax", batch), reference)


@pytest.fixture
def strict_fp32():
    """TF32 off for the CUDA comparison (bash .ci/gpu runs it): fp32 matmuls as on the CPU, so 1e-5 holds."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bash .ci/gpu on a GPU machine)")
@pytest.mark.parametrize("router", ROUTERS)
def test_cuda_matches_cpu(router, strict_fp32):
    """Outputs, the aux loss and every adapter gradient of one step, on CUDA against the CPU."""
    results = []
    for device in ("cpu", "cuda"):
        model = get_molora_model(build_base("llama"), molora_config("llama", router, aux_losses={"balance": 0.1}))
        randomize_experts(model)
        model.to(device).train()
        batch = {k: v.to(device) for k, v in make_batch(pad_last=2).items()}
        task_ids = task_ids_for(router, batch["input_ids"].shape[0])
        out = model(**batch, labels=batch["input_ids"], task_ids=None if task_ids is None else task_ids.to(device))
        (out.loss + model.aux_loss()).backward()
        grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.logits.detach().cpu(), model.aux_loss().detach().cpu(), grads))
    (cpu, cpu_aux, cpu_grads), (gpu, gpu_aux, gpu_grads) = results
    assert (gpu - cpu).abs().max() <= 1e-5 * max(1.0, cpu.abs().max().item())
    assert (gpu_aux - cpu_aux).abs() <= 1e-5
    for name, grad in cpu_grads.items():
        assert (gpu_grads[name] - grad).abs().max() <= 1e-5 * max(1.0, grad.abs().max().item()), name
