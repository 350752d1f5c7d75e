"""Helpers for tests that write adapter files by hand, as someone other than molora would."""

from __future__ import annotations

import json
from pathlib import Path

from molora.core.config import CONFIG_NAME, WEIGHTS_NAME
from molora.deploy.adapter_files import adapter_file_digest


def resign(folder: Path) -> None:
    """Recompute molora_config.json's sha256 after the files were changed: what anyone handing over an altered
    adapter can do, so that the checks behind the checksum are what a test meets."""
    path = folder / CONFIG_NAME
    data = json.loads(path.read_text())
    data.pop("sha256", None)
    data["sha256"] = adapter_file_digest(folder / WEIGHTS_NAME, data)
    path.write_text(json.dumps(data, indent=2))
