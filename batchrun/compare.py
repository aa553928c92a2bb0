"""Two runs side by side: ``batchrun compare RUN_A RUN_B [--html FILE] [--fail-if ...]``.

Rows are joined on the id (and ``sample``, when both runs drew several samples). The report says
what a person checks in the morning: ids only in one run, the share of identical answers and a text
similarity of the rest (difflib's ratio), finish reasons, answer lengths, latency, failures, cost,
scores, and any change of model, revision or parameters between the runs' provenance.

``--fail-if`` turns the report into an exit code for a scheduled job: ``changed>0.2`` (share of
common rows whose answer changed), ``failed_rate>0.01`` (run B's), ``p95_latency>1.5x`` (a suffix
``x`` compares with run A). Exit 0 when no threshold is crossed, ``ExitCode.THRESHOLD_CROSSED`` (4) when one is.
"""

from __future__ import annotations

import difflib
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchrun.errors import BatchrunError
from batchrun.facts import ID_COLUMN, OPENAI_BATCH_ID, ExitCode

__all__ = ["CompareReport", "Threshold", "compare_runs", "find_previous", "parse_fail_if"]

#: At most this many changed pairs have their similarity measured (difflib is quadratic in the text).
MAX_SIMILARITY_PAIRS = 5000
#: Changed rows shown side by side.
CHANGED_ROWS_SHOWN = 20


class CompareError(BatchrunError):
    """A run that cannot be compared (no such folder, no job.json), or a bad --fail-if: exit 2."""

    exit_code = ExitCode.NOTHING_RAN


@dataclass(slots=True)
class RunData:
    """What compare reads of one run: its committed rows, keyed, and its summary and provenance."""

    folder: Path
    results: dict[Any, dict[str, Any]]
    failures: dict[Any, str]  # key -> error_type
    summary: dict[str, Any]
    provenance: dict[str, Any]

    @property
    def keys(self) -> set[Any]:
        return set(self.results) | set(self.failures)

    def failure_rate(self) -> float:
        total = len(self.results) + len(self.failures)
        return len(self.failures) / total if total else 0.0

    def latencies(self) -> list[float]:
        return sorted(r["latency_s"] for r in self.results.values() if r.get("latency_s") is not None)

    def lengths(self) -> list[int]:
        return [len(r.get("generated_text") or "") for r in self.results.values()]

    def cost(self) -> float | None:
        usd = (self.summary.get("cost") or {}).get("usd")
        return float(usd) if usd is not None else None


def load_run(folder: str | Path) -> RunData:
    """Read a run's committed shards (what the manifest vouches for), summary and job record."""
    from batchrun.output.files import read_json
    from batchrun.output.layout import OutputStore
    from batchrun.runs import read_shards, union_summary

    root = Path(folder)
    parts = OutputStore.parts(root)  # a split job: its shards' one spec, and their summaries as one
    try:
        job = OutputStore.job_of(root) if (root / "state").is_dir() else None
        summaries = [read_json(part.state_dir / "summary.json") or {} for part in parts]
    except BatchrunError as exc:  # a damaged state file: said in one line, exit 2
        raise CompareError(f"cannot read the run {root}: {exc}") from None
    if job is None:
        raise CompareError(f"{root} is not a run's output folder (no state/job.json)")
    malformed = [name for name, value in (("job.json", job), *(("summary.json", s) for s in summaries))
                 if not _well_formed(value)]
    if malformed:
        raise CompareError(f"cannot read the run {root}: its state/{malformed[0]} is malformed "
                           "(expected a JSON object of objects); restore it from a copy")
    summary = union_summary(summaries)
    id_column = _id_column(job.get("spec") or {})
    # A step of a job of several (OUTPUT/steps/<step>): its verdict's numbers are named as the next step
    # reads them, so a judge's {score, reason} is compared as score_judge.
    step = root.name if root.parent.name == "steps" else None
    results: dict[Any, dict[str, Any]] = {}
    for table in read_shards(root, "data"):
        for row in table.to_pylist():
            values = {k: v for k, v in row.items() if not isinstance(v, (bytes, dict))}
            if step is not None and isinstance(row.get("parsed"), dict):
                values.update({f"{name}_{step}": value for name, value in row["parsed"].items()
                               if isinstance(value, (int, float)) and not isinstance(value, bool)})
            results[_key(row, id_column)] = values
    failures: dict[Any, str] = {}
    for table in read_shards(root, "failed", columns=[id_column, "sample", "error_type"]):
        for row in table.to_pylist():
            failures[_key(row, id_column)] = row.get("error_type") or "unknown"
    provenance = dict(summary.get("provenance") or job.get("provenance") or {})
    identity = job.get("identity") or {}
    provenance.setdefault("model", identity.get("model"))
    provenance.setdefault("revision", identity.get("revision"))
    provenance.setdefault("parameters", identity.get("parameters"))
    return RunData(root, results, failures, summary, provenance)


def _well_formed(record: Any) -> bool:
    """A state record compare reads: a JSON object whose sections (spec, identity, rows...) are objects."""
    sections = ("spec", "identity", "provenance", "rows", "cost", "latency_s")
    return isinstance(record, dict) and all(isinstance(record.get(k) or {}, dict) for k in sections)


def _id_column(spec: Any) -> str:
    """The rows' id column, as the spec parser sets it: an OpenAI batch file's ids are its ``custom_id``
    (its rows' ``id`` is the response's, empty from TGI: keying on it folds every row into one)."""
    source = spec.get("input") if isinstance(spec, dict) else None
    if not isinstance(source, dict):
        return ID_COLUMN
    if "openai_batch" in source:
        return OPENAI_BATCH_ID
    return str(source.get("id_column") or ID_COLUMN)


def _key(row: dict[str, Any], id_column: str) -> Any:
    value = row.get(id_column)
    return (value, row["sample"]) if row.get("sample") is not None else value


def quantile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile of sorted ``values`` (nearest rank), None when empty."""
    if not values:
        return None
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


@dataclass(slots=True)
class CompareReport:
    """The comparison of run A (before) with run B (after)."""

    a: RunData
    b: RunData
    only_a: list[Any] = field(default_factory=list)
    only_b: list[Any] = field(default_factory=list)
    common: int = 0  # keys with a result in both runs
    identical: int = 0
    similarity: float | None = None  # mean difflib ratio over the changed answers measured
    similarity_measured: int = 0
    changed_rows: list[tuple[Any, str, str, float]] = field(default_factory=list)  # sample shown side by side
    score_columns: list[str] = field(default_factory=list)

    @property
    def changed_share(self) -> float:
        return (self.common - self.identical) / self.common if self.common else 0.0

    def provenance_changes(self) -> dict[str, tuple[Any, Any]]:
        """model, revision, hardware, image, server version and parameters that differ between the runs."""
        keys = ("model", "revision", "hardware", "image", "server_version", "parameters", "batchrun_version")
        return {k: (self.a.provenance.get(k), self.b.provenance.get(k)) for k in keys
                if self.a.provenance.get(k) != self.b.provenance.get(k)}

    def scores(self) -> dict[str, tuple[float | None, float | None]]:
        def mean(run: RunData, column: str) -> float | None:
            values = [r[column] for r in run.results.values() if r.get(column) is not None]
            return round(sum(values) / len(values), 6) if values else None

        return {c: (mean(self.a, c), mean(self.b, c)) for c in self.score_columns}

    def check_thresholds(self, thresholds: list[Threshold]) -> None:
        """Refuse a threshold on a score neither run has (a misspelt ``score_regx`` would never be crossed,
        silently turning the gate off): :class:`CompareError`, exit 2."""
        for threshold in thresholds:
            if threshold.metric in FAIL_IF_METRICS or threshold.metric in self.score_columns:
                continue
            known = ", ".join(self.score_columns) or "none"
            raise CompareError(f"--fail-if: neither run has the score column {threshold.metric} "
                               f"(score columns: {known})")

    def metrics(self) -> dict[str, tuple[float | None, float | None]]:
        """(run A, run B) for each figure a --fail-if threshold may name."""
        la, lb = self.a.latencies(), self.b.latencies()
        missing = len(self.only_a) / len(self.a.keys) if self.a.keys else 0.0
        out: dict[str, tuple[float | None, float | None]] = {
            "changed": (0.0, self.changed_share),
            "similarity": (1.0, self.similarity),
            "failed_rate": (self.a.failure_rate(), self.b.failure_rate()),
            "p50_latency": (quantile(la, 0.5), quantile(lb, 0.5)),
            "p95_latency": (quantile(la, 0.95), quantile(lb, 0.95)),
            "cost": (self.a.cost(), self.b.cost()),
            "missing": (0.0, missing),
            "revision_changed": (0.0, 1.0 if "revision" in self.provenance_changes() else 0.0),
        }
        out.update(self.scores())
        return out

    def verdict(self, thresholds: list[Threshold] | None = None) -> dict[str, Any]:
        """What the notification and the exit code say: identical / changed, and any threshold crossed."""
        crossed = [t.describe(self.metrics()) for t in thresholds or [] if t.crossed(self.metrics())]
        changes = self.provenance_changes()
        if crossed:
            word = "threshold crossed"
        elif self.common and self.identical == self.common and not self.only_a and not self.only_b:
            word = "identical"
        else:
            word = f"{self.changed_share:.1%} of answers changed"
        return {"verdict": word, "crossed": crossed, "changed": round(self.changed_share, 6), "common": self.common,
                "revision_changed": "revision" in changes, "run_a": str(self.a.folder), "run_b": str(self.b.folder)}

    def to_dict(self) -> dict[str, Any]:
        """Every figure of the report, as JSON (``compare --json``)."""
        def dist(values: list[int] | list[float]) -> dict[str, Any]:
            s = sorted(values)
            return {"n": len(s), "mean": round(sum(s) / len(s), 3) if s else None, "p50": quantile(s, 0.5),
                    "p95": quantile(s, 0.95), "max": s[-1] if s else None}

        runs = {}
        for name, run in (("a", self.a), ("b", self.b)):
            runs[name] = {
                "folder": str(run.folder), "ok": len(run.results), "failed": len(run.failures),
                "failure_rate": round(run.failure_rate(), 6), "failures_by_type": dict(Counter(run.failures.values())),
                "finish_reasons": dict(Counter(r.get("finish_reason") for r in run.results.values())),
                "length_chars": dist(run.lengths()), "latency_s": dist(run.latencies()), "cost_usd": run.cost(),
                "model": run.provenance.get("model"), "revision": run.provenance.get("revision"),
            }
        return {
            "runs": runs, "only_in_a": len(self.only_a), "only_in_b": len(self.only_b), "common": self.common,
            "identical": self.identical, "identical_share": round(1 - self.changed_share, 6) if self.common else None,
            "similarity_of_changed": self.similarity, "similarity_measured": self.similarity_measured,
            "scores": {c: {"a": a, "b": b} for c, (a, b) in self.scores().items()},
            "provenance_changes": {k: {"a": a, "b": b} for k, (a, b) in self.provenance_changes().items()},
        }


def compare_runs(run_a: str | Path, run_b: str | Path) -> CompareReport:
    """Compare two output folders (A before, B after)."""
    a, b = load_run(run_a), load_run(run_b)
    report = CompareReport(a=a, b=b)
    report.only_a = sorted(a.keys - b.keys, key=str)
    report.only_b = sorted(b.keys - a.keys, key=str)
    ratios: list[float] = []
    for key in sorted(set(a.results) & set(b.results), key=str):
        report.common += 1
        text_a = a.results[key].get("generated_text") or ""
        text_b = b.results[key].get("generated_text") or ""
        if text_a == text_b:
            report.identical += 1
            continue
        if len(ratios) < MAX_SIMILARITY_PAIRS:
            ratio = difflib.SequenceMatcher(None, text_a, text_b, autojunk=False).ratio()
            ratios.append(ratio)
            if len(report.changed_rows) < CHANGED_ROWS_SHOWN:
                report.changed_rows.append((key, text_a, text_b, ratio))
    report.similarity = round(sum(ratios) / len(ratios), 4) if ratios else None
    report.similarity_measured = len(ratios)
    columns = {c for r in (a, b) for row in r.results.values() for c in row if c.startswith("score_")}
    report.score_columns = sorted(columns - {SCORE_ERROR})
    return report


# --------------------------------------------------------------------------- --fail-if

_THRESHOLD = re.compile(r"^\s*([a-z_0-9]+)\s*(>|<)\s*([0-9.]+)(x?)\s*$")


@dataclass(frozen=True, slots=True)
class Threshold:
    """``metric > value`` (or ``<``); with ``relative``, value times run A's figure."""

    metric: str
    op: str
    value: float
    relative: bool

    def limit(self, metrics: dict[str, tuple[float | None, float | None]]) -> float | None:
        before = metrics[self.metric][0]
        if self.relative:
            return None if before is None else before * self.value
        return self.value

    def crossed(self, metrics: dict[str, tuple[float | None, float | None]]) -> bool:
        if self.metric not in metrics:
            return False
        after, limit = metrics[self.metric][1], self.limit(metrics)
        if after is None or limit is None:
            return False
        return after > limit if self.op == ">" else after < limit

    def describe(self, metrics: dict[str, tuple[float | None, float | None]]) -> str:
        after, limit = metrics.get(self.metric, (None, None))[1], self.limit(metrics)
        spelled = f"{self.value:g}x run A" if self.relative else f"{self.value:g}"
        shown = "-" if after is None else f"{after:.4g}"
        return f"{self.metric} {shown} {self.op} {spelled}" + (f" ({limit:.4g})" if self.relative and limit else "")


SCORE_ERROR = "score_error"  # a text column, not a score
FAIL_IF_METRICS = ("changed", "similarity", "failed_rate", "p50_latency", "p95_latency", "cost", "missing",
                   "revision_changed")


def parse_fail_if(text: str) -> list[Threshold]:
    """``changed>0.2,failed_rate>0.01,p95_latency>1.5x`` as thresholds; score_<name> columns too."""
    thresholds = []
    for part in (p for p in text.split(",") if p.strip()):
        match = _THRESHOLD.match(part)
        if not match:
            raise CompareError(f"--fail-if {part!r}: expected METRIC>VALUE or METRIC<VALUE (VALUEx: times run A)")
        metric, op, value, x = match.groups()
        if metric not in FAIL_IF_METRICS and (not metric.startswith("score_") or metric == SCORE_ERROR):
            raise CompareError(f"--fail-if {part!r}: unknown metric {metric}; expected one of "
                               f"{', '.join(FAIL_IF_METRICS)} or a score_<name> column of the runs")
        thresholds.append(Threshold(metric, op, float(value), bool(x)))
    return thresholds


def find_previous(folder: str | Path) -> str | None:
    """The latest finished run before ``folder`` among its siblings (a templated output.path such as
    out/nightly/{date}: the runs are siblings; out/nightly/{date}/{time}: cousins, one level further up)."""
    from batchrun.runs import find_runs

    here = Path(folder).resolve()
    parent = here.parent
    for _ in range(2):
        runs = find_runs(parent)
        mine = next((r for r in runs if r.folder.resolve() == here), None)
        others = [r for r in runs if r.folder.resolve() != here and r.exit_code is not None]
        if others:
            started = mine.started_at if mine is not None else None
            earlier = [r for r in others if started is None or (r.started_at or "") < started]
            return str(earlier[-1].folder) if earlier else None
        parent = parent.parent
    return None


# --------------------------------------------------------------------------- text


def format_report(report: CompareReport, thresholds: list[Threshold] | None = None) -> str:
    """The comparison as lines a person reads in a terminal."""
    d = report.to_dict()
    ra, rb = d["runs"]["a"], d["runs"]["b"]
    lines = [f"A: {ra['folder']}", f"B: {rb['folder']}"]
    for key, (old, new) in report.provenance_changes().items():
        lines.append(f"  changed {key}: {old} -> {new}")
    lines.append(f"rows: {report.common} in both, {d['only_in_a']} only in A, {d['only_in_b']} only in B")
    if report.common:
        sim = f"; similarity of the changed ones {report.similarity:.3f}" if report.similarity is not None else ""
        lines.append(f"answers: {report.identical}/{report.common} identical ({1 - report.changed_share:.1%}){sim}")
    lines.append(f"failure rate: {ra['failure_rate']:.2%} -> {rb['failure_rate']:.2%}"
                 f"  (by type: {ra['failures_by_type'] or '-'} -> {rb['failures_by_type'] or '-'})")
    lines.append(f"finish reasons: {ra['finish_reasons']} -> {rb['finish_reasons']}")
    la, lb = ra["length_chars"], rb["length_chars"]
    lines.append(f"answer length (chars): mean {la['mean']} p50 {la['p50']} p95 {la['p95']} -> "
                 f"mean {lb['mean']} p50 {lb['p50']} p95 {lb['p95']}")
    ta, tb = ra["latency_s"], rb["latency_s"]
    lines.append(f"latency: p50 {_s(ta['p50'])} p95 {_s(ta['p95'])} -> p50 {_s(tb['p50'])} p95 {_s(tb['p95'])}")
    lines.append(f"cost: {_usd(ra['cost_usd'])} -> {_usd(rb['cost_usd'])}")
    for column, pair in d["scores"].items():
        lines.append(f"{column}: {pair['a']} -> {pair['b']}")
    verdict = report.verdict(thresholds)
    lines.append(f"verdict: {verdict['verdict']}" + (f" ({'; '.join(verdict['crossed'])})" if verdict["crossed"]
                                                      else ""))
    return "\n".join(lines)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def _usd(value: float | None) -> str:
    return "-" if value is None else f"${value:.4f}"
