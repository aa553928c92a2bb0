"""Reading JSON Lines files: their objects in batches, and a JSON value as text."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from batchrun.errors import InputError
from batchrun.records import storable

# A JSON escape of a UTF-16 surrogate: a line holding one may decode to a string UTF-8 cannot store.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _json_objects(
    files: Sequence[Path], key: str, expected: str, *, name_files: bool, unencodable: list[str] | None = None,
    id_key: str | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every non-blank line of ``files`` as a JSON object, with where it is (``FILE, line N``).

    A file that cannot be opened, a line that is not JSON, or one that is not an object raises
    InputError naming ``key`` (the spec key) and the line. ``name_files``: say each file's path; else
    only its name (one file).

    JSON may escape a lone UTF-16 surrogate (``"\\ud83d"``, half an emoji), which UTF-8, and so the
    output, cannot hold: such a string is read with U+FFFD in its place, and the line's place (with
    its ``id_key`` value, when it has one) is appended to ``unencodable`` when given.
    """
    for path in files:
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the `with` below; opening gets its own message
        except OSError as exc:
            raise InputError(f"{key}: cannot read {str(path)!r}: {exc}") from None
        with f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                where = f"{path if name_files else path.name}, line {number}"
                try:
                    value = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise InputError(f"{key}: {where}: not valid JSON: {exc}") from None
                if not isinstance(value, dict):
                    raise InputError(f"{key}: {where}: expected {expected}, got {type(value).__name__}")
                if _SURROGATE_ESCAPE.search(raw):
                    stored = storable(value)
                    if stored is not value and unencodable is not None:
                        row_id = stored.get(id_key) if id_key is not None else None
                        unencodable.append(where if row_id is None else f"id {row_id!r} ({where})")
                    value = stored
                yield where, value


def _in_batches(values: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    """``values`` in lists of at most ``size`` (``itertools.batched`` arrives in Python 3.12)."""
    batch: list[dict[str, Any]] = []
    for value in values:
        batch.append(value)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _json_text(value: Any) -> str:
    """A JSON value as text for a string column: strings unchanged, anything else as its JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
