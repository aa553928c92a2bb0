"""OpenAI Batch input files: JSON Lines of ``custom_id``, ``method``, ``url`` and ``body``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from batchrun.errors import InputError
from batchrun.facts import OPENAI_BATCH_ID
from batchrun.sources._base import DoneMask, _BaseSource
from batchrun.sources._files import _file_digest, _fingerprint, _plural, _relative_name, _resolve_files
from batchrun.sources._json_lines import _in_batches, _json_objects, _json_text
from batchrun.spec import InputSpec

#: The columns of an OpenAI batch file's rows. ``body`` is the request body's JSON text, so that the
#: bodies of any route (chat messages, completion prompts, tools ...) share one column type.
OPENAI_BATCH_SCHEMA = pa.schema(
    [
        pa.field(OPENAI_BATCH_ID, pa.string()),
        pa.field("method", pa.string()),
        pa.field("url", pa.string()),
        pa.field("body", pa.string()),
    ]
)


class OpenAIBatchSource(_BaseSource):
    """Rows from an OpenAI Batch input file: one request a line (``custom_id``, ``method``, ``url``, ``body``).

    The whole file is checked when it is opened, before anything is resumed: a line that is not a
    JSON object, a missing or non-string ``custom_id``, or a ``custom_id`` used twice raises
    :class:`InputError` naming the file and line. The ids are collected for that (a dict of the
    ids, about 100 bytes each: OpenAI caps a batch file at 50,000 requests). What a line asks for
    (its ``method``, ``url`` and ``body``) is the task's to judge, row by row: a request batchrun
    cannot serve becomes a failure row, not a refused job. Blank lines are skipped.
    """

    def __init__(self, spec: InputSpec) -> None:
        super().__init__(spec)
        assert spec.path is not None
        self.files, root = _resolve_files(spec.path, "input.openai_batch", (".jsonl", ".ndjson"))
        self._identity = [
            {"name": _relative_name(p, root), "size": p.stat().st_size, "digest": _file_digest(p)} for p in self.files
        ]
        self.schema = OPENAI_BATCH_SCHEMA
        seen: dict[str, str] = {}  # custom_id -> where it was first found
        for where, line in self._lines(self.unencodable):
            custom_id = line.get("custom_id")
            if custom_id is None or custom_id == "":
                raise InputError(f"input.openai_batch: {where}: the request has no custom_id")
            if not isinstance(custom_id, str):
                raise InputError(
                    f"input.openai_batch: {where}: custom_id must be a string, got {json.dumps(custom_id)}"
                )
            if custom_id in seen:
                raise InputError(
                    f"input.openai_batch: {where}: custom_id {custom_id!r} is used twice (first on {seen[custom_id]}); "
                    "every request needs its own custom_id, which names its result"
                )
            seen[custom_id] = where
        self._count = len(seen)
        self.description = (
            f"openai batch: {spec.path} ({_plural(len(self.files), 'file')}, {_plural(self._count, 'request')})"
        )

    def _lines(self, unencodable: list[str] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """Each request line as a JSON object, with where it is (``requests.jsonl, line 3``)."""
        expected = "a JSON object (custom_id, method, url, body)"
        yield from _json_objects(
            self.files, "input.openai_batch", expected, name_files=len(self.files) > 1, unencodable=unencodable,
            id_key=OPENAI_BATCH_ID,
        )

    @staticmethod
    def _columns(line: dict[str, Any]) -> dict[str, Any]:
        body = line.get("body")
        return {
            OPENAI_BATCH_ID: line["custom_id"],
            "method": None if line.get("method") is None else _json_text(line["method"]),
            "url": None if line.get("url") is None else _json_text(line["url"]),
            "body": None if body is None else json.dumps(body, ensure_ascii=False),
        }

    def _total_rows(self) -> int:
        return self._count

    def fingerprint(self) -> str:
        return _fingerprint({"kind": "openai_batch", "files": self._identity})

    def find_duplicate_ids(self) -> list:
        """Always ``[]``: the file was refused at open time if a custom_id repeats (with its line)."""
        return []

    def _chunks(self, batch_size: int, done: DoneMask | None = None) -> Iterator[list[dict[str, Any]]]:
        return _in_batches((self._columns(line) for _where, line in self._lines()), batch_size)

    def _id_chunks(self) -> Iterator[list[Any]]:
        chunk = [line["custom_id"] for _where, line in self._lines()]
        if chunk:
            yield chunk


