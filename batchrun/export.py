"""``batchrun export``: an output folder's committed rows as JSON lines, plain or in OpenAI's batch format.

Only what the manifest lists is read (a shard being written, or one a crash left unpublished, is
not), so an export taken while a job runs is a consistent snapshot of what was committed. Shards are
read one record batch at a time: memory does not grow with the output.

The OpenAI batch output format, one line a request, is what OpenAI's files and vLLM's
``BatchRequestOutput`` read::

    {"id": "batch_req_<hex>", "custom_id": "...",
     "response": {"status_code": 200, "request_id": "...", "body": <the endpoint's JSON answer>},
     "error": null}

A failed row has ``"response": null`` (or ``{"status_code": <status>, "request_id": ..., "body":
null}`` when the endpoint answered) and ``"error": {"code": <error_type>, "message": ...}``. The
ids are derived from the ``custom_id``, so exporting the same output twice gives the same file.
Files are written next to their target and renamed into place: a reader never sees half an export.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import decimal
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from batchrun.errors import OutputError
from batchrun.facts import OPENAI_BATCH_ID

__all__ = ["EXPORT_FORMATS", "ExportCounts", "export_output"]

EXPORT_FORMATS = ("jsonl", "openai-batch")
"""The formats ``batchrun export --format`` writes."""

#: Rows read from a shard at a time.
EXPORT_BATCH_ROWS = 1024


@dataclass(frozen=True, slots=True)
class ExportCounts:
    """How many lines an export wrote: results, and failures (to the errors file when one was given)."""

    results: int
    failures: int


def export_output(root: str | Path, *, fmt: str, to: str | Path, errors: str | Path | None = None) -> ExportCounts:
    """Write the committed rows of the output folder ``root`` to ``to`` (failures to ``errors`` if given).

    Raises :class:`OutputError` for a folder with no run, an ``openai-batch`` export of an output
    that no ``input.openai_batch`` job wrote, or a file that cannot be written.
    """
    from batchrun.output import OutputStore
    from batchrun.output.manifest import read_manifest, shard_problem

    if fmt not in EXPORT_FORMATS:
        raise OutputError(f"--format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    if errors is not None and _same_file(Path(to), Path(errors)):
        # Both would be written to temporary files and renamed in turn: the second would replace the first.
        raise OutputError(f"--errors {errors} is the file of --to: leave --errors out to write the failures into "
                          "the same file, or name another file")
    store = OutputStore(root)
    if not store.root.is_dir():
        raise OutputError(f"{store.root} is not an output folder (no such directory)")
    job = OutputStore.job_of(store.root)
    if job is None:
        raise OutputError(f"{store.root} holds no run of a job (no state/job.json): nothing to export")
    task = (job.get("identity") or {}).get("task")
    if fmt == "openai-batch" and task != "openai-batch":
        raise OutputError(
            f"{store.root} was written by a {task} job; --format openai-batch needs the raw answers an "
            "input.openai_batch job keeps (use --format jsonl)"
        )
    shards = [s for part in OutputStore.parts(store.root) for s in read_manifest(part.manifest_path).listed.values()
              if shard_problem(store.root, s, ()) is None]  # every shard of a split job: the union
    data = [store.root / s.file for s in shards if s.kind == "data"]
    failed = [store.root / s.file for s in shards if s.kind == "failed"]
    result_line = _openai_result if fmt == "openai-batch" else _plain_line
    failure_line = _openai_failure if fmt == "openai-batch" else _plain_line
    with contextlib.ExitStack() as files:
        out = files.enter_context(_atomic(Path(to)))
        err = files.enter_context(_atomic(Path(errors))) if errors is not None else out
        results = _write(out, data, result_line)
        failures = _write(err, failed, failure_line)
    return ExportCounts(results=results, failures=failures)


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file (through a relative path, a symlink or a hard link)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.samefile(b)
    except OSError:  # one of them does not exist yet
        return False


def _write(out: IO[str], files: list[Path], line: Any) -> int:
    count = 0
    for row in _rows(files):
        out.write(json.dumps(line(row), ensure_ascii=False, default=_json_default))
        out.write("\n")
        count += 1
    return count


def _rows(files: list[Path]) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    for path in files:
        try:
            with pq.ParquetFile(path) as parquet:
                for batch in parquet.iter_batches(batch_size=EXPORT_BATCH_ROWS):
                    yield from batch.to_pylist()
        except OSError as exc:
            raise OutputError(f"cannot read {path}: {exc}") from exc


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[IO[str]]:
    """A text file written beside ``path`` and renamed onto it when complete; removed on failure."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(tmp, "w", encoding="utf-8")  # noqa: SIM115 - closed below, before the rename
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc}") from exc
    try:
        with f:
            yield f
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


# --------------------------------------------------------------------------------------------------
# Lines


def _plain_line(row: dict[str, Any]) -> dict[str, Any]:
    return row


def _openai_ids(custom_id: str, request_id: str | None) -> tuple[str, str]:
    """The line's ``id`` and its response's ``request_id``: stable for a custom_id, like every export."""
    digest = hashlib.sha256(custom_id.encode("utf-8")).hexdigest()
    return f"batch_req_{digest[:32]}", request_id or f"req_{digest[32:64]}"


def _openai_result(row: dict[str, Any]) -> dict[str, Any]:
    custom_id = row[OPENAI_BATCH_ID]
    line_id, request_id = _openai_ids(custom_id, row.get("request_id"))
    try:
        body = json.loads(row["response_body"])
    except (TypeError, ValueError):  # the task only keeps JSON answers; a hand-edited shard is not one
        body = row["response_body"]
    response = {"status_code": 200, "request_id": request_id, "body": body}
    return {"id": line_id, "custom_id": custom_id, "response": response, "error": None}


def _openai_failure(row: dict[str, Any]) -> dict[str, Any]:
    custom_id = row[OPENAI_BATCH_ID]
    line_id, request_id = _openai_ids(custom_id, None)
    code, message, status = row.get("error_type"), row.get("error"), row.get("status")
    response = None
    if status is not None:
        # The body stays null: vLLM's BatchResponseData types it as one of its response models, which an
        # error object is not; the error itself is in "error", where every reader looks.
        response = {"status_code": status, "request_id": request_id, "body": None}
    return {"id": line_id, "custom_id": custom_id, "response": response, "error": {"code": code, "message": message}}


def _json_default(value: Any) -> Any:
    """What JSON lacks: bytes as base64 text, dates and times as ISO text, decimals as numbers."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return float(value)
    return str(value)
