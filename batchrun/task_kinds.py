"""What batchrun knows about each task, declared once: its route, the endpoints that can serve it, and
which spec keys apply. The spec parser, the endpoints and the task classes all read this registry; it
imports nothing of batchrun, so nothing it serves can import it back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["TASK_KINDS", "TaskKind", "task_kind"]


@dataclass(frozen=True, kw_only=True)
class TaskKind:
    """What batchrun knows about one task, declared once for the spec, the runner and the task."""

    name: str
    """The spec's ``task`` value, e.g. ``chat-completion``."""
    route: str
    """The path requests go to, relative to the endpoint's base URL."""
    endpoint_tasks: tuple[str, ...]
    """Inference Endpoint ``model.task`` values whose servers answer this route."""
    emulator_task: str
    """What the built-in emulator serves for a job of this task (``endpoint: {local: ...}``)."""
    takes_system: bool
    """Whether ``prompt.system`` applies."""
    takes_messages: bool = False
    """Whether ``prompt.messages_column`` (a column of chat conversations) applies."""
    takes_prompt: bool = True
    """Whether the job has a ``prompt`` section at all (an OpenAI batch file's requests carry their own)."""
    image_column: str
    """``"required"`` or ``"forbidden"``: whether ``prompt.image_column`` must be given."""
    image_keys: tuple[str, ...]
    """The ``image.*`` spec keys that apply; empty when the ``image`` section does not."""
    token_limit_parameter: str | None
    """The route's name for the output token limit (``max_new_tokens`` or ``max_tokens``), if any."""
    reserved_parameters: tuple[str, ...]
    """Parameters batchrun sets itself on every request; the spec may not set them."""
    implementation: str
    """``module:Class`` of the task class, imported when a task is built."""
    schema_parameter: str | None = None
    """Where the route takes a JSON Schema for structured output (TGI's ``grammar`` on ``/generate``,
    ``response_format`` on the chat route); None when the task has no structured output."""
    seed_path: tuple[str, ...] | None = None
    """Where the request body carries the sampling seed (``("parameters", "seed")`` or ``("seed",)``);
    None when batchrun does not set seeds for the task."""
    packs: bool = False
    """Whether a request carries several rows (TEI's batch routes; packing.py and the ``packing`` spec keys)."""
    takes_texts: bool = False
    """Whether ``prompt.texts_column`` (a column of candidate texts per row: rerank) is required."""
    provider_routes: tuple[str, ...] = ()
    """The Inference Providers whose own routes batchrun builds for this task through the router
    (tasks/provider_images.py); empty where the router's OpenAI routes serve it through any provider."""


TASK_KINDS: Mapping[str, TaskKind] = MappingProxyType(
    {
        kind.name: kind
        for kind in (
            TaskKind(
                name="text-generation",
                route="/",
                endpoint_tasks=("text-generation", "text2text-generation", "image-text-to-text"),
                emulator_task="text-generation",
                takes_system=False,
                image_column="forbidden",
                image_keys=(),
                token_limit_parameter="max_new_tokens",
                reserved_parameters=("details",),  # details=true carries finish_reason and token counts
                implementation="batchrun.tasks.text:TextGenerationTask",
                seed_path=("parameters", "seed"),
                schema_parameter="grammar",
            ),
            TaskKind(
                name="chat-completion",
                route="/v1/chat/completions",
                endpoint_tasks=("text-generation", "text2text-generation", "image-text-to-text", "conversational"),
                emulator_task="text-generation",
                takes_system=True,
                takes_messages=True,
                image_column="forbidden",
                image_keys=(),
                token_limit_parameter="max_tokens",
                reserved_parameters=("messages",),
                implementation="batchrun.tasks.text:ChatCompletionTask",
                seed_path=("seed",),
                schema_parameter="response_format",
            ),
            TaskKind(
                name="text-to-image",
                route="/",
                endpoint_tasks=("text-to-image",),
                emulator_task="text-to-image",
                takes_system=False,
                image_column="forbidden",
                image_keys=("format", "seed_column", "seed"),
                token_limit_parameter=None,
                reserved_parameters=("seed",),  # per row, from image.seed_column or image.seed
                implementation="batchrun.tasks.text_to_image:TextToImageTask",
                seed_path=("parameters", "seed"),
                provider_routes=("hf-inference", "nscale", "together"),
            ),
            TaskKind(
                name="image-text-to-text",
                route="/v1/chat/completions",
                endpoint_tasks=("image-text-to-text", "text-generation"),
                emulator_task="image-text-to-text",
                takes_system=True,
                takes_messages=True,
                image_column="required",
                image_keys=("max_side", "base_dir"),
                token_limit_parameter="max_tokens",
                reserved_parameters=("messages",),
                implementation="batchrun.tasks.vision:VisionChatTask",
                seed_path=("seed",),
                schema_parameter="response_format",
            ),
            TaskKind(
                # Each row is one request line of an OpenAI batch file (input.openai_batch), sent to the
                # OpenAI-compatible route its `url` names; `route` is the usual one, for the endpoint checks.
                name="openai-batch",
                route="/v1/chat/completions",
                endpoint_tasks=("text-generation", "text2text-generation", "image-text-to-text", "conversational"),
                emulator_task="text-generation",
                takes_system=False,
                takes_prompt=False,
                image_column="forbidden",
                image_keys=(),
                token_limit_parameter="max_tokens",
                reserved_parameters=("messages", "prompt"),
                implementation="batchrun.tasks.openai_batch:OpenAIBatchTask",
            ),
            # Text Embeddings Inference (tasks/tei.py). Its parameters go at the top level of the body.
            TaskKind(
                name="feature-extraction",
                route="/embed",  # or /v1/embeddings, when the endpoint url names it
                endpoint_tasks=("feature-extraction", "sentence-similarity", "sentence-embeddings"),
                emulator_task="feature-extraction",
                takes_system=False,
                image_column="forbidden",
                image_keys=(),
                token_limit_parameter=None,
                reserved_parameters=("inputs", "input"),
                implementation="batchrun.tasks.tei:EmbeddingTask",
                packs=True,
            ),
            TaskKind(
                name="rerank",
                route="/rerank",
                endpoint_tasks=("text-ranking", "sentence-ranking", "text-classification"),
                emulator_task="text-ranking",
                takes_system=False,
                image_column="forbidden",
                image_keys=(),
                token_limit_parameter=None,
                reserved_parameters=("query", "texts"),
                implementation="batchrun.tasks.tei:RerankTask",
                takes_texts=True,
            ),
            TaskKind(
                name="text-classification",
                route="/predict",
                endpoint_tasks=("text-classification",),
                emulator_task="text-classification",
                takes_system=False,
                image_column="forbidden",
                image_keys=(),
                token_limit_parameter=None,
                reserved_parameters=("inputs",),
                implementation="batchrun.tasks.tei:ClassificationTask",
                packs=True,
            ),
        )
    }
)
"""Every task batchrun runs, in the order the docs list them."""


def task_kind(name: str) -> TaskKind:
    """The registry entry for task ``name``; ValueError naming the known tasks for any other."""
    try:
        return TASK_KINDS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASK_KINDS)}") from None
