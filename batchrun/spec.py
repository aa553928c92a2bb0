"""The job spec: load the user's YAML, validate it at the edge, and hand out frozen config objects.

A spec is checked completely before anything else happens (reliability.md §3, §5): a typo must cost
nothing. Every problem is a :class:`~batchrun.errors.SpecError` naming the file, the key path
(``input.parquet``, ``retries.max_attempts``) and what was expected. Unknown keys are errors at
every level, with a "did you mean" suggestion, because a misspelt optional key that is silently
ignored changes a job without telling anyone.

Conventions the rest of batchrun can rely on:

- Durations (``request_timeout``, ``outage_timeout``, ``budget.deadline``, ``endpoint.ready_timeout``,
  ``endpoint.idle_backstop``) are floats in seconds. The YAML may say ``90``, ``"90s"``, ``"20m"``,
  ``"6h"``, ``"1h30m"`` or ``"250ms"``.
- Sizes (``output.shard_bytes``) are ints in bytes. The YAML may say ``67108864``, ``"64MB"``
  (SI, 10**6) or ``"64MiB"`` (IEC, 2**20).
- Paths (``input.parquet``, ``input.jsonl``, ``input.dataset.path``, ``output.path``,
  ``image.base_dir``) stay exactly as written. Relative paths are resolved against the current
  working directory when they are used (by :mod:`batchrun.sources`, the sink and the image
  loader), not against the spec file's folder: a job is run
  from the project folder, the way ``jobs/quickstart.yaml`` names ``sample_data/prompts.parquet``.
- ``parameters`` and ``endpoint.local`` are passed through unchanged as plain dicts; the route and
  the emulator own their meaning. For text-to-image, the parameters the toolkit documents
  (``negative_prompt``, ``num_inference_steps``, ``guidance_scale``, ``width``, ``height``) are
  type-checked, and ``seed`` is refused: it is set per row from ``image.seed_column`` / ``image.seed``.
- ``image`` holds the image options of the two image tasks (see :class:`ImageSpec`); a key that
  does not apply to the job's task is an error, like an unknown one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import string
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from batchrun.errors import SpecError
from batchrun.notify import NotifySpec, parse_notify_spec
from batchrun.scoring import ScorerSpec, parse_score_spec
from batchrun.task_kinds import TASK_KINDS, TaskKind

__all__ = [
    "BudgetSpec",
    "ConcurrencySpec",
    "DatasetSpec",
    "EndpointSpec",
    "ImageSpec",
    "InputSpec",
    "JobSpec",
    "OutputSpec",
    "PackingSpec",
    "PromptSpec",
    "PushSpec",
    "RetrySpec",
    "ScaleSpec",
    "load_spec",
    "parse_duration",
    "parse_size",
    "parse_spec",
]

IMAGE_FORMATS = ("png", "jpeg", "webp")
ON_FINISH = ("pause", "scale-to-zero", "keep")

DEFAULT_READY_TIMEOUT = 20 * 60.0
DEFAULT_IDLE_BACKSTOP = 15 * 60.0
DEFAULT_SHARD_BYTES = 64 * 2**20
DEFAULT_REQUEST_TIMEOUT = 120.0
DEFAULT_OUTAGE_TIMEOUT = 600.0
#: The largest answer read from the endpoint (``max_answer_bytes``); a larger one fails its row.
DEFAULT_MAX_ANSWER_BYTES = 8 * 2**20
DEFAULT_MAX_IMAGE_ANSWER_BYTES = 64 * 2**20  # text-to-image: one image, raw


# --------------------------------------------------------------------------------------------------
# The config objects


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """A ``datasets`` input: what :func:`datasets.load_dataset` takes, read streamed.

    ``options`` holds any further builder keyword (``delimiter`` for CSV, ``columns`` for Parquet,
    ...); it is a separate mapping so that a typo among the known keys is still caught.
    """

    path: str
    name: str | None = None
    split: str = "train"
    data_files: Any = None
    data_dir: str | None = None
    revision: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class InputSpec:
    """Where the rows come from. ``kind`` is ``parquet``, ``jsonl``, ``dataset`` or ``openai_batch``.

    ``openai_batch`` is a JSONL file of OpenAI Batch request lines (``custom_id``, ``method``, ``url``,
    ``body``); its ``id_column`` is always ``custom_id``, set by the parser.

    ``path`` is the Parquet/JSONL file, folder or glob (unset for a dataset, which uses
    ``dataset``). ``keep_columns`` of ``None`` keeps every input column in the output.
    ``allow_empty``: an input with no rows is a normal night for this job (exit 0), not a mistake (exit 2).
    """

    kind: str
    path: str | None = None
    dataset: DatasetSpec | None = None
    id_column: str | None = None
    limit: int | None = None
    keep_columns: tuple[str, ...] | None = None
    allow_empty: bool = False


@dataclass(frozen=True, kw_only=True)
class PromptSpec:
    """How a row becomes a prompt: a ``template`` with ``{column}`` placeholders, a ``column``, or a
    ``messages_column`` of chat conversations (``[{role, content}]``, ``datasets``' conversational format).

    ``system`` is the chat system message (chat-completion and image-text-to-text); with
    ``messages_column`` it is prepended only to conversations that have no system message.
    ``image_column`` is the input column holding the picture (image-text-to-text only, without
    ``messages_column``: a conversation carries its images as image parts).
    All of them are unset for an ``openai-batch`` job, whose request lines carry their own messages.
    """

    template: str | None = None
    column: str | None = None
    system: str | None = None
    image_column: str | None = None
    messages_column: str | None = None
    schema_column: str | None = None  # a column holding each row's JSON Schema (structured output)
    texts_column: str | None = None  # rerank: a column holding each row's candidate texts (a list of strings)

    @property
    def columns(self) -> tuple[str, ...]:
        """The input columns the prompt reads, in order of first use (the image column last)."""
        if self.messages_column is not None:
            return (self.messages_column,)
        names = (self.column,) if self.column is not None else _template_fields(self.template or "")
        if self.image_column is not None and self.image_column not in names:
            names = (*names, self.image_column)
        return names


@dataclass(frozen=True, kw_only=True)
class ImageSpec:
    """Image options. Which keys apply depends on the task.

    text-to-image: ``format`` (png, jpeg or webp) is what the job asks for with ``Accept`` and
    stores; each row's seed is its ``seed_column`` value, or, without a column (or where the value
    is null), derived from the row id and the job's ``seed`` (:func:`batchrun.images.derive_seed`),
    so any row can be drawn again.

    image-text-to-text: ``max_side`` shrinks an input image whose longer side is over it before
    sending (``None``: send as it is); ``base_dir`` is where relative image paths are looked up
    (``None``: the current directory, like every relative path in a spec).
    """

    format: str = "png"
    seed_column: str | None = None
    seed: int = 0
    max_side: int | None = None
    base_dir: str | None = None


@dataclass(frozen=True, kw_only=True)
class ScaleSpec:
    """Replica counts to set on a Dedicated Inference Endpoint for the job."""

    min_replica: int
    max_replica: int


@dataclass(frozen=True, kw_only=True)
class EndpointSpec:
    """Which server answers the requests, and what batchrun may do to its lifecycle.

    Exactly one of ``url`` (any TGI or OpenAI-compatible server, left alone), ``local`` (the
    built-in emulator; its dict goes to ``batchrun.emulator.EndpointConfig.from_dict``) and
    ``name`` (+ ``namespace``: a Dedicated Inference Endpoint) is set. ``on_finish`` of ``None``
    means "pause, unless the endpoint was already running". ``api_url`` of ``None`` means
    huggingface_hub's default control plane.
    """

    url: str | None = None
    local: Mapping[str, Any] | None = None
    name: str | None = None
    namespace: str | None = None
    api_url: str | None = None
    scale: ScaleSpec | None = None
    ready_timeout: float = DEFAULT_READY_TIMEOUT
    on_finish: str | None = None
    idle_backstop: float = DEFAULT_IDLE_BACKSTOP
    price_per_replica_hour: float | None = None
    #: How progress, the summary and the output's ``endpoint`` column name it among several (list form).
    label: str | None = None
    #: Send the HF token to this endpoint's url (and ``api_url``) although it is not a Hugging Face host
    #: (transport.token_problem); never over plain http beyond loopback.
    send_token: bool = False

    @property
    def kind(self) -> str:
        """``url``, ``local`` or ``name``: which of the three ways the endpoint was given."""
        if self.url is not None:
            return "url"
        if self.local is not None:
            return "local"
        return "name"


@dataclass(frozen=True, kw_only=True)
class BudgetSpec:
    """Limits that stop a job early (resumably). ``None`` means no limit."""

    max_usd: float | None = None
    deadline: float | None = None


@dataclass(frozen=True, kw_only=True)
class ConcurrencySpec:
    """Adaptive concurrency: start at ``initial`` in-flight requests, never exceed ``max``."""

    max: int = 256
    initial: int = 8


@dataclass(frozen=True, kw_only=True)
class PackingSpec:
    """Rows per request for the tasks that take a batch of inputs (TEI's embed and predict routes):
    at most ``max_rows`` rows and about ``max_tokens`` tokens (estimated) per request. Unset: the
    server's own limits, read from its ``GET /info`` (``max_client_batch_size``), or found from its
    answers."""

    max_rows: int | None = None
    max_tokens: int | None = None


@dataclass(frozen=True, kw_only=True)
class RetrySpec:
    """Retry policy knobs (reliability.md §2). Seconds for times; ``budget_ratio`` is a share."""

    max_attempts: int = 5
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    max_retry_after: float = 120.0
    budget_ratio: float = 0.1
    # More tries for an answer that is not valid against the output schema, each with a fresh seed.
    # They count apart from max_attempts, which is for transport failures.
    invalid_output: int = 2


@dataclass(frozen=True, kw_only=True)
class PushSpec:
    """``output.push_to_hub``: publish the output as a dataset repo at the end of the run (docs/hub.md).

    ``every`` (seconds) also pushes during the run; ``endpoint`` is the Hub's base url (None:
    huggingface_hub's own, which honours ``HF_ENDPOINT``), e.g. the local emulator's.
    """

    repo: str
    private: bool = False
    config: str = "default"
    split: str = "train"
    every: float | None = None
    include_failed: bool = False
    endpoint: str | None = None
    send_token: bool = False  # ``endpoint`` may be a host other than Hugging Face's (it receives the token)


@dataclass(frozen=True, kw_only=True)
class OutputSpec:
    """Where results go, and when a Parquet shard is closed and published."""

    path: str
    shard_rows: int = 10_000
    shard_bytes: int = DEFAULT_SHARD_BYTES
    push_to_hub: PushSpec | None = None


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """A whole validated job. ``raw`` is the mapping as loaded (for the spec snapshot); ``file``
    is the spec's path, or ``None`` when it was built from a dict."""

    name: str
    task: str
    input: InputSpec
    prompt: PromptSpec
    parameters: Mapping[str, Any]
    endpoint: EndpointSpec
    budget: BudgetSpec
    concurrency: ConcurrencySpec
    retries: RetrySpec
    packing: PackingSpec = field(default_factory=PackingSpec)  # rows per request (packing.py)
    embedding_dtype: str = "float32"  # feature-extraction: how each embedding's values are stored (float16 halves it)
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    # The largest answer read; None: the task's default (answer_cap). A larger answer fails its row.
    max_answer_bytes: int | None = None
    outage_timeout: float = DEFAULT_OUTAGE_TIMEOUT  # an endpoint unavailable this long stops the job (exit 3)
    failure_threshold: float | None = None
    output: OutputSpec
    image: ImageSpec | None = None  # set for the image tasks only
    # Structured output: the JSON Schema every answer must follow (loaded and checked; see structured.py).
    output_schema: Mapping[str, Any] | None = None
    # Answers drawn per input row, each with its own seed; outputs are keyed by (id, sample) (samples.py).
    samples: int = 1
    # Scorers run on each finished row, their columns next to the answer (scoring.py).
    score: tuple[ScorerSpec, ...] = ()
    # Where a short summary is posted at the end of every run (notify.py).
    notify: NotifySpec | None = None
    # Several endpoints (``endpoint:`` given as a list): all of them, ``endpoint`` being the first. Empty
    # for the mapping form, which means one endpoint exactly as it always did.
    endpoints: tuple[EndpointSpec, ...] = ()
    # Several endpoints may serve different models or revisions only when the spec says so.
    mixed_models: bool = False
    # Keys that apply to every endpoint of the list form that does not set its own.
    endpoint_defaults: Mapping[str, Any] | None = None
    # How many shards the job is split into, for ``--shard auto`` under a scheduler that does not say it
    # (a Kubernetes Indexed Job); ``--shard-count`` overrides it. None: the scheduler says, or --shard I/N.
    shards: int | None = None
    # Which shard of the job this run is (``--shard I/N``, shards.py); None: the whole job. Not a spec key.
    shard: Any = None
    file: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def all_endpoints(self) -> tuple[EndpointSpec, ...]:
        """Every endpoint the job sends to: the list form's, or the one endpoint."""
        return self.endpoints or (self.endpoint,)

    def identity(self) -> dict[str, Any]:
        """The configuration that must not change between a run and its resume.

        Output written under one identity must never be mixed with another (reliability.md §1).
        The input's identity is not here: sources give their own ``fingerprint()``. Limits,
        concurrency, retries and output sharding may change freely between runs.
        """
        endpoint_identity: Any = _endpoint_identity(self.endpoint)
        if self.endpoints:  # the list form; one endpoint keeps the identity its outputs always had
            endpoint_identity = [_endpoint_identity(each) for each in self.endpoints]
        identity: dict[str, Any] = {
            "task": self.task,
            "prompt": {
                "template": self.prompt.template,
                "column": self.prompt.column,
                "system": self.prompt.system,
            },
            "parameters": dict(self.parameters),
            "endpoint": endpoint_identity,
        }
        if self.prompt.messages_column is not None:  # only when set: older outputs keep their identity
            identity["prompt"]["messages_column"] = self.prompt.messages_column
        if self.prompt.texts_column is not None:
            identity["prompt"]["texts_column"] = self.prompt.texts_column
        # Text jobs keep the identity they always had, so their existing outputs still resume.
        if self.task == "text-to-image" and self.image is not None:
            identity["image"] = {
                "format": self.image.format,
                "seed_column": self.image.seed_column,
                "seed": self.image.seed,
            }
        elif self.task == "image-text-to-text" and self.image is not None:
            identity["prompt"]["image_column"] = self.prompt.image_column
            identity["image"] = {"max_side": self.image.max_side}
        # Only when set, so the outputs of jobs without structured output keep their identity.
        if self.output_schema is not None:
            identity["output_schema"] = dict(self.output_schema)
        if self.prompt.schema_column is not None:
            identity["prompt"]["schema_column"] = self.prompt.schema_column
        if self.samples != 1:
            identity["samples"] = self.samples
        if self.embedding_dtype != "float32":  # only when set: the output's column type
            identity["embedding_dtype"] = self.embedding_dtype
        if self.score:  # only when set: the score columns are part of every shard's schema
            identity["score"] = [scorer.describe() for scorer in self.score]
        return identity


def _endpoint_identity(endpoint: EndpointSpec) -> dict[str, Any]:
    if endpoint.url is not None:
        # A url is a location, like an input path: the same server may move to another port.
        # What it serves is not known without asking it, so only the kind of endpoint counts.
        return {"kind": "url"}
    if endpoint.local is not None:
        model = endpoint.local.get("model_id", endpoint.local.get("model"))
        return {"local": True, "model": model}
    return {"namespace": endpoint.namespace, "name": endpoint.name}


# --------------------------------------------------------------------------------------------------
# Loading


def load_spec(path: str | Path, *, output_override: str | None = None) -> JobSpec:
    """Read and validate the YAML job spec at ``path``.

    ``output_override`` (the CLI's ``--output DIR``) replaces ``output.path``. The job's name
    defaults to the file's stem.
    """
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(file, "(file)", f"no such file (relative to {Path.cwd()})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(file, "(file)", f"cannot read it: {exc}") from None
    try:
        data = yaml.load(text, Loader=_SpecLoader)  # a SafeLoader subclass: no arbitrary objects
    except (_DuplicateKey, _AliasBomb) as exc:
        raise SpecError(file, exc.path, exc.problem) from None
    except yaml.YAMLError as exc:
        raise _yaml_error(file, exc) from None
    if data is None:
        raise SpecError(file, "(top level)", "the file is empty; expected a mapping of job keys")
    spec = parse_spec(data, file=file, default_name=Path(path).stem)
    if output_override is not None:
        problem = _output_path_problem(str(output_override))
        if problem is not None:
            raise SpecError(file, "--output", problem)
        spec = replace(spec, output=replace(spec.output, path=str(output_override)))
    return spec


class _DuplicateKey(Exception):
    def __init__(self, path: str, problem: str) -> None:
        super().__init__(problem)
        self.path = path
        self.problem = problem


class _AliasBomb(Exception):
    def __init__(self, path: str, problem: str) -> None:
        super().__init__(problem)
        self.path = path
        self.problem = problem


#: How many nodes YAML aliases may add to a spec once expanded (a "billion laughs" file adds billions).
MAX_ALIAS_EXPANSION = 10_000


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing a key given twice in one mapping and aliases that expand too far.

    PyYAML keeps the last of two equal keys without a word, so a job would silently run with half of
    what its file says. The check walks the composed node tree first, where key paths and line
    numbers are still known. Keys brought in by a ``<<`` merge may be overridden, as YAML intends.

    An alias shares its node in the composed tree, but everything that walks the loaded spec sees it
    expanded: a few lines of nested aliases make billions of values. Before anything is constructed,
    the tree's expanded size is counted (each node once per path reaching it, memoised per node, so the
    count itself is cheap), and a file whose aliases add more than :data:`MAX_ALIAS_EXPANSION` nodes,
    or an alias inside its own anchor, is refused.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        _refuse_alias_bombs(node)
        _refuse_duplicate_keys(node, "", set())
        return super().construct_document(node)


def _refuse_alias_bombs(root: yaml.Node) -> None:
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            line = node.start_mark.line + 1
            raise _AliasBomb(f"line {line}", "an alias refers to the node that contains it (a recursive structure); "
                                             "a job spec cannot use one")
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(size(item) for item in node.value)
        open_nodes.discard(key)
        sizes[key] = total
        if total - len(sizes) > MAX_ALIAS_EXPANSION:  # more nodes expanded than the file holds, by far
            raise _AliasBomb(
                "(yaml)",
                f"its aliases (*name) expand to more than {MAX_ALIAS_EXPANSION:,} extra values; a spec "
                "needs few: refused, as a file that grows without limit when read (a 'billion laughs')",
            )
        return total

    size(root)


def _refuse_duplicate_keys(node: yaml.Node, path: str, seen: set[int]) -> None:
    if id(node) in seen:  # an alias to a node already checked (or to one of its parents)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_lines: dict[tuple[str, Any], int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key_path = path
            if isinstance(key_node, yaml.ScalarNode):
                key_path = f"{path}.{key_node.value}" if path else str(key_node.value)
                key = (key_node.tag, key_node.value)
                line = key_node.start_mark.line + 1
                if key in first_lines:
                    raise _DuplicateKey(
                        key_path,
                        f"is given twice (lines {first_lines[key]} and {line}); YAML would keep only the last, "
                        "silently dropping the other: keep one",
                    )
                first_lines[key] = line
            _refuse_duplicate_keys(value_node, key_path, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _refuse_duplicate_keys(item, f"{path}[{index}]", seen)


def _yaml_error(file: str, exc: yaml.YAMLError) -> SpecError:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    detail = f"{context}, {problem}" if context else problem
    if mark is not None:
        return SpecError(file, f"line {mark.line + 1}, column {mark.column + 1}", f"invalid YAML: {detail}")
    return SpecError(file, "(yaml)", f"invalid YAML: {detail}")


def parse_spec(data: Any, *, file: str | None = None, default_name: str = "job") -> JobSpec:
    """Validate a loaded spec mapping and build the :class:`JobSpec`. ``file`` only labels errors."""
    return _Parser(file).job(data, default_name)


# --------------------------------------------------------------------------------------------------
# Validation. One small parser object so that every check knows the file it reports against.



def _keys(spec_class: type) -> tuple[str, ...]:
    """The spec keys of a section whose keys are its config class's fields, one to one."""
    return tuple(f.name for f in dataclasses.fields(spec_class))


def _default(spec_class: type, name: str) -> Any:
    """The default ``spec_class`` declares for field ``name``: the parser's only source of defaults."""
    for f in dataclasses.fields(spec_class):
        if f.name == name and f.default is not dataclasses.MISSING:
            return f.default
    raise KeyError(f"{spec_class.__name__}.{name} has no plain default")


# `file` and `raw` record where the spec came from; they are not keys a spec may set.
_MAX_SAMPLES = 10_000
_JOB_KEYS = tuple(key for key in _keys(JobSpec) if key not in ("file", "raw", "endpoints", "shard"))
# The input section names its kind by its key (parquet, jsonl or dataset), so it is not one to one.
_INPUT_KINDS = ("parquet", "dataset", "jsonl", "openai_batch")
_INPUT_KEYS = (*_INPUT_KINDS, "id_column", "limit", "keep_columns", "allow_empty")
#: The task of a job reading an OpenAI batch file, implied by ``input.openai_batch``.
OPENAI_BATCH_TASK = "openai-batch"
#: The id column of an OpenAI batch file: each request line's ``custom_id``.
OPENAI_BATCH_ID = "custom_id"
_DATASET_KEYS = _keys(DatasetSpec)
_PROMPT_KEYS = _keys(PromptSpec)
_IMAGE_KEYS = _keys(ImageSpec)
# The tasks that take an image section, and the keys each takes, from the task registry.
_IMAGE_KEYS_BY_TASK = {kind.name: kind.image_keys for kind in TASK_KINDS.values() if kind.image_keys}
# Every name a route uses for its output token limit; a job may only use its own route's name.
_TOKEN_LIMIT_PARAMETERS = tuple(
    dict.fromkeys(k.token_limit_parameter for k in TASK_KINDS.values() if k.token_limit_parameter)
)
# The toolkit's documented text-to-image parameters, and what each must be.
_TEXT_TO_IMAGE_PARAMETERS = {
    "negative_prompt": "a string",
    "num_inference_steps": "a positive integer",
    "guidance_scale": "a number",
    "width": "a positive integer",
    "height": "a positive integer",
}
_SEED_MAX = 2**63 - 1
_ENDPOINT_KEYS = _keys(EndpointSpec)


def _default_label(kind: str, url: str | None, local: Any, name: str | None, index: int) -> str:
    """How an endpoint of the list form is named when it has no ``label``: its name, host or place."""
    if kind == "name" and name:
        return name
    if kind == "url" and url:
        import yarl

        host = yarl.URL(url)
        return f"{host.host}:{host.port}" if host.port else str(host.host)
    if isinstance(local, Mapping) and local.get("name"):
        return str(local["name"])
    return f"endpoint-{index}"


def _url_label_forms(url: str) -> list[str]:
    """A url's labels, shortest first: host:port, then with its path, its query, its scheme."""
    import yarl

    u = yarl.URL(url)
    host = f"{u.host}:{u.port}" if u.port else str(u.host)
    path = u.raw_path.rstrip("/")
    query = f"?{u.raw_query_string}" if u.raw_query_string else ""
    return [host, host + path, host + path + query, f"{u.scheme}://{host}{path}{query}"]


def _distinct_url_labels(endpoints: list[EndpointSpec], *, given: list[bool]) -> list[EndpointSpec]:
    """Urls on one host and port get default labels that tell them apart: each the shortest form of its
    url (host:port, then with the path...) that no other endpoint's label shares. Labels the spec gave
    are kept as they are."""
    forms = [_url_label_forms(e.url) if e.url is not None and not given[i] else None
             for i, e in enumerate(endpoints)]
    level = [0] * len(endpoints)

    def label(i: int) -> str | None:
        options = forms[i]
        return endpoints[i].label if options is None else options[level[i]]

    changed = True
    while changed:
        changed = False
        labels = [label(i) for i in range(len(endpoints))]
        for i, options in enumerate(forms):
            if options is not None and level[i] + 1 < len(options) and labels.count(labels[i]) > 1:
                level[i] += 1
                changed = True
    return [e if forms[i] is None else dataclasses.replace(e, label=label(i)) for i, e in enumerate(endpoints)]


_LIFECYCLE_KEYS = ("api_url", "scale", "ready_timeout", "on_finish", "idle_backstop", "price_per_replica_hour")
_SCALE_KEYS = _keys(ScaleSpec)
_BUDGET_KEYS = _keys(BudgetSpec)
_CONCURRENCY_KEYS = _keys(ConcurrencySpec)
_RETRY_KEYS = _keys(RetrySpec)
_OUTPUT_KEYS = _keys(OutputSpec)

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


class _Parser:
    """Builds the config objects from a loaded mapping; every check reports against ``file``."""

    def __init__(self, file: str | None) -> None:
        self.file = file

    def error(self, key: str, problem: str) -> SpecError:
        return SpecError(self.file, key, problem)

    # -- the sections --------------------------------------------------------------------------

    def job(self, data: Any, default_name: str) -> JobSpec:
        if not isinstance(data, Mapping):
            raise self.error("(top level)", f"expected a mapping of job keys, got {_describe(data)}")
        self.keys(data, "", _JOB_KEYS)
        batch_file = isinstance(data.get("input"), Mapping) and "openai_batch" in data["input"]
        # A job on an OpenAI batch file needs neither task nor prompt: its request lines carry both.
        no_prompt = batch_file or data.get("task") == OPENAI_BATCH_TASK  # (the latter is refused just below)
        for required in ("input", "endpoint") if no_prompt else ("task", "input", "prompt", "endpoint"):
            if required not in data:
                raise self.error(required, "is required")

        name = self.string(data, "name", default=default_name)
        if "/" in name or "\\" in name or name in (".", ".."):
            raise self.error("name", f"expected a plain name without path separators, got {name!r}")
        kind = self.task(data.get("task", OPENAI_BATCH_TASK if batch_file else None))
        self.batch_task(kind, batch_file)
        task = kind.name
        prompt = self.prompt(data["prompt"], kind) if kind.takes_prompt else self.no_prompt(data)
        parameters = self.parameters(data.get("parameters"), kind)
        output_schema = self.output_schema(data.get("output_schema"), kind, prompt, parameters)
        output = self.output(data.get("output"), name)
        return JobSpec(
            name=name,
            task=task,
            input=self.input(data["input"]),
            prompt=prompt,
            parameters=parameters,
            **self.endpoint_list(data),
            budget=self.budget(data.get("budget")),
            concurrency=self.concurrency(data.get("concurrency")),
            retries=self.retries(data.get("retries")),
            packing=self.packing(data.get("packing"), kind),
            embedding_dtype=self.embedding_dtype(data, kind),
            request_timeout=self.duration(data, "request_timeout", default=_default(JobSpec, "request_timeout")),
            max_answer_bytes=self.size(data, "max_answer_bytes", default=None),
            outage_timeout=self.duration(data, "outage_timeout", default=_default(JobSpec, "outage_timeout")),
            failure_threshold=self.fraction(data, "failure_threshold", default=_default(JobSpec, "failure_threshold")),
            output=output,
            image=self.image(data.get("image"), kind),
            output_schema=output_schema,
            samples=self.samples(data, kind),
            shards=self.integer(data, "shards", default=None, minimum=1),
            score=self.delegated(parse_score_spec, data.get("score")),
            notify=self.delegated(parse_notify_spec, data.get("notify")),
            file=self.file,
            raw=data,
        )

    def task(self, value: Any) -> TaskKind:
        names = tuple(TASK_KINDS)
        if not isinstance(value, str):
            raise self.error("task", f"expected one of {', '.join(names)}, got {_describe(value)}")
        if value not in TASK_KINDS:
            raise self.error("task", f"expected one of {', '.join(names)}, got {value!r}{_suggest(value, names)}")
        return TASK_KINDS[value]

    def batch_task(self, kind: TaskKind, batch_file: bool) -> None:
        """``input.openai_batch`` and task ``openai-batch`` go together (the task may be left out)."""
        if batch_file and kind.name != OPENAI_BATCH_TASK:
            raise self.error(
                "task",
                f"is {kind.name}, but input.openai_batch requests name their own route (their `url`); "
                f"leave task out (it is {OPENAI_BATCH_TASK}) or read another input",
            )
        if not batch_file and kind.name == OPENAI_BATCH_TASK:
            raise self.error("task", f"{OPENAI_BATCH_TASK} reads an OpenAI batch file: set input.openai_batch")

    def no_prompt(self, data: Mapping[str, Any]) -> PromptSpec:
        if "prompt" in data:
            raise self.error(
                "prompt", "does not apply to an input.openai_batch job: each request line's body is sent as it is"
            )
        return PromptSpec()

    def parameters(self, data: Any, kind: TaskKind) -> dict[str, Any]:
        """The route's parameters, passed through, once the ones batchrun owns or the route ignores are refused."""
        if data is None:
            return {}
        if not isinstance(data, Mapping):
            raise self.error("parameters", f"expected a mapping of the route's parameters, got {_describe(data)}")
        for key in data:
            if not isinstance(key, str):
                raise self.error("parameters", f"expected string parameter names, got {key!r}")
        if data.get("stream"):
            raise self.error("parameters.stream", "is not supported: batchrun reads whole answers")
        if kind.name == "text-to-image":
            self.text_to_image_parameters(data)
        for key in kind.reserved_parameters:
            if key in data:
                raise self.error(f"parameters.{key}", f"is set by batchrun itself for task {kind.name}; remove it")
        own = kind.token_limit_parameter
        for key in _TOKEN_LIMIT_PARAMETERS:
            if key in data and own is not None and key != own:
                # The route would ignore it without a word, and every answer would run to the server's default.
                raise self.error(
                    f"parameters.{key}",
                    f"task {kind.name} sends to {_route_name(kind)}, which takes {own}; "
                    f"{'remove it' if own in data else 'rename it'}",
                )
        self.per_row_seed(data.get("seed"), kind)
        return dict(data)

    def delegated(self, parse: Any, data: Any) -> Any:
        """A section parsed by its own module, which raises ``ValueError((key, problem))``."""
        try:
            return parse(data)
        except ValueError as exc:
            key, problem = exc.args[0]
            raise self.error(key, problem) from None

    def per_row_seed(self, seed: Any, kind: TaskKind) -> None:
        """``parameters.seed`` is a number, or ``per-row`` / ``per-row:N``: each row its own stable seed."""
        from batchrun.tasks.samples import per_row_job_seed

        if not isinstance(seed, str):
            return
        if per_row_job_seed(seed) is None:
            raise self.error("parameters.seed", f"expected an integer, per-row or per-row:N, got {seed!r}")
        if kind.seed_path is None:
            owners = ", ".join(k.name for k in TASK_KINDS.values() if k.seed_path)
            raise self.error("parameters.seed", f"per-row seeds apply to tasks {owners}, not {kind.name}")

    def samples(self, data: Mapping[str, Any], kind: TaskKind) -> int:
        """``samples``: answers per input row, each drawn with its own seed."""
        samples = self.integer(data, "samples", default=_default(JobSpec, "samples"), minimum=1)
        if samples > _MAX_SAMPLES:
            raise self.error("samples", f"expected at most {_MAX_SAMPLES}, got {samples}")
        if samples > 1 and kind.seed_path is None:
            owners = ", ".join(k.name for k in TASK_KINDS.values() if k.seed_path)
            raise self.error("samples", f"several samples apply to tasks {owners}, not {kind.name}")
        image = data.get("image")
        if samples > 1 and isinstance(image, Mapping) and image.get("seed_column") is not None:
            raise self.error(
                "samples", "each sample is drawn with its own seed; image.seed_column would draw them all alike"
            )
        return samples

    def output_schema(
        self, data: Any, kind: TaskKind, prompt: PromptSpec, parameters: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """The job's JSON Schema, checked against its metaschema now: a bad schema costs nothing."""
        from batchrun.structured import SchemaProblem, load_schema

        wanted = "output_schema" if data is not None else "prompt.schema_column" if prompt.schema_column else None
        if wanted is None:
            return None
        if kind.schema_parameter is None:
            owners = ", ".join(k.name for k in TASK_KINDS.values() if k.schema_parameter)
            raise self.error(wanted, f"structured output applies to tasks {owners}, not {kind.name}")
        if data is not None and prompt.schema_column is not None:
            raise self.error("output_schema", "give one schema for the job or prompt.schema_column, not both")
        if kind.schema_parameter in parameters:
            raise self.error(
                f"parameters.{kind.schema_parameter}",
                f"is set by batchrun from {wanted} for task {kind.name}; remove it",
            )
        if data is None:
            return None
        try:
            return load_schema(data)
        except SchemaProblem as problem:
            raise self.error("output_schema", str(problem)) from None

    def input(self, data: Any) -> InputSpec:
        data = self.section(data, "input", _INPUT_KEYS)
        kind = self.exactly_one(data, "input", _INPUT_KINDS)
        path = None
        dataset = None
        if kind == "dataset":
            dataset = self.dataset(data["dataset"])
        else:
            path = self.string(data, kind, prefix="input.")
        limit = self.integer(data, "limit", prefix="input.", default=None, minimum=1)
        keep = data.get("keep_columns")
        keep_columns = None
        if keep is not None:
            if not isinstance(keep, list) or not all(isinstance(c, str) and c for c in keep):
                raise self.error("input.keep_columns", f"expected a list of column names, got {_describe(keep)}")
            keep_columns = tuple(keep)
        allow_empty = data.get("allow_empty", InputSpec.allow_empty)
        if not isinstance(allow_empty, bool):
            raise self.error("input.allow_empty", f"expected true or false, got {_describe(allow_empty)}")
        id_column = self.string(data, "id_column", prefix="input.", default=None)
        if kind == "openai_batch":
            if id_column is not None:
                raise self.error("input.id_column", "does not apply to input.openai_batch: the ids are its custom_id")
            id_column = OPENAI_BATCH_ID
        return InputSpec(
            kind=kind,
            path=path,
            dataset=dataset,
            id_column=id_column,
            limit=limit,
            keep_columns=keep_columns,
            allow_empty=allow_empty,
        )

    def dataset(self, data: Any) -> DatasetSpec:
        if isinstance(data, str):
            # `dataset: user/name` is the common case; let it stand for `dataset: {path: user/name}`.
            data = {"path": data}
        data = self.section(data, "input.dataset", _DATASET_KEYS)
        if "path" not in data:
            raise self.error(
                "input.dataset.path", "is required (a Hub dataset id, a folder, or a builder like 'parquet')"
            )
        data_files = data.get("data_files")
        if data_files is not None and not _is_data_files(data_files):
            raise self.error(
                "input.dataset.data_files",
                f"expected a path, a list of paths, or a mapping of split to paths, got {_describe(data_files)}",
            )
        options = data.get("options")
        if options is None:
            options = {}
        elif not isinstance(options, Mapping):
            raise self.error(
                "input.dataset.options", f"expected a mapping of builder keywords, got {_describe(options)}"
            )
        prefix = "input.dataset."
        return DatasetSpec(
            path=self.string(data, "path", prefix=prefix),
            name=self.string(data, "name", prefix=prefix, default=None),
            split=self.string(data, "split", prefix=prefix, default=_default(DatasetSpec, "split")),
            data_files=data_files,
            data_dir=self.string(data, "data_dir", prefix=prefix, default=None),
            revision=self.string(data, "revision", prefix=prefix, default=None),
            options=dict(options),
        )

    def prompt(self, data: Any, kind: TaskKind) -> PromptSpec:
        data = self.section(data, "prompt", _PROMPT_KEYS)
        messages_column = self.messages_column(data, kind)
        source = self.exactly_one(data, "prompt", ("template", "column")) if messages_column is None else None
        template = column = None
        if source == "template":
            template = self.string(data, "template", prefix="prompt.")
            try:
                fields = _template_fields(template)
            except ValueError as exc:
                problem = f"expected a template with {{column}} placeholders: {exc}"
                raise self.error("prompt.template", problem) from None
            if not fields:
                raise self.error(
                    "prompt.template",
                    "expected at least one {column} placeholder; use prompt.column for a column as it is",
                )
        elif source == "column":
            column = self.string(data, "column", prefix="prompt.")
        system = self.string(data, "system", prefix="prompt.", default=None, allow_empty=True)
        if system is not None and not kind.takes_system:
            owners = " and ".join(k.name for k in TASK_KINDS.values() if k.takes_system)
            raise self.error("prompt.system", f"only applies to tasks {owners}, not {kind.name}")
        image_column = self.string(data, "image_column", prefix="prompt.", default=None)
        schema_column = self.string(data, "schema_column", prefix="prompt.", default=None)
        texts_column = self.string(data, "texts_column", prefix="prompt.", default=None)
        if (texts_column is None) == kind.takes_texts:
            which = "is required for" if kind.takes_texts else "only applies to task rerank, not"
            raise self.error("prompt.texts_column", f"{which} {kind.name} (the column of candidate texts)")
        if messages_column is not None and image_column is not None:
            raise self.error(
                "prompt.image_column",
                "does not apply with prompt.messages_column: a conversation carries its images as image parts "
                "of its messages' content",
            )
        if kind.image_column == "required" and image_column is None and messages_column is None:
            raise self.error(
                "prompt.image_column", f"is required for task {kind.name} (the input column holding the image)"
            )
        if kind.image_column == "forbidden" and image_column is not None:
            owners = " and ".join(k.name for k in TASK_KINDS.values() if k.image_column == "required")
            raise self.error("prompt.image_column", f"only applies to task {owners}, not {kind.name}")
        return PromptSpec(
            template=template, column=column, system=system, image_column=image_column,
            messages_column=messages_column,
            schema_column=schema_column,
            texts_column=texts_column,
        )

    def messages_column(self, data: Mapping[str, Any], kind: TaskKind) -> str | None:
        """``prompt.messages_column``: the conversation is the whole prompt, so nothing else may build one."""
        if "messages_column" not in data:
            return None
        if not kind.takes_messages:
            owners = " and ".join(k.name for k in TASK_KINDS.values() if k.takes_messages)
            raise self.error("prompt.messages_column", f"only applies to tasks {owners}, not {kind.name}")
        both = [key for key in ("template", "column") if key in data]
        if both:
            raise self.error(
                "prompt.messages_column",
                f"is the whole prompt (each row's conversation); remove prompt.{' and prompt.'.join(both)}, "
                "or drop messages_column to build a one-turn prompt from the row",
            )
        name: str = self.string(data, "messages_column", prefix="prompt.")
        return name

    def image(self, data: Any, kind: TaskKind) -> ImageSpec | None:
        task = kind.name
        if not kind.image_keys:
            if data is not None:
                raise self.error("image", f"only applies to tasks {' and '.join(_IMAGE_KEYS_BY_TASK)}, not {task}")
            return None
        if data is None:
            return ImageSpec()
        data = self.section(data, "image", _IMAGE_KEYS)
        allowed = kind.image_keys
        for key in data:
            if key not in allowed:
                owner = next(t for t, keys in _IMAGE_KEYS_BY_TASK.items() if key in keys)
                raise self.error(
                    f"image.{key}", f"only applies to task {owner}, not {task}; expected one of {', '.join(allowed)}"
                )
        fmt = data.get("format", _default(ImageSpec, "format"))
        if isinstance(fmt, str) and fmt.lower() == "jpg":
            fmt = "jpeg"
        if not isinstance(fmt, str) or fmt.lower() not in IMAGE_FORMATS:
            hint = _suggest(fmt.lower(), IMAGE_FORMATS) if isinstance(fmt, str) else ""
            raise self.error("image.format", f"expected one of {', '.join(IMAGE_FORMATS)}, got {_describe(fmt)}{hint}")
        seed = self.integer(data, "seed", prefix="image.", default=_default(ImageSpec, "seed"), minimum=0)
        if seed > _SEED_MAX:
            raise self.error("image.seed", f"expected a non-negative integer below 2**63, got {seed}")
        return ImageSpec(
            format=fmt.lower(),
            seed_column=self.string(data, "seed_column", prefix="image.", default=None),
            seed=seed,
            max_side=self.integer(data, "max_side", prefix="image.", default=None, minimum=1),
            base_dir=self.string(data, "base_dir", prefix="image.", default=None),
        )

    def text_to_image_parameters(self, parameters: Mapping[str, Any]) -> None:
        if "seed" in parameters:
            raise self.error(
                "parameters.seed",
                "is set per row for text-to-image: name a column with image.seed_column, or let batchrun "
                "derive each row's seed from its id (change image.seed to draw a different set)",
            )
        for key, expected in _TEXT_TO_IMAGE_PARAMETERS.items():
            if key not in parameters:
                continue
            value = parameters[key]
            if expected == "a string":
                ok = isinstance(value, str)
            elif expected == "a number":
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            else:
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            if not ok:
                raise self.error(f"parameters.{key}", f"expected {expected}, got {_describe(value)}")

    def endpoint_list(self, job: Mapping[str, Any]) -> dict[str, Any]:
        """``endpoint:`` as one mapping (one endpoint, as always) or a list (several, multi-endpoint).

        With the list form, ``endpoint_defaults`` gives keys every item gets unless it sets its own, and
        ``mixed_models`` allows endpoints serving different models.
        """
        data = job["endpoint"]
        mixed = job.get("mixed_models", False)
        if not isinstance(mixed, bool):
            raise self.error("mixed_models", f"expected true or false, got {_describe(mixed)}")
        defaults = job.get("endpoint_defaults")
        if not isinstance(data, list):
            for key in ("endpoint_defaults", "mixed_models"):
                if key in job:
                    raise self.error(key, "only applies when endpoint is a list of endpoints")
            return {"endpoint": self.endpoint(data)}
        if not data:
            raise self.error("endpoint", "expected at least one endpoint in the list")
        if defaults is not None:
            self.section(defaults, "endpoint_defaults", _LIFECYCLE_KEYS)
        endpoints = []
        for index, item in enumerate(data):
            where = f"endpoint[{index}]"
            item = self.section(item, where, _ENDPOINT_KEYS)
            if defaults and "url" not in item:
                item = {**defaults, **item}
            endpoints.append(self.endpoint(item, where=where, index=index))
        endpoints = _distinct_url_labels(endpoints, given=["label" in item for item in data])
        labels = [e.label for e in endpoints]
        for index, label in enumerate(labels):
            if label in labels[:index]:
                raise self.error(f"endpoint[{index}].label", f"{label!r} names two endpoints; give each its own label")
        return {"endpoint": endpoints[0], "endpoints": tuple(endpoints), "mixed_models": mixed,
                "endpoint_defaults": dict(defaults) if defaults else None}

    # One of the longer checks: the three ways to name an endpoint and the keys each allows are read together.
    def endpoint(self, data: Any, *, where: str = "endpoint", index: int | None = None) -> EndpointSpec:
        data = self.section(data, where, _ENDPOINT_KEYS)
        kind = self.exactly_one(data, where, ("url", "local", "name"))
        prefix = where + "."
        label = self.string(data, "label", prefix=prefix, default=None)
        url = local = name = namespace = None
        if kind == "url":
            url = self.string(data, "url", prefix=prefix)
            if not re.match(r"^https?://[^/\s]+", url):
                raise self.error(f"{prefix}url", f"expected an http:// or https:// URL, got {_no_userinfo(url)!r}")
            for key in _LIFECYCLE_KEYS:
                if key in data:
                    raise self.error(
                        f"{prefix}{key}",
                        "only applies to an endpoint given by name or local; "
                        "batchrun does not manage the lifecycle of a url",
                    )
        elif kind == "local":
            local = data["local"]
            if local is None:
                local = {}
            if not isinstance(local, Mapping):
                raise self.error(
                    f"{prefix}local", f"expected a mapping of emulator settings (or {{}}), got {_describe(local)}"
                )
            local = dict(local)
        else:
            name = self.string(data, "name", prefix=prefix)
            if "namespace" not in data:
                raise self.error(
                    f"{prefix}namespace",
                    "is required with endpoint.name (the user or organization that owns the endpoint)",
                )
        if "namespace" in data:
            if kind != "name":
                raise self.error(f"{prefix}namespace", "only applies together with endpoint.name")
            namespace = self.string(data, "namespace", prefix=prefix)

        api_url = self.string(data, "api_url", prefix=prefix, default=None)
        if api_url is not None:
            api_url = api_url.rstrip("/")
            if not re.match(r"^https?://", api_url) or not api_url.endswith("/v2"):
                raise self.error(
                    f"{prefix}api_url",
                    f"expected the control plane's base URL ending in /v2, got {_no_userinfo(api_url)!r}",
                )
        send_token = self.boolean(data, "send_token", prefix=prefix)
        if url is not None:
            self.token_url(url, f"{prefix}url", send_token, f"{prefix}send_token")
        if api_url is not None:  # huggingface_hub sends the token to every control-plane call
            self.token_url(api_url, f"{prefix}api_url", send_token, f"{prefix}send_token", always=True)
        on_finish = data.get("on_finish")
        if on_finish is not None and on_finish not in ON_FINISH:
            hint = _suggest(on_finish, ON_FINISH) if isinstance(on_finish, str) else ""
            raise self.error(f"{prefix}on_finish", f"expected one of {', '.join(ON_FINISH)}, got {on_finish!r}{hint}")
        price = self.number(data, "price_per_replica_hour", prefix=prefix, default=None, minimum=0.0)
        return EndpointSpec(
            url=url,
            local=local,
            name=name,
            namespace=namespace,
            api_url=api_url,
            scale=self.scale(data.get("scale")),
            ready_timeout=self.duration(
                data, "ready_timeout", prefix=prefix, default=_default(EndpointSpec, "ready_timeout")
            ),
            on_finish=on_finish,
            idle_backstop=self.duration(
                data, "idle_backstop", prefix=prefix, default=_default(EndpointSpec, "idle_backstop")
            ),
            price_per_replica_hour=price,
            send_token=send_token,
            label=label if label is not None or index is None else _default_label(kind, url, local, name, index),
        )

    def scale(self, data: Any) -> ScaleSpec | None:
        if data is None:
            return None
        data = self.section(data, "endpoint.scale", _SCALE_KEYS)
        prefix = "endpoint.scale."
        for key in _SCALE_KEYS:
            if key not in data:
                raise self.error(prefix + key, "is required")
        low = self.integer(data, "min_replica", prefix=prefix, minimum=0)
        high = self.integer(data, "max_replica", prefix=prefix, minimum=1)
        if low > high:
            raise self.error("endpoint.scale.min_replica", f"expected at most max_replica ({high}), got {low}")
        return ScaleSpec(min_replica=low, max_replica=high)

    def budget(self, data: Any) -> BudgetSpec:
        if data is None:
            return BudgetSpec()
        data = self.section(data, "budget", _BUDGET_KEYS)
        return BudgetSpec(
            max_usd=self.number(data, "max_usd", prefix="budget.", default=None, minimum=0.0, strict=True),
            deadline=self.duration(data, "deadline", prefix="budget.", default=None),
        )

    def concurrency(self, data: Any) -> ConcurrencySpec:
        if data is None:
            return ConcurrencySpec()
        data = self.section(data, "concurrency", _CONCURRENCY_KEYS)
        high = self.integer(data, "max", prefix="concurrency.", default=_default(ConcurrencySpec, "max"), minimum=1)
        initial = self.integer(
            data, "initial", prefix="concurrency.", default=min(_default(ConcurrencySpec, "initial"), high), minimum=1
        )
        if initial > high:
            raise self.error("concurrency.initial", f"expected at most concurrency.max ({high}), got {initial}")
        return ConcurrencySpec(max=high, initial=initial)

    def packing(self, data: Any, kind: TaskKind) -> PackingSpec:
        """``packing``: only for the tasks that send several rows per request."""
        if data is None:
            return PackingSpec()
        if not kind.packs:
            owners = ", ".join(k.name for k in TASK_KINDS.values() if k.packs)
            raise self.error("packing", f"applies to tasks {owners}, not {kind.name}")
        data = self.section(data, "packing", _keys(PackingSpec))
        return PackingSpec(max_rows=self.integer(data, "max_rows", prefix="packing.", default=None, minimum=1),
                           max_tokens=self.integer(data, "max_tokens", prefix="packing.", default=None, minimum=1))

    def embedding_dtype(self, data: Mapping[str, Any], kind: TaskKind) -> str:
        """``embedding_dtype``: float32 (the default) or float16, for feature-extraction only."""
        if "embedding_dtype" not in data:
            return "float32"
        if kind.name != "feature-extraction":
            raise self.error("embedding_dtype", f"applies to task feature-extraction, not {kind.name}")
        value = data["embedding_dtype"]
        if value not in ("float32", "float16"):
            raise self.error("embedding_dtype", f"expected float32 or float16, got {_describe(value)}")
        dtype: str = value
        return dtype

    def retries(self, data: Any) -> RetrySpec:
        if data is None:
            return RetrySpec()
        data = self.section(data, "retries", _RETRY_KEYS)
        p = "retries."
        defaults = RetrySpec()
        base = self.number(data, "backoff_base", prefix=p, default=defaults.backoff_base, minimum=0.0)
        cap = self.number(data, "backoff_cap", prefix=p, default=defaults.backoff_cap, minimum=0.0)
        if cap < base:
            raise self.error("retries.backoff_cap", f"expected at least backoff_base ({base:g}), got {cap:g}")
        return RetrySpec(
            max_attempts=self.integer(data, "max_attempts", prefix=p, default=defaults.max_attempts, minimum=1),
            backoff_base=base,
            backoff_cap=cap,
            max_retry_after=self.number(
                data, "max_retry_after", prefix=p, default=defaults.max_retry_after, minimum=0.0
            ),
            budget_ratio=self.fraction(data, "budget_ratio", prefix=p, default=defaults.budget_ratio),
            invalid_output=self.integer(data, "invalid_output", prefix=p, default=defaults.invalid_output, minimum=0),
        )

    def output(self, data: Any, job_name: str) -> OutputSpec:
        if data is None:
            data = {}
        data = self.section(data, "output", _OUTPUT_KEYS)
        return OutputSpec(
            path=self.output_path(data, job_name),
            shard_rows=self.integer(
                data, "shard_rows", prefix="output.", default=_default(OutputSpec, "shard_rows"), minimum=1
            ),
            shard_bytes=self.size(data, "shard_bytes", prefix="output.", default=_default(OutputSpec, "shard_bytes")),
            push_to_hub=self.push_to_hub(data.get("push_to_hub")),
        )

    def push_to_hub(self, data: Any) -> PushSpec | None:
        if data is None:
            return None
        from batchrun.publish.names import name_problem, repo_problem

        p = "output.push_to_hub."
        data = self.section(data, "output.push_to_hub", _keys(PushSpec))
        repo = self.string(data, "repo", prefix=p)
        for key, problem in (("repo", repo_problem(repo)),
                             ("config", name_problem(data.get("config", "default"), "config")),
                             ("split", name_problem(data.get("split", "train"), "split"))):
            if problem is not None:
                raise self.error(p + key, problem)
        flags = {}
        for key in ("private", "include_failed", "send_token"):
            flags[key] = self.boolean(data, key, prefix=p)
        endpoint = self.string(data, "endpoint", prefix=p, default=None)
        if endpoint is not None:  # huggingface_hub sends the token to every Hub call
            if not re.match(r"^https?://[^/\s]+", endpoint):
                raise self.error(p + "endpoint", f"expected an http:// or https:// URL, got {_no_userinfo(endpoint)!r}")
            self.token_url(endpoint, p + "endpoint", flags["send_token"], p + "send_token", always=True)
        return PushSpec(
            repo=repo, config=data.get("config", "default"), split=data.get("split", "train"),
            every=self.duration(data, "every", prefix=p, default=None),
            endpoint=endpoint, **flags,
        )

    def output_path(self, data: Mapping[str, Any], job_name: str) -> str:
        # Without a path, results go to out/<job name>, the layout the sample jobs use.
        path: str = self.string(data, "path", prefix="output.", default=f"out/{job_name}")
        problem = _output_path_problem(path)
        if problem is not None:
            raise self.error("output.path", problem)
        return path

    # -- shapes --------------------------------------------------------------------------------

    def boolean(self, data: Mapping[str, Any], key: str, *, prefix: str = "") -> bool:
        value = data.get(key, False)
        if not isinstance(value, bool):
            raise self.error(prefix + key, f"expected true or false, got {_describe(value)}")
        return value

    def token_url(self, url: str, key: str, send_token: bool, opt_in_key: str, *, always: bool = False) -> None:
        """Refuse a url with credentials in it, and one the HF token must not reach: plain http beyond
        loopback when it would be sent (``send_token``, or ``always`` for huggingface_hub's calls), a
        host other than Hugging Face's unless ``send_token`` (``always``; a plain url then goes without it)."""
        from batchrun.transport import token_problem

        if urllib.parse.urlsplit(url).username is not None or "@" in urllib.parse.urlsplit(url).netloc:
            raise self.error(key, (
                f"{_no_userinfo(url)!r} has credentials in it (user:password@), which would be stored in job.json, "
                "summary.json and a published dataset card; remove them. batchrun sends the Hugging Face token "
                "(HF_TOKEN, or `hf auth login`) as a Bearer token: to give it to a host other than Hugging Face's, "
                f"set {opt_in_key}: true (https only)"))
        problem = token_problem(url, send_token=send_token)
        if problem is None:
            return
        if url.lower().startswith("http://") and (send_token or always):
            raise self.error(key, f"{problem}; use https (the token never goes over plain http beyond loopback)")
        if always:
            raise self.error(key, f"{problem} ({opt_in_key}: true), and huggingface_hub sends it on every call")

    def section(self, data: Any, key: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
        if not isinstance(data, Mapping):
            raise self.error(key, f"expected a mapping with keys among {', '.join(allowed)}, got {_describe(data)}")
        self.keys(data, key + ".", allowed)
        return data

    def keys(self, data: Mapping[str, Any], prefix: str, allowed: tuple[str, ...]) -> None:
        for key in data:
            if key not in allowed:
                label = key if isinstance(key, str) else repr(key)
                hint = _suggest(key, allowed) if isinstance(key, str) else ""
                raise self.error(
                    prefix + label, f"unknown key{hint or ''}; expected one of {', '.join(allowed)}"
                )

    def exactly_one(self, data: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str:
        present = [c for c in choices if c in data]
        if len(present) != 1:
            got = "none" if not present else " and ".join(present)
            raise self.error(key, f"expected exactly one of {', '.join(choices)}, got {got}")
        return present[0]

    # -- scalars -------------------------------------------------------------------------------
    # Each takes the mapping and the key so the error names the full path; a missing key (or an
    # explicit null) gets the default, and a missing key with no default is "required".

    _REQUIRED: Any = object()

    def string(
        self, data: Mapping[str, Any], key: str, *, prefix: str = "", default: Any = _REQUIRED,
        allow_empty: bool = False,
    ) -> Any:
        value = data.get(key)
        if value is None:
            if default is _Parser._REQUIRED:
                raise self.error(prefix + key, "is required" if key not in data else "expected a string, got null")
            return default
        if not isinstance(value, str) or (not value and not allow_empty):
            raise self.error(prefix + key, f"expected a non-empty string, got {_describe(value)}")
        return value

    def integer(
        self, data: Mapping[str, Any], key: str, *, prefix: str = "", default: Any = _REQUIRED,
        minimum: int | None = None,
    ) -> Any:
        value = data.get(key)
        kind = "a positive integer" if minimum == 1 else "a non-negative integer" if minimum == 0 else "an integer"
        if value is None:
            if default is _Parser._REQUIRED:
                raise self.error(prefix + key, "is required")
            return default
        # bool is an int in Python; `limit: yes` is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(prefix + key, f"expected {kind}, got {_describe(value)}")
        if minimum is not None and value < minimum:
            raise self.error(prefix + key, f"expected {kind}, got {value}")
        return value

    def number(
        self, data: Mapping[str, Any], key: str, *, prefix: str = "", default: Any = _REQUIRED,
        minimum: float | None = None,
        strict: bool = False,
    ) -> Any:
        value = data.get(key)
        if value is None:
            if default is _Parser._REQUIRED:
                raise self.error(prefix + key, "is required")
            return default
        kind = "a positive number" if strict else "a non-negative number" if minimum == 0.0 else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.error(prefix + key, f"expected {kind}, got {_describe(value)}")
        if minimum is not None and (value < minimum or (strict and value <= minimum)):
            raise self.error(prefix + key, f"expected {kind}, got {value}")
        return float(value)

    def fraction(
        self, data: Mapping[str, Any], key: str, *, prefix: str = "", default: Any = _REQUIRED,
    ) -> Any:
        value = data.get(key)
        if value is None:
            if default is _Parser._REQUIRED:
                raise self.error(prefix + key, "is required")
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise self.error(prefix + key, f"expected a share between 0 and 1 (like 0.5), got {_describe(value)}")
        return float(value)

    def duration(
        self, data: Mapping[str, Any], key: str, *, prefix: str = "", default: Any = _REQUIRED,
    ) -> Any:
        value = data.get(key)
        if value is None:
            if default is _Parser._REQUIRED:
                raise self.error(prefix + key, "is required")
            return default
        seconds = parse_duration(value)
        if seconds is None or seconds <= 0:
            raise self.error(
                prefix + key,
                f"expected a positive duration in seconds or like '90s', '20m', '6h', '1h30m', got {_describe(value)}",
            )
        return seconds

    def size(
        self, data: Mapping[str, Any], key: str, *, prefix: str = "", default: Any = _REQUIRED,
    ) -> Any:
        value = data.get(key)
        if value is None:
            if default is _Parser._REQUIRED:
                raise self.error(prefix + key, "is required")
            return default
        size = parse_size(value)
        if size is None or size <= 0:
            raise self.error(
                prefix + key, f"expected a positive size in bytes or like '64MB', '1GiB', got {_describe(value)}"
            )
        return size


def _no_userinfo(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@``, for messages."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1***@", url)


def answer_cap(spec: JobSpec) -> int:
    """The largest answer a job reads: ``max_answer_bytes``, or the task's default (an image is larger)."""
    if spec.max_answer_bytes is not None:
        return spec.max_answer_bytes
    return DEFAULT_MAX_IMAGE_ANSWER_BYTES if spec.task == "text-to-image" else DEFAULT_MAX_ANSWER_BYTES


def parse_duration(value: Any) -> float | None:
    """Seconds in ``value`` (a number, ``"90"``, ``"90s"``, ``"1h30m"``), or ``None`` if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if not isinstance(value, str):
        return None
    text = value.strip().lower().replace(" ", "")
    try:
        return float(text)
    except ValueError:
        pass
    if not text or _DURATION_PART.sub("", text):
        return None
    return sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(text))


def parse_size(value: Any) -> int | None:
    """Bytes in ``value`` (an int, ``"64MB"``, ``"1GiB"``), or ``None`` if it is not a size."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        return None
    match = _SIZE.fullmatch(value.strip())
    if not match:
        return None
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[(unit or "b").lower()])


def _template_fields(template: str) -> tuple[str, ...]:
    """The column names a ``str.format`` template uses; ValueError for anything but plain names."""
    names: list[str] = []
    for _literal, name, _spec, _conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise ValueError("positional placeholders like {} or {0} have no column; name the column, like {topic}")
        if any(ch in name for ch in ".["):
            raise ValueError(f"{{{name}}} uses attribute or index access; use a plain column name")
        if name not in names:
            names.append(name)
    return tuple(names)


def _is_data_files(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if isinstance(value, list):
        return all(isinstance(v, str) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_data_files(v) and not isinstance(v, Mapping) for k, v in value.items())
    return False


def _route_name(kind: TaskKind) -> str:
    label = "the chat route" if kind.route.rstrip("/").endswith("/chat/completions") else "the generation route"
    return f"{label} (POST {kind.route})"


#: A URL's scheme and "://" (s3://, gs://, hf://, file://...).
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _output_path_problem(path: str) -> str | None:
    """Why ``path`` cannot be the output folder: it must name a folder of its own."""
    last = path.strip().replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    if not path.strip():
        return "expected a folder for the results, got an empty path"
    if _URL.match(path.strip()):
        # Path() would make "s3://bucket/x" a local folder "s3:/bucket/x": refused, until object storage is supported.
        return (f"expected a local folder, got the URL {path!r}: object storage is not supported yet; write to a "
                "local (or mounted) folder and copy it, or push it with `batchrun push`")
    if last in ("", ".", ".."):
        # The output folder gets a manifest, shards and a lock of its own; `.` would scatter them
        # among the user's files (and a fresh run would clear them).
        return f"expected a folder of the job's own, like out/{{job name}}, got {path!r}; name a folder"
    return None


def _suggest(word: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{value!r} (a boolean)"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)
