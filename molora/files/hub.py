"""Adapters by Hugging Face Hub id: `org/name` resolved through huggingface_hub's own download and cache (so
HF_HUB_OFFLINE, HF_HOME and tokens behave as everywhere else), the safetensors and JSON files only, and pushed
back as one commit. What comes down is read by the same checked readers as a local folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

HUB_OPTIONS = ("revision", "cache_dir", "token", "local_files_only")


def is_hub_id(path: str | Path) -> bool:
    """`org/name` and no such local folder: how PEFT and transformers tell a Hub id from a path."""
    text = str(path)
    if Path(text).exists() or text.count("/") != 1 or text.startswith((".", "/")) or "\\" in text:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def adapter_folder(path: str | Path, files: Sequence[str], **hub: Any) -> Path:
    """The local folder of an adapter: `path` itself, or the snapshot folder huggingface_hub downloads `files` of the
    Hub repo `path` into (at `revision`, from its cache when offline). A file the repo lacks is a FileNotFoundError."""
    unknown = sorted(set(hub) - set(HUB_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected Hub options {unknown}; these are {list(HUB_OPTIONS)}")
    if not is_hub_id(path):
        if any(value is not None and value is not False for value in hub.values()):
            given = sorted(key for key, value in hub.items() if value is not None and value is not False)
            raise ValueError(f"{given} only apply to a Hub id (org/name); {path} is a local path")
        return Path(path)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    folder = None
    for name in files:
        try:
            folder = Path(hf_hub_download(str(path), name, **{k: v for k, v in hub.items() if v is not None})).parent
        except EntryNotFoundError:
            raise FileNotFoundError(f"the Hub repo {path} ({_at(hub)}) has no {name}") from None
        except LocalEntryNotFoundError as err:
            raise FileNotFoundError(
                f"{path}: {name} is neither in the local Hub cache nor downloadable ({err})"
            ) from None
        except HfHubHTTPError as err:
            raise FileNotFoundError(f"the Hub repo {path} ({_at(hub)}): {err}") from None
    assert folder is not None
    return folder


def _at(hub: dict[str, Any]) -> str:
    return f"revision {hub['revision']}" if hub.get("revision") else "its main branch"


def push_adapter(
    folder: Path,
    files: Sequence[str],
    repo_id: str,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> Any:
    """`files` of `folder` to `repo_id` as one commit (the repo created if needed); huggingface_hub's CommitInfo."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or "Upload molora adapter",
        revision=revision,
        create_pr=create_pr,
    )
