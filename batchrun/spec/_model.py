"""The job's config objects: frozen dataclasses the rest of batchrun reads (the spec's shape)."""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from batchrun.facts import IDLE_BACKSTOP_S, READY_TIMEOUT_S
from batchrun.facts import OPENAI_BATCH_ID as OPENAI_BATCH_ID  # the spec package names it too
from batchrun.notify import NotifySpec
from batchrun.scoring import BUILT_INS, ScorerSpec
from batchrun.spec._shape import Shape, key, spec_fields
from batchrun.task_kinds import TASK_KINDS

IMAGE_FORMATS = ("png", "jpeg", "webp")
ON_FINISH = ("pause", "scale-to-zero", "keep")

DEFAULT_READY_TIMEOUT = READY_TIMEOUT_S
DEFAULT_IDLE_BACKSTOP = IDLE_BACKSTOP_S
DEFAULT_SHARD_BYTES = 64 * 2**20
DEFAULT_REQUEST_TIMEOUT = 120.0
DEFAULT_OUTAGE_TIMEOUT = 600.0
#: The largest answer read from the endpoint (``max_answer_bytes``); a larger one fails its row.
DEFAULT_MAX_ANSWER_BYTES = 8 * 2**20
DEFAULT_MAX_IMAGE_ANSWER_BYTES = 64 * 2**20  # text-to-image: one image, raw

#: The task of a job reading an OpenAI batch file, implied by ``input.openai_batch``.
OPENAI_BATCH_TASK = "openai-batch"

# The shapes most keys share.
_TEXT = Shape("string")
_DURATION = Shape("duration")
_SIZE = Shape("size")
_FLAG = Shape("boolean")
_COUNT = Shape("integer", minimum=1)
_SHARE = Shape("fraction")
_SECONDS = Shape("number", minimum=0.0)

#: The largest ``image.seed`` (a seed is a signed 64-bit integer).
SEED_MAX = 2**63 - 1
#: The most answers one row may ask for (``samples``).
MAX_SAMPLES = 10_000

# The sections parsed by their own modules (scoring.py, notify.py), as JSON Schema.
_COLUMN = {"type": "string", "minLength": 1}
_STEPS_JSON = {"type": "array", "minItems": 1, "items": {
    "type": "object", "required": ["name"],
    "properties": {"name": {"type": "string", "minLength": 1}, "filter": {"type": "string", "minLength": 1}},
}}
_SCORE_JSON = {"type": "array", "items": {
    "type": "object",
    "properties": {
        **dict.fromkeys(BUILT_INS, _COLUMN),
        "regex": {"anyOf": [_COLUMN, {"type": "object", "properties": {"pattern": {"type": "string"}},
                                      "required": ["pattern"], "additionalProperties": False}]},
        "function": {"type": "string", "pattern": "^[^:]+:[^:]+$"},
        "columns": {"type": "array", "minItems": 1, "items": {"type": "string", "pattern": "^\\w+$"}},
    },
    "oneOf": [{"required": [name]} for name in (*BUILT_INS, "function")],
    "additionalProperties": False,
}}
_NOTIFY_JSON = {"type": "object", "properties": {
    "webhook": {"type": "string", "description": "an http(s) url, or ${ENV_VAR} naming one"},
    "attempts": {"type": "integer", "minimum": 1, "maximum": 10, "default": 3},
    "timeout": {"anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "string", "pattern": "^[0-9.]+s$"}],
                "default": "10s"},
}, "required": ["webhook"], "additionalProperties": False}


# --------------------------------------------------------------------------------------------------
# The config objects


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """A ``datasets`` input: what :func:`datasets.load_dataset` takes, read streamed.

    ``options`` holds any further builder keyword (``delimiter`` for CSV, ``columns`` for Parquet,
    ...); it is a separate mapping so that a typo among the known keys is still caught.
    """

    path: str = key(Shape("string", required=True), "a Hub dataset id, a folder, or a builder like 'parquet'")
    name: str | None = key(_TEXT, "the dataset's configuration", None)
    split: str = key(_TEXT, "the split to read", "train")
    data_files: Any = key(Shape("custom", json={"anyOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "string"}},
        {"type": "object", "additionalProperties": {"anyOf": [
            {"type": "string"}, {"type": "array", "items": {"type": "string"}}]}}]}),
        "a path, a list of paths, or a mapping of split to paths", None)
    data_dir: str | None = key(_TEXT, "a folder inside the dataset", None)
    revision: str | None = key(_TEXT, "a branch, tag or commit of a Hub dataset", None)
    options: Mapping[str, Any] = key(Shape("custom", json={"type": "object"}),
                                     "any further load_dataset keyword", default_factory=dict)


#: The input section names where its rows come from by its key (the others are InputSpec's fields).
INPUT_KINDS = ("parquet", "dataset", "jsonl", "openai_batch")


@dataclass(frozen=True, kw_only=True)
class InputSpec:
    """Where the rows come from. ``kind`` is ``parquet``, ``jsonl``, ``dataset`` or ``openai_batch``.

    ``openai_batch`` is a JSONL file of OpenAI Batch request lines (``custom_id``, ``method``, ``url``,
    ``body``); its ``id_column`` is always ``custom_id``, set by the parser.

    ``path`` is the Parquet/JSONL file, folder or glob (unset for a dataset, which uses
    ``dataset``). ``keep_columns`` of ``None`` keeps every input column in the output.
    ``allow_empty``: an input with no rows is a normal night for this job (exit 0), not a mistake (exit 2).

    ``kind`` is ``memory`` for rows handed over from Python (``batchrun.run(spec, input=...)``): then
    ``memory`` holds them as an Arrow table. It is not a spec key: a YAML file cannot name it.
    """

    kind: str
    path: str | None = None
    dataset: DatasetSpec | None = key(
        Shape("section", section=DatasetSpec, nullable=False, json={"type": "string", "minLength": 1}),
        "load_dataset arguments (or a dataset id, standing for {path: ID})", None)
    id_column: str | None = key(_TEXT, "a column of unique ids (default: the row number)", None)
    limit: int | None = key(_COUNT, "read only the first N rows", None)
    keep_columns: tuple[str, ...] | None = key(
        Shape("custom", json={"type": "array", "items": {"type": "string", "minLength": 1}}),
        "input columns copied to the output (default: all)", None)
    allow_empty: bool = key(_FLAG, "an input with no rows is normal (exit 0), not a mistake (exit 2)", False)
    memory: Any = field(default=None, compare=False, repr=False)  # kind memory: a pyarrow Table
    # Kind step: ``path`` is the previous step's output folder, and this its ``filter`` (not spec keys);
    # ``upstream_done`` (a threading.Event) is set when the previous step, running meanwhile, has ended:
    # until then its new shards are read as they are published. None: it has ended already.
    step_filter: str | None = None
    upstream_done: Any = field(default=None, compare=False, repr=False)


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

    template: str | None = key(_TEXT, "the prompt, with {column} placeholders", None)
    column: str | None = key(_TEXT, "a column used as the prompt as it is", None)
    system: str | None = key(Shape("string", allow_empty=True), "the chat system message (chat and vision)", None)
    image_column: str | None = key(_TEXT, "the input column holding the image (vision)", None)
    messages_column: str | None = key(_TEXT, "a column of whole conversations (chat and vision)", None)
    schema_column: str | None = key(_TEXT, "a column holding each row's JSON Schema (structured output)", None)
    texts_column: str | None = key(_TEXT, "rerank: a column holding each row's candidate texts (a list of strings)",
                                   None)

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

    format: str = key(Shape("custom", json={"anyOf": [
        {"enum": [*IMAGE_FORMATS, "jpg"]},
        {"type": "string", "pattern": "^([pP][nN][gG]|[jJ][pP][eE]?[gG]|[wW][eE][bB][pP])$"}]}),
        "text-to-image: the format asked for and stored (png, jpeg or webp)", "png")
    seed_column: str | None = key(_TEXT, "text-to-image: the column holding each row's seed", None)
    seed: int = key(Shape("custom", json={"type": "integer", "minimum": 0, "maximum": SEED_MAX}),
                    "text-to-image: the job's seed, from which each row's is derived", 0)
    max_side: int | None = key(_COUNT, "vision: shrink a larger input image to this longer side", None)
    base_dir: str | None = key(_TEXT, "vision: the folder relative image paths are looked up in", None)


@dataclass(frozen=True, kw_only=True)
class ScaleSpec:
    """Replica counts to set on a Dedicated Inference Endpoint for the job."""

    min_replica: int = key(Shape("integer", minimum=0, required=True), "replicas at least")
    max_replica: int = key(Shape("integer", minimum=1, required=True), "replicas at most")


#: The keys that say which kind of endpoint a block is: exactly one of them is given.
ENDPOINT_KINDS = ("url", "local", "name", "provider")


@dataclass(frozen=True, kw_only=True)
class PriceSpec:
    """What a serverless target charges: per token, in USD per million tokens (both keys), or per image and
    per megapixel (text-to-image through a provider; either or both, added up)."""

    input_per_mtok: float | None = key(Shape("number", minimum=0.0), "USD per 1M prompt tokens", None)
    output_per_mtok: float | None = key(Shape("number", minimum=0.0), "USD per 1M completion tokens", None)
    per_image: float | None = key(Shape("number", minimum=0.0), "USD per image (text-to-image)", None)
    per_megapixel: float | None = key(Shape("number", minimum=0.0), "USD per megapixel of each image (text-to-image)",
                                      None)


@dataclass(frozen=True, kw_only=True)
class LimitsSpec:
    """An endpoint's own rate limits per minute; limits its answers announce (``x-ratelimit-*``) need none."""

    rpm: int | None = key(_COUNT, "requests per minute this endpoint allows", None)
    tpm: int | None = key(_COUNT, "tokens per minute (prompt + max_tokens) this endpoint allows", None)


@dataclass(frozen=True, kw_only=True)
class BatchSpec:
    """How a target in ``mode: batch`` uses the provider's batch API (batchrun/batches/)."""

    max_requests: int = key(_COUNT, "requests per batch input file at most", 50_000)
    max_bytes: int = key(_SIZE, "bytes per batch input file at most", 200 * 1000 * 1000)
    poll_every: float = key(_DURATION, "how often running batches are asked for their state", 5.0)
    fallback_online_after: float | None = key(_DURATION, "rows still in batches this long before budget.deadline "
                                                         "are cancelled and sent online", None)
    discount: float = key(_SHARE, "the batch price as a share of the online price", 0.5)


#: How a serverless target is used: one request at a time, a provider's batch API, or its flex tier.
MODES = ("online", "batch", "flex")


@dataclass(frozen=True, kw_only=True)
class EndpointSpec:
    """Which server answers the requests, and what batchrun may do to its lifecycle.

    Exactly one of ``url`` (any TGI or OpenAI-compatible server, left alone), ``local`` (the
    built-in emulator; its dict goes to ``batchrun.emulator.EndpointConfig.from_dict``), ``name``
    (+ ``namespace``: a Dedicated Inference Endpoint) and ``provider`` (+ ``model``: the Inference
    Providers router) is set. A ``url`` with a ``model`` is an OpenAI-compatible API billed per token,
    its key read from the environment variable ``api_key_env``. ``on_finish`` of ``None``
    means "pause, unless the endpoint was already running". ``api_url`` of ``None`` means
    huggingface_hub's default control plane.
    """

    url: str | None = key(Shape("custom", json={"type": "string", "pattern": "^https?://[^/\\s]+"}),
                          "any TGI or OpenAI-compatible server, left alone", None)
    local: Mapping[str, Any] | None = key(Shape("custom", json={"type": "object"}),
                                          "the built-in emulator, with its settings (docs/emulator.md)", None)
    name: str | None = key(_TEXT, "a Dedicated Inference Endpoint, with namespace", None)
    namespace: str | None = key(Shape("string", nullable=False), "the user or organization owning endpoint.name",
                                None)
    api_url: str | None = key(Shape("custom", json={"type": "string", "pattern": "^https?://.*/v2/*$"}),
                              "the control plane's base URL, ending in /v2", None, lifecycle=True)
    scale: ScaleSpec | None = key(Shape("section", section=ScaleSpec), "replica counts during the job", None,
                                  lifecycle=True)
    ready_timeout: float = key(_DURATION, "the longest wait for the endpoint to be ready", DEFAULT_READY_TIMEOUT,
                               lifecycle=True)
    on_finish: str | None = key(Shape("choice", choices=ON_FINISH),
                                "what to do at the end (default: pause, unless it was already running)", None,
                                lifecycle=True)
    idle_backstop: float = key(_DURATION, "the endpoint's own idle timeout while the job runs",
                               DEFAULT_IDLE_BACKSTOP, lifecycle=True)
    price_per_replica_hour: float | None = key(_SECONDS, "for cost figures and budget.max_usd", None,
                                               lifecycle=True)
    #: How progress, the summary and the output's ``endpoint`` column name it among several (list form).
    label: str | None = key(_TEXT, "its name among several endpoints (list form)", None)
    #: Send the HF token to this endpoint's url (and ``api_url``) although it is not a Hugging Face host
    #: (transport.token_problem); never over plain http beyond loopback.
    send_token: bool = key(_FLAG, "send the Hugging Face token to this non-Hugging Face host (https only)", False)
    #: Serverless targets, billed per token (endpoints/providers.py).
    provider: str | None = key(_TEXT, "an Inference Providers provider (or auto, fastest, cheapest), with model",
                               None)
    model: str | None = key(_TEXT, "the model sent in each request's body (with provider, or a url's API)", None)
    router_url: str | None = key(Shape("custom", json={"type": "string", "pattern": "^(https?://.*/v1/*|local)$"}),
                                 "the router's base URL ending in /v1, or local for the built-in emulator", None)
    api_key_env: str | None = key(Shape("custom", json={"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"}),
                                  "the environment variable holding a url API's key", None)
    price: PriceSpec | None = key(Shape("section", section=PriceSpec),
                                  "per-token price, USD per 1M tokens (or per image, for text-to-image)", None)
    #: The lane's requests and tokens per minute, held by its rate gate (batchrun.rate).
    limits: LimitsSpec | None = key(Shape("section", section=LimitsSpec),
                                    "requests and tokens per minute to stay under", None)
    #: batch: the provider's batch API (half the price, within hours); flex: its cheaper synchronous tier.
    mode: str = key(Shape("choice", choices=MODES), "online, batch (the batch API) or flex (a cheaper tier)", "online")
    batch: BatchSpec | None = key(Shape("section", section=BatchSpec),
                                  "limits and polling of mode: batch (flex reads its discount)", None)

    @property
    def kind(self) -> str:
        """``url``, ``api``, ``local``, ``name`` or ``provider``: which way the endpoint was given.

        ``api`` is a url with a model: an OpenAI-compatible API billed per token."""
        if self.provider is not None:
            return "provider"
        if self.url is not None:
            return "api" if self.model is not None else "url"
        if self.local is not None:
            return "local"
        return "name"

    @property
    def per_token(self) -> bool:
        """Whether it is a serverless target billed per token (the router, or a url's API)."""
        return self.kind in ("provider", "api")


#: The keys that manage an endpoint's lifecycle: refused for a url, and the keys ``endpoint_defaults`` takes.
LIFECYCLE_KEYS = tuple(f.name for f in spec_fields(EndpointSpec) if f.metadata.get("lifecycle"))


@dataclass(frozen=True, kw_only=True)
class BudgetSpec:
    """Limits that stop a job early (resumably). ``None`` means no limit."""

    max_usd: float | None = key(Shape("number", minimum=0.0, strict=True), "stop before this spending (USD)", None)
    deadline: float | None = key(_DURATION, "stop before this long a run", None)


@dataclass(frozen=True, kw_only=True)
class ConcurrencySpec:
    """Adaptive concurrency: start at ``initial`` in-flight requests, never exceed ``max``."""

    max: int = key(_COUNT, "the adaptive limit's ceiling", 256)
    initial: int = key(_COUNT, "the adaptive limit's start (at most max)", 48)


@dataclass(frozen=True, kw_only=True)
class PackingSpec:
    """Rows per request for the tasks that take a batch of inputs (TEI's embed and predict routes):
    at most ``max_rows`` rows and about ``max_tokens`` tokens (estimated) per request. Unset: the
    server's own limits, read from its ``GET /info`` (``max_client_batch_size``), or found from its
    answers."""

    max_rows: int | None = key(_COUNT, "rows per request at most (default: the server's max_client_batch_size)",
                               None)
    max_tokens: int | None = key(_COUNT, "estimated tokens per request at most (default: the server's "
                                 "max_batch_tokens)", None)


@dataclass(frozen=True, kw_only=True)
class RetrySpec:
    """Retry policy knobs (reliability.md §2). Seconds for times; ``budget_ratio`` is a share."""

    max_attempts: int = key(_COUNT, "attempts per row per run", 5)
    backoff_base: float = key(_SECONDS, "full-jitter backoff base (seconds)", 0.5)
    backoff_cap: float = key(_SECONDS, "full-jitter backoff cap (seconds)", 30.0)
    max_retry_after: float = key(_SECONDS, "the longest Retry-After honoured (seconds)", 120.0)
    budget_ratio: float = key(_SHARE, "retries allowed per request sent", 0.1)
    # More tries for an answer that is not valid against the output schema, each with a fresh seed.
    # They count apart from max_attempts, which is for transport failures.
    invalid_output: int = key(Shape("integer", minimum=0),
                              "more tries for an answer not valid against the output schema", 2)


@dataclass(frozen=True, kw_only=True)
class PushSpec:
    """``output.push_to_hub``: publish the output as a dataset repo at the end of the run (docs/hub.md).

    ``every`` (seconds) also pushes during the run; ``endpoint`` is the Hub's base url (None:
    huggingface_hub's own, which honours ``HF_ENDPOINT``), e.g. the local emulator's.
    """

    repo: str = key(Shape("string", required=True), "the dataset repo ORG/NAME")
    private: bool = key(_FLAG, "create the repo private", False)
    config: str = key(_TEXT, "the repo's config the output goes to", "default")
    split: str = key(_TEXT, "the config's split the output goes to", "train")
    every: float | None = key(_DURATION, "also push during the run, this often", None)
    include_failed: bool = key(_FLAG, "also push the failed rows, as their own config", False)
    endpoint: str | None = key(Shape("custom", json={"type": "string", "pattern": "^https?://[^/\\s]+"}),
                               "the Hub's base url (default: huggingface_hub's)", None)
    # ``endpoint`` may be a host other than Hugging Face's (it receives the token)
    send_token: bool = key(_FLAG, "send the token to endpoint although it is not Hugging Face's (https only)", False)


@dataclass(frozen=True, kw_only=True)
class OutputSpec:
    """Where results go, and when a Parquet shard is closed and published."""

    path: str = key(_TEXT, "the output folder (default: out/<name>)")
    shard_rows: int = key(_COUNT, "a shard closes at this many rows", 10_000)
    shard_bytes: int = key(_SIZE, "a shard closes at this size", DEFAULT_SHARD_BYTES)
    push_to_hub: PushSpec | None = key(Shape("section", section=PushSpec),
                                       "publish the output as a dataset repo (docs/hub.md)", None)


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """A whole validated job. ``raw`` is the mapping as loaded (for the spec snapshot); ``file``
    is the spec's path, or ``None`` when it was built from a dict."""

    name: str = key(_TEXT, "the job's name (default: the file's stem)")
    task: str = key(Shape("choice", choices=tuple(TASK_KINDS)),
                    f"what the job asks (default: {OPENAI_BATCH_TASK} with input.openai_batch)")
    input: InputSpec = key(Shape("section", section=InputSpec, required=True), "where the rows come from")
    prompt: PromptSpec = key(Shape("section", section=PromptSpec, nullable=False),
                             "how a row becomes a prompt (not with input.openai_batch)")
    parameters: Mapping[str, Any] = key(Shape("custom", json={"type": "object"}),
                                        "passed to the route under its own names")
    endpoint: EndpointSpec = key(Shape("custom", required=True),
                                 "the server that answers: url, local, or name + namespace; or a list of them")
    budget: BudgetSpec = key(Shape("section", section=BudgetSpec), "limits that stop the job early (resumably)")
    concurrency: ConcurrencySpec = key(Shape("section", section=ConcurrencySpec), "the adaptive concurrency limit")
    retries: RetrySpec = key(Shape("section", section=RetrySpec), "the retry policy")
    packing: PackingSpec = key(Shape("section", section=PackingSpec),
                               "rows per request, for the tasks that send several (TEI)", default_factory=PackingSpec)
    embedding_dtype: str = key(Shape("choice", choices=("float32", "float16")),
                               "feature-extraction: how each embedding's values are stored", "float32")
    request_timeout: float = key(_DURATION, "the deadline of one request", DEFAULT_REQUEST_TIMEOUT)
    # The largest answer read; None: the task's default (answer_cap). A larger answer fails its row.
    max_answer_bytes: int | None = key(_SIZE, "the largest answer read (default: 8MiB, 64MiB for text-to-image)",
                                       None)
    # An endpoint unavailable this long stops the job (exit 3).
    outage_timeout: float = key(_DURATION, "an endpoint answering nothing this long stops the job",
                                DEFAULT_OUTAGE_TIMEOUT)
    failure_threshold: float | None = key(_SHARE, "stop when this share of recent rows fails", None)
    output: OutputSpec = key(Shape("section", section=OutputSpec), "where the results go")
    image: ImageSpec | None = key(Shape("section", section=ImageSpec), "image options (the image tasks only)", None)
    # Structured output: the JSON Schema every answer must follow (loaded and checked; see structured.py).
    output_schema: Mapping[str, Any] | None = key(
        Shape("custom", json={"type": ["object", "string"]}),
        "structured output: a JSON Schema every answer must follow, or the path of a .json file", None)
    # Answers drawn per input row, each with its own seed; outputs are keyed by (id, sample) (samples.py).
    samples: int = key(Shape("custom", json={"type": "integer", "minimum": 1, "maximum": MAX_SAMPLES}),
                       "answers per input row, each with its own seed", 1)
    # Scorers run on each finished row, their columns next to the answer (scoring.py).
    score: tuple[ScorerSpec, ...] = key(Shape("custom", json=_SCORE_JSON), "scorers run on each finished row", ())
    # Where a short summary is posted at the end of every run (notify.py).
    notify: NotifySpec | None = key(Shape("custom", json=_NOTIFY_JSON),
                                    "where a short summary is posted after every run", None)
    # Several endpoints (``endpoint:`` given as a list): all of them, ``endpoint`` being the first. Empty
    # for the mapping form, which means one endpoint exactly as it always did. Not a key of its own.
    endpoints: tuple[EndpointSpec, ...] = ()
    # Several endpoints may serve different models or revisions only when the spec says so.
    mixed_models: bool = key(_FLAG, "endpoints of the list form may serve different models or revisions", False)
    # Keys that apply to every endpoint of the list form that does not set its own.
    endpoint_defaults: Mapping[str, Any] | None = key(
        Shape("custom"), "lifecycle keys every endpoint of the list form gets unless it sets its own", None)
    # How many shards the job is split into, for ``--shard auto`` under a scheduler that does not say it
    # (a Kubernetes Indexed Job); ``--shard-count`` overrides it. None: the scheduler says, or --shard I/N.
    shards: int | None = key(_COUNT, "how many shards the job is split into, for --shard auto", None)
    # A job of several steps: each a job of its own (its name, task, prompt, endpoint...; job-level keys apply
    # unless it sets its own) reading the rows the step before it wrote, with a ``filter`` of those rows.
    steps: tuple[StepSpec, ...] = key(Shape("custom", json=_STEPS_JSON),
                                      "steps run in order, each reading the rows of the one before", ())
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
    if endpoint.per_token:  # where it is served may change; the model may not
        return {"kind": endpoint.kind, "model": endpoint.model}
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



@dataclass(frozen=True, kw_only=True)
class StepSpec:
    """One step of a job of several (``steps:``): its own job, writing ``OUTPUT/steps/<name>/``.

    ``job`` is the step as a job of its own. The first step reads the job's input; each later one
    reads the rows the step before it wrote (``job.input.kind`` is ``step``), those that pass
    ``filter`` (a condition over columns, or ``module:function``; see :mod:`batchrun.spec._filter`).
    A step with ``filter`` and no task sends nothing: it writes the rows that pass.
    """

    name: str
    job: JobSpec | None  # None: a step that only filters
    filter: str | None = None
