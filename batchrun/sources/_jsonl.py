"""JSONL input: a file, a folder or a glob of JSON Lines, typed over the whole input."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from batchrun.sources._base import ID_SCAN_BATCH, DoneMask, _BaseSource
from batchrun.sources._files import _file_digest, _fingerprint, _plural, _relative_name, _resolve_files
from batchrun.sources._json_lines import _in_batches, _json_objects
from batchrun.sources._jsonl_types import _JsonlTypes
from batchrun.spec import InputSpec


class JsonlSource(_BaseSource):
    """Rows from JSON Lines files, one object a line, read line by line.

    JSON has no schema, and a streamed run must never meet a row that the output cannot hold after
    it has paid for the answer. So the whole input is scanned once when it is opened (it is read
    anyway for the count and the fingerprint), keeping only a small summary per column, and every
    column gets a type that all its values fit (see :class:`_JsonlTypes`):

    - only integers: int64; integers and decimals: float64; only strings, or only booleans: their type;
    - only lists, or only objects: the Arrow type they all unify to;
    - anything else (integers and strings, an integer beyond int64, lists of mixed types...): string,
      with each value that is not a string written as its JSON text (id ``7`` becomes ``"7"``).

    Rows are handed out already converted to those types, so ``Row.id`` and ``Row.columns`` match
    :attr:`schema`. Columns are the keys of all rows, in order of first appearance; a key missing
    from a row is ``None``. Blank lines are skipped and take no position. A line that is not a JSON
    object raises :class:`InputError` naming the file and line, when the input is opened.
    """

    def __init__(self, spec: InputSpec) -> None:
        super().__init__(spec)
        assert spec.path is not None
        self.files, root = _resolve_files(spec.path, "input.jsonl", (".jsonl", ".ndjson", ".json"))
        self._identity = [
            {"name": _relative_name(p, root), "size": p.stat().st_size, "digest": _file_digest(p)} for p in self.files
        ]
        types = _JsonlTypes()
        for value in self._objects(self.unencodable):
            types.add(value)
        self.schema, self._converters = types.settle()
        self._names = self.schema.names
        self._count = types.rows
        self.description = f"jsonl: {spec.path} ({_plural(len(self.files), 'file')}, {_plural(self._count, 'row')})"

    def _objects(self, unencodable: list[str] | None = None) -> Iterator[dict[str, Any]]:
        for _where, value in _json_objects(
            self.files, "input.jsonl", "a JSON object", name_files=True, unencodable=unencodable, id_key=self.id_column
        ):
            yield value

    def _settled(self, value: dict[str, Any]) -> dict[str, Any]:
        columns = {name: value.get(name) for name in self._names}
        for name, convert in self._converters.items():
            if columns[name] is not None:
                columns[name] = convert(columns[name])
        return columns

    def _total_rows(self) -> int:
        return self._count

    def fingerprint(self) -> str:
        return _fingerprint({"kind": "jsonl", "id_column": self.id_column, "files": self._identity})

    def _chunks(self, batch_size: int, done: DoneMask | None = None) -> Iterator[list[dict[str, Any]]]:
        return _in_batches((self._settled(value) for value in self._objects()), batch_size)

    def _id_chunks(self) -> Iterator[list[Any]]:
        assert self.id_column is not None
        convert = self._converters.get(self.id_column)
        chunk: list[Any] = []
        for value in self._objects():
            item = value.get(self.id_column)
            chunk.append(convert(item) if convert is not None and item is not None else item)
            if len(chunk) >= ID_SCAN_BATCH:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


