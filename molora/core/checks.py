"""Checks on the numbers a config or a router reads, shared by both (so that neither imports the other for them)."""

from __future__ import annotations

import math
from typing import Any


def check_number(name: str, value: Any, *, minimum: int | float, kind: type, strict: bool = False) -> None:
    ok_type = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float:
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok_type:
        raise ValueError(f"{name} must be {kind.__name__}, got {value!r}")
    # NaN passes every comparison below, and an infinite scale or weight turns the zero-initialised adapter into NaN.
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise ValueError(f"{name} must be {relation} {minimum}, got {value!r}")
