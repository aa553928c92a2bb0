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
- Each key is declared once, on its config field (:func:`batchrun.spec._shape.key`): its shape, its
  default and what it is for. The parser reads keys through it, and :func:`json_schema` (``batchrun
  schema``) is derived from it.
- ``image`` holds the image options of the two image tasks (see :class:`ImageSpec`); a key that
  does not apply to the job's task is an error, like an unknown one.
"""

from batchrun.spec._model import (
    DEFAULT_IDLE_BACKSTOP,
    DEFAULT_MAX_ANSWER_BYTES,
    DEFAULT_MAX_IMAGE_ANSWER_BYTES,
    DEFAULT_OUTAGE_TIMEOUT,
    DEFAULT_READY_TIMEOUT,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_SHARD_BYTES,
    IMAGE_FORMATS,
    INPUT_KINDS,
    ON_FINISH,
    OPENAI_BATCH_ID,
    OPENAI_BATCH_TASK,
    BudgetSpec,
    ConcurrencySpec,
    DatasetSpec,
    EndpointSpec,
    ImageSpec,
    InputSpec,
    JobSpec,
    LimitsSpec,
    OutputSpec,
    PackingSpec,
    PromptSpec,
    PushSpec,
    RetrySpec,
    ScaleSpec,
    StepSpec,
    answer_cap,
)
from batchrun.spec._parse import load_spec, parse_spec
from batchrun.spec._schema import json_schema
from batchrun.spec._units import PER_ROW, parse_duration, parse_size, per_row_job_seed
from batchrun.spec._yaml import MAX_ALIAS_EXPANSION

__all__ = [
    "DEFAULT_IDLE_BACKSTOP",
    "DEFAULT_MAX_ANSWER_BYTES",
    "DEFAULT_MAX_IMAGE_ANSWER_BYTES",
    "DEFAULT_OUTAGE_TIMEOUT",
    "DEFAULT_READY_TIMEOUT",
    "DEFAULT_REQUEST_TIMEOUT",
    "DEFAULT_SHARD_BYTES",
    "IMAGE_FORMATS",
    "INPUT_KINDS",
    "MAX_ALIAS_EXPANSION",
    "ON_FINISH",
    "OPENAI_BATCH_ID",
    "OPENAI_BATCH_TASK",
    "PER_ROW",
    "BudgetSpec",
    "ConcurrencySpec",
    "DatasetSpec",
    "EndpointSpec",
    "ImageSpec",
    "InputSpec",
    "JobSpec",
    "LimitsSpec",
    "OutputSpec",
    "PackingSpec",
    "PromptSpec",
    "PushSpec",
    "RetrySpec",
    "ScaleSpec",
    "StepSpec",
    "answer_cap",
    "json_schema",
    "load_spec",
    "parse_duration",
    "parse_size",
    "parse_spec",
    "per_row_job_seed",
]
