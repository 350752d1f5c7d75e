"""Adapters by Hub id. huggingface_hub itself lays out its cache, from a local stand-in for the Hub's file endpoint
(the HEAD/GET of /org/name/resolve/revision/file, nothing else); the loads then run offline from that cache, through
the same checks as a local folder. The push is checked as the exact files and commit it would send."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest
import torch
from huggingface_hub import hf_hub_download

from molora import MoLoRAModel, export_peft, from_peft_adapters, get_molora_model
from molora.files.formats import ADAPTER_FORMAT, FormatVersionError
from tests.adapter_files import resign
from tests.conftest import build_base, make_batch, molora_config, randomize_experts

ADAPTER_FILES = ("adapter_model.safetensors", "molora_config.json")


class _Resolve(http.server.BaseHTTPRequestHandler):
    """GET/HEAD /{org}/{name}/resolve/{revision}/{file}: the file, with the commit and etag headers of the Hub."""

    protocol_version = "HTTP/1.1"
    repos: dict[tuple[str, str], dict[str, bytes]] = {}
    requested: list[str] = []

    def _answer(self) -> bytes | None:
        self.requested.append(self.path)
        parts = self.path.split("?")[0].strip("/").split("/")
        files = self.repos.get(("/".join(parts[:2]), parts[3])) if len(parts) == 5 and parts[2] == "resolve" else None
        if files is None or parts[4] not in files:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound" if files else "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        body = files[parts[4]]
        self.send_response(200)
        self.send_header("X-Repo-Commit", hashlib.sha1(parts[3].encode()).hexdigest())
        self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return body

    def do_HEAD(self):
        self._answer()

    def do_GET(self):
        body = self._answer()
        if body is not None:
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(tmp_path):
    """publish(repo, folder, revision, files) serves the folder's files, then downloads them into tmp_path/cache
    with huggingface_hub; returns that cache_dir."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Resolve)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    cache = tmp_path / "cache"

    def publish(repo: str, folder: Path, revision: str = "main", files=ADAPTER_FILES) -> Path:
        _Resolve.repos[(repo, revision)] = {name: (folder / name).read_bytes() for name in files}
        for name in files:
            hf_hub_download(repo, name, revision=revision, cache_dir=cache, endpoint=endpoint)
        return cache

    publish.endpoint = endpoint
    yield publish
    server.shutdown()
    _Resolve.repos.clear()


@contextlib.contextmanager
def offline():
    """No network inside: huggingface_hub's offline switch on, and the stand-in Hub is never consulted."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setenv("HF_HUB_OFFLINE", "1")
        _Resolve.requested.clear()
        yield
    assert _Resolve.requested == []


def _saved(folder: Path, seed: int) -> MoLoRAModel:
    torch.manual_seed(seed)
    model = get_molora_model(build_base("llama"), molora_config("llama"))
    randomize_experts(model)
    model.save_pretrained(folder)
    return model


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**make_batch()).logits


def test_an_adapter_loads_by_hub_id_and_revision_offline_from_the_cache(hub, tmp_path):
    main, v1 = _saved(tmp_path / "main", 0), _saved(tmp_path / "v1", 1)
    hub("org/adapter", tmp_path / "main")
    cache = hub("org/adapter", tmp_path / "v1", revision="v1")
    # the cache is huggingface_hub's own layout: blobs, snapshots per commit, refs per revision
    assert {p.name for p in (cache / "models--org--adapter" / "refs").iterdir()} == {"main", "v1"}
    with offline():
        loaded = MoLoRAModel.from_pretrained(build_base("llama"), "org/adapter", cache_dir=cache)
        older = MoLoRAModel.from_pretrained(build_base("llama"), "org/adapter", revision="v1", cache_dir=cache)
    torch.testing.assert_close(_logits(loaded), _logits(main), rtol=0, atol=0)
    torch.testing.assert_close(_logits(older), _logits(v1), rtol=0, atol=0)


def test_a_hub_adapter_meets_the_same_checks_as_a_folder(hub, tmp_path):
    _saved(tmp_path / "newer", 0)
    config = json.loads((tmp_path / "newer" / "molora_config.json").read_text())
    (tmp_path / "newer" / "molora_config.json").write_text(json.dumps({**config, "format_version": ADAPTER_FORMAT + 1}))
    resign(tmp_path / "newer")
    _saved(tmp_path / "nan", 0)
    raw = bytearray((tmp_path / "nan" / "adapter_model.safetensors").read_bytes())
    raw[-4:] = torch.tensor([float("nan")]).numpy().tobytes()
    (tmp_path / "nan" / "adapter_model.safetensors").write_bytes(bytes(raw))
    resign(tmp_path / "nan")
    hub("org/newer", tmp_path / "newer")
    cache = hub("org/nan", tmp_path / "nan")
    with offline(), pytest.raises(FormatVersionError, match="pip install -U molora"):
        MoLoRAModel.from_pretrained(build_base("llama"), "org/newer", cache_dir=cache)
    with offline(), pytest.raises(ValueError, match="NaN or inf"):
        MoLoRAModel.from_pretrained(build_base("llama"), "org/nan", cache_dir=cache)


def test_a_hub_id_fetches_safetensors_and_json_only(hub, tmp_path, monkeypatch):
    """A repo that holds the adapter as a pickle (adapter_model.bin): molora asks the Hub for the safetensors file,
    is told there is none, and never requests the pickle."""
    import huggingface_hub

    _saved(tmp_path / "a", 0)
    (tmp_path / "a" / "adapter_model.bin").write_bytes(b"a pickle molora must never fetch")
    hub("org/pickled", tmp_path / "a", files=("adapter_model.bin", "molora_config.json"))
    online = functools.partial(huggingface_hub.hf_hub_download, endpoint=hub.endpoint)  # to the stand-in Hub
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", online)
    _Resolve.requested.clear()
    with pytest.raises(FileNotFoundError, match=r"the Hub repo org/pickled .* has no adapter_model\.safetensors"):
        MoLoRAModel.from_pretrained(build_base("llama"), "org/pickled", cache_dir=tmp_path / "fresh")
    assert _Resolve.requested and all(path.endswith("/adapter_model.safetensors") for path in _Resolve.requested)


def test_hub_options_on_a_local_folder_are_an_error(tmp_path):
    _saved(tmp_path / "a", 0)
    with pytest.raises(ValueError, match=r"\['revision'\] only apply to a Hub id"):
        MoLoRAModel.from_pretrained(build_base("llama"), tmp_path / "a", revision="v1")


def test_peft_adapters_load_by_hub_id(hub, tmp_path):
    model = _saved(tmp_path / "m", 0)
    for expert in (0, 1):
        export_peft(model, tmp_path / f"peft{expert}", expert=expert)
        hub(f"org/peft{expert}", tmp_path / f"peft{expert}", files=("adapter_model.safetensors", "adapter_config.json"))
    cache = tmp_path / "cache"
    with offline():
        by_id = from_peft_adapters(build_base("llama"), ["org/peft0", "org/peft1"], cache_dir=cache)
    by_path = from_peft_adapters(build_base("llama"), [tmp_path / "peft0", tmp_path / "peft1"])
    torch.manual_seed(0)
    first = _logits(by_id)
    torch.manual_seed(0)
    torch.testing.assert_close(first, _logits(by_path), rtol=0, atol=0)


# Push ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def recorded_push(monkeypatch):
    """HfApi.create_repo/create_commit record what they were given and send nothing."""
    from huggingface_hub import HfApi

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        calls.append(("create_commit", repo_id, {**kwargs, "files": files}))
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def test_push_to_hub_sends_the_two_adapter_files_as_one_commit(recorded_push, tmp_path):
    model = _saved(tmp_path / "local", 0)
    assert model.push_to_hub("org/mine", private=True, revision="dev", commit_message="v1") == "commit-info"
    (_, repo, repo_options), (_, commit_repo, commit) = recorded_push
    assert (repo, commit_repo, repo_options) == ("org/mine", "org/mine", {"private": True, "exist_ok": True})
    assert commit["commit_message"] == "v1" and commit["revision"] == "dev" and commit["create_pr"] is False
    assert commit["files"] == {name: (tmp_path / "local" / name).read_bytes() for name in ADAPTER_FILES}


def test_save_pretrained_pushes_what_it_saved(recorded_push, tmp_path):
    model = _saved(tmp_path / "first", 0)
    model.save_pretrained(tmp_path / "my-adapter", push_to_hub=True)
    model.save_pretrained(tmp_path / "other", push_to_hub=True, repo_id="org/named", bits=8)
    (_, repo, _), (_, _, commit), (_, named, _), (_, _, int8) = recorded_push
    assert repo == "my-adapter" and named == "org/named"
    assert commit["files"] == {name: (tmp_path / "my-adapter" / name).read_bytes() for name in ADAPTER_FILES}
    assert int8["files"] == {name: (tmp_path / "other" / name).read_bytes() for name in ADAPTER_FILES}
