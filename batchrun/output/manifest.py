"""The manifest, ``state/manifest.jsonl``: one JSON line per event, and the truth about what is published.

Events: ``run`` (a run started; its number names its shards), ``publish`` (a shard counts from now
on; ``replaces`` retires the shard it replaces in the same line) and ``retire`` (a shard no longer
counts; ``aside`` says which folder under ``state/`` it belongs in). Replaying the lines in order
gives the :class:`ManifestView`. Only the last line can be cut short by a crash, and it never counted.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchrun.errors import OutputError

__all__ = [
    "POSITION_DTYPE",
    "ManifestLog",
    "ManifestView",
    "ShardFile",
    "file_crc32",
    "read_manifest",
    "read_positions",
    "shard_problem",
]

# Sidecars are little-endian whatever the machine, so an output folder can be moved between hosts.
POSITION_DTYPE = np.dtype("<u8")


@dataclass(frozen=True, slots=True)
class ShardFile:
    """One published Parquet file (a shard of the output) as the manifest describes it."""

    kind: str  # "data" or "failed"
    file: str  # relative to the output root, e.g. "data/part-00003-r2.parquet"
    positions: str  # relative to the output root
    rows: int
    retryable: int  # failed shards: how many of its rows are retryable
    seq: int
    # The file as it was published (older manifests lack crc32 and mtime_ns; see shard_problem).
    bytes: int | None = None
    crc32: int | None = None
    mtime_ns: int | None = None

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> ShardFile:
        """The shard a ``publish`` event lists. Raises KeyError/ValueError/TypeError for a malformed one."""
        return cls(
            kind=event["kind"],
            file=event["file"],
            positions=event["positions"],
            rows=int(event["rows"]),
            retryable=int(event.get("retryable", 0)),
            seq=int(event["seq"]),
            bytes=_optional_int(event.get("bytes")),
            crc32=_optional_int(event.get("crc32")),
            mtime_ns=_optional_int(event.get("mtime_ns")),
        )


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def file_crc32(path: Path) -> int:
    """The CRC-32 of a whole file, read 1 MiB at a time."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


@dataclass
class ManifestView:
    """What the manifest says: the shards that count, the ones retired, and where the log ends."""

    listed: dict[str, ShardFile]
    retired: dict[str, str]  # file -> the folder under state/ it belongs in
    runs: int
    max_seq: int
    good_bytes: int  # offset just past the last complete line
    torn: bool  # the last line was cut short by a crash

    def apply(self, event: dict[str, Any]) -> None:
        """Replay one event."""
        op = event.get("op")
        if op == "run":
            self.runs += 1
        elif op == "publish":
            shard = ShardFile.from_event(event)
            self.listed[shard.file] = shard
            self.retired.pop(shard.file, None)
            self.max_seq = max(self.max_seq, shard.seq)
            replaced = event.get("replaces")
            if replaced:
                self.listed.pop(replaced, None)
                self.retired[replaced] = "retired"
        elif op == "retire":
            self.listed.pop(event["file"], None)
            self.retired[event["file"]] = event.get("aside", "retired")


def _line_spans(raw: bytes) -> list[tuple[int, int, bool]]:
    """(start, end, has_newline) of every line, so that a torn tail can be cut at an exact offset."""
    spans: list[tuple[int, int, bool]] = []
    offset = 0
    while offset < len(raw):
        newline = raw.find(b"\n", offset)
        if newline == -1:
            spans.append((offset, len(raw), False))
            break
        spans.append((offset, newline, True))
        offset = newline + 1
    return spans


def read_manifest(path: Path) -> ManifestView:
    """Replay ``manifest.jsonl``. A last line cut short by a crash mid-append is ignored."""
    view = ManifestView(listed={}, retired={}, runs=0, max_seq=-1, good_bytes=0, torn=False)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return view
    except OSError as exc:
        raise OutputError(f"cannot read {path}: {exc}") from exc

    spans = _line_spans(raw)
    last_content = max((i for i, (a, b, _) in enumerate(spans) if raw[a:b].strip()), default=-1)
    for index, (start, end, has_newline) in enumerate(spans):
        line = raw[start:end]
        if line.strip():
            try:
                event = json.loads(line)
                if not isinstance(event, dict):
                    raise ValueError("a line is not a JSON object")
                view.apply(event)
            except (ValueError, KeyError, TypeError) as exc:
                if index == last_content:
                    # Only the last line can be cut short by a crash; whatever it was, it never counted.
                    view.torn = True
                    return view
                raise OutputError(
                    f"{path} is damaged at line {index + 1} ({exc}); it is the record of what is done, "
                    "so batchrun will not guess: restore it, or pass --fresh to set this output aside"
                ) from exc
        # A complete object whose newline never made it still counts, but the file needs the newline.
        view.torn = not has_newline
        view.good_bytes = end + 1 if has_newline else end
    return view


class ManifestLog:
    """The manifest open for appending. Each :meth:`append` is durable when it returns."""

    def __init__(self, path: Path, view: ManifestView) -> None:
        if view.torn:
            _repair_tail(path, view.good_bytes)
        self.path = path
        self._file: IO[bytes] | None = open(path, "ab")  # noqa: SIM115 - held until close()

    def fileno(self) -> int:
        if self._file is None:
            raise ValueError("the manifest is closed")
        return self._file.fileno()

    def append(self, event: dict[str, Any]) -> None:
        """Append one line and make it durable: this is the moment things count."""
        if self._file is None:
            raise ValueError("the manifest is closed")
        self._file.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _repair_tail(path: Path, good_bytes: int) -> None:
    """Cut a torn last line off, or finish a complete one, so that appends start on a fresh line."""
    with open(path, "r+b") as f:
        f.truncate(good_bytes)
        if good_bytes:
            f.seek(good_bytes - 1)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.flush()
        os.fsync(f.fileno())


def shard_problem(root: Path, shard: ShardFile, schemas: Sequence[pa.Schema]) -> str | None:
    """Why ``shard`` cannot be trusted, or None when its footer, row count and sidecar agree.

    ``schemas`` are the schemas a shard of its kind may have (none: not checked); a shard of another
    schema raises :class:`OutputError`, since it would make the folder unloadable as one dataset.
    """
    path = root / shard.file
    try:
        # Opening reads the footer, which a writer that never closed did not write.
        with pq.ParquetFile(path) as parquet:
            rows = parquet.metadata.num_rows
            file_schema = parquet.schema_arrow
    except FileNotFoundError:
        return "missing"
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError ... for a file with no footer
        return f"unreadable ({type(exc).__name__}: {exc})"
    if rows != shard.rows:
        return f"holds {rows} rows, the manifest says {shard.rows}"
    changed = _changed_since_published(path, shard)
    if changed is not None:
        return changed
    try:
        sidecar_bytes = (root / shard.positions).stat().st_size
    except OSError:
        return "its positions file is missing"
    if sidecar_bytes != shard.rows * POSITION_DTYPE.itemsize:
        return "its positions file has the wrong size"
    if schemas and not any(file_schema.equals(schema, check_metadata=False) for schema in schemas):
        raise OutputError(
            f"{path} has other columns than this job writes ({schema_difference(file_schema, schemas[0])}); "
            "shards of two schemas cannot be loaded as one dataset: restore the previous settings, use another "
            "output folder or pass --fresh"
        )
    return None


def schema_difference(found: pa.Schema, expected: pa.Schema) -> str:
    """How ``found`` differs from ``expected``, in words: columns only in one, and changed types."""
    have = {f.name: f.type for f in found}
    want = {f.name: f.type for f in expected}
    parts = []
    if gone := [name for name in have if name not in want]:
        parts.append(f"the shard has {', '.join(gone)}, which this job does not write")
    if new := [name for name in want if name not in have]:
        parts.append(f"this job writes {', '.join(new)}, which the shard lacks")
    retyped = [f"{name} ({have[name]} -> {want[name]})" for name in want if name in have and have[name] != want[name]]
    if retyped:
        parts.append(f"types changed: {', '.join(retyped)}")
    return "; ".join(parts) or "the columns are in another order or differ in nullability"


def _changed_since_published(path: Path, shard: ShardFile) -> str | None:
    """Why the file is no longer the one published, or None.

    A footer that reads says nothing of the pages before it. Reading every page of every shard on
    each status or resume would cost as much as reading the whole output, so the check is in two
    steps: a file whose size and modification time are those the manifest recorded at publication
    is taken as published (a stat, as cheap as the footer); any other is read whole and must match
    its recorded CRC-32. Shards published before checksums were recorded keep the footer check.
    """
    if shard.crc32 is None:
        return None
    try:
        stat = path.stat()
        if shard.bytes is not None and stat.st_size != shard.bytes:
            return f"holds {stat.st_size} bytes, the manifest says {shard.bytes}"
        if stat.st_mtime_ns == shard.mtime_ns:
            return None
        if file_crc32(path) != shard.crc32:
            return "its content changed since it was published (CRC-32 mismatch)"
    except OSError as exc:
        return f"unreadable ({type(exc).__name__}: {exc})"
    return None


def read_positions(root: Path, shard: ShardFile) -> np.ndarray:
    """The source positions of a shard's rows, from its sidecar."""
    return np.fromfile(root / shard.positions, dtype=POSITION_DTYPE)
