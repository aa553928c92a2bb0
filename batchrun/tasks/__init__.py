"""Tasks: how one row becomes a request, and how a 200 answer becomes output columns.

A task knows the wire format of one route (protocols.md §1, §2) and nothing about sending,
retrying or writing. Rows that cannot make a request (empty prompt, a template that does not render,
an input image that does not decode) fail in :meth:`Task.prepare` with a non-retryable
:class:`~batchrun.errors.RequestFailed`, before anything is sent.

    text-generation      TextGenerationTask   POST /                     text out
    chat-completion      ChatCompletionTask   POST /v1/chat/completions  text out
    text-to-image        TextToImageTask      POST / (Accept: image/*)   image bytes out, stored unchanged
    image-text-to-text   VisionChatTask       POST /v1/chat/completions  image + text in, text out
    openai-batch         OpenAIBatchTask      POST the line's url        an OpenAI batch request, answer kept whole
    feature-extraction   EmbeddingTask        POST /embed (or /v1/embeddings)  a pack of texts in, a vector each
    rerank               RerankTask           POST /rerank               a query and its candidates, scores and ranks
    text-classification  ClassificationTask   POST /predict              a pack of texts in, labels and scores each

chat-completion and image-text-to-text also take a whole conversation per row
(``prompt.messages_column``, :mod:`batchrun.tasks.conversation`).

Every fact about a task that more than one module needs (its route, the endpoint tasks that can
serve it, which spec keys apply) is declared once, in :data:`TASK_KINDS`. This module is light (no
pyarrow, no Pillow): the spec parser reads the registry, and ``batchrun validate`` and ``--help``
must stay fast. The task classes and output schemas load on first use.

    base.py            PreparedRequest, the Task protocol, prompts, reading answers
    text.py            TextGenerationTask, ChatCompletionTask, OUTPUT_SCHEMA
    vision.py          VisionChatTask, VISION_OUTPUT_SCHEMA
    text_to_image.py   TextToImageTask
    provider_images.py ProviderImageTask: text-to-image in an Inference Provider's own route shape
    conversation.py    a row's conversation checked and turned into chat messages
    openai_batch.py    OpenAIBatchTask, BATCH_OUTPUT_SCHEMA
    structured.py      StructuredTask: a text task whose answers follow a JSON Schema
    samples.py         SampledTask: several samples per row, each with its own seed
    tei.py             EmbeddingTask, RerankTask, ClassificationTask (Text Embeddings Inference)
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from batchrun.lazy import lazy_attributes
from batchrun.task_kinds import TASK_KINDS, TaskKind, task_kind
from batchrun.tasks.base import (
    PreparedRequest,
    Task,
    join_url,
    placeholder_column_problem,
    prompt_column_problem,
    render_prompt,
)
from batchrun.tasks.conversation import messages_column_problem

if TYPE_CHECKING:
    from batchrun.spec import ImageSpec, JobSpec
    from batchrun.tasks.openai_batch import BATCH_OUTPUT_SCHEMA, OpenAIBatchTask
    from batchrun.tasks.tei import ClassificationTask, EmbeddingTask, RerankTask
    from batchrun.tasks.text import OUTPUT_SCHEMA, ChatCompletionTask, TextGenerationTask
    from batchrun.tasks.text_to_image import TextToImageTask
    from batchrun.tasks.vision import VISION_OUTPUT_SCHEMA, VisionChatTask

__all__ = [
    "BATCH_OUTPUT_SCHEMA",
    "OUTPUT_SCHEMA",
    "TASK_KINDS",
    "VISION_OUTPUT_SCHEMA",
    "ChatCompletionTask",
    "ClassificationTask",
    "EmbeddingTask",
    "OpenAIBatchTask",
    "PreparedRequest",
    "RerankTask",
    "Task",
    "TaskKind",
    "TextGenerationTask",
    "TextToImageTask",
    "VisionChatTask",
    "build_task",
    "join_url",
    "make_task",
    "messages_column_problem",
    "placeholder_column_problem",
    "prompt_column_problem",
    "render_prompt",
    "task_kind",
]


def make_task(spec: JobSpec) -> Task:
    """The task object for a validated job spec.

    Every check a task needs (parameters the route refuses, keys that do not apply) is made by the
    spec parser, so this does not fail for a spec that :func:`~batchrun.spec.parse_spec` accepted, with
    one exception: text-to-image with ``provider: auto`` raises ValueError, as its route is not known
    until preflight has read the Hub's mapping and pinned the provider.
    """
    module_name, class_name = task_kind(spec.task).implementation.split(":")
    serverless = all(e.per_token for e in spec.all_endpoints)  # billed per token: OpenAI's routes and forms
    if serverless and spec.task == "text-generation":
        module_name, class_name = "batchrun.tasks.text", "CompletionsTask"
    if serverless and spec.task == "text-to-image":  # the pinned provider's own route through the router
        module_name, class_name = "batchrun.tasks.provider_images", "ProviderImageTask"
    task_class = getattr(importlib.import_module(module_name), class_name)
    task: Task = task_class.from_spec(spec)
    if any(e.per_token for e in spec.all_endpoints):  # innermost hook: it sees (and bills) every answer
        from batchrun.tasks.billed import BilledTask

        target = spec.endpoint
        task = BilledTask(task, mode=target.mode, discount=target.batch.discount if target.batch else 0.5,
                          per_image=spec.task == "text-to-image")
    seed = spec.parameters.get("seed")
    from batchrun.spec import per_row_job_seed

    per_row = per_row_job_seed(seed)
    if spec.samples > 1:
        from batchrun.tasks.samples import SampledTask

        job_seed = seed if isinstance(seed, int) else per_row if per_row is not None else (
            spec.image.seed if spec.image is not None else 0)
        task = SampledTask(task, job_seed=job_seed)
    elif per_row is not None:  # each row its own stable seed (with samples, each sample has one already)
        from batchrun.tasks.samples import PerRowSeedTask

        task = PerRowSeedTask(task, job_seed=per_row)
    if spec.output_schema is not None or spec.prompt.schema_column is not None:
        from batchrun.structured import OutputSchema
        from batchrun.tasks.structured import StructuredTask

        schema = OutputSchema(
            schema=dict(spec.output_schema) if spec.output_schema is not None else None,
            per_row=spec.prompt.schema_column,
        )
        task = StructuredTask(task, schema, job_seed=seed if isinstance(seed, int) else per_row,
                              openai_form=serverless)
    if len(spec.all_endpoints) > 1:  # which endpoint answered each row (the dispatcher fills it in)
        from batchrun.tasks.answered_by import AnsweredByTask

        task = AnsweredByTask(task)
    if spec.score:  # outermost: its columns join the data schema before the first row
        from pathlib import Path

        from batchrun.tasks.scored import ScoredTask

        # A user's scorer module is found installed, beside the spec, or in the working directory.
        search = (str(Path(spec.file).resolve().parent),) if spec.file and Path(spec.file).exists() else ()
        task = ScoredTask(task, spec.score, (*search, str(Path.cwd())))
    return task


def build_task(
    name: str,
    *,
    template: str | None = None,
    column: str | None = None,
    system: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    image_column: str | None = None,
    image: ImageSpec | None = None,
) -> Task:
    """The task a job spec with these prompt, parameters and image keys would run (tests, benchmarks).

    The keys go through the spec parser, so anything a spec refuses is refused here too, as a
    :class:`~batchrun.errors.SpecError` (a ValueError).
    """
    from batchrun.spec import parse_spec

    keys = {"template": template, "column": column, "system": system, "image_column": image_column}
    prompt = {key: value for key, value in keys.items() if value is not None}
    data: dict[str, Any] = {
        "task": name,
        "input": {"parquet": "input.parquet"},
        "prompt": prompt,
        "parameters": dict(parameters or {}),
        "endpoint": {"url": "http://127.0.0.1:1"},
    }
    if image is not None:
        kind = TASK_KINDS.get(name)
        image_keys = kind.image_keys if kind is not None else ()
        data["image"] = {key: getattr(image, key) for key in image_keys if getattr(image, key) is not None}
    return make_task(parse_spec(data, file="<build_task>"))


# The task classes and schemas import pyarrow (and Pillow): load them on first use.
_LAZY = {
    "OUTPUT_SCHEMA": "batchrun.tasks.text",
    "TextGenerationTask": "batchrun.tasks.text",
    "ChatCompletionTask": "batchrun.tasks.text",
    "VISION_OUTPUT_SCHEMA": "batchrun.tasks.vision",
    "VisionChatTask": "batchrun.tasks.vision",
    "TextToImageTask": "batchrun.tasks.text_to_image",
    "BATCH_OUTPUT_SCHEMA": "batchrun.tasks.openai_batch",
    "OpenAIBatchTask": "batchrun.tasks.openai_batch",
    "EmbeddingTask": "batchrun.tasks.tei",
    "RerankTask": "batchrun.tasks.tei",
    "ClassificationTask": "batchrun.tasks.tei",
}


__getattr__ = lazy_attributes(globals(), _LAZY)
