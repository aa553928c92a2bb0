"""The job's config objects: frozen dataclasses the rest of batchrun reads (the spec's shape)."""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from batchrun.notify import NotifySpec
from batchrun.scoring import ScorerSpec

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

#: The task of a job reading an OpenAI batch file, implied by ``input.openai_batch``.
OPENAI_BATCH_TASK = "openai-batch"
#: The id column of an OpenAI batch file: each request line's ``custom_id``.
OPENAI_BATCH_ID = "custom_id"

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


def answer_cap(spec: JobSpec) -> int:
    """The largest answer a job reads: ``max_answer_bytes``, or the task's default (an image is larger)."""
    if spec.max_answer_bytes is not None:
        return spec.max_answer_bytes
    return DEFAULT_MAX_IMAGE_ANSWER_BYTES if spec.task == "text-to-image" else DEFAULT_MAX_ANSWER_BYTES


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

