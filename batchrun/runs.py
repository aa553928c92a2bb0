"""The runs under a folder, one line each (``batchrun runs DIR``), and reading a run's committed shards.

A run is an output folder: it holds ``state/job.json`` and, once a run ended, ``state/summary.json``.
Only what the manifest vouches for is read (never a shard still being written), as ``status`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchrun.errors import BatchrunError

__all__ = ["RunLine", "find_runs", "format_runs", "read_shards"]

#: How deep ``runs`` looks for output folders under DIR (out/nightly/2026-01-15/020000 is 2 deep).
MAX_DEPTH = 4


def read_shards(root: str | Path, kind: str, columns: list[str] | None = None) -> list[Any]:
    """The committed ``kind`` ("data" or "failed") shards of ``root`` as pyarrow tables, with only the
    ``columns`` each holds (all when None)."""
    import pyarrow.parquet as pq

    from batchrun.output.layout import OutputStore
    from batchrun.output.manifest import read_manifest

    root = Path(root).absolute()  # as the sink wrote it (see OutputStore): pyarrow never reads it as a URI
    listed = {k: v for part in OutputStore.parts(root) for k, v in read_manifest(part.manifest_path).listed.items()}
    tables = []
    for relative, shard in sorted(listed.items()):
        if shard.kind != kind:
            continue
        path = root / relative
        try:
            names = pq.read_schema(path).names
            wanted = None if columns is None else [c for c in columns if c in names]
            tables.append(pq.read_table(path, columns=wanted))
        except OSError:
            continue  # a listed shard that cannot be read is not counted, as resume would not
    return tables


@dataclass(frozen=True, slots=True)
class RunLine:
    """One run, as ``batchrun runs`` shows it."""

    folder: Path
    started_at: str | None
    model: str | None
    revision: str | None
    ok: int | None
    failed: int | None
    p50_s: float | None
    cost_usd: float | None
    exit_code: int | None
    run_id: str | None
    problem: str | None = None  # why its state could not be read: listed as unreadable, the others go on


def find_runs(root: str | Path) -> list[RunLine]:
    """Every output folder under ``root`` (``root`` itself included), oldest first. A folder whose state
    cannot be read is listed with its ``problem``."""
    base = Path(root)
    folders = []
    for depth in range(MAX_DEPTH + 1):
        pattern = "/".join(["*"] * depth + ["state", "job.json"])
        folders += [job.parent.parent for job in base.glob(pattern)]
        # A job split into shards keeps its record per shard: state/shards/<shard>/job.json.
        folders += [job.parents[3] for job in base.glob("/".join(["*"] * depth + ["state", "shards", "*",
                                                                                  "job.json"]))]
    lines = []
    for folder in sorted(set(folders)):
        try:
            lines.append(_run_line(folder))
        except (BatchrunError, AttributeError, TypeError, ValueError) as exc:  # one damaged run: the others go on
            detail = str(exc) if isinstance(exc, BatchrunError) else "its state files are malformed"
            lines.append(RunLine(folder=folder, started_at=None, model=None, revision=None, ok=None, failed=None,
                                 p50_s=None, cost_usd=None, exit_code=None, run_id=None, problem=detail))
    return sorted(lines, key=lambda line: (line.started_at or "", str(line.folder)))


def _run_line(folder: Path) -> RunLine:
    from batchrun.output.files import read_json
    from batchrun.output.layout import OutputStore

    parts = OutputStore.parts(folder)
    job = OutputStore.job_of(folder) or {}
    summary = union_summary([read_json(part.state_dir / "summary.json") or {} for part in parts])
    provenance = summary.get("provenance") or job.get("provenance") or {}
    identity = job.get("identity") or {}
    rows = summary.get("rows") or {}
    started_at = summary.get("started_at") or provenance.get("started_at") or job.get("created_at")
    if started_at is not None and not isinstance(started_at, str):
        raise ValueError(started_at)
    return RunLine(
        folder=folder,
        started_at=started_at,
        model=provenance.get("model") or identity.get("model"),
        revision=provenance.get("revision") or identity.get("revision"),
        ok=rows.get("total_ok"),
        failed=rows.get("total_failed"),
        p50_s=(summary.get("latency_s") or {}).get("p50"),
        cost_usd=(summary.get("cost") or {}).get("usd"),
        exit_code=summary.get("exit_code"),
        run_id=job.get("run_id"),
    )


def union_summary(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary for the shards of a split job: rows summed, the first start, the worst exit code.

    Latency percentiles do not add up and the shards' costs overlap (they share the endpoint's
    replicas), so neither is given; a shard with no summary yet (running, or killed) leaves the exit
    code unknown.
    """
    if len(summaries) == 1:
        return summaries[0]
    rows = [s.get("rows") or {} for s in summaries]
    codes = [code for s in summaries if isinstance(code := s.get("exit_code"), int)]
    started = [s["started_at"] for s in summaries if s.get("started_at")]
    return {
        "provenance": next((s["provenance"] for s in summaries if s.get("provenance")), {}),
        "started_at": min(started) if started else None,
        "rows": {key: sum(r.get(key) or 0 for r in rows) for key in ("total_ok", "total_failed")},
        "exit_code": max(codes) if len(codes) == len(summaries) else None,
    }


def format_runs(lines: list[RunLine], root: str | Path) -> str:
    """The runs as an aligned table; a run with no summary yet (running, or killed) shows dashes."""
    def dash(value: Any, fmt: str = "{}") -> str:
        return "-" if value is None else fmt.format(value)

    header = ("started (UTC)", "revision", "ok", "failed", "p50", "cost", "exit", "folder")
    rows = [header]
    for line in lines:
        if line.problem is not None:
            folder = f"{_relative(line.folder, root)} ({line.problem})"
            rows.append(("-", "-", "-", "-", "-", "-", "unreadable", folder))
            continue
        started = (line.started_at or "-").replace("+00:00", "")[:19].replace("T", " ")
        revision = (line.revision or "-")[:12]
        folder = _relative(line.folder, root)
        rows.append((started, revision, dash(line.ok), dash(line.failed), dash(line.p50_s, "{:.3f}s"),
                     dash(line.cost_usd, "${:.2f}"), dash(line.exit_code, "{}") if line.exit_code is not None
                     else "running or killed", folder))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)), r[-1]]).rstrip()
                     for r in rows)


def _relative(folder: Path, root: str | Path) -> str:
    try:
        return str(folder.relative_to(root)) if folder != Path(root) else "."
    except ValueError:
        return str(folder)
