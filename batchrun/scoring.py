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

A scorer is code a spec or the data chooses (a regex taken from a column can backtrack for minutes,
holding the GIL all along), so during a run the scorers run in a child process, never on the event
loop: :class:`ScoringStage` sends it each result and waits off the loop. A row whose scoring takes
longer than :data:`SCORE_TIMEOUT_S` gets ``score_error: timeout`` (its answer is kept) and the child
is killed and replaced. Requests, signals and progress go on meanwhile; intake waits only while
:data:`SCORE_BACKLOG` results wait for their scores.

``validate`` runs no scorer code: a function scorer's module is found (``importlib.util.find_spec``)
and its source parsed for the function's name, never imported.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import importlib
import importlib.util
import math
import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from batchrun.facts import MAX_MESSAGE_CHARS

__all__ = ["SCORE_ERROR_COLUMN", "Scorer", "ScorerSpec", "Scoring", "parse_score_spec"]

#: The column holding why a row's scores are null (the first scorer that raised), else null.
SCORE_ERROR_COLUMN = "score_error"
#: The column scorers read the answer from.
ANSWER_COLUMN = "generated_text"
BUILT_INS = ("exact_match", "contains", "regex")
#: The longest one row's scoring may take during a run; past it the row's score_error is "timeout".
SCORE_TIMEOUT_S = 10.0
#: Results waiting for their scores before intake waits for the scorers.
SCORE_BACKLOG = 256
#: How long the scoring process may take to start (import the scorers' modules).
SCORER_START_S = 60.0


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
        self._search = search
        self._function: ScoreFunction | None = None
        self._pattern = re.compile(spec.pattern) if spec.pattern is not None else None
        if spec.kind == "function":
            assert spec.function is not None
            _check_function(spec.function, search)  # found and defined, without running its module

    def load(self) -> None:
        """Import a function scorer's module (running its code): only where it is about to score."""
        if self.spec.kind == "function" and self._function is None:
            assert self.spec.function is not None
            self._function = _load_function(self.spec.function, self._search)

    def __call__(self, row: Mapping[str, Any]) -> dict[str, float | None]:
        """This scorer's columns for ``row``; raises whatever the scorer raises."""
        spec = self.spec
        answer = row.get(ANSWER_COLUMN)
        if spec.kind == "function":
            self.load()
            assert self._function is not None
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


def _check_function(reference: str, search: tuple[str, ...]) -> None:
    """Raise ValueError unless ``module:function`` names a module that can be found and, in its source,
    a top-level function (or name) ``function``. Nothing of the module runs: it is parsed, not imported."""
    import sys

    module_name, name = reference.split(":")
    added = [d for d in search if d not in sys.path]
    sys.path[len(sys.path):] = added
    try:
        try:
            found = importlib.util.find_spec(module_name)  # a dotted name imports its parent packages
        except (ImportError, ValueError) as exc:
            raise ValueError(f"score: cannot find the scorer {reference}: {exc}") from None
    finally:
        for folder in added:
            sys.path.remove(folder)
    if found is None:
        raise ValueError(f"score: cannot load the scorer {reference}: no module named {module_name!r} "
                         f"(looked in the spec's folder, the working directory and the installed packages)")
    source = None
    if found.origin and found.origin.endswith(".py"):
        with contextlib.suppress(OSError, UnicodeDecodeError), open(found.origin, encoding="utf-8") as file:
            source = file.read()
    if source is None:  # a compiled or namespace module: its names are known only by running it
        return
    try:
        tree = ast.parse(source, filename=found.origin or module_name)
    except SyntaxError as exc:
        raise ValueError(f"score: the scorer module {module_name} does not parse: {exc}") from None
    names = _top_level_names(tree.body)
    if name not in names and "*" not in names:  # a star import may bring it: only running it would tell
        raise ValueError(f"score: cannot load the scorer {reference}: {module_name} defines no {name!r}")


def _top_level_names(body: list[ast.stmt]) -> set[str]:
    """The names a module binds at its top level (functions, classes, assignments, imports)."""
    names: set[str] = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.If):  # a name bound conditionally counts: it may exist
            names |= _top_level_names(node.body) | _top_level_names(node.orelse)
        elif isinstance(node, ast.Try):
            names |= _top_level_names([*node.body, *node.orelse, *node.finalbody,
                                       *(s for h in node.handlers for s in h.body)])
    return names


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
        self.search = search
        self.scorers = [Scorer(s, search) for s in specs]
        self.columns = tuple(c for s in specs for c in s.output_columns)
        self.errors = 0

    def fields(self) -> list[Any]:
        """The pyarrow fields the data schema gains: one float64 per score, then ``score_error``."""
        import pyarrow as pa

        return [*(pa.field(c, pa.float64()) for c in self.columns), pa.field(SCORE_ERROR_COLUMN, pa.string())]

    def values(self, row: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """Every score of ``row`` and None, or all-null scores and the first scorer error."""
        values: dict[str, Any] = dict.fromkeys(self.columns)
        try:
            for scorer in self.scorers:
                values.update(scorer(row))
        except Exception as exc:  # any user code may fail: the row is kept, its scores null
            return dict.fromkeys(self.columns), f"{type(exc).__name__}: {exc}"[:MAX_MESSAGE_CHARS]
        return values, None

    def with_values(self, record: Any, values: dict[str, Any], error: str | None) -> Any:
        """``record`` with ``values`` and ``score_error`` in its output; an error is counted."""
        if error is not None:
            self.errors += 1
            values = dict.fromkeys(self.columns)
        return dataclasses.replace(record, output={**record.output, **values, SCORE_ERROR_COLUMN: error})


def scoring_row(record: Any) -> dict[str, Any]:
    """What a scorer reads of a result: its kept input columns, its output and its id."""
    return {**record.kept, **record.output, "id": record.id}


# --------------------------------------------------------------------------- off the event loop


def _serve_scores(connection: Any, specs: tuple[ScorerSpec, ...], search: tuple[str, ...]) -> None:
    """The scoring process: load the scorers (their modules run here), then answer each row sent."""
    try:
        scoring = Scoring(specs, search)
        for scorer in scoring.scorers:
            scorer.load()
    except BaseException as exc:  # a module that fails to import: said to the parent, then the end
        connection.send(("failed", f"{type(exc).__name__}: {exc}"[:MAX_MESSAGE_CHARS]))
        return
    connection.send(("ready", None))
    while True:
        try:
            row = connection.recv()
        except (EOFError, OSError):  # the job ended
            return
        connection.send(scoring.values(row))


class _ScoringProcess:
    """One child process running the scorers; blocking calls, made from a worker thread."""

    def __init__(self, specs: tuple[ScorerSpec, ...], search: tuple[str, ...]) -> None:
        import multiprocessing

        # spawn: a fork of a process with threads and an event loop may deadlock.
        context = multiprocessing.get_context("spawn")
        self._connection, child = context.Pipe()
        self._process = context.Process(target=_serve_scores, args=(child, specs, search), daemon=True,
                                        name="batchrun-scores")
        self._process.start()
        child.close()
        if not self._connection.poll(SCORER_START_S):
            self.close()
            raise ValueError(f"score: the scorers did not load within {SCORER_START_S:g} s")
        try:
            status, detail = self._connection.recv()
        except (EOFError, OSError):
            status, detail = "failed", "the scoring process ended while loading the scorers"
        if status != "ready":
            self.close()
            raise ValueError(f"score: cannot load the scorers: {detail}")

    def score(self, row: dict[str, Any], timeout_s: float) -> tuple[dict[str, Any] | None, str | None]:
        """The row's values and error; ``(None, "timeout: ...")`` when it took too long (the process is
        then killed: the caller starts another)."""
        try:
            self._connection.send(row)
            if self._connection.poll(timeout_s):
                values, error = self._connection.recv()
                return values, error
        except (EOFError, OSError):
            self.close()
            return None, "the scoring process ended (killed, or out of memory)"
        self.close()
        return None, f"timeout: scoring took more than {timeout_s:g} s"

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    def close(self) -> None:
        self._connection.close()
        if self._process.is_alive():
            self._process.kill()
        self._process.join(5)


class ScoringStage:
    """Scores results off the event loop, then hands each record on (counted and committed).

    ``put`` takes every record the dispatcher finishes; results wait in a queue for the scoring
    process, failures pass straight on. ``rows`` wraps the dispatcher's intake so that it waits while
    :data:`SCORE_BACKLOG` results wait. ``drain`` waits for what is queued (each row bounded by the
    timeout); ``close`` hands on what is left unscored (answers kept) and ends the process.
    """

    def __init__(self, scoring: Scoring, sink: Callable[[Any], None], *, timeout_s: float | None = None) -> None:
        self.scoring = scoring
        self._sink = sink
        self._timeout_s = SCORE_TIMEOUT_S if timeout_s is None else timeout_s
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._room = asyncio.Event()
        self._room.set()
        self._process: _ScoringProcess | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._scoring: Any = None  # the record being scored, handed on unscored if the stage is cut short
        self._failure: BaseException | None = None
        self._closed = False

    async def start(self) -> None:
        """Start the scoring process (it imports the scorers); ValueError when they cannot load."""
        self._process = await asyncio.to_thread(_ScoringProcess, self.scoring.specs, self.scoring.search)
        self._consumer = asyncio.create_task(self._consume(), name="scores")

    def put(self, record: Any) -> None:
        from batchrun.records import RowResult

        if self._failure is not None:
            raise self._failure
        if not isinstance(record, RowResult):
            self._sink(record)
            return
        self._queue.put_nowait(record)
        if self._queue.qsize() >= SCORE_BACKLOG:
            self._room.clear()

    async def rows(self, rows: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """``rows``, each taken only while the scorers keep up."""
        async for row in rows:
            await self._room.wait()
            if self._failure is not None:
                raise self._failure
            yield row

    async def _consume(self) -> None:
        while True:
            record = self._scoring = await self._queue.get()
            try:
                values, error = await self._score(scoring_row(record))
                self._scoring = None
                self._sink(self.scoring.with_values(record, values or {}, error))
            except BaseException as exc:
                self._failure = exc
                self._room.set()
                raise
            finally:
                self._queue.task_done()
                if self._queue.qsize() < SCORE_BACKLOG // 2:
                    self._room.set()

    async def _score(self, row: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        if self._process is None or not self._process.alive:  # the last one was killed: a row took too long
            self._process = await asyncio.to_thread(_ScoringProcess, self.scoring.specs, self.scoring.search)
        return await asyncio.to_thread(self._process.score, row, self._timeout_s)

    async def drain(self) -> None:
        """Wait until every queued result is scored and handed on (or the consumer failed)."""
        if self._consumer is None or self._consumer.done():
            return
        drained = asyncio.ensure_future(self._queue.join())
        try:
            await asyncio.wait([drained, self._consumer], return_when=asyncio.FIRST_COMPLETED)
        finally:
            drained.cancel()

    async def close(self) -> None:
        """End the scoring: what is still queued is handed on unscored (``score_error`` says so, the
        answers are kept), the process ends, and a failure of the consumer (the sink's) is raised.
        Closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._consumer is not None:
                self._consumer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._consumer
        finally:
            left = [self._scoring] if self._scoring is not None else []
            self._scoring = None
            while not self._queue.empty():
                left.append(self._queue.get_nowait())
            if self._process is not None:
                await asyncio.to_thread(self._process.close)
            if self._failure is None or isinstance(self._failure, asyncio.CancelledError):
                for record in left:
                    self._sink(self.scoring.with_values(record, {}, "not scored: the job stopped first"))
        if self._failure is not None and not isinstance(self._failure, asyncio.CancelledError):
            raise self._failure


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
