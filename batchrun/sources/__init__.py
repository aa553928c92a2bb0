"""Input rows, streamed: Parquet (a file, a folder or a glob), JSONL, a ``datasets`` dataset, or rows
given in Python (a Dataset, a DataFrame or a list of dicts: ``_memory``).

Every source reads in batches, so memory stays flat however large the input is, and gives rows in
one deterministic order. ``Row.position`` is the row's 0-based index in that order and is what
resume relies on, so the order depends only on the input itself:

- Parquet, JSONL and OpenAI batch files are read in the sorted order of their paths (plain string order:
  ``part-10`` comes before ``part-2``), each file from its first row to its last.
- A folder written by ``Dataset.save_to_disk`` is read from its memory-mapped Arrow table.
- Anything else under ``input.dataset`` goes through ``datasets.load_dataset_builder(...)
  .as_streaming_dataset(split)``, which is what ``load_dataset(..., streaming=True)`` does, keeping
  the builder so that the resolved data files are known. Rows come as Arrow, so ``Image`` columns
  stay raw ``{"bytes", "path"}`` dicts and nothing is decoded here.

Relative paths are resolved against the current working directory, and error messages say which
directory that was.

Fingerprints (``Source.fingerprint()``) identify the input's *content*, not where it lives, so a
job resumes after the project folder is moved or copied:

- each file is named relative to the input's root (the folder, the glob's fixed prefix, or the
  file itself) and contributes its size and a content digest: for Parquet, a hash of the footer
  (it holds every row group's offsets, sizes and statistics); for other files, a hash of the whole
  file up to 64 MiB, or of its first and last MiB beyond that;
- modification times are left out on purpose: a copy (``cp``, a download, a checkout) changes them
  while the data stays the same, and a fingerprint that changes then would refuse a valid resume;
- ``id_column`` is part of the fingerprint (it decides the ids in the output); ``limit`` is not, so
  a job may be resumed with a higher limit to extend it;
- a streamed dataset adds its config (path, name, split, revision, options). Hub data files are
  resolved with their commit, so an unpinned ``revision`` still fingerprints what was read.
"""

from __future__ import annotations

from batchrun.errors import InputError
from batchrun.sources._base import (
    EXACT_ID_SCAN_ROWS,
    ID_SCAN_BATCH,
    MAX_DUPLICATES_REPORTED,
    DoneMask,
    Source,
    _BaseSource,
    _check_columns,
)
from batchrun.sources._datasets import SavedDatasetSource, StreamedDatasetSource, _saved_dataset_folder
from batchrun.sources._files import FULL_DIGEST_MAX_BYTES, SAMPLE_DIGEST_BYTES
from batchrun.sources._jsonl import JsonlSource
from batchrun.sources._jsonl_types import JSONL_NESTED_SAMPLE
from batchrun.sources._memory import MEMORY_INPUTS, MemorySource, as_arrow_table
from batchrun.sources._openai_batch import OPENAI_BATCH_SCHEMA, OpenAIBatchSource
from batchrun.sources._parquet import PARQUET_BUFFER_SIZE, ParquetSource
from batchrun.sources._step import StepSource, committed_rows
from batchrun.spec import InputSpec

__all__ = [
    "EXACT_ID_SCAN_ROWS",
    "FULL_DIGEST_MAX_BYTES",
    "ID_SCAN_BATCH",
    "JSONL_NESTED_SAMPLE",
    "MAX_DUPLICATES_REPORTED",
    "MEMORY_INPUTS",
    "OPENAI_BATCH_SCHEMA",
    "PARQUET_BUFFER_SIZE",
    "SAMPLE_DIGEST_BYTES",
    "DoneMask",
    "JsonlSource",
    "MemorySource",
    "OpenAIBatchSource",
    "ParquetSource",
    "SavedDatasetSource",
    "Source",
    "StepSource",
    "StreamedDatasetSource",
    "as_arrow_table",
    "committed_rows",
    "open_source",
]


def open_source(spec: InputSpec) -> Source:
    """Open the input a job spec names, checking what can be checked without reading every row.

    Raises :class:`InputError` for a missing or unreadable input, an ``id_column`` the input does
    not have, or an id column of an unusable type. (Whether ``keep_columns`` and the prompt's
    columns exist is the job's preflight to check, against :attr:`Source.schema`.)
    """
    if spec.kind == "parquet":
        source: _BaseSource = ParquetSource(spec)
    elif spec.kind == "jsonl":
        source = JsonlSource(spec)
    elif spec.kind == "openai_batch":
        source = OpenAIBatchSource(spec)
    elif spec.kind == "dataset":
        assert spec.dataset is not None
        saved = _saved_dataset_folder(spec.dataset)
        source = SavedDatasetSource(spec, saved) if saved else StreamedDatasetSource(spec)
    elif spec.kind == "memory":
        source = MemorySource(spec)
    elif spec.kind == "step":
        source = StepSource(spec)
    else:  # pragma: no cover - the spec parser only produces the three kinds above
        raise InputError(f"unknown input kind {spec.kind!r}")
    _check_columns(spec, source)
    return source

