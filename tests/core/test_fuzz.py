"""Config fuzzing: random valid configs inject, train only the adapter and start as the base model; random invalid
configs raise ValueError naming the field, at construction or at injection, and nothing else.

Hypothesis runs derandomized and without a database (the same examples on every run, so CI is deterministic) with
few examples per test; REGRESSIONS, run as @example rows, are the failures it found before the fixes.
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from molora import MoLoRAConfig, MoLoRALinear, get_molora_model
from molora.core.base_layers import base_kind
from molora.core.config import DISPATCHES, MIN_ROUTER_TEMPERATURE, ROUTING_SCOPES
from molora.core.experts import EXPERTS
from molora.core.losses import AUX_LOSSES
from molora.core.pooling import POOLINGS
from molora.core.routers import ROUTERS
from tests.conftest import build_base, make_batch, outputs_of

FUZZ = settings(
    max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
ARCHS = ("llama", "gpt2", "bert")
ROUTER_NAMES = tuple(sorted(ROUTERS))  # read at collection, before any test registers a router of its own
NUM_LAYERS = 2  # build_base's models


def _linear_names(arch: str) -> list[str]:
    return [n for n, m in build_base(arch).named_modules() if base_kind(m) is not None]


LINEAR_NAMES = {arch: _linear_names(arch) for arch in ARCHS}
LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _layer_of(name: str) -> int | None:
    found = LAYER_INDEX.findall(name)
    return int(found[-1]) if found else None


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


@st.composite
def valid_kwargs(draw, arch: str, router: str | None = None) -> dict:
    """MoLoRAConfig kwargs that are valid for `arch`'s tiny model, plus "_expect": what the test checks after.

    The targets are built from real module names (first one inside a layer), so the first always survives
    layers_to_transform and exclude_modules by construction instead of by assume().
    """
    names = LINEAR_NAMES[arch]
    layered = [n for n in names if _layer_of(n) is not None]
    first = draw(st.sampled_from(layered))
    others = draw(st.lists(st.sampled_from(names), max_size=3, unique=True))
    chosen = [first] + [n for n in others if n != first]

    def suffix(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[-draw(st.integers(1, len(parts))) :])

    form = draw(st.sampled_from(["list", "regex", "regex_flags"]))
    suffixes = [suffix(n) for n in chosen]
    if form == "list":
        target_modules: list[str] | str = suffixes
    else:
        alternatives = "|".join(re.escape(s) for s in suffixes)
        target_modules = rf"(?:.*\.)?(?:{alternatives})"
        if form == "regex_flags":
            target_modules = "(?i)" + target_modules.upper()

    layers = None
    if draw(st.booleans()):
        extra = draw(st.lists(st.integers(0, NUM_LAYERS - 1), max_size=2))
        layers = sorted({_layer_of(first), *extra})
        if len(layers) == 1 and draw(st.booleans()):
            layers = layers[0]  # an int is accepted too
    excluded = None
    exclude_modules = None
    if len(chosen) > 1 and draw(st.booleans()):
        excluded = chosen[-1]
        exclude_modules = draw(st.sampled_from([[excluded], re.escape(excluded)]))

    first_leaf = re.escape(_leaf(first))
    if draw(st.booleans()):
        num_experts: int | dict[str, int] = draw(st.integers(1, 6))
        smallest = num_experts
    else:
        per_module, rest = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        num_experts = {first_leaf: per_module, ".*": rest}
        smallest = min(per_module, rest)

    router = router or draw(st.sampled_from(ROUTER_NAMES))
    top_k = None
    if router == "topk":
        top_k = draw(st.one_of(st.none(), st.integers(1, smallest))) if smallest >= 2 else 1
    elif router == "switch":
        top_k = draw(st.sampled_from([None, 1]))
    elif router in ("intuition", "task"):
        top_k = draw(st.one_of(st.none(), st.integers(1, smallest)))
    elif router == "domain":  # one expert per task; a module with one expert is shared by all tasks
        top_k = draw(st.sampled_from([None, 1]))
    pooling = draw(st.sampled_from(POOLINGS))
    kwargs = dict(
        target_modules=target_modules,
        exclude_modules=exclude_modules,
        num_experts=num_experts,
        expert_type=draw(st.sampled_from(sorted(EXPERTS))),
        rank=draw(st.integers(1, 8)),
        # practical ranges: alpha = 5e-324 (a zero scaling in fp32) and temperature = 5e-324 are now refused
        alpha=draw(st.floats(1e-3, 1e3)),
        dropout=draw(st.sampled_from([0.0, 0.1, 0.5])),
        rank_pattern=draw(st.one_of(st.none(), st.builds(lambda r: {first_leaf: r}, st.integers(1, 8)))),
        alpha_pattern=draw(st.one_of(st.none(), st.builds(lambda a: {first_leaf: a}, st.floats(0.5, 32)))),
        use_rslora=draw(st.booleans()),
        router=router,
        top_k=top_k,
        dispatch=draw(st.sampled_from(DISPATCHES)),
        router_temperature=draw(st.floats(MIN_ROUTER_TEMPERATURE, 1e3)),
        router_jitter=draw(st.sampled_from([0.0, 0.01, 0.3])),
        intuition_pooling=pooling,
        intuition_hidden=draw(st.one_of(st.none(), st.integers(2, 24))),
        num_tasks=draw(st.integers(1, 4 if router == "task" else _fewest_routed(num_experts)))
        if ROUTERS[router].needs_task_ids
        else None,
        aux_losses=draw(st.dictionaries(st.sampled_from(sorted(AUX_LOSSES)), st.floats(0, 1), max_size=4)),
        layers_to_transform=layers,
        # a group shares one routing decision, so its modules need one expert count
        routing_scope=draw(st.sampled_from(ROUTING_SCOPES)) if isinstance(num_experts, int) else "module",
    )
    first_leaf_name = _leaf(first)

    def expected(name: str, patterns: dict | None, default):
        # the patterns above have one key, the first module's leaf: it matches exactly the modules with that leaf
        return patterns[first_leaf] if patterns and _leaf(name) == first_leaf_name else default

    kwargs["_expect"] = dict(
        first=first,
        excluded=excluded,
        experts=lambda n: expected(n, num_experts, num_experts[".*"]) if isinstance(num_experts, dict) else num_experts,
        rank=lambda n: expected(n, kwargs["rank_pattern"], kwargs["rank"]),
        alpha=lambda n: expected(n, kwargs["alpha_pattern"], kwargs["alpha"]),
    )
    return kwargs


def _fewest_routed(num_experts: int | dict) -> int:
    """The fewest experts of a module with more than one (router='domain' needs that many tasks at most)."""
    counts = list(num_experts.values()) if isinstance(num_experts, dict) else [num_experts]
    return min([c for c in counts if c > 1], default=1)


def _split(kwargs: dict) -> tuple[dict, dict]:
    kwargs = dict(kwargs)
    return {k: v for k, v in kwargs.items() if k != "_expect"}, kwargs.get("_expect", {})


def _forward(model, config: MoLoRAConfig, batch: dict) -> torch.Tensor:
    length = batch["input_ids"].shape[1]
    task_ids = None
    if ROUTERS[config.router].needs_task_ids:
        task_ids = torch.arange(2) % config.num_tasks
    elif "task_mi" in config.aux_losses:  # the task-aware loss reads task ids whatever the router
        task_ids = torch.arange(2)
    prompt_mask = torch.arange(length).expand(2, length) < max(1, length // 2)
    return outputs_of(model(**batch, task_ids=task_ids, prompt_mask=prompt_mask))


def _is_adapter(name: str) -> bool:
    return ".experts." in name or ".router." in name


def valid_case(router: str):
    return st.sampled_from(ARCHS).flatmap(
        lambda arch: st.tuples(
            st.just(arch),
            valid_kwargs(arch, router),
            st.sampled_from([torch.float32, torch.bfloat16]),
            st.integers(2, 9),  # sequence length (one token makes q_proj irrelevant: softmax over one key is 1)
            st.integers(0, 8),  # right padding of row 0
        )
    )


# One parametrised run per router: drawn from one strategy, the derandomized examples favoured the first routers.
@pytest.mark.parametrize("router", ROUTER_NAMES)
@settings(FUZZ, max_examples=12)
@given(data=st.data())
def test_valid_configs_inject_start_as_the_base_model_and_train_only_the_adapter(router, data):
    arch, kwargs, dtype, length, pad = data.draw(valid_case(router), label="case")
    kwargs, expect = _split(kwargs)
    config = MoLoRAConfig(**kwargs)
    model = get_molora_model(build_base(arch, dtype=dtype), config)
    layers = {n: m for n, m in model.base_model.named_modules() if isinstance(m, MoLoRALinear)}

    # What was injected follows the config (checked against the module names the targets were built from).
    assert expect["first"] in layers and expect["excluded"] not in layers
    wanted_layers = config.layers_to_transform
    for name, layer in layers.items():
        assert wanted_layers is None or _layer_of(name) in wanted_layers, name
        experts = expect["experts"](name)
        assert layer.experts.num_experts == experts, name
        rank = expect["rank"](name) if config.expert_type == "lora" else experts  # rank-1: scaled as rank E
        if config.expert_type == "lora":
            assert layer.experts.rank == rank, name
        root = math.sqrt(rank) if config.use_rslora else rank
        assert layer.scaling == pytest.approx(expect["alpha"](name) / root), name

    # Frozen base, trainable adapter, before any forward.
    for name, param in model.named_parameters():
        assert param.requires_grad == _is_adapter(name), name

    batch = make_batch(length=length, pad_last=min(pad, length - 1))
    base = build_base(arch, dtype=dtype).train()
    with torch.no_grad():
        reference = outputs_of(base(**batch))
    model.train()
    out = _forward(model, config, batch)
    assert out.dtype == dtype and torch.isfinite(out).all()
    # Zero-initialised output sides: exactly the base model, bit for bit, in every dtype and router.
    assert torch.equal(out, reference)

    loss = out.float().square().mean() + model.aux_loss()
    assert torch.isfinite(loss)
    loss.backward()
    with_grad = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    for name, param in with_grad:
        assert _is_adapter(name), name
        assert torch.isfinite(param.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for _, p in with_grad)
    for name, param in model.named_parameters():
        if not _is_adapter(name):
            assert not param.requires_grad and param.grad is None, name


@pytest.mark.parametrize("router", ROUTER_NAMES)
@settings(FUZZ, max_examples=8)
@given(data=st.data())
def test_random_initialised_experts_give_finite_outputs_and_gradients(router, data):
    """init_lora_weights=False: the adapter is not a no-op, so non-finite values could not hide behind a zero."""
    arch = data.draw(st.sampled_from(ARCHS), label="arch")
    kwargs, _ = _split(data.draw(valid_kwargs(arch, router), label="kwargs"))
    config = MoLoRAConfig(**kwargs, init_lora_weights=False)
    model = get_molora_model(build_base(arch), config).train()
    batch = make_batch(pad_last=2)
    reference = outputs_of(build_base(arch)(**batch))
    out = _forward(model, config, batch)
    assert torch.isfinite(out).all() and not torch.equal(out, reference)
    (out.square().mean() + model.aux_loss()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# Invalid configs ------------------------------------------------------------------------------------------------
NAN, INF = math.nan, math.inf
BAD_NUMBERS = {
    # field: values that must be refused whatever the rest of the config
    "num_experts": [0, -2, 2.5, True, "4", None, [4], {}, {"q": 0}, {"[": 2}, {1: 2}, {"(?i)q_proj": 2}],
    "expert_type": ["dora", "LoRA", None, 1, ["lora"]],
    "rank": [0, -1, 1.5, True, None, "8"],
    "alpha": [0, -1, NAN, INF, -INF, None, "16", 5e-324, 1e40],  # the last two: scaling 0 / inf in fp32
    "dropout": [-0.1, 1.0, 1.5, NAN, INF, None],
    "rank_pattern": [{"x": 0}, {"(": 2}, {3: 2}, {"(?i)x": 2}, ["x"], {"x": 1.5}],
    "alpha_pattern": [{"x": -1}, {"x": 0}, {"(": 2.0}, {3: 2.0}, {"x": NAN}, {"x": INF}, {"(?x)a": 1.0}, {".*": 1e40}],
    "use_rslora": ["yes", None, 1],
    "router": ["hash", "", "TopK", None, 3, ["topk"], {}],
    "router_temperature": [0, -1.0, NAN, INF, None, "1", 5e-324, MIN_ROUTER_TEMPERATURE / 2],
    "router_jitter": [-0.1, NAN, INF, None],
    "dispatch": ["scatter", None, ["auto"]],
    "intuition_pooling": ["max", None, ["mean"]],
    "intuition_hidden": [1, 0, -3, 2.5, True],
    "aux_losses": [{"load": 1.0}, {"balance": -1.0}, ["balance"], None, {"balance": NAN}, {"z": INF}, {"z": "1"}],
    "layers_to_transform": [[], [-1], "0", [0.5], [True], {0}, [7], 7],
    "init_lora_weights": ["gaussian", None, 1],
    "exclude_modules": [3, [3], [None], "(", ".*", {"q"}],
    "target_modules": [[], "", 5, None, [3], [""], "q_proj(", ["not_a_module"], "not_a_module.*", ("q", 4)],
}
# Values that are invalid only together with another field.
COMBINED = [
    ("top_k", dict(router="topk", num_experts=3, top_k=4)),
    ("top_k", dict(router="topk", num_experts={".*": 2}, top_k=3)),
    ("top_k", dict(router="topk", top_k=0)),
    ("top_k", dict(router="topk", top_k=1.5)),
    ("top_k", dict(router="topk", top_k="2")),
    ("top_k", dict(router="intuition", num_experts=2, top_k=3)),
    ("top_k", dict(router="switch", top_k=2)),
    ("num_tasks", dict(router="task", num_tasks=None)),
    ("num_tasks", dict(router="task", num_tasks=0)),
    ("num_tasks", dict(router="task", num_tasks=1.5)),
    ("num_experts", dict(num_experts={"not_a_module": 2})),  # no pattern for the targeted modules: at injection
]
# Targets that exist but are not linear: at injection.
NON_LINEAR = {"llama": ["self_attn"], "gpt2": ["attn"], "bert": "encoder\\.layer\\.0\\.attention"}


# Failures hypothesis found before the fixes (against the code then), one per cause; (field, updates, mode).
REGRESSIONS = [
    # "construct": TypeError / re.error / no error at all from MoLoRAConfig(...) or from injection
    ("exclude_modules", {"exclude_modules": [3]}, "construct"),  # TypeError in the suffix match at injection
    ("num_experts", {"num_experts": {1: 2}}, "construct"),  # TypeError from re.compile
    ("alpha_pattern", {"alpha_pattern": {3: 2.0}}, "construct"),  # TypeError from re.compile
    ("alpha_pattern", {"alpha_pattern": {"(?x)a": 1.0}}, "construct"),  # re.error: global flag inside (?:...)
    ("router", {"router": ["topk"]}, "construct"),  # TypeError: unhashable type: 'list'
    ("alpha", {"alpha": INF}, "construct"),  # accepted: NaN outputs (inf * 0) from the first forward
    ("dropout", {"dropout": NAN}, "construct"),  # accepted (NaN compares False), silently no dropout
    ("router_temperature", {"router_temperature": 5e-324}, "construct"),  # accepted: NaN outputs (0 in fp32)
    ("alpha", {"alpha": 5e-324}, "construct"),  # accepted: scaling 0 in fp32, every gradient exactly 0
    # "mutate": a field assigned after construction reached injection unchecked
    ("rank", {"rank": 0}, "mutate"),  # ZeroDivisionError in alpha / rank
    ("num_experts", {"num_experts": True}, "mutate"),  # TypeError in torch.empty
    ("num_experts", {"num_experts": -2}, "mutate"),  # RuntimeError: negative dimension
    ("num_tasks", {"router": "task", "num_tasks": None}, "mutate"),  # TypeError in nn.Embedding
    ("top_k", {"router": "topk", "top_k": "2"}, "mutate"),  # TypeError comparing int and str
    ("aux_losses", {"aux_losses": None}, "mutate"),  # TypeError: 'NoneType' object is not iterable
    ("alpha_pattern", {"alpha_pattern": {"(": 2.0}}, "mutate"),  # re.error from pattern_lookup
    ("router", {"router": "hash"}, "mutate"),  # KeyError from ROUTERS[...]
]


def regressions(test):
    for field, updates, mode in REGRESSIONS:
        test = example(("llama", dict(target_modules=["q_proj"]), field, updates, mode))(test)
    return test


@st.composite
def invalid_case(draw):
    arch = draw(st.sampled_from(ARCHS))
    kwargs, _ = _split(draw(valid_kwargs(arch)))
    kind = draw(st.sampled_from(["single", "combined", "non_linear"]))
    if kind == "single":
        field = draw(st.sampled_from(sorted(BAD_NUMBERS)))
        updates = {field: draw(st.sampled_from(BAD_NUMBERS[field]))}
    elif kind == "combined":
        field, updates = draw(st.sampled_from(COMBINED))
    else:
        field, updates = "target_modules", {"target_modules": NON_LINEAR[arch], "layers_to_transform": None}
    # "construct": the bad value goes to MoLoRAConfig(...); "mutate": it is assigned to a valid config's field
    # afterwards (dataclass fields are plain attributes), so only injection can catch it.
    mode = draw(st.sampled_from(["construct", "mutate"]))
    return arch, kwargs, field, updates, mode


def _configure_and_inject(model, kwargs: dict, updates: dict, mode: str) -> None:
    if mode == "construct":
        config = MoLoRAConfig(**(kwargs | updates))
    else:
        config = MoLoRAConfig(**kwargs)
        for key, value in updates.items():
            setattr(config, key, value)
    get_molora_model(model, config)


def _untouched(model) -> bool:
    no_layers = not any(isinstance(m, MoLoRALinear) for m in model.modules())
    return no_layers and all(p.requires_grad for p in model.parameters())


@settings(FUZZ, max_examples=60)
@given(invalid_case())
@regressions
def test_invalid_configs_raise_value_error_naming_the_field_and_leave_the_model_untouched(case):
    arch, kwargs, field, updates, mode = case
    model = build_base(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # top_k with router="softmax" only warns
        with pytest.raises(ValueError) as caught:  # any other exception type fails the test
            _configure_and_inject(model, kwargs, updates, mode)
    assert field in str(caught.value), (field, str(caught.value))
    assert _untouched(model)


def test_every_bad_value_of_the_tables_is_refused_in_both_modes():
    """Hypothesis samples the tables above; this walks all of them once on a fixed base, so none goes untried."""
    cases = [(f, {f: v}) for f, values in BAD_NUMBERS.items() for v in values] + COMBINED
    failures = []
    for mode in ("construct", "mutate"):
        for field, updates in cases:
            model = build_base("llama")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _configure_and_inject(model, dict(target_modules=["q_proj"]), updates, mode)
            except ValueError as err:
                outcome = None if field in str(err) else str(err)
            except Exception as err:  # the point of the test: any other exception type is a failure
                outcome = repr(err)
            else:
                outcome = "no error"
            if outcome is None and not _untouched(model):
                outcome = "model changed"
            if outcome is not None:
                failures.append((mode, updates, outcome))
    assert not failures


def test_every_router_and_expert_type_is_fuzzed():
    """The strategies read the registries; this fails if a built-in went missing from them."""
    assert {"softmax", "topk", "switch", "intuition", "task"} <= set(ROUTER_NAMES)
    assert set(EXPERTS) == {"lora", "rank1"}


def test_injection_revalidates_a_config_changed_after_construction():
    """Without revalidation, rank=0 set after construction reached alpha / rank (ZeroDivisionError)."""
    config = MoLoRAConfig(target_modules=["q_proj"])
    config.rank = 0
    model = build_base("llama")
    with pytest.raises(ValueError, match="rank"):
        get_molora_model(model, config)
    assert _untouched(model)
    config.rank = 4
    assert len([m for m in get_molora_model(model, config).modules() if isinstance(m, MoLoRALinear)]) == 2
