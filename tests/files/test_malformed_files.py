"""Malformed adapter files get a ValueError naming the file and the problem, the model is left as it was, memory
stays bounded, and a mutation fuzz over real adapters (molora's and PEFT's) lets only those errors out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from bench.refused_load_memory import measure, save_good_adapter, write_padded_adapter
from molora import MoLoRAModel, export_peft, from_peft_adapters
from molora.core.patcher import molora_layers
from molora.files.formats import JSON_LIMIT_BYTES
from molora.files.tensors import header_limit
from tests.adapter_files import resign
from tests.conftest import build_base, molora_config, randomize_experts

REPO = Path(__file__).resolve().parents[2]
WEIGHTS, CONFIG = "adapter_model.safetensors", "molora_config.json"
DOCUMENTED = (ValueError, FileNotFoundError)  # what a load of a file from elsewhere may raise


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapter")
    model = get_model()
    randomize_experts(model)
    model.save_pretrained(folder)
    return folder


def get_model() -> MoLoRAModel:
    from molora import get_molora_model

    return get_molora_model(build_base("llama"), molora_config("llama"))


def split(path: Path) -> tuple[dict, bytes]:
    """A safetensors file as (header dict, data bytes)."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def join(path: Path, header: dict | str, data: bytes) -> None:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def copy(adapter: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in (WEIGHTS, CONFIG):
        (folder / name).write_bytes((adapter / name).read_bytes())
    return folder


def _first_float(header: dict) -> tuple[str, int]:
    name = next(k for k in header if k != "__metadata__")
    return name, header[name]["data_offsets"][0]


def _with_value(value: float):
    def mutate(header: dict, data: bytes) -> tuple[dict, bytes]:
        _, start = _first_float(header)
        return header, data[:start] + torch.tensor([value]).numpy().tobytes() + data[start + 4 :]

    return mutate


def _extra_entries(count: int):
    def mutate(header: dict, data: bytes) -> tuple[dict, bytes]:
        end = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
        extra = {f"extra.{i}": {"dtype": "F32", "shape": [0], "data_offsets": [end, end]} for i in range(count)}
        return {**header, **extra}, data

    return mutate


def _retyped(header: dict, data: bytes) -> tuple[dict, bytes]:
    name, _ = _first_float(header)
    return {**header, name: {**header[name], "dtype": "I32"}}, data


def _reshaped(header: dict, data: bytes) -> tuple[dict, bytes]:
    name, _ = _first_float(header)
    shape = header[name]["shape"]
    return {**header, name: {**header[name], "shape": [shape[0] * shape[1], *shape[2:]]}}, data


def _renamed(header: dict, data: bytes) -> tuple[dict, bytes]:
    name, _ = _first_float(header)
    return {**{k: v for k, v in header.items() if k != name}, name + "x": header[name]}, data


def _gap(header: dict, data: bytes) -> tuple[dict, bytes]:
    return header, data + b"\0" * 4


def _overlap(header: dict, data: bytes) -> tuple[dict, bytes]:
    name, _ = _first_float(header)
    begin, end = header[name]["data_offsets"]
    return {**header, name: {**header[name], "data_offsets": [begin + 4, end + 4]}}, data


MALFORMED = {
    "NaN": (_with_value(float("nan")), "NaN or inf in 1 tensor"),
    "inf": (_with_value(float("inf")), "NaN or inf in 1 tensor"),
    "a tensor too many": (_extra_entries(1), "unexpected"),
    "far more tensors than the config implies": (_extra_entries(200), r"\d+ tensors, more than the 70 expected"),
    "a header past the cap": (_extra_entries(3000), "refused unread"),
    "another dtype": (_retyped, r"I32 .* spans|is I32"),
    "another shape": (_reshaped, r"checkpoint \[\d+, \d+\] vs model"),
    "another name": (_renamed, "missing .* unexpected|unexpected"),
    "bytes no tensor covers": (_gap, r"cover \d+ bytes of data, the file holds"),
    "overlapping tensors": (_overlap, "gap or overlap|expected 0"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_adapter_is_a_value_error_naming_file_and_problem_and_leaves_the_model_alone(
    adapter, tmp_path, case
):
    mutate, message = MALFORMED[case]
    folder = copy(adapter, tmp_path)
    join(folder / WEIGHTS, *mutate(*split(folder / WEIGHTS)))
    resign(folder)  # the checksum recomputed, as by whoever altered the file: the checks behind it must hold
    base = build_base("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=message) as raised:
        MoLoRAModel.from_pretrained(base, folder)
    assert str(folder) in str(raised.value)
    assert not list(molora_layers(base))
    after = base.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', "'a' appears twice"),
        ('{"a": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}', "dtype 'F8_E4M3'"),
        ('{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}', "not a list of sizes"),
        ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}', "exactly dtype, shape"),
        ("[1, 2]", "not a JSON object"),
        ('{"a": NaN}', "not valid JSON"),
        ("[" * 100_000, "not valid JSON"),
    ],
)
def test_a_malformed_header_is_refused_before_any_tensor_is_read(adapter, tmp_path, header, message):
    folder = copy(adapter, tmp_path)
    join(folder / WEIGHTS, header, b"\0" * 4)
    resign(folder)
    with pytest.raises(ValueError, match=message):
        MoLoRAModel.from_pretrained(build_base("llama"), folder)


def test_a_header_longer_than_the_file_is_named(adapter, tmp_path):
    folder = copy(adapter, tmp_path)
    raw = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes((len(raw)).to_bytes(8, "little") + raw[8:])
    resign(folder)
    with pytest.raises(ValueError, match=rf"{WEIGHTS}: its header claims \d+ bytes, the file has {len(raw)}"):
        MoLoRAModel.from_pretrained(build_base("llama"), folder)


@pytest.mark.parametrize("what", ["weights", "config"])
def test_the_checksum_names_a_file_changed_after_saving(adapter, tmp_path, what):
    folder = copy(adapter, tmp_path)
    if what == "weights":
        header, data = split(folder / WEIGHTS)
        join(folder / WEIGHTS, header, data[:-4] + torch.tensor([0.5]).numpy().tobytes())  # still finite
    else:
        config = json.loads((folder / CONFIG).read_text())
        (folder / CONFIG).write_text(json.dumps({**config, "alpha": config["alpha"] + 1}))  # still valid
    with pytest.raises(ValueError, match=r"changed since they were saved .*sha256"):
        MoLoRAModel.from_pretrained(build_base("llama"), folder)


def test_json_files_are_capped_unread(adapter, tmp_path):
    folder = copy(adapter, tmp_path)
    (folder / CONFIG).write_text(" " * (JSON_LIMIT_BYTES + 1))
    with pytest.raises(ValueError, match=rf"{CONFIG}: \d+ bytes, more than the {JSON_LIMIT_BYTES}"):
        MoLoRAModel.from_pretrained(build_base("llama"), folder)


@pytest.mark.parametrize("router", ["os.system", "builtins.eval", "https://example.com/router.py"])
def test_no_config_field_names_code_that_molora_would_import_or_fetch(adapter, tmp_path, router):
    folder = copy(adapter, tmp_path)
    config = json.loads((folder / CONFIG).read_text())
    (folder / CONFIG).write_text(json.dumps({**config, "router": router}))
    resign(folder)
    with pytest.raises(ValueError, match="router"):
        MoLoRAModel.from_pretrained(build_base("llama"), folder)


# Bounded memory ------------------------------------------------------------------------------------------------------
def test_a_header_listing_a_million_empty_tensors_is_refused_within_a_few_mib(tmp_path):
    """safetensors alone parses such a header into a GB of Python objects; molora refuses it unread. The peak
    resident memory is measured in a fresh process (bench/refused_load_memory.py), so nothing this test allocates
    hides the load's."""
    good = save_good_adapter(tmp_path / "good")
    padded = write_padded_adapter(good, tmp_path / "padded", 1_000_000)
    size = (padded / WEIGHTS).stat().st_size
    assert size > header_limit(1000) * 10  # the file is far past any cap
    outcome, growth = measure(good, padded)
    assert outcome.startswith("REFUSED") and "refused unread" in outcome, outcome
    assert growth < 8 << 20, f"peak resident memory grew {growth / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB file"


# Mutation fuzz -------------------------------------------------------------------------------------------------------
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def mutations(draw, size: int):
    """A few bytes overwritten, a cut, or bytes inserted, anywhere in a file of `size` bytes."""
    kind = draw(st.sampled_from(["overwrite", "truncate", "insert"]))
    at = draw(st.one_of(st.integers(0, min(size - 1, 2048)), st.integers(0, size - 1)))  # the header half the time
    if kind == "truncate":
        return lambda raw: raw[:at]
    new = draw(st.binary(min_size=1, max_size=4))
    if kind == "insert":
        return lambda raw: raw[:at] + new + raw[at:]
    return lambda raw: raw[:at] + new + raw[at + len(new) :]


def _mutate_and_load(adapter: Path, tmp_path: Path, name: str, mutation, keep_checksum: bool):
    folder = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    for file in (WEIGHTS, CONFIG):
        (folder / file).write_bytes((adapter / file).read_bytes())
    if not keep_checksum:
        config = json.loads((folder / CONFIG).read_text())
        del config["sha256"]
        (folder / CONFIG).write_text(json.dumps(config, indent=2))
    original = (folder / name).read_bytes()
    (folder / name).write_bytes(mutation(original))
    changed = (folder / name).read_bytes() != original
    try:
        loaded = MoLoRAModel.from_pretrained(build_base("llama"), folder)
    except DOCUMENTED as err:
        event(f"refused: {type(err).__name__}")  # --hypothesis-show-statistics shows the outcomes
        return folder, changed, None
    event("loaded")
    return folder, changed, loaded


@pytest.mark.parametrize("name", [WEIGHTS, CONFIG])
@given(data=st.data())
@FUZZ
def test_fuzz_a_mutated_adapter_is_refused_unless_it_says_what_was_saved(adapter, tmp_path, name, data):
    """With its checksum, a mutated adapter never loads silently: a load means the same tensors and config."""
    mutation = data.draw(mutations((adapter / name).stat().st_size))
    _, changed, loaded = _mutate_and_load(adapter, tmp_path, name, mutation, keep_checksum=True)
    if loaded is not None:
        saved = load_file(str(adapter / WEIGHTS))
        state = loaded.adapter_state_dict()
        assert all(torch.equal(state[k], saved[k]) for k in saved), "a mutated adapter loaded other values"
        reference = MoLoRAModel.from_pretrained(build_base("llama"), adapter).molora_config
        assert loaded.molora_config == reference
        assert not changed or name == CONFIG  # only JSON whitespace can change and still say the same


@given(data=st.data())
@FUZZ
def test_fuzz_without_a_checksum_only_documented_errors_escape(adapter, tmp_path, data):
    """Without its checksum (a hand-written config), a mutated weights file is refused or loads exactly the values
    it holds, all finite: never another exception, never a hang."""
    mutation = data.draw(mutations((adapter / WEIGHTS).stat().st_size))
    folder, _, loaded = _mutate_and_load(adapter, tmp_path, WEIGHTS, mutation, keep_checksum=False)
    if loaded is not None:
        written = load_file(str(folder / WEIGHTS))
        state = loaded.adapter_state_dict()
        assert all(torch.equal(state[k], written[k]) and torch.isfinite(state[k]).all() for k in written)


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("peft")
    model = get_model()
    randomize_experts(model)
    export_peft(model, folder, expert=0)
    return folder


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
@given(data=st.data())
@FUZZ
def test_fuzz_peft_files_let_only_documented_errors_out(peft_adapter, tmp_path, name, data):
    """PEFT files carry no checksum: a changed value that is still a finite number loads as written (PEFT's format
    cannot tell), anything else is a ValueError or FileNotFoundError."""
    mutation = data.draw(mutations((peft_adapter / name).stat().st_size))
    folder = tmp_path / f"p{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    for file in ("adapter_model.safetensors", "adapter_config.json"):
        (folder / file).write_bytes((peft_adapter / file).read_bytes())
    (folder / name).write_bytes(mutation((folder / name).read_bytes()))
    try:
        model = from_peft_adapters(build_base("llama"), [folder, peft_adapter])
    except DOCUMENTED as err:
        event(f"refused: {type(err).__name__}")
        return
    event("loaded")
    assert all(torch.isfinite(p).all() for p in model.adapter_state_dict().values())
