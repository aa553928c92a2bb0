"""A static HTML contact sheet of a batchrun output folder, to eyeball results without a server.

    write_preview("out/sdxl-job", "out/sdxl-job/preview.html")

Reads ``OUTPUT/data/*.parquet`` lazily (record batches, stopping after ``limit`` rows) and writes one
self-contained HTML file: images are embedded as small thumbnails in data URLs, so the page opens
from disk, can be mailed, and stays small. What it shows depends on the output's columns:

- **text-to-image** (an Image column and no ``generated_text``): each image with its prompt, seed
  and latency;
- **vision-language** (an Image column and ``generated_text``): each input image with its answer;
- **text**: a table of id and ``generated_text``.

Every piece of text from the data is escaped; the page has no scripts.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

__all__ = ["THUMBNAIL_SIDE", "write_preview"]

#: The longest side of an embedded thumbnail, in pixels.
THUMBNAIL_SIDE = 256

# Columns that are results or bookkeeping, never the "prompt" shown under a picture.
_NOT_PROMPT = frozenset({"generated_text", "format", "error", "error_type", "finish_reason"})
_BATCH_ROWS = 16

_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; background: #f6f6f4; color: #222; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header p { margin: 0 0 20px; color: #666; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(280px, 1fr)); gap: 16px; align-items: start; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 8px; padding: 12px; }
.card img { display: block; margin: 0 auto 8px; max-width: 100%; border-radius: 4px; }
.card .missing { height: 120px; display: flex; align-items: center; justify-content: center;
  background: #eee; color: #a33; border-radius: 4px; margin-bottom: 8px; }
.card .text { margin: 0 0 6px; white-space: pre-wrap; word-break: break-word; }
.card .answer { margin: 0 0 6px; padding: 6px 8px; background: #f0f4ff; border-radius: 4px;
  white-space: pre-wrap; word-break: break-word; }
.card .meta { color: #777; font-size: 12px; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { border: 1px solid #ddd; padding: 6px 8px; text-align: left; vertical-align: top; }
td.text { white-space: pre-wrap; word-break: break-word; }
"""


@dataclass(frozen=True)
class _Layout:
    """How to show an output: which columns hold the id, the image, the prompt and the answer."""

    kind: str  # "text-to-image", "vision" or "text"
    id_column: str
    image_column: str | None
    text_columns: list[str]
    answer_column: str | None


def write_preview(output_dir: str | Path, html_path: str | Path, *, limit: int = 60) -> Path:
    """Write an HTML contact sheet of at most ``limit`` result rows of ``output_dir``; return its path."""
    if limit < 0:
        raise ValueError(f"limit must be 0 or more, got {limit}")
    root = Path(output_dir).absolute()  # as the sink wrote it (see OutputStore): pyarrow never reads it as a URI
    shards = sorted((root / "data").glob("*.parquet"))
    failed = sorted((root / "failed").glob("*.parquet"))
    total_ok = sum(pq.ParquetFile(p).metadata.num_rows for p in shards)
    total_failed = sum(pq.ParquetFile(p).metadata.num_rows for p in failed)

    rows: list[dict[str, Any]] = []
    layout: _Layout | None = None
    if shards:
        layout = _layout(pq.ParquetFile(shards[0]).schema_arrow)
        rows = list(_read_rows(shards, limit))

    name = _job_name(root) or root.name
    summary = f"{total_ok} results, {total_failed} failed; showing {len(rows)}"
    if layout is None:
        body = "<p>No results yet: the output has no data shards.</p>"
    elif layout.kind == "text":
        body = _text_table(rows, layout)
    else:
        body = '<div class="grid">\n' + "\n".join(_card(row, layout) for row in rows) + "\n</div>"

    document = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{_e(name)} · batchrun preview</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<header><h1>{_e(name)}</h1><p>{_e(summary)}"
        f"{' · ' + _e(layout.kind) if layout else ''}</p></header>\n{body}\n</body>\n</html>\n"
    )
    out = Path(html_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(document, encoding="utf-8")
    return out


# --------------------------------------------------------------------------------------------------
# Reading


def _read_rows(shards: list[Path], limit: int) -> Iterator[dict[str, Any]]:
    """The first ``limit`` rows across ``shards``, reading a few rows at a time."""
    left = limit
    for path in shards:
        if left <= 0:
            return
        for batch in pq.ParquetFile(path).iter_batches(batch_size=min(_BATCH_ROWS, left)):
            for row in batch.slice(0, left).to_pylist():
                yield row
                left -= 1
            if left <= 0:
                return


def _is_image_type(data_type: pa.DataType) -> bool:
    """Whether a column has the ``datasets`` Image layout (``struct<bytes, path>``)."""
    if not pa.types.is_struct(data_type):
        return False
    names = {data_type.field(i).name for i in range(data_type.num_fields)}
    return names == {"bytes", "path"}


def _layout(schema: pa.Schema) -> _Layout:
    id_column = schema.names[0]  # the sink writes the id column first
    image_columns = [f.name for f in schema if _is_image_type(f.type)]
    answer = "generated_text" if "generated_text" in schema.names else None
    if "prompt" in schema.names:
        texts = ["prompt"]
    else:
        texts = [
            f.name
            for f in schema
            if f.name != id_column and f.name not in _NOT_PROMPT
            and (pa.types.is_string(f.type) or pa.types.is_large_string(f.type))
        ]  # fmt: skip
    if image_columns:
        kind = "vision" if answer else "text-to-image"
        return _Layout(kind, id_column, image_columns[0], texts, answer)
    # A text output without generated_text (an unknown task): show every text column.
    return _Layout("text", id_column, None, texts, answer)


def _job_name(root: Path) -> str | None:
    from batchrun.output import OutputStore

    try:
        job = OutputStore.job_of(root)  # a split job: its shards' one spec
    except (OSError, ValueError):
        return None
    name = job.get("name") if isinstance(job, dict) else None
    return str(name) if name else None


# --------------------------------------------------------------------------------------------------
# Rendering


def _card(row: dict[str, Any], layout: _Layout) -> str:
    assert layout.image_column is not None
    parts = ['<div class="card">', _thumbnail_tag(row.get(layout.image_column))]
    text = " · ".join(str(row[c]) for c in layout.text_columns if row.get(c) is not None)
    if text:
        parts.append(f'<p class="text">{_e(text)}</p>')
    if layout.answer_column is not None:
        parts.append(f'<p class="answer">{_e(str(row.get(layout.answer_column) or ""))}</p>')
    meta = [f"id {row.get(layout.id_column)}"]
    if row.get("seed") is not None:
        meta.append(f"seed {row['seed']}")
    if row.get("width") and row.get("height"):
        meta.append(f"{row['width']}×{row['height']} {row.get('format') or ''}".rstrip())
    if isinstance(row.get("latency_s"), (int, float)):
        meta.append(f"{row['latency_s']:.2f} s")
    parts.append(f'<p class="meta">{_e(" · ".join(meta))}</p>')
    parts.append("</div>")
    return "\n".join(parts)


def _text_table(rows: list[dict[str, Any]], layout: _Layout) -> str:
    columns = [layout.id_column, *([layout.answer_column] if layout.answer_column else layout.text_columns)]
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    lines = [f"<table>\n<tr>{head}</tr>"]
    for row in rows:
        cells = "".join(f'<td class="text">{_e("" if row.get(c) is None else str(row[c]))}</td>' for c in columns)
        lines.append(f"<tr>{cells}</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _thumbnail_tag(value: Any) -> str:
    """An ``<img>`` with a downsized copy of an Image cell, or a note saying why there is none."""
    data = value.get("bytes") if isinstance(value, dict) else None
    if not data:
        return '<div class="missing">no image bytes</div>'
    try:
        url, (width, height) = _thumbnail(data)
    except Exception:
        return '<div class="missing">image cannot be decoded</div>'
    return f'<img src="{url}" width="{width}" height="{height}" alt="">'


def _thumbnail(data: bytes) -> tuple[str, tuple[int, int]]:
    """A data URL of ``data`` shrunk to :data:`THUMBNAIL_SIDE`: JPEG, or PNG when it has transparency."""
    with Image.open(io.BytesIO(data)) as opened:
        picture = opened.copy()
    picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
    # JPEG is far smaller for pictures; PNG only where JPEG would lose the alpha channel.
    transparent = picture.mode in ("RGBA", "LA", "PA") or (picture.mode == "P" and "transparency" in picture.info)
    out = io.BytesIO()
    if transparent:
        picture.convert("RGBA").save(out, format="PNG", optimize=True)
        mime = "image/png"
    else:
        picture.convert("RGB").save(out, format="JPEG", quality=80)
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(out.getvalue()).decode('ascii')}", picture.size


def _e(text: str) -> str:
    return html.escape(text, quote=True)
