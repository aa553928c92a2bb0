"""Rows handed over from Python: a ``datasets.Dataset``, a pandas ``DataFrame`` or a list of dicts.

They become one Arrow table (:func:`as_arrow_table`), read like a saved dataset: in order, a slice
at a time, so a row's position is its index in what was given. Its fingerprint is a digest of the
table's content (its schema and every value, written as an Arrow IPC stream), so a resume of the
same output with other rows, or the same rows in another order, is refused like a changed file.
``Image`` columns of a Dataset stay raw ``{"bytes", "path"}`` dicts, as from any dataset input.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pyarrow as pa

from batchrun.errors import InputError
from batchrun.sources._base import ID_SCAN_BATCH, _TableSource
from batchrun.sources._files import _fingerprint, _plural
from batchrun.spec import InputSpec

#: What ``input=`` may be, said in the error for anything else.
MEMORY_INPUTS = "a datasets.Dataset, a pandas DataFrame, a pyarrow Table or a list of dicts"


def as_arrow_table(data: Any) -> pa.Table:
    """``data`` (a Dataset, a DataFrame, a pyarrow Table or a list of dicts) as one Arrow table.

    A Dataset keeps its features in the table's metadata, and its selection or shuffle (an indices
    mapping) is applied. Raises :class:`InputError` for anything else.
    """
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, list):
        if not all(isinstance(row, dict) for row in data):
            raise InputError(f"input: a list must hold one dict per row; expected {MEMORY_INPUTS}")
        try:
            return pa.Table.from_pylist(data)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise InputError(f"input: the rows cannot become one table (do their values disagree in type?): {exc}") \
                from None
    kind = type(data)
    if kind.__module__.startswith("datasets") and hasattr(data, "with_format"):
        if not hasattr(data, "num_rows") or isinstance(getattr(data, "num_rows", None), dict):
            raise InputError("input: a DatasetDict holds several splits; pass one of them (such as ds['train'])")
        table = data.with_format("arrow")[:]  # the indices mapping applied, Image columns left undecoded
        return table.replace_schema_metadata({**(table.schema.metadata or {}),
                                              **(data.features.arrow_schema.metadata or {})})
    if kind.__module__.startswith("pandas") and hasattr(data, "to_dict"):
        try:
            return pa.Table.from_pandas(data, preserve_index=False)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise InputError(f"input: the DataFrame cannot become an Arrow table: {exc}") from None
    raise InputError(f"input: expected {MEMORY_INPUTS}, got {kind.__name__}")


def table_digest(table: pa.Table) -> str:
    """A digest of the table's columns and values (its metadata left out), in its row order."""
    digest = hashlib.sha256()

    class _Sink:  # the IPC stream, hashed as it is written, never held whole
        closed = False

        def write(self, data: Any) -> int:
            view = memoryview(data)
            digest.update(view)
            return view.nbytes

        def flush(self) -> None:
            pass

    bare = table.replace_schema_metadata(None).combine_chunks()
    with pa.ipc.new_stream(pa.PythonFile(_Sink(), mode="w"), bare.schema) as writer:
        for batch in bare.to_batches(max_chunksize=ID_SCAN_BATCH):
            writer.write_batch(batch)
    return digest.hexdigest()


class MemorySource(_TableSource):
    """Rows from Python, held as one Arrow table (:attr:`InputSpec.memory`)."""

    def __init__(self, spec: InputSpec) -> None:
        super().__init__(spec)
        if not isinstance(spec.memory, pa.Table):
            raise InputError(f"input: the rows given in Python are missing; expected {MEMORY_INPUTS}")
        self._table: pa.Table = spec.memory
        self.schema = self._table.schema
        self._digest: str | None = None
        self.description = f"memory: rows given in Python ({_plural(self._table.num_rows, 'row')})"

    def _total_rows(self) -> int:
        return self._table.num_rows

    def fingerprint(self) -> str:
        if self._digest is None:
            self._digest = table_digest(self._table)
        return _fingerprint({"kind": "memory", "id_column": self.id_column, "content": self._digest})
