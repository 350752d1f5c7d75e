"""The user's own domains: JSONL or CSV rows, every row checked, every error naming its file and line."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from molora.run.domains import Record

if TYPE_CHECKING:
    from molora.run.data_config import DataConfig


def _decode(path: Path) -> str:
    """The file's text; a byte that is not UTF-8 is an error naming its line (a leading BOM is allowed)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        decoded = err.object  # (after the BOM, if there was one: the offsets count from there)
        line = decoded.count(b"\n", 0, err.start) + 1
        bad = decoded[err.start : err.end]
        raise ValueError(f"{path}, line {line}: not UTF-8 (bytes {bad!r}); save the file as UTF-8") from None


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line, row) per non-blank line; split on newlines only (JSON strings may hold U+2028)."""
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}, line {number}: invalid JSON ({err.msg}, column {err.colno}); data files hold one JSON "
                "object per line"
            ) from None
        if not isinstance(row, dict):
            kind = type(row).__name__
            raise ValueError(f"{path}, line {number}: expected a JSON object {{field: value}}, got a {kind}")
        yield number, row


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line where the row starts, {header: cell}); quoted cells may span lines, blank lines are skipped."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    header_line = end = 0
    try:
        for cells in reader:
            start, end = end + 1, reader.line_num
            if not cells:
                continue
            if header is None:
                header, header_line = cells, start
                continue
            if len(cells) != len(header):
                raise ValueError(
                    f"{path}, line {start}: {len(cells)} fields, but the header (line {header_line}) has "
                    f"{len(header)}: {header}"
                )
            yield start, dict(zip(header, cells, strict=True))
    except csv.Error as err:
        raise ValueError(f"{path}, line {reader.line_num}: invalid CSV ({err})") from None


def _text(row: dict[str, Any], name: str, setting: str, where: str) -> str:
    value = row[name]
    if value is None or isinstance(value, (bool, dict, list)):
        raise ValueError(f"{where}: field {name!r} ({setting}) must be text, got {json.dumps(value)}")
    text = str(value)
    if not text.strip():
        raise ValueError(f"{where}: field {name!r} ({setting}) is empty; every example needs it")
    return text


def _record(row: dict[str, Any], config: DataConfig, where: str) -> tuple[str, Record]:
    """(domain, record) of one row, every field present, text and not empty."""
    if config.domain_field not in row:
        raise ValueError(f"{where}: missing field {config.domain_field!r} (data.domain_field); it has {sorted(row)}")
    domain = _text(row, config.domain_field, "data.domain_field", where)
    if config.prompt_field in row and config.response_field in row:
        prompt = _text(row, config.prompt_field, "data.prompt_field", where)
        return domain, {"prompt": prompt, "response": _text(row, config.response_field, "data.response_field", where)}
    if config.text_field in row:
        return domain, {"prompt": "", "response": _text(row, config.text_field, "data.text_field", where)}
    raise ValueError(
        f"{where}: needs {config.text_field!r} (data.text_field) or both {config.prompt_field!r} and "
        f"{config.response_field!r} (data.prompt_field, data.response_field); it has {sorted(row)}"
    )


def read_user_rows(config: DataConfig) -> tuple[dict[str, list[Record]], dict[str, str]]:
    """({domain: records}, {domain: 'file, line N' where it first appears}); every row is checked."""
    by_domain: dict[str, list[Record]] = {}
    first_seen: dict[str, str] = {}
    for name in config.files:
        path = Path(name)
        text = _decode(path)
        rows = _csv_rows(path, text) if path.suffix == ".csv" else _jsonl_rows(path, text)
        count = 0
        for number, row in rows:
            where = f"{path}, line {number}"
            domain, record = _record(row, config, where)
            by_domain.setdefault(domain, []).append(record)
            first_seen.setdefault(domain, where)
            count += 1
        if not count:
            raise ValueError(f"{path}: no examples in the file")
    return by_domain, first_seen


def read_user_files(config: DataConfig) -> dict[str, list[Record]]:
    """{domain: records} from JSONL/CSV rows with a text field, or prompt and response fields, and a domain field.

    A bad row (missing or empty field, invalid JSON or CSV, not UTF-8) is a ValueError naming file and line.
    """
    return read_user_rows(config)[0]
