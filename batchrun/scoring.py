"""Scores: small functions run on each finished row, whose numbers are stored next to the answer.

    score:
      - exact_match: answer             # 1.0 when the answer equals the row's `answer` column (stripped)
      - contains: keyword               # 1.0 when the answer contains the row's `keyword` column
      - regex: {pattern: "\\b\\d+\\b"}  # 1.0 when the pattern matches the answer (or `regex: COLUMN`)
      - function: my_scorers:judge      # a user's function(row) -> {name: number}
        columns: [fluency, length_ratio]

Why the columns are declared up front: every shard of a job shares one schema, fixed before the first
row (output/schema.py), so a function's columns must be known before it has ever run. Built-ins write
``score_<name>``; a function writes ``score_<column>`` for each declared column. One ``score_error``
column holds the first scorer error of a row (null when every scorer ran): a scorer that raises
leaves that row's scores null and is counted, and the answer is kept.

Scores are computed on the result record before it is handed to the committer (the runner's
``on_record``), so they land in the same shard as the answer; failure records are left alone.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["SCORE_ERROR_COLUMN", "Scorer", "ScorerSpec", "Scoring", "parse_score_spec"]

#: The column holding why a row's scores are null (the first scorer that raised), else null.
SCORE_ERROR_COLUMN = "score_error"
#: The column scorers read the answer from.
ANSWER_COLUMN = "generated_text"
BUILT_INS = ("exact_match", "contains", "regex")


@dataclass(frozen=True, slots=True)
class ScorerSpec:
    """One entry of ``score:``: a built-in with its reference column (or regex pattern), or a function."""

    kind: str  # exact_match | contains | regex | function
    reference: str | None = None  # the input column compared with the answer
    pattern: str | None = None  # regex only: a fixed pattern instead of a column
    function: str | None = None  # "module:function"
    columns: tuple[str, ...] = ()  # function only: the numbers it returns

    @property
    def output_columns(self) -> tuple[str, ...]:
        """The data columns this scorer writes, each a float64."""
        if self.kind == "function":
            return tuple(f"score_{c}" for c in self.columns)
        return (f"score_{self.kind}",)

    def describe(self) -> dict[str, Any]:
        """The scorer as the job's identity and provenance record it."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, ())}


def parse_score_spec(data: Any) -> tuple[ScorerSpec, ...]:
    """``score:`` as a tuple of scorers. Raises ``ValueError((key, problem))`` for the spec parser to word."""
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ValueError(("score", "expected a list of scorers, e.g. [{exact_match: answer}]"))
    scorers: list[ScorerSpec] = []
    for i, entry in enumerate(data):
        key = f"score[{i}]"
        if not isinstance(entry, Mapping):
            raise ValueError((key, "expected a mapping such as {exact_match: COLUMN} or {function: module:function}"))
        kinds = [k for k in (*BUILT_INS, "function") if k in entry]
        if len(kinds) != 1:
            raise ValueError((key, f"expected exactly one of {', '.join((*BUILT_INS, 'function'))}"))
        kind = kinds[0]
        allowed = {kind, "columns"} if kind == "function" else {kind}
        unknown = sorted(str(k) for k in entry if k not in allowed)
        if unknown:
            raise ValueError((f"{key}.{unknown[0]}", f"unknown key; expected one of {', '.join(sorted(allowed))}"))
        scorers.append(_one_scorer(key, kind, entry))
    names = [c for s in scorers for c in s.output_columns]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(("score", f"two scorers write the column {duplicated[0]}: name each once"))
    return tuple(scorers)


def _one_scorer(key: str, kind: str, entry: Mapping[str, Any]) -> ScorerSpec:
    value = entry[kind]
    if kind == "function":
        if not isinstance(value, str) or value.count(":") != 1 or not all(value.split(":")):
            raise ValueError((f"{key}.function", f"expected module:function, got {value!r}"))
        columns = entry.get("columns")
        if not isinstance(columns, list) or not columns or not all(
            isinstance(c, str) and re.fullmatch(r"\w+", c) for c in columns
        ):
            raise ValueError((f"{key}.columns", "expected the list of numbers the function returns, e.g. [bleu]: "
                                                "every shard's columns are fixed before the first row"))
        return ScorerSpec(kind=kind, function=value, columns=tuple(columns))
    if kind == "regex" and isinstance(value, Mapping):
        pattern = value.get("pattern")
        if set(value) != {"pattern"} or not isinstance(pattern, str):
            raise ValueError((f"{key}.regex", "expected a column name, or {pattern: REGEX}"))
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError((f"{key}.regex.pattern", f"not a regular expression: {exc}")) from None
        return ScorerSpec(kind=kind, pattern=pattern)
    if not isinstance(value, str) or not value:
        raise ValueError((f"{key}.{kind}", "expected the name of the input column holding the reference"))
    return ScorerSpec(kind=kind, reference=value)


# --------------------------------------------------------------------------- at run time

ScoreFunction = Callable[[dict[str, Any]], Mapping[str, Any]]


class Scorer:
    """One scorer, ready to run on a row (a dict of the row's kept input and output columns)."""

    def __init__(self, spec: ScorerSpec, search: tuple[str, ...] = ()) -> None:
        self.spec = spec
        self._function: ScoreFunction | None = None
        self._pattern = re.compile(spec.pattern) if spec.pattern is not None else None
        if spec.kind == "function":
            assert spec.function is not None
            self._function = _load_function(spec.function, search)

    def __call__(self, row: Mapping[str, Any]) -> dict[str, float | None]:
        """This scorer's columns for ``row``; raises whatever the scorer raises."""
        spec = self.spec
        answer = row.get(ANSWER_COLUMN)
        if self._function is not None:
            values = self._function(dict(row))
            if not isinstance(values, Mapping):
                raise TypeError(f"{spec.function} returned {type(values).__name__}, expected a dict of numbers")
            return {f"score_{c}": _number(values.get(c), c) for c in spec.columns}
        column = spec.output_columns[0]
        if answer is None:
            return {column: None}
        text = str(answer)
        if self._pattern is not None:
            return {column: float(self._pattern.search(text) is not None)}
        reference = row.get(spec.reference) if spec.reference is not None else None
        if reference is None:
            return {column: None}
        if spec.kind == "exact_match":
            return {column: float(text.strip() == str(reference).strip())}
        if spec.kind == "contains":
            return {column: float(str(reference).strip().lower() in text.lower())}
        return {column: float(re.search(str(reference), text) is not None)}  # regex from a column


def _load_function(reference: str, search: tuple[str, ...]) -> ScoreFunction:
    """``module:function``, imported as installed, else from the spec's folder or the working directory
    (a scorer kept next to its job spec needs no packaging)."""
    import sys

    module_name, name = reference.split(":")
    added = [d for d in search if d not in sys.path]
    sys.path[len(sys.path):] = added
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"score: cannot load the scorer {reference}: {exc}") from None
    finally:
        for folder in added:
            sys.path.remove(folder)
    if not callable(function):
        raise ValueError(f"score: {reference} is not a function")
    return function


def _number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)):
        raise TypeError(f"score {name!r} is {value!r}, expected a number")
    return float(value)


class Scoring:
    """Every scorer of a job, applied to result records; counts the rows whose scoring raised."""

    def __init__(self, specs: tuple[ScorerSpec, ...], search: tuple[str, ...] = ()) -> None:
        self.specs = specs
        self.scorers = [Scorer(s, search) for s in specs]
        self.columns = tuple(c for s in specs for c in s.output_columns)
        self.errors = 0

    def fields(self) -> list[Any]:
        """The pyarrow fields the data schema gains: one float64 per score, then ``score_error``."""
        import pyarrow as pa

        return [*(pa.field(c, pa.float64()) for c in self.columns), pa.field(SCORE_ERROR_COLUMN, pa.string())]

    def score(self, record: Any) -> Any:
        """``record`` (a RowResult) with its score columns added; other records are returned unchanged.

        A scorer that raises nulls every score of that row (a partial set would read as a real
        result) and names the error in ``score_error``; the answer is never lost.
        """
        from batchrun.records import RowResult

        if not isinstance(record, RowResult):
            return record
        row = {**record.kept, **record.output, "id": record.id}
        values: dict[str, Any] = dict.fromkeys(self.columns)
        error = None
        try:
            for scorer in self.scorers:
                values.update(scorer(row))
        except Exception as exc:  # any user code may fail: the row is kept, its scores null
            values = dict.fromkeys(self.columns)
            error = f"{type(exc).__name__}: {exc}"[:500]
            self.errors += 1
        values[SCORE_ERROR_COLUMN] = error
        return dataclasses.replace(record, output={**record.output, **values})


def missing_references(specs: tuple[ScorerSpec, ...], kept_columns: tuple[str, ...]) -> list[str]:
    """The reference columns that are not kept in the output (a scorer reads the row as stored)."""
    return [s.reference for s in specs if s.reference is not None and s.reference not in kept_columns]


def aggregate(tables: list[Any], columns: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Mean and count of each score column over ``tables`` (pyarrow), and how many rows had a score error."""
    import pyarrow.compute as pc

    out: dict[str, Any] = {}
    for column in columns:
        values = [t.column(column) for t in tables if column in t.column_names]
        n = sum(len(v) - v.null_count for v in values)
        total = sum(float(pc.sum(v).as_py() or 0.0) for v in values)
        out[column] = {"mean": round(total / n, 6) if n else None, "n": n}
    errors = sum(len(t) - t.column(SCORE_ERROR_COLUMN).null_count for t in tables
                 if SCORE_ERROR_COLUMN in t.column_names)
    return {"columns": out, "errors": errors} if columns else {}
