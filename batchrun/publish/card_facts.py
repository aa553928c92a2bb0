"""What the dataset card says about a job, read from its output folder alone.

Everything comes from files the run wrote (``state/job.json``, ``summary.json``, ``spend.json`` and
the committed shards), so a push from the output folder says the same as a push at the end of the
run, and two pushes of an unchanged output render the same card byte for byte.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchrun import __version__
from batchrun.errors import OutputError
from batchrun.output.layout import OutputStore
from batchrun.publish.layout import LocalShard

__all__ = ["JobFacts", "read_facts"]

#: Rows shown in the card, and images in its thumbnail strip.
EXAMPLE_ROWS = 3
THUMBNAILS = 6
THUMB_PX = 128


@dataclass(slots=True)
class JobFacts:
    """The facts of one job's output that the card states, and the features its configs declare."""

    name: str
    fingerprint: str
    spec: dict[str, Any]
    spec_file: str | None
    identity: dict[str, Any]
    summary: dict[str, Any] | None
    spend: dict[str, Any] | None
    ok_rows: int
    failed_rows: int
    failed_retryable: int
    tokens: dict[str, int]
    features: dict[str, list[dict[str, Any]]]  # "data"/"failed" -> datasets features, as YAML lists
    num_bytes: dict[str, int]  # "data"/"failed" -> uncompressed size, from the Parquet footers
    example_rows: list[dict[str, str]] = field(default_factory=list)
    example_columns: list[str] = field(default_factory=list)
    thumbnails: bytes | None = None  # a PNG strip of the first images, for image jobs
    version: str = __version__

    @property
    def model(self) -> str | None:
        return self.identity.get("model") or (self.summary or {}).get("endpoint", {}).get("model")

    @property
    def revision(self) -> str | None:
        return self.identity.get("revision") or (self.summary or {}).get("endpoint", {}).get("revision")


def read_facts(root: Path, data: Sequence[LocalShard], failed: Sequence[LocalShard]) -> JobFacts:
    """The facts of the output at ``root``; ``data`` and ``failed`` are the shards this push publishes."""
    store = OutputStore.parts(root)[0]  # a split job: its shards share one spec; the spending is summed
    job = OutputStore.job_of(root)
    if not job:
        raise OutputError(f"{root} holds no job (no state/job.json): push the output folder of a `batchrun run`")
    facts = JobFacts(
        name=str(job.get("name") or root.name),
        fingerprint=str(job.get("fingerprint") or ""),
        spec=dict(job.get("spec") or {}),
        spec_file=job.get("spec_file"),
        identity=dict(job.get("identity") or {}),
        summary=store.load_summary(),
        spend=OutputStore.spend_of(root),
        ok_rows=sum(s.shard.rows for s in data),
        failed_rows=sum(s.shard.rows for s in failed),
        failed_retryable=sum(s.shard.retryable for s in failed),
        tokens=_token_totals(data),
        features={},
        num_bytes={kind: sum(_uncompressed(s.path) for s in shards) for kind, shards in (("data", data),
                                                                                         ("failed", failed))},
    )
    lengths = _list_lengths(facts.summary)
    for kind, shards in (("data", data), ("failed", failed)):
        if shards:
            facts.features[kind] = _features(pq.read_schema(shards[0].path), lengths if kind == "data" else {})
    if data:
        first = _first_rows(data[0].path, max(EXAMPLE_ROWS, THUMBNAILS))
        images = _image_columns(first.schema)
        facts.example_columns = [n for n in first.column_names if n not in images]
        facts.example_rows = [_shown(row, facts.example_columns) for row in first.slice(0, EXAMPLE_ROWS).to_pylist()]
        facts.thumbnails = _thumbnail_strip(first, images)
    return facts


def _list_lengths(summary: dict[str, Any] | None) -> dict[str, int]:
    """List columns of one length in every row: an embedding job's ``embedding`` (its summary says how long)."""
    dimension = (summary or {}).get("embedding_dimension")
    return {"embedding": dimension} if isinstance(dimension, int) and dimension > 0 else {}


def _features(schema: pa.Schema, lengths: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """The ``datasets`` features of a shard schema as the card's YAML declares them (Image stays Image).

    A list column in ``lengths`` is declared with its fixed length (``Sequence(Value("float32"), length=D)``):
    ``datasets`` then reads it as a fixed-size list.
    """
    from datasets import Features, Sequence  # heavy: only a push needs it

    features = Features.from_arrow_schema(schema)
    for name, length in (lengths or {}).items():
        if name in schema.names and pa.types.is_list(schema.field(name).type):
            features[name] = Sequence(features[name].feature, length=length)
    return features._to_yaml_list()


def _first_rows(path: Path, n: int) -> pa.Table:
    """The first ``n`` rows of a shard, reading one batch rather than the whole file (images are large)."""
    with pq.ParquetFile(path) as parquet:
        batch = next(parquet.iter_batches(batch_size=n), None)
        schema = parquet.schema_arrow
    return pa.Table.from_batches([batch], schema=schema) if batch is not None else schema.empty_table()


def _uncompressed(path: Path) -> int:
    metadata = pq.read_metadata(path)
    return sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))


def _token_totals(shards: Sequence[LocalShard]) -> dict[str, int]:
    """Prompt and completion tokens over every published row, where the task records them."""
    totals: dict[str, int] = {}
    for local in shards:
        names = set(pq.read_schema(local.path).names)
        columns = [c for c in ("prompt_tokens", "completion_tokens") if c in names]
        if not columns:
            continue
        table = pq.read_table(local.path, columns=columns)
        for column in columns:
            totals[column] = totals.get(column, 0) + int(pa.compute.sum(table.column(column)).as_py() or 0)
    return totals


def _image_columns(schema: pa.Schema) -> list[str]:
    """The columns the ``huggingface`` metadata declares as ``Image``."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return []
    try:
        features = json.loads(raw).get("info", {}).get("features", {})
    except (ValueError, AttributeError):
        return []
    return [name for name, f in features.items() if isinstance(f, dict) and f.get("_type") == "Image"]


def _shown(row: dict[str, Any], columns: list[str], limit: int = 120) -> dict[str, str]:
    """A row as the card's table shows it: short, on one line, no table-breaking characters."""
    out = {}
    for name in columns:
        value = row.get(name)
        text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
        text = " ".join(text.split()).replace("|", "\\|")
        out[name] = text if len(text) <= limit else text[: limit - 1] + "…"
    return out


def _thumbnail_strip(table: pa.Table, image_columns: list[str]) -> bytes | None:
    """One PNG of the first images side by side, each scaled to THUMB_PX high; None without images."""
    if not image_columns:
        return None
    from PIL import Image

    thumbs = []
    for cell in table.column(image_columns[0]).to_pylist()[:THUMBNAILS]:
        data = (cell or {}).get("bytes") if isinstance(cell, dict) else None
        if not data:
            continue
        try:
            with Image.open(io.BytesIO(data)) as opened:
                rgb = opened.convert("RGB")
            scale = THUMB_PX / max(1, rgb.height)
            thumbs.append(rgb.resize((max(1, round(rgb.width * scale)), THUMB_PX)))
        except Exception:  # a cell Pillow cannot read is left out of the strip, not the push
            continue
    if not thumbs:
        return None
    strip = Image.new("RGB", (sum(t.width for t in thumbs) + 4 * (len(thumbs) - 1), THUMB_PX), "white")
    x = 0
    for thumb in thumbs:
        strip.paste(thumb, (x, 0))
        x += thumb.width + 4
    out = io.BytesIO()
    strip.save(out, format="PNG", optimize=False)
    return out.getvalue()
