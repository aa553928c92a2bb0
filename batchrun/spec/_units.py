"""Durations and sizes as a spec may write them: ``90``, ``"20m"``, ``"1h30m"``; ``67108864``, ``"64MiB"``."""

from __future__ import annotations

import math
import re
from typing import Any

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip



def parse_duration(value: Any) -> float | None:
    """Seconds in ``value`` (a number, ``"90"``, ``"90s"``, ``"1h30m"``), or ``None`` if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if not isinstance(value, str):
        return None
    text = value.strip().lower().replace(" ", "")
    try:
        return float(text)
    except ValueError:
        pass
    if not text or _DURATION_PART.sub("", text):
        return None
    return sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(text))


def parse_size(value: Any) -> int | None:
    """Bytes in ``value`` (an int, ``"64MB"``, ``"1GiB"``), or ``None`` if it is not a size."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        return None
    match = _SIZE.fullmatch(value.strip())
    if not match:
        return None
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[(unit or "b").lower()])


#: ``parameters.seed: per-row`` (or ``per-row:N``): each row sent with its own stable seed.
PER_ROW = "per-row"


def per_row_job_seed(value: object) -> int | None:
    """The job seed of ``parameters.seed: per-row`` (0) or ``per-row:N`` (N); None for anything else."""
    if not isinstance(value, str) or not (value == PER_ROW or value.startswith(PER_ROW + ":")):
        return None
    tail = value[len(PER_ROW) + 1:]
    if not tail:
        return 0
    if not tail.isdigit():
        return None
    return int(tail)
