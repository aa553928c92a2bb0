"""Everything checked before anything costs money (reliability.md §3, §5).

    spec -> input (schema, duplicate ids) -> columns -> task -> output schema -> prompts of the first rows
         -> token -> endpoint (read-only) -> the output's identity -> the output is writable

Anything wrong here raises an exit-2 error before a single billable call: a typo costs nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from batchrun.cost import MARGIN_SHARE, Spent
from batchrun.endpoints import Endpoint, EndpointCheck, EndpointPool, open_endpoints
from batchrun.errors import (
    AuthError,
    BudgetSpentError,
    ConfigMismatchError,
    EndpointError,
    EndpointUnusableError,
    InputError,
    OutputError,
    RequestFailed,
    SpecError,
    register_secret,
)
from batchrun.facts import ID_COLUMN, POLL_INTERVAL_S
from batchrun.records import FailureType
from batchrun.sources import Source, open_source
from batchrun.spec import JobSpec
from batchrun.stop import Stop
from batchrun.tasks import (
    Task,
    make_task,
    messages_column_problem,
    placeholder_column_problem,
    prompt_column_problem,
)

if TYPE_CHECKING:
    from batchrun.output import OutputStore
    from batchrun.transport import ServerInfo

__all__ = ["Preflight", "preflight"]

#: How many of the first rows have their prompt rendered (and shown by `batchrun validate`).
PREVIEW_ROWS = 3


@dataclass(slots=True)
class Preflight:
    """Everything checked before anything costs money, and what the checks found."""

    spec: JobSpec
    source: Source
    task: Task
    kept_columns: tuple[str, ...]  # the input columns copied to the output, in input order
    pool: EndpointPool  # every endpoint of the job (one, or the list form's)
    token: str | None = field(repr=False)
    identity: dict[str, Any]
    fingerprint: str
    count: int | None
    prompt_previews: list[tuple[Any, str]] = field(default_factory=list)  # (row id, rendered prompt or error)
    endpoint_check: EndpointCheck | None = None
    stored_job: dict[str, Any] | None = None  # the output's job.json from an earlier run, if any
    spent: Spent = field(default_factory=Spent)  # what earlier runs of this job spent
    run: Any = None  # this run's RunProvenance (provenance.py), set by the runner before the output opens
    unencodable: list[str] = field(default_factory=list)  # input rows read with U+FFFD for lone surrogates

    @property
    def infos(self) -> Mapping[str, ServerInfo]:
        """The ``GET /info`` answers the endpoint check read, by server root: the run reuses them."""
        return self.endpoint_check.infos if self.endpoint_check is not None else {}

    def data_schema(self, store: Any = None) -> Any:
        """The pyarrow schema of the data shards, with its datasets features and provenance metadata.

        With ``store`` (an OutputStore), the features part is kept in its state and read back by a
        resumed run built from the same inputs, which then need not import ``datasets``.
        """
        import hashlib

        from batchrun.output import build_data_schema

        spec = self.spec

        def build() -> Any:
            return build_data_schema(self.source.schema, id_column=spec.input.id_column,
                                     keep_columns=self.kept_columns, output_schema=self.task.output_schema)

        if store is None:
            return _with_provenance(build(), self.identity, self.run)
        # Everything the schema is built from; metadata included, since features come from it too.
        digest = hashlib.sha256()
        for part in (self.source.schema, self.task.output_schema):
            digest.update(part.serialize().to_pybytes())
        digest.update(repr((spec.input.id_column, tuple(self.kept_columns))).encode())
        return _with_provenance(store.schema_for(digest.hexdigest(), build), self.identity, self.run)


async def preflight(
    spec: JobSpec,
    *,
    check_endpoint: bool = False,
    fresh: bool = False,
    stop: Stop | None = None,
    echo: Callable[[str], None] = print,
    poll_interval_s: float | None = None,
    retry_failed: bool = False,
) -> Preflight:
    """Validate everything that can be validated without spending money. Raises exit-2 errors.

    ``check_endpoint`` also asks the endpoint itself (read-only): `batchrun run` always does.
    A list of steps, each a call; kept in one function so that their order, which is what makes a
    typo cost nothing, reads top to bottom.
    """
    from batchrun.output import OutputStore, data_columns

    _check_notify(spec)
    source = await _open_input(spec)
    count = source.count()
    _check_not_empty(spec, count)
    _check_columns(spec, source)
    store = OutputStore.for_spec(spec)
    await asyncio.to_thread(_check_output_folder, store)
    await asyncio.to_thread(_check_shared_endpoint_guard, spec, store)
    stored = await asyncio.to_thread(store.load_job) if store.exists() else None
    input_fingerprint = await asyncio.to_thread(source.fingerprint)
    await _check_unique_ids(spec, source, scanned=bool(stored and stored.get("ids_checked") == input_fingerprint))
    offline = _pin_image_provider(spec, None)  # provider auto: checked on the first route until the Hub is asked
    task = _make_task(offline)
    kept = _kept_columns(spec, source, task)
    _check_score_references(spec, kept)
    # The output's columns are checked now; their datasets features (a heavy import) when the run opens it.
    data_columns(source.schema, id_column=spec.input.id_column, keep_columns=kept, output_schema=task.output_schema)
    previews = await asyncio.to_thread(_render_first_rows, spec, source, task)
    token = _resolve_token(spec)
    spent = await _spent_before(spec, store, stored, fresh=fresh)
    runs_before = int((stored or {}).get("runs", 0)) if not fresh else 0
    # A job whose last run finished every row sends nothing and touches no endpoint, not even to ask
    # what it serves (a url's GET /info would wake a scaled-to-zero endpoint); the model it recorded
    # stays in its identity.
    finished = stored is not None and not fresh and _finished(
        await asyncio.to_thread(store.load_summary), count, retry_failed=retry_failed)
    spec = await _choose_image_provider(spec, token, ask_hub=check_endpoint and not finished, echo=echo)
    if spec is not offline:  # provider auto, chosen now
        task = _make_task(spec)
    pool = open_endpoints(
        spec, token=token, stop=stop or Stop(), echo=echo, poll_interval_s=poll_interval_s or POLL_INTERVAL_S,
        run_number=runs_before + 1,
    )
    from batchrun.tasks.billed import bind_meters

    bind_meters(task, {member.name: member.endpoint.meter for member in pool.members})  # cost per token, per lane
    check = await _check_endpoint(pool) if check_endpoint and not finished else None
    identity = _identity(spec, input_fingerprint, check)
    if finished and stored is not None:
        known = stored.get("identity") or {}
        identity.update({key: known[key] for key in _KNOWN_ONLY if key in known})
    if not fresh:
        await _check_same_job(spec, store, stored, identity, source, task, kept)
    # Last, as it is the only check that writes (a probe file): a job refused above leaves no trace.
    await asyncio.to_thread(store.check_writable)
    return Preflight(
        spec=spec,
        source=source,
        task=task,
        kept_columns=kept,
        pool=pool,
        token=token,
        identity=identity,
        fingerprint=fingerprint(identity),
        count=count,
        prompt_previews=previews,
        endpoint_check=check,
        stored_job=stored,
        spent=spent,
        unencodable=_unencodable_rows(source),
    )


async def _spent_before(spec: JobSpec, store: OutputStore, stored: dict[str, Any] | None, *, fresh: bool) -> Spent:
    """What the job spent in its earlier runs; refused when what remains of the budget could not buy a run."""
    spent = Spent()
    if stored is not None and not fresh:
        spent = Spent.from_record(await asyncio.to_thread(store.load_spend))
    # What remains within the guard's margin could not buy a run: it would stop as soon as it started.
    if spec.budget.max_usd is not None and spent.usd >= spec.budget.max_usd * (1 - MARGIN_SHARE):
        raise BudgetSpentError(spec.budget.max_usd, spent.usd, spent.runs)
    return spent


async def _check_same_job(
    spec: JobSpec, store: OutputStore, stored: dict[str, Any] | None, identity: dict[str, Any], source: Source,
    task: Task, kept: tuple[str, ...],
) -> None:
    """The output already holds this job under these settings, or nothing: a changed job is refused.

    A shard's first run is held to the settings its sibling shards already wrote into the folder."""
    reference = stored if stored is not None or store.shard is None else await asyncio.to_thread(store.sibling_job)
    if reference is None:
        return
    changed = compare_identity(reference.get("identity", {}), identity)
    changed += _kept_columns_change(reference, spec, source, task, kept)
    if changed:
        raise ConfigMismatchError(str(store.root), changed, shard=store.shard)


def _check_notify(spec: JobSpec) -> None:
    """A webhook url naming an unset ``${VAR}`` would be posted to nowhere (or literally): refused now."""
    unset = spec.notify.unset_variables() if spec.notify is not None else []
    if unset:
        raise SpecError(spec.file, "notify.webhook", f"${{{unset[0]}}} is not set in the environment: set it, "
                                                      "or remove notify")


def _unencodable_rows(source: Any) -> list[str]:
    """Where the input held strings UTF-8 cannot store (lone surrogates), read with U+FFFD in their place."""
    while not hasattr(source, "unencodable") and hasattr(source, "inner"):  # a shard's or samples' wrapper
        source = source.inner
    return list(getattr(source, "unencodable", ()))


def unencodable_note(rows: list[str], shown: int = 5) -> str | None:
    """The line `validate` and `run` print about such rows, or None when there are none."""
    if not rows:
        return None
    where = "; ".join(rows[:shown]) + (f"; and {len(rows) - shown} more" if len(rows) > shown else "")
    return (f"{len(rows)} input row(s) hold strings UTF-8 cannot store (a lone surrogate, such as half an emoji): "
            f"they are read, sent and kept with U+FFFD in its place ({where})")


async def _open_input(spec: JobSpec) -> Source:
    try:
        source = await asyncio.to_thread(open_source, spec.input)
    except InputError as exc:
        raise InputError(f"{spec.file}: {exc}" if spec.file else str(exc)) from None
    if spec.shard is not None:  # one shard of the job: its rows only (shards.py)
        from batchrun.shards import ShardedSource

        source = ShardedSource(source, spec.shard)
    if spec.samples > 1:
        from batchrun.samples import SampledSource

        return SampledSource(source, spec.samples)
    return source


def _finished(summary: dict[str, Any] | None, count: int | None, *, retry_failed: bool = False) -> bool:
    """Whether the last run's summary says every row of ``count`` has its final record (with
    ``retry_failed``, a final failure is not final: then only a job with every row ok is finished)."""
    rows = (summary or {}).get("rows") or {}
    try:
        done = int(rows["total_ok"]) + int(rows["total_failed"])
        if retry_failed and int(rows["total_failed"]):
            return False
        return count is not None and not rows["total_failed_retryable"] and done >= count
    except (KeyError, TypeError, ValueError):
        return False


def _check_not_empty(spec: JobSpec, count: int | None) -> None:
    """An input with no rows is a mistake (a nightly job on a broken export) unless the spec says otherwise.

    A streamed input whose size is not known up front is checked when it is read (the reader finds no
    row at all).
    """
    if count == 0 and not spec.input.allow_empty:
        raise InputError(empty_input_message(spec))


def empty_input_message(spec: JobSpec) -> str:
    where = spec.input.path or (spec.input.dataset.path if spec.input.dataset else "the input")
    return (f"the input has no rows ({where}); nothing to do. If an empty input is normal for this job, "
            "set input.allow_empty: true")


#: What a batchrun output folder holds at its top; anything else means the folder is someone else's.
_OUTPUT_ENTRIES = frozenset({"data", "failed", "state", "preview.html"})


def _check_output_folder(store: Any) -> None:
    """Refuse a non-empty folder that is not a batchrun output: results would be mixed with the user's files."""
    root = store.root
    store.check_split()
    if not root.is_dir() or store.exists():
        return
    try:
        entries = list(root.iterdir())
    except FileNotFoundError:  # made and removed again by another shard's writability probe: empty
        return
    foreign = sorted(entry.name for entry in entries if entry.name not in _OUTPUT_ENTRIES)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise OutputError(
            f"the output folder {root} is not empty and is not a batchrun output (it holds {shown}); "
            "name a new or empty folder with output.path or --output"
        )


def _check_shared_endpoint_guard(spec: JobSpec, store: Any) -> None:
    """A split job's managed endpoint is shared through its output (docs/shards.md); a store that cannot refuse a
    write (an hf:// bucket) cannot guard it, so the launcher brackets it with `batchrun endpoint up/down`."""
    objects = getattr(store, "objects", None)
    if objects is None or getattr(objects, "conditional_writes", True) is not False:
        return
    if spec.shard is None and spec.shards is None:
        return
    from batchrun.endpoints.shared_in_store import bracket_registered

    for e in spec.all_endpoints:
        if e.name is None or e.namespace is None or e.per_token:
            continue
        if not bracket_registered(objects, e.api_url, e.namespace, e.name):
            raise OutputError(
                f"{spec.output.path}: a Hugging Face bucket has no conditional writes, so the shards cannot guard "
                f"the endpoint {e.namespace}/{e.name} they share: bracket them from the launcher with "
                f"`batchrun endpoint up JOB.yaml` before the shards and `batchrun endpoint down JOB.yaml` after "
                "(docs/object-storage.md)")


def _check_columns(spec: JobSpec, source: Source) -> None:
    """Every column the spec names exists in the input, and a prompt column holds text. The one place
    these are checked; each problem names the spec key."""
    columns = list(source.schema.names)
    available = f"(columns: {', '.join(columns)})"
    prompt = spec.prompt
    if prompt.messages_column is not None:
        _check_messages_column(spec, source, available)
    missing = [name for name in prompt.columns if name not in columns]
    if missing:
        if prompt.template is not None and set(missing) - {prompt.image_column}:
            names = ", ".join("{" + m + "}" for m in missing if m != prompt.image_column)
            raise SpecError(spec.file, "prompt.template", f"uses {names}, but the input has no such column {available}")
        key = "prompt.column" if missing[0] == prompt.column else "prompt.image_column"
        raise SpecError(spec.file, key, f"{missing[0]!r} is not an input column {available}")
    if prompt.column is not None:
        problem = prompt_column_problem(source.schema.field(prompt.column))
        if problem is not None:
            raise SpecError(spec.file, "prompt.column", problem)
    for name in prompt.columns if prompt.template is not None else ():
        problem = placeholder_column_problem(source.schema.field(name)) if name != prompt.image_column else None
        if problem is not None:
            raise SpecError(spec.file, "prompt.template", problem)
    image_placeholder = "{" + prompt.image_column + "}" if prompt.image_column is not None else None
    if prompt.template is not None and image_placeholder is not None and image_placeholder in prompt.template:
        raise SpecError(spec.file, "prompt.template", f"uses {{{prompt.image_column}}}, the image column: "
                        "the image is sent as an image part beside the text; leave it out of the template")
    schema_column = prompt.schema_column
    if schema_column is not None and schema_column not in columns:
        raise SpecError(spec.file, "prompt.schema_column", f"{schema_column!r} is not an input column {available}")
    texts_column = prompt.texts_column  # rerank: each row's candidates, a list of strings
    if texts_column is not None:
        if texts_column not in columns:
            raise SpecError(spec.file, "prompt.texts_column", f"{texts_column!r} is not an input column {available}")
        import pyarrow as pa  # the source's schema is loaded already

        kind = source.schema.field(texts_column).type
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not (
                pa.types.is_string(kind.value_type) or pa.types.is_large_string(kind.value_type)):
            raise SpecError(spec.file, "prompt.texts_column",
                            f"column {texts_column!r} has type {kind}, not a list of strings (the candidate texts)")
    seed_column = spec.image.seed_column if spec.image else None
    if seed_column is not None and seed_column not in columns:
        raise SpecError(spec.file, "image.seed_column", f"{seed_column!r} is not an input column {available}")
    missing = [c for c in spec.input.keep_columns or () if c not in columns]
    if missing:
        raise SpecError(spec.file, "input.keep_columns", f"{', '.join(missing)} not in the input {available}")


def _check_messages_column(spec: JobSpec, source: Source, available: str) -> None:
    """``prompt.messages_column`` exists and can hold conversations (each row's turns are checked as it is sent)."""
    name = spec.prompt.messages_column
    if name not in source.schema.names:
        raise SpecError(spec.file, "prompt.messages_column", f"{name!r} is not an input column {available}")
    problem = messages_column_problem(source.schema.field(name))
    if problem is not None:
        raise SpecError(spec.file, "prompt.messages_column", problem)


async def _check_unique_ids(spec: JobSpec, source: Source, *, scanned: bool) -> None:
    # The duplicate scan reads every id (8 bytes a row in memory); an input already scanned under the
    # same fingerprint by an earlier run of this job is not scanned again on resume.
    duplicates = [] if scanned else await asyncio.to_thread(source.find_duplicate_ids)
    if duplicates:
        shown = ", ".join(repr(d) for d in duplicates[:5])
        raise InputError(
            f"input.id_column {spec.input.id_column!r} has duplicate ids ({shown}); every row needs a unique id "
            "so that it ends in exactly one output record. Fix the input or drop input.id_column to number rows."
        )


def _auto_image_provider(spec: JobSpec) -> bool:
    """A text-to-image job through Inference Providers whose provider is ``auto`` (not chosen yet)."""
    e = spec.endpoint
    return spec.task == "text-to-image" and e.per_token and e.provider == "auto"


def _pin_image_provider(spec: JobSpec, provider: str | None) -> JobSpec:
    """A text-to-image job's ``provider: auto`` pinned to ``provider`` (None: the first route batchrun builds);
    any other spec as it is."""
    if not _auto_image_provider(spec):
        return spec
    e = spec.endpoint
    from batchrun.tasks.provider_images import IMAGE_ROUTES

    chosen = provider or next(iter(IMAGE_ROUTES))
    return dataclasses.replace(spec, endpoint=dataclasses.replace(e, provider=chosen),
                               endpoints=tuple(dataclasses.replace(x, provider=chosen) for x in spec.endpoints))


async def _choose_image_provider(spec: JobSpec, token: str | None, *, ask_hub: bool,
                                 echo: Callable[[str], None]) -> JobSpec:
    """``provider: auto`` for text-to-image names no route: the provider is chosen from the Hub's mapping of
    the model (read-only), after every offline check, and the rest of the job sees it pinned.

    The Hub is asked only when the job will send (``ask_hub``: not for `validate`, nor for a job whose rows
    are all done); otherwise, and on the built-in router, it is the first route batchrun builds.
    """
    if not _auto_image_provider(spec):
        return spec
    e = spec.endpoint
    if e.router_url == "local" or not ask_hub:
        return _pin_image_provider(spec, None)
    from batchrun.endpoints.providers import first_image_provider, hub_image_mapping

    assert e.model is not None
    chosen, passed = first_image_provider(e.model, await hub_image_mapping(e.model, token))
    echo(f"endpoint: provider auto chose {chosen}, the first provider the Hub maps to {e.model} for "
         f"text-to-image" + (f" (passed over: {', '.join(passed)})" if passed else ""))
    return _pin_image_provider(spec, chosen)


def _make_task(spec: JobSpec) -> Task:
    try:
        return make_task(spec)
    except ValueError as exc:  # parameters the route cannot take (stream, messages, ...)
        raise SpecError(spec.file, "parameters", str(exc)) from None


def _kept_columns(spec: JobSpec, source: Source, task: Task) -> tuple[str, ...]:
    """The input columns copied to the output, in input order (all but the id by default)."""
    names = [c for c in source.schema.names if c != spec.input.id_column]
    if spec.input.id_column is None and spec.input.keep_columns is None and ID_COLUMN in names:
        raise SpecError(
            spec.file, "input.id_column", "the input has a column named 'id', which clashes with the id column "
            "batchrun would number rows with; set input.id_column: id to use it, or list input.keep_columns without it"
        )
    if spec.input.keep_columns is not None:
        wanted = set(spec.input.keep_columns)
        return tuple(c for c in names if c in wanted)
    seed_column = spec.image.seed_column if spec.image is not None else None
    if seed_column is not None and seed_column in task.output_schema.names:
        # The output's own `seed` column records the seed used, which is this input column's value (or
        # the derived one where it was null): keeping the input column too would only clash.
        return tuple(c for c in names if c != seed_column)
    return tuple(names)


def _kept_columns_change(
    stored: dict[str, Any], spec: JobSpec, source: Source, task: Task, kept: tuple[str, ...]
) -> list[str]:
    """The change of kept input columns since the output's first run, said like any other change.

    The output's shards hold the kept columns: shards of two column sets cannot be read as one
    dataset. job.json records them; an output written before it did has its spec's keep_columns
    read against this input (an input that changed is refused on its own).
    """
    old = stored.get("kept_columns")
    if not isinstance(old, list):
        raw = ((stored.get("spec") or {}).get("input") or {}).get("keep_columns")
        if raw is not None and not (isinstance(raw, list) and all(isinstance(c, str) for c in raw)):
            return []
        then = dataclasses.replace(spec.input, keep_columns=None if raw is None else tuple(raw))
        try:
            old = list(_kept_columns(dataclasses.replace(spec, input=then), source, task))
        except SpecError:
            return []
    if old == list(kept):
        return []
    return [f"kept input columns ({old!r} -> {list(kept)!r}; input.keep_columns)"]


def _check_score_references(spec: JobSpec, kept: tuple[str, ...]) -> None:
    """A scorer reads its reference from the row as stored: the column must be a kept input column."""
    from batchrun.scoring import missing_references

    for column in missing_references(spec.score, kept):
        raise SpecError(spec.file, "score", f"the reference column {column!r} is not among the input columns "
                        f"kept in the output ({', '.join(kept) or 'none'})")


def _render_first_rows(spec: JobSpec, source: Source, task: Task) -> list[tuple[Any, str]]:
    """The prompts of the first rows; a template that fails on every one of them is a spec error."""
    previews: list[tuple[Any, str]] = []
    template_failures: list[str] = []
    # Distinct rows: with several samples per row, the first units are one row's samples.
    for batch in source.batches(batch_size=PREVIEW_ROWS * spec.samples):
        for row in [row for row in batch if row.sample == 0][:PREVIEW_ROWS]:
            try:
                previews.append((row.id, task.describe(task.prepare(row))))
            except RequestFailed as exc:
                previews.append((row.id, f"<row will fail without a request: {exc}>"))
                if exc.error_type == FailureType.TEMPLATE:
                    template_failures.append(str(exc))
        break
    if previews and len(template_failures) == len(previews):
        # Every row looked at fails to render: a mistake in the template, not in the data. Found now,
        # it costs nothing; found after the resume, it costs a cold start for no request at all.
        raise SpecError(spec.file, "prompt.template", f"cannot render the first rows: {template_failures[0]}")
    return previews


def _resolve_token(spec: JobSpec) -> str | None:
    """The token: huggingface_hub's (HF_TOKEN or the saved login). Never from the command line."""
    from huggingface_hub import get_token

    token = get_token()
    register_secret(token)
    named = [e for e in spec.all_endpoints if e.name]
    if named and not token:
        raise AuthError(
            "no Hugging Face token found: set HF_TOKEN or run `hf auth login` (a token that may call and manage "
            f"Inference Endpoints in {named[0].namespace})"
        )
    return token


async def _check_endpoint(endpoint: Endpoint) -> EndpointCheck:
    try:
        return await endpoint.check()
    except EndpointUnusableError:
        raise
    except EndpointError as exc:  # found before anything was touched: nothing ran (exit 2)
        raise EndpointUnusableError(str(exc), state=exc.state) from None


def _identity(spec: JobSpec, input_fingerprint: str, check: EndpointCheck | None) -> dict[str, Any]:
    """The configuration that must not change between a run and its resume (reliability.md §1).

    The served model and its revision join it when the endpoint said them: an endpoint updated to
    another model between two runs must not add its answers to the same output.
    """
    identity = dict(spec.identity())
    identity["input"] = input_fingerprint
    if check is not None and check.model:
        identity["model"] = check.model
        if check.revision:
            identity["revision"] = check.revision
    return identity


def _with_provenance(schema: Any, identity: dict[str, Any], run: Any = None) -> Any:
    """Every Parquet file says what made it: batchrun's version, the job's fingerprint and the served
    model and revision where the endpoint named them (key-value metadata ``batchrun``); with the
    run's provenance, also the run id, its start, the parameters sent and the endpoint's hardware,
    image and server version where known."""
    from batchrun import __version__

    record = {"version": __version__, "fingerprint": fingerprint(identity)}
    record.update({key: identity[key] for key in _KNOWN_ONLY if key in identity})
    if run is not None:
        record.update(run.metadata())
    metadata = dict(schema.metadata or {})
    metadata[b"batchrun"] = json.dumps(record, sort_keys=True).encode()
    return schema.with_metadata(metadata)


def fingerprint(identity: dict[str, Any]) -> str:
    """A short stable digest of an identity."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


#: Identity keys that count only when both runs knew them (a check that could not tell is not a change).
_KNOWN_ONLY = ("model", "revision")


def compare_identity(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What changed in the identity, said with old and new values."""
    changes = []
    for key in sorted(set(stored) | set(current)):
        old, new = stored.get(key), current.get(key)
        if old == new or (key in _KNOWN_ONLY and (key not in stored or key not in current)):
            continue
        if key == "input":
            changes.append("input (its files or their content changed)")
        elif isinstance(old, dict) and isinstance(new, dict):
            keys = sorted(set(old) | set(new))
            parts = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
            changes.append(f"{key} ({', '.join(parts)})")
        else:
            changes.append(f"{key} ({old!r} -> {new!r})")
    return changes
